"""infinity-lightning: train, fine-tune and run Infinity bitwise visual autoregressive models.

Public names are imported lazily so that ``import infinity_lightning`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": "infinity_lightning.checkpoints",
    "load_transformer": "infinity_lightning.checkpoints",
    "save_tokenizer": "infinity_lightning.checkpoints",
    "save_transformer": "infinity_lightning.checkpoints",
    "InfinityPipeline": "infinity_lightning.pipeline",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infinity_lightning' has no attribute {name!r}")

"""LoRA adapters on a pipeline's transformer: :class:`LoraLoaderMixin`, part of
:class:`~infinity_lightning.pipeline.InfinityPipeline`.

Names follow diffusers; the work is done by :mod:`infinity_lightning.lora` (PEFT layers injected
into the transformer, PEFT-format adapter folders such as the ``<output_dir>/lora/`` that
``infinity-lightning fit`` writes for a recipe with ``model.lora``)::

    pipe = InfinityPipeline.from_pretrained("runs/quickstart", lora="runs/lora_quickstart/lora")
    pipe.load_lora("runs/style/lora", adapter_name="style", scale=0.8)   # a second adapter beside it
    pipe.set_adapters(["default", "style"], [1.0, 0.5])                  # which are active, at what scale
    pipe.unload_lora("style")                                            # or all of them: unload_lora()
    pipe.fuse_lora()                                                     # fold the active ones into the weights

An adapted Linear computes ``W x + sum_a scale_a * alpha_a / rank_a * B_a A_a x`` over the active
adapters.  Adapter weights stay fp32 on bf16 blocks (``dtype="bf16"`` pipelines); fusing into
bf16 blocks rounds the merged weights to bf16.  Unloading every adapter gives back exactly the
outputs of the transformer before the first adapter.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .io import PathLike
from . import lora as _lora

#: what ``from_pretrained(lora=...)`` takes: a folder, a list of folders, or ``{name: folder}``
LoraSources = Union[None, PathLike, Sequence[PathLike], Mapping[str, PathLike]]

__all__ = ["LoraLoaderMixin", "lora_sources"]


def lora_sources(lora: LoraSources) -> List[Tuple[Optional[str], PathLike]]:
    """``[(adapter name or None, folder), ...]`` of a ``lora=`` argument."""
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike)):
        return [(None, lora)]
    if isinstance(lora, Mapping):
        return [(str(name), path) for name, path in lora.items()]
    items = list(lora)
    bad = [p for p in items if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise TypeError(f"lora: expected adapter folders (paths), a list of them or {{name: folder}}, got {bad[0]!r}")
    return [(None, p) for p in items]


class LoraLoaderMixin:
    """LoRA methods of a pipeline holding a ``transformer`` (see the module docstring)."""

    transformer: nn.Module

    def load_lora(self, path: PathLike, adapter_name: Optional[str] = None, scale: float = 1.0) -> str:
        """Load the PEFT-format adapter folder ``path`` (``adapter_config.json`` +
        ``adapter_model.safetensors``) and activate it beside the adapters already loaded.

        ``adapter_name``: default ``"default"`` (``"default_1"``, ... when taken); ``scale``: its
        multiplier (0: off, 1: as trained).  Returns the adapter's name.  A folder that does not
        fit this transformer (other width, depth or targets) is an error naming the folder and
        the keys at fault.
        """
        return _lora.load_lora(self.transformer, path, adapter_name=adapter_name, scale=scale)

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     weights: Union[None, float, Sequence[float]] = None) -> None:
        """Make exactly ``adapter_names`` active (the others stay loaded, unused), with per-adapter
        scales ``weights`` (default: each keeps its scale)."""
        _lora.set_adapters(self.transformer, adapter_names, weights)

    def unload_lora(self, adapter_name: Optional[str] = None) -> None:
        """Remove adapter ``adapter_name``, or every adapter (``None``; nothing to do when none is
        loaded).  With no adapter left the transformer is the plain one again, bit for bit."""
        if adapter_name is None and not _lora.lora_configs(self.transformer):
            return
        _lora.unload_lora(self.transformer, adapter_name)

    def fuse_lora(self, adapter_names: Union[None, str, Sequence[str]] = None) -> List[str]:
        """Fold adapters into the transformer's weights (``W += scale * alpha / rank * B A``) and
        drop every adapter: the transformer is a plain one again (``save_pretrained`` writes it).
        ``adapter_names``: default the active ones, at their current scales.  Returns the names fused."""
        return _lora.merge_lora(self.transformer, adapter_names)

    def lora_adapters(self) -> Dict[str, Dict[str, Any]]:
        """``{name: {"rank", "alpha", "scale", "active", "trainable", "layers"}}`` of the loaded adapters."""
        return _lora.lora_adapters(self.transformer)

    def _check_no_adapters(self, what: str) -> None:
        names = list(_lora.lora_configs(self.transformer))  # no peft import for plain transformers
        if names:
            raise ValueError(f"{what}: the transformer carries LoRA adapters {names}; call fuse_lora() to fold them "
                             "into the weights, or unload_lora() to remove them, first")

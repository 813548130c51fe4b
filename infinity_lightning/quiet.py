"""Keep third-party progress output out of the way where it says nothing.

Hugging Face ``transformers`` draws a progress bar for every model it saves or loads ("Loading
weights", "Writing model shards"), even for a 90K-parameter text encoder read from a local folder
in milliseconds.  :func:`hf_progress_bars_off` turns those bars off for the duration of a load or
save; :func:`is_small_model` tells whether a local model folder is small enough that a bar is
noise (the loaders keep the bar for large models such as flan-t5-xl, where it shows progress).
Downloads from the Hub keep their own bars.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

__all__ = ["hf_progress_bars_off", "is_small_model", "SMALL_MODEL_BYTES"]

#: Model folders whose weight files add up to less than this load without a progress bar.
SMALL_MODEL_BYTES = 100 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


@contextlib.contextmanager
def hf_progress_bars_off(enabled: bool = True) -> Iterator[None]:
    """Switch ``transformers``' progress bars off inside the block (and back on after, when they
    were on); ``enabled=False`` leaves them as they are."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    if enabled and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and was_on:
            hf_logging.enable_progress_bar()


def is_small_model(folder: Union[str, os.PathLike]) -> bool:
    """Whether the weight files in ``folder`` add up to less than :data:`SMALL_MODEL_BYTES`
    (a folder that does not exist counts as small: the loader reports it)."""
    path = Path(folder)
    if not path.is_dir():
        return True
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return total < SMALL_MODEL_BYTES

"""Keep third-party progress output out of the way where it says nothing.

Hugging Face ``transformers`` draws a progress bar for every model it saves or loads ("Loading
weights", "Writing model shards"), even for a 90K-parameter text encoder read from a local folder
in milliseconds.  :func:`hf_progress_bars_off` turns those bars off for the duration of a load or
save; :func:`is_small_model` tells whether a local model folder is small enough that a bar is
noise (the loaders keep the bar for large models such as flan-t5-xl, where it shows progress).
Downloads from the Hub keep their own bars.

:func:`silence_known_noise` drops the warnings and log lines that say nothing a user can act on
(the command line calls it; a notebook may too).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["hf_progress_bars_off", "is_small_model", "is_small_module", "silence_known_noise", "SMALL_MODEL_BYTES", "QUIET_WARNINGS"]

#: Warnings that say nothing a user can act on: Lightning's own deprecated internals; the frozen
#: (eval-mode) helper networks of the modules, which are meant so; the validation step of recipes
#: without validation data; the batch-yielding datasets, which split their work per worker
#: themselves; the checkpoint folder of a resumed run (a new run never starts in a used one);
#: tqdm's notice that a notebook lacks ipywidgets.
QUIET_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"Found \d+ module\(s\) in eval mode",
                  r"You defined a `validation_step` but have no `val_dataloader`",
                  r"Your `IterableDataset` has `__len__` defined", r"Checkpoint directory .* exists and is not empty",
                  r"IProgress not found")


class _DropTips(logging.Filter):
    """Drops Lightning's advertisement lines (``💡 Tip: ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def silence_known_noise() -> None:
    """Filter :data:`QUIET_WARNINGS` and Lightning's advertisement tip (idempotent)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in target.filters):
            target.addFilter(_DropTips())

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


def is_small_module(module: Any) -> bool:
    """Whether ``module``'s parameters take less than :data:`SMALL_MODEL_BYTES` (as
    :func:`is_small_model` for a model in memory, before it is saved)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) < SMALL_MODEL_BYTES

"""Interrupted runs lose nothing: atomic checkpoints, checked resumes, exact data positions.

* :class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` of every recipe run: a checkpoint
  is written to a temporary file in its folder, flushed to disk and renamed over the target
  (:func:`infinity_lightning.io.atomic_write`), so a crash or ``SIGKILL`` leaves either the old
  file or the new one, never half of one.  Loading uses ``torch.load(weights_only=True)``: a
  checkpoint that would need to run code to unpickle is refused, and a truncated or corrupt
  file raises a :class:`~infinity_lightning.io.CheckpointError` naming it.
* :func:`verify_checkpoint` checks a checkpoint without loading its tensors (the zip directory
  and the CRC-32 of every record; for a distributed checkpoint folder, ``.metadata`` and
  ``meta.pt``); :func:`find_resume_checkpoint` returns the newest checkpoint of a folder that
  passes, skipping broken ones with a warning.  ``infinity-lightning fit ... --ckpt-path auto``
  (or ``ckpt_path: auto`` in a recipe) resumes from it, or starts afresh when there is none.
* :func:`make_data_resumable` gives a DataModule's training loader Lightning's ``state_dict`` /
  ``load_state_dict`` interface: a checkpoint taken in the middle of an epoch records how many
  batches of that epoch were trained on, and the resumed run skips exactly those, so it sees the
  batches the uninterrupted run would have seen (Lightning alone restarts the epoch's data).
* :func:`check_trainer_settings` refuses a recipe's accelerator, device count or precision when
  this machine lacks them, naming the ``trainer.*`` key (Lightning would fail deep inside, or
  quietly train fp16 recipes in bf16 on the CPU).
* :class:`LossLog` appends ``global_step loss`` per optimizer step to a text file, flushed per
  line, so the losses of a killed run survive it.

Distributed (sharded) checkpoints of ``ModelParallelStrategy`` / FSDP2 are folders written by
``torch.distributed.checkpoint`` and do not go through a ``CheckpointIO``; they are not atomic.
``torch.distributed.checkpoint`` writes the ``.metadata`` file after every shard and Lightning
writes ``meta.pt`` last, so :func:`verify_checkpoint` treats a folder that lacks either, or whose
``meta.pt`` is truncated, as incomplete and the resume falls back to an older checkpoint.

Fault injection for tests: with the environment variable
``INFINITY_LIGHTNING_FAULT_PAUSE_SAVE="<global_step>:<seconds>:<marker file>"``,
:class:`AtomicCheckpointIO` pauses after writing the temporary file of the checkpoint of that step
and before renaming it, and first writes the temporary file's path to the marker file, so a test
can kill the process exactly while a checkpoint is being written.
"""
from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback

from .io import CheckpointError, PathLike, atomic_write, safe_load

log = logging.getLogger(__name__)


__all__ = [
    "AtomicCheckpointIO",
    "FAULT_PAUSE_SAVE_ENV",
    "LossLog",
    "ResumableLoader",
    "check_trainer_settings",
    "find_resume_checkpoint",
    "make_data_resumable",
    "stale_temp_files",
    "use_atomic_checkpoints",
    "verify_checkpoint",
]

#: Environment variable of the checkpoint-writing fault hook (see the module docstring).
FAULT_PAUSE_SAVE_ENV = "INFINITY_LIGHTNING_FAULT_PAUSE_SAVE"
_DISTRIBUTED_META = "meta.pt"


# --------------------------------------------------------------------------------------------
# checking checkpoints
# --------------------------------------------------------------------------------------------
def _check_zip(path: Path) -> Optional[str]:
    """Why the ``torch.save`` zip file ``path`` is unusable, or ``None``.

    ``torch.save`` writes a zip archive whose central directory sits at the end of the file and
    whose records carry CRC-32 checksums: a file cut short has no readable directory, and a
    damaged record fails its checksum.  Every record is read (the cost of reading the file once).
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "is a zip archive without a data.pkl record (not a torch.save file)"
            bad = archive.testzip()
    except zipfile.BadZipFile as e:
        return f"is truncated or not a torch.save file ({e})"
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # zlib and short-read errors
        return f"is corrupt ({type(e).__name__}: {e})"
    if bad is not None:
        return f"is corrupt (record {bad} fails its CRC-32 check)"
    return None


def verify_checkpoint(path: PathLike) -> Optional[str]:
    """``None`` when ``path`` looks like a complete checkpoint, else the reason it does not.

    Files: a complete ``torch.save`` zip archive whose records pass their checksums.  Folders
    (distributed checkpoints): ``.metadata`` and a complete ``meta.pt``.  Nothing is unpickled,
    so the check is safe on untrusted files; :class:`AtomicCheckpointIO` loads with
    ``weights_only=True`` afterwards.
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        missing = [n for n in (".metadata", _DISTRIBUTED_META) if not (path / n).is_file()]
        if missing:
            return (f"is an incomplete distributed checkpoint folder (no {' and no '.join(missing)}; "
                    "it was probably interrupted while being written)")
        problem = _check_zip(path / _DISTRIBUTED_META)
        return None if problem is None else f"has a {_DISTRIBUTED_META} that {problem}"
    return _check_zip(path)


def stale_temp_files(folder: PathLike) -> List[Path]:
    """Temporary files of :func:`~infinity_lightning.io.atomic_write` left by interrupted saves."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(".*.tmp") if p.is_file())


def find_resume_checkpoint(folder: PathLike, pattern: str = "*.ckpt") -> Optional[Path]:
    """The newest checkpoint in ``folder`` that passes :func:`verify_checkpoint`, or ``None``.

    Candidates are the files and distributed-checkpoint folders matching ``pattern``, newest
    modification time first (``last.ckpt`` before a step checkpoint of the same time).  Broken
    ones are skipped with a warning naming them and the reason; temporary files of interrupted
    saves are reported (never used, never deleted: another process may still be writing one).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    stale = stale_temp_files(folder)
    if stale:
        log.warning("%s: %d temporary file(s) of interrupted checkpoint saves, not used for resuming (safe to "
                    "delete once no run writes to this folder): %s", folder, len(stale),
                    ", ".join(p.name for p in stale))

    def newest_first(p: Path):
        return (p.stat().st_mtime_ns, p.name.startswith("last"))

    candidates = sorted((p for p in folder.glob(pattern) if not p.name.startswith(".")), key=newest_first,
                        reverse=True)
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s %s; skipping it and trying an older one", path, problem)
    return None


# --------------------------------------------------------------------------------------------
# Lightning CheckpointIO
# --------------------------------------------------------------------------------------------
def _fault_pause(checkpoint: Dict[str, Any], tmp: str) -> None:
    spec = os.environ.get(FAULT_PAUSE_SAVE_ENV)
    if not spec:
        return
    step, seconds, marker = spec.split(":", 2)
    if int(checkpoint.get("global_step", -1)) != int(step) or os.path.exists(marker):
        return
    Path(marker).write_text(tmp)
    time.sleep(float(seconds))


def load_checkpoint_file(path: PathLike, map_location: Any = None) -> Dict[str, Any]:
    """Load a Lightning checkpoint file with ``weights_only=True`` (no code runs while unpickling).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, corrupt,
    refused as unsafe, or not a checkpoint dict.
    """
    path = Path(path)
    if path.is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} {problem}; resume from an older checkpoint "
                                  f"(`--ckpt-path auto` picks the newest complete one)")
    if map_location is None or callable(map_location):
        obj = safe_load(path, what="checkpoint")  # on the CPU; Lightning moves the states itself
    else:
        try:
            obj = torch.load(str(path), map_location=map_location, weights_only=True)
        except Exception as e:  # the same messages as safe_load
            safe_load(path, what="checkpoint")
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a Lightning checkpoint dict")
    return obj


class AtomicCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO with atomic saves and safe, checked loads.

    ``save_checkpoint`` writes through :func:`infinity_lightning.io.atomic_write` (temporary file
    in the target folder, fsync, ``os.replace``, fsync of the folder); ``load_checkpoint``
    verifies the archive and loads with ``weights_only=True``: Lightning checkpoints of this
    framework hold tensors, numbers, strings and plain containers only, which the restricted
    unpickler accepts.  A checkpoint that needs anything else is refused with a
    :class:`~infinity_lightning.io.CheckpointError` (Lightning's ``weights_only`` argument cannot
    turn the check off).
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: PathLike, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")

        def write(tmp: str) -> None:
            torch.save(checkpoint, tmp)
            _fault_pause(checkpoint, tmp)

        atomic_write(path, write)

    def load_checkpoint(self, path: PathLike, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location)

    def remove_checkpoint(self, path: PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def use_atomic_checkpoints(trainer_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``trainer_kwargs`` with an :class:`AtomicCheckpointIO` plugin added, unless the plugins
    already hold a ``CheckpointIO`` (a user's choice wins).  Returns a new dict."""
    out = dict(trainer_kwargs)
    plugins = out.get("plugins")
    plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, (list, tuple)) else [plugins])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    out["plugins"] = plugins
    return out


# --------------------------------------------------------------------------------------------
# exact data position on resume
# --------------------------------------------------------------------------------------------
class ResumableLoader:
    """A training loader that Lightning can save and restore mid-epoch.

    Wraps the loader a DataModule returns (iterating the wrapper iterates it).  Lightning saves
    :meth:`state_dict` with every checkpoint: the epoch in progress and the number of its
    batches already trained on (the fit loop's count, which is exact whatever the loader has
    prefetched).  Every pass sets the DataModule's epoch to the trainer's (``set_epoch``); after
    :meth:`load_state_dict`, the next pass uses the saved epoch and drops that many batches first, so a run resumed from a mid-epoch checkpoint sees the
    remaining batches of the epoch in their original order; a checkpoint taken after the last
    batch of an epoch resumes with the next epoch.  Dropping batches reads them (data loading
    only, no model work): the cost grows with the position in the epoch.  Exact for DataModules
    whose epoch is a function of ``(seed, epoch)``, as the ones of this package.
    """

    def __init__(self, loader: Any, datamodule: Any = None) -> None:
        self.loader = loader
        self.datamodule = datamodule
        self._pending: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "datamodule", "_pending"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _trainer(self) -> Any:
        return getattr(self.datamodule, "trainer", None) if self.datamodule is not None else None

    def state_dict(self) -> Dict[str, int]:
        trainer = self._trainer()
        if trainer is None:
            return {"epoch": 0, "batches": 0}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._pending = {"epoch": int(state.get("epoch", 0)), "batches": int(state.get("batches", 0))}

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        trainer = self._trainer()
        epoch = int(trainer.current_epoch) if trainer is not None else None
        skip = 0
        if pending is not None:
            epoch, skip = pending["epoch"], pending["batches"]
            try:
                length = len(self.loader)
            except TypeError:
                length = None
            if length is not None and skip >= length:  # saved after the last batch of the epoch
                epoch, skip = epoch + 1, 0
            if skip:
                log.info("resuming in epoch %d after batch %d: skipping the batches already trained on", epoch, skip)
        # Every pass takes its epoch from the trainer: Lightning iterates a loader once to probe it
        # before training, which would otherwise advance a DataModule that counts its passes.
        if epoch is not None and self.datamodule is not None and callable(getattr(self.datamodule, "set_epoch", None)):
            self.datamodule.set_epoch(epoch)
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator)
        return iterator


def make_data_resumable(datamodule: Any) -> Any:
    """Make ``datamodule.train_dataloader()`` return a :class:`ResumableLoader` (in place).

    Loaders that are already stateful (``state_dict`` and ``load_state_dict``, such as
    ``torchdata``'s ``StatefulDataLoader``) are left alone.  Returns ``datamodule``.
    """
    if datamodule is None or getattr(datamodule, "_resumable_loader", False):
        return datamodule
    original: Callable[[], Any] = datamodule.train_dataloader

    def train_dataloader() -> Any:
        loader = original()
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            return loader
        return ResumableLoader(loader, datamodule)

    train_dataloader.__doc__ = original.__doc__
    datamodule.train_dataloader = train_dataloader
    datamodule._resumable_loader = True
    return datamodule


# --------------------------------------------------------------------------------------------
# per-step loss log
# --------------------------------------------------------------------------------------------
class LossLog(Callback):
    """Appends ``"<global_step> <loss>"`` after every training batch to a text file.

    Each line is flushed as it is written, so it survives a ``SIGKILL`` of the process; the loss
    is written with ``repr`` (exact float).  A skipped step (non-finite loss) is written as
    ``nan``.  Rank zero only.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank != 0:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float("nan") if loss is None else float(loss.detach())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step} {value!r}\n")
            f.flush()


def read_loss_log(path: PathLike) -> List[tuple]:
    """``[(global_step, loss), ...]`` from a :class:`LossLog` file (a torn last line is dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append((int(parts[0]), float(parts[1])))
            except ValueError:
                pass
    return out


# --------------------------------------------------------------------------------------------
# trainer settings the machine must support
# --------------------------------------------------------------------------------------------
_INT_KEYS = ("max_steps", "min_steps", "max_epochs", "min_epochs", "log_every_n_steps", "accumulate_grad_batches",
             "num_sanity_val_steps", "num_nodes", "check_val_every_n_epoch")
_NUMBER_KEYS = ("gradient_clip_val",)
_FP16 = ("16", "16-mixed", "16-true", 16, "transformer-engine-float16")


def _accelerator_kind(value: Any) -> Optional[str]:
    if value is None or not isinstance(value, str):
        return None  # an Accelerator instance: the caller knows what it built
    value = value.lower()
    return "cuda" if value in ("gpu", "cuda") else value


def check_trainer_settings(trainer_kwargs: Dict[str, Any], where: str = "recipe section 'trainer'") -> None:
    """Refuse trainer settings this machine cannot honour, with one message naming the key.

    Checks the types of the integer and number keys (``max_steps``, ``gradient_clip_val``, ...),
    that ``accelerator`` (``gpu``/``cuda``, ``mps``, ``tpu``) exists here and has enough
    ``devices``, and that ``precision`` is supported: fp16 needs a CUDA GPU (Lightning would
    silently switch to bf16 on the CPU), ``bf16`` on a GPU needs bf16 support, and
    ``transformer-engine`` needs the ``transformer_engine`` package.  Raises
    :class:`~infinity_lightning.recipes.RecipeError`.
    """
    from .recipes import RecipeError

    for key in _INT_KEYS:
        value = trainer_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecipeError(f"{where}: 'trainer.{key}' = {value!r} ({type(value).__name__}); expected an integer")
    for key in _NUMBER_KEYS:
        value = trainer_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecipeError(f"{where}: 'trainer.{key}' = {value!r} ({type(value).__name__}); expected a number")

    accelerator = _accelerator_kind(trainer_kwargs.get("accelerator", "auto"))
    devices = trainer_kwargs.get("devices", "auto")
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{where}: 'trainer.accelerator' = {trainer_kwargs.get('accelerator')!r} but this machine "
                              "has no usable CUDA GPU (torch.cuda.is_available() is False); use "
                              "trainer.accelerator=cpu (or auto)")
        count = torch.cuda.device_count()
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
            raise RecipeError(f"{where}: 'trainer.devices' = {devices} but this machine has {count} CUDA GPU(s)")
    elif accelerator == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RecipeError(f"{where}: 'trainer.accelerator' = 'mps' but this machine has no Apple GPU (MPS); "
                              "use trainer.accelerator=cpu (or auto)")
    elif accelerator == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise RecipeError(f"{where}: 'trainer.accelerator' = 'tpu' needs torch_xla, which is not installed; "
                              "use trainer.accelerator=cpu (or auto)")
    on_gpu = accelerator == "cuda" or (accelerator in (None, "auto") and torch.cuda.is_available())

    precision = trainer_kwargs.get("precision")
    if precision is None:
        return
    text = str(precision)
    if precision in _FP16 or text in _FP16:
        if not on_gpu:
            raise RecipeError(f"{where}: 'trainer.precision' = {precision!r} (fp16) needs a CUDA GPU, and this run is "
                              "on the CPU; use trainer.precision=bf16-mixed or 32-true")
    elif text.startswith("bf16") and on_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise RecipeError(f"{where}: 'trainer.precision' = {precision!r} but this GPU does not support bfloat16; use "
                          "trainer.precision=16-mixed or 32-true")
    if text.startswith("transformer-engine"):
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise RecipeError(f"{where}: 'trainer.precision' = {precision!r} needs the transformer_engine package, "
                              "which is not installed")

"""File input/output shared by every loader and exporter.

* :func:`safe_load` opens user-supplied ``.pth``/``.pt``/``.ckpt`` files with
  ``torch.load(weights_only=True)`` and safetensors files with ``safetensors``; a pickle that
  carries code, a truncated file or a missing file gets a :class:`CheckpointError` naming it.
* :func:`atomic_save` / :func:`atomic_save_safetensors` write to a temporary file in the target
  folder, flush it to disk and rename it over the target, so a crash never leaves a half-written
  checkpoint behind.
* :func:`read_weights` reads a state dict from a file, a safetensors file, or a folder of
  safetensors shards with a ``*.index.json`` (the Hugging Face layout of the 8B release).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

from .errors import UserError

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot be used: missing, corrupt, unsafe or of the wrong kind."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: PathLike) -> None:
    """Give ``path`` the permissions a plain ``open()`` or ``mkdir()`` would: 0666 for a file, 0777
    for a folder, less the umask (temporary files and folders are created 0600 / 0700)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def atomic_write(path: PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` and atomically rename the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates the file 0600, and writers that replace the file (safetensors' save_file)
        # keep that: give the result the permissions a plain open() would, after writing.
        usual_permissions(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Save a flat tensor dict as safetensors, atomically (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def is_safetensors(path: PathLike) -> bool:
    return str(path).endswith(".safetensors")


def safe_load(path: PathLike, *, what: str = "checkpoint") -> Any:
    """Load a user-supplied file without executing code.

    ``.safetensors`` files go through safetensors; everything else through
    ``torch.load(map_location="cpu", weights_only=True)``.  Raises :class:`CheckpointError` with
    the file name for a missing, truncated or corrupt file and for a pickle that would need
    arbitrary code to load.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} path {path} is a folder; expected a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} file {path} is empty (0 bytes): it was probably cut short while being written")
    if is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{what} file {path} is not a readable safetensors file ({e})") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            raise CheckpointError(
                f"refusing to load {what} file {path}: it contains Python objects that would run code "
                "when unpickled (only tensors, numbers, strings and plain containers are accepted). "
                "If you trust the file, re-save its state dict with torch.save(model.state_dict(), ...)."
            ) from e
        # torch's message is a paragraph; the unpickler's own reason is the line that says what it met
        lines = [line.strip() for line in msg.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith(("Unsupported", "invalid load key"))),
                      lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{what} file {path} is corrupt, truncated or not a torch.save file ({reason})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{what} file {path} is corrupt or truncated ({first})") from e


def _find_index(folder: Path) -> Optional[Path]:
    candidates = sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.bin.index.json"))
    return candidates[0] if candidates else None


def read_weights(path: PathLike, *, what: str = "checkpoint") -> Dict[str, Any]:
    """Read a state-dict-like mapping from a file or a sharded folder.

    A folder must hold a ``*.index.json`` (``weight_map``: key -> shard file) or safetensors
    files, which are merged.  A shard named by the index but missing is an error.
    """
    path = Path(path)
    if path.is_dir():
        index = _find_index(path)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"index file {index} is not a valid shard index ({e})") from e
            out: Dict[str, Any] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = path / shard
                if not shard_path.exists():
                    raise CheckpointError(f"shard {shard} listed in {index} is missing from {path}")
                out.update(safe_load(shard_path, what=what))
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise CheckpointError(f"{len(missing)} keys of {index} are in no shard: {missing[:5]}")
            return out
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{what} folder {path} holds no *.safetensors files and no shard index")
        out = {}
        for shard in shards:
            out.update(safe_load(shard, what=what))
        return out
    obj = safe_load(path, what=what)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what} file {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def format_key_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class StateDictMismatchError(CheckpointError):
    """Raised by strict loading when keys are missing, unexpected or of the wrong shape."""


def check_state_dict(model_sd: Mapping[str, torch.Tensor], file_sd: Mapping[str, Any], *, source: str,
                     what: str, ignore_missing: Iterable[str] = ()) -> None:
    """Compare a file's state dict with a model's; raise a message listing every difference."""
    ignore = set(ignore_missing)
    missing = [k for k in model_sd if k not in file_sd and k not in ignore]
    unexpected = [k for k in file_sd if k not in model_sd]
    wrong_shape = [
        f"{k}: file {tuple(file_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in file_sd and hasattr(file_sd[k], "shape") and tuple(file_sd[k].shape) != tuple(model_sd[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"{source} does not match the {what}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {format_key_list(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {format_key_list(unexpected)}")
        if wrong_shape:
            parts.append(f"  shape mismatches ({len(wrong_shape)}): {format_key_list(wrong_shape, 10)}")
        raise StateDictMismatchError("\n".join(parts))

"""``infinity-lightning convert SRC DST``: between Lightning checkpoints, the released layout and safetensors.

Sources: a released file (``infinity_2b_reg.pth``, ``infinity_vae_d32reg.pth``), a safetensors
file, a folder of safetensors shards with an index (the 8B release), an original training
checkpoint, a Lightning ``.ckpt`` (the transformer under ``transformer.``, the tokenizer under
``tokenizer.`` or ``vae.``), or a distributed (sharded) checkpoint folder, which is consolidated
first.  The weights go through the strict loaders, so a converted file always loads with
:func:`~infinity_lightning.checkpoints.load_transformer` / ``load_tokenizer`` and holds exactly
the source tensors.

Targets (``--to``, default from DST's extension): ``released`` (``.pth``: the flat transformer
state dict, or ``{"vae": ...}`` for a tokenizer), ``safetensors``, ``lightning`` (``.ckpt``:
``{"state_dict": {"transformer.<key>" | "tokenizer.<key>": ...}}``).  Transformers get a
``<DST stem>.json`` architecture record beside them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from ..io import CheckpointError, atomic_save, atomic_write, read_weights

LIGHTNING_PREFIX = {"transformer": "transformer.", "tokenizer": "tokenizer."}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``convert``."""
    parser.add_argument("src", help="source checkpoint: file, shard folder or distributed checkpoint folder")
    parser.add_argument("dst", help="output file")
    parser.add_argument("--to", choices=["released", "safetensors", "lightning"],
                        help="output format (default: from DST: .safetensors, .ckpt -> lightning, else released)")
    parser.add_argument("--kind", choices=["transformer", "tokenizer"], help="what SRC holds (default: detected)")
    parser.add_argument("--use-ema", action="store_true", help="take the EMA weights of a training checkpoint")


def is_distributed_checkpoint(path: Path) -> bool:
    """A ``torch.distributed.checkpoint`` folder (sharded Lightning/FSDP2 checkpoints) has ``.metadata``."""
    return path.is_dir() and (path / ".metadata").is_file()


def consolidate(folder: Path, out_file: Path) -> Path:
    """Merge a distributed checkpoint folder into one ``torch.save`` file (read back with
    ``weights_only=True`` like any user file).

    Lightning's sharded checkpoints (with ``meta.pt``) go through
    :func:`infinity_lightning.parallel.consolidate_checkpoint`, which also restores the EMA
    averages to ``ema_state``; other ``torch.distributed.checkpoint`` folders are merged as they are.
    """
    from ..parallel import METADATA_FILENAME, consolidate_checkpoint

    if (folder / METADATA_FILENAME).is_file():
        return consolidate_checkpoint(folder, out_file, keep_optimizer=False)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(out_file))
    return out_file


def _looks_like_tokenizer_keys(keys) -> bool:
    return any(k.split(".", 1)[-1].startswith("encoder.conv_in") or k.startswith("encoder.conv_in")
               or k.startswith(("quantizer.", "quantize.")) for k in keys)


def detect_kind(obj: Mapping[str, Any]) -> str:
    """'tokenizer' or 'transformer' for a loaded checkpoint object."""
    if isinstance(obj.get("vae"), Mapping):
        return "tokenizer"
    if isinstance(obj.get("trainer"), Mapping):
        return "transformer"
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    if any(k.startswith("transformer.") for k in sd) or "cfg_uncond" in sd or "pos_start" in sd:
        return "transformer"
    if _looks_like_tokenizer_keys(sd):
        return "tokenizer"
    raise CheckpointError("cannot tell whether the checkpoint holds a transformer or a tokenizer; pass --kind")


def _tokenizer_source(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    # A Lightning checkpoint of a transformer-training module may hold both: keep the tokenizer's
    # keys only, so load_tokenizer's prefix search finds one model.
    if isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
        for prefix in ("tokenizer.", "vae."):
            sub = {k: v for k, v in sd.items() if k.startswith(prefix)}
            if sub:
                return {**{k: v for k, v in obj.items() if k != "state_dict"}, "state_dict": sub}
    return obj


def convert(src: Path, dst: Path, to: Optional[str] = None, kind: Optional[str] = None,
            use_ema: bool = False) -> Dict[str, Any]:
    """Convert ``src`` to ``dst``; returns a summary (kind, format, tensor count)."""
    from ..checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
    from ..presets import config_to_dict

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"source checkpoint not found: {src}")
    if dst.resolve() == src.resolve():
        raise ValueError("SRC and DST are the same path")
    if to is None:
        to = {".safetensors": "safetensors", ".ckpt": "lightning"}.get(dst.suffix.lower(), "released")
    with tempfile.TemporaryDirectory() as tmp:
        if is_distributed_checkpoint(src):
            src = consolidate(src, Path(tmp) / "consolidated.pt")
        obj = read_weights(src, what="checkpoint")
        kind = kind or detect_kind(obj)
        if kind == "tokenizer":
            source = _tokenizer_source(obj)
            if source is not obj:
                src = Path(tmp) / "tokenizer_only.pt"
                torch.save(source, src)
        del obj  # the loaders below read the file again; do not hold two copies
        if kind == "transformer":
            model = load_transformer(src, use_ema=use_ema)
            if to in ("released", "safetensors"):
                save_transformer(model, dst, format=to)
            else:
                sd = {LIGHTNING_PREFIX["transformer"] + k: v.detach().cpu() for k, v in model.state_dict().items()}
                atomic_save({"state_dict": sd, "infinity_config": config_to_dict(model.config)}, dst)
                meta = {"model_type": "infinity", **config_to_dict(model.config)}
                atomic_write(dst.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(meta, indent=1)))
            count = len(model.state_dict())
        elif kind == "tokenizer":
            if use_ema:
                raise ValueError("--use-ema applies to transformer checkpoints only")
            vae = load_tokenizer(src)
            if to in ("released", "safetensors"):
                save_tokenizer(vae, dst, format=to)
            else:
                sd = {LIGHTNING_PREFIX["tokenizer"] + k: v.detach().cpu() for k, v in vae.state_dict().items()}
                atomic_save({"state_dict": sd, "tokenizer_config": config_to_dict(vae.config)}, dst)
            count = len(vae.state_dict())
        else:
            raise ValueError(f"--kind must be 'transformer' or 'tokenizer', got {kind!r}")
    return {"kind": kind, "format": to, "tensors": count, "dst": str(dst)}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``infinity-lightning convert``."""
    summary = convert(Path(args.src), Path(args.dst), to=args.to, kind=args.kind, use_ema=args.use_ema)
    print(json.dumps(summary))
    return 0


__all__ = ["convert", "consolidate", "detect_kind", "is_distributed_checkpoint", "add_arguments", "run"]

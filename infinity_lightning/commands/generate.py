"""``infinity-lightning generate``: images from prompts, one PNG + JSON per image.

Examples::

    infinity-lightning generate --pipeline weights/ --prompt "a red apple" --seed 1 --out out/
    infinity-lightning generate --transformer infinity_2b_reg.pth --tokenizer infinity_vae_d32reg.pth \\
        --text-encoder flan-t5-xl/ --prompts-file prompts.jsonl --dtype bf16 --devices 2 --out out/

Generation runs as a Lightning prediction loop, so ``--devices N`` splits the prompts over N
devices (record i goes to rank i % N); file names are the global record index.

The sampling flags are the fields of :class:`~infinity_lightning.sampling.SamplingConfig` whose
metadata has a ``cli`` type (``--top-k`` for ``top_k``, the help from the field); unset flags keep
the model's settings.  Every argument is checked before the model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Type

from ..presets import RELEASED_VARIANTS
from ..sampling import SamplingConfig
from ..scales import PIXEL_BUDGETS

log = logging.getLogger(__name__)


def _resolution(value: str):
    if value in PIXEL_BUDGETS:
        return value
    try:
        size = int(value.lower().removesuffix("px"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected one of {sorted(PIXEL_BUDGETS)} or a pixel size") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the pixel size must be positive")
    return size


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


# -- sampling flags from SamplingConfig ------------------------------------------------------------
def sampling_fields(config_cls: Type[SamplingConfig] = SamplingConfig) -> List[dataclasses.Field]:
    """The fields of ``config_cls`` exposed as flags (metadata ``cli`` is a type)."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli") is not None]


def add_sampling_arguments(group, config_cls: Type[SamplingConfig] = SamplingConfig) -> None:
    """One flag per :func:`sampling_fields` entry: ``--name-with-dashes``, default None (the
    model's setting), type and help from the field's metadata (``bool``: ``--x`` / ``--no-x``)."""
    for f in sampling_fields(config_cls):
        flag, kind = "--" + f.name.replace("_", "-"), f.metadata["cli"]
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f.metadata.get("help"))
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=f.metadata.get("help"))


def sampling_overrides(args: argparse.Namespace, config_cls: Type[SamplingConfig] = SamplingConfig) -> Dict[str, Any]:
    """The sampling flags that were given, as SamplingConfig field values."""
    return {f.name: getattr(args, f.name) for f in sampling_fields(config_cls) if getattr(args, f.name) is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``generate``."""
    src = parser.add_argument_group("model")
    src.add_argument("--pipeline", help="pipeline folder (released or generic layout) or Hugging Face repo id")
    src.add_argument("--variant", choices=sorted(RELEASED_VARIANTS), help="released model in a folder holding several")
    src.add_argument("--transformer", help="transformer weights file/folder or preset (overrides --pipeline's)")
    src.add_argument("--tokenizer", help="tokenizer weights file or preset (overrides --pipeline's)")
    src.add_argument("--text-encoder", help="text encoder folder (overrides --pipeline's)")
    src.add_argument("--use-ema", action="store_true", help="EMA weights of a training checkpoint")
    src.add_argument("--text-encoder-dtype", choices=["fp32", "bf16", "fp16"], help="text encoder weight dtype")
    src.add_argument("--quantize-text-encoder", choices=["8bit", "4bit"], help="bitsandbytes text encoder weights")
    src.add_argument("--offload", action="store_true", help="keep components on the CPU except while used")

    p = parser.add_argument_group("prompts")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file (one prompt per line) or .jsonl (objects with 'prompt')")
    p.add_argument("--negative-prompt", help="negative prompt for every image")
    p.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut prompts longer than the model's text length (default: an error naming the prompt)")

    s = parser.add_argument_group("sampling (defaults: the model's settings)")
    add_sampling_arguments(s)
    s.add_argument("--seed", type=int, default=0, help="image i (global index) uses seed + i")
    s.add_argument("--aspect-ratio", type=float, default=1.0, help="height / width (nearest template)")
    s.add_argument("--resolution", type=_resolution, help="0.06M, 0.25M, 0.60M, 1M or a pixel size (e.g. 256)")

    r = parser.add_argument_group("run")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="transformer/decoder precision (autocast)")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto")
    r.add_argument("--devices", type=_positive_int, default=1, help="devices for the prediction loop (DDP when > 1)")
    r.add_argument("--batch-size", type=_positive_int, default=1,
                   help="images per transformer batch (1 keeps each image independent of batching)")
    r.add_argument("--out", required=True, help="output folder for <index>.png / <index>.json")
    r.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    r.add_argument("--skip-existing", action="store_true", help="skip records whose PNG already exists")


def _accelerator(device: str, devices: int = 1) -> str:
    """The Lightning accelerator of ``--device``; a device this machine lacks is a ``ValueError``
    naming the flag (before anything is loaded)."""
    import torch

    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: this machine has no usable CUDA GPU; use --device cpu")
        if devices > torch.cuda.device_count():
            raise ValueError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"--device {device!r}: expected cpu, cuda or auto")


# -- validation ------------------------------------------------------------------------------------
def _check_out(out: str) -> None:
    """``--out`` must be a writable folder, or a path whose first existing parent is one."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SystemExit(f"generate: --out {out} exists and is not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"generate: --out {out}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"generate: --out {out}: {existing} is not writable")


def _check_model(args: argparse.Namespace) -> None:
    from ..loading import check_source

    if not args.pipeline and not (args.transformer and args.tokenizer and args.text_encoder):
        raise SystemExit("generate: give --pipeline FOLDER, or --transformer, --tokenizer and --text-encoder")
    if args.pipeline:
        try:
            check_source(args.pipeline)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"generate: --pipeline: {e}") from None
    if args.text_encoder and not Path(args.text_encoder).expanduser().is_dir():
        what = "is a file, expected a Hugging Face folder" if Path(args.text_encoder).expanduser().exists() \
            else "does not exist"
        raise SystemExit(f"generate: --text-encoder folder {args.text_encoder!r} {what}")
    for flag in ("transformer", "tokenizer"):
        value = getattr(args, flag)
        if value and not Path(value).expanduser().exists() and ("/" in value or Path(value).suffix):
            raise SystemExit(f"generate: --{flag} {value!r} does not exist")
    if args.tokenizer and Path(args.tokenizer).expanduser().is_dir():
        raise SystemExit(f"generate: --tokenizer {args.tokenizer!r} is a folder, expected a weights file "
                         "(.pth or .safetensors)")


def _check_records(records: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    from ..scales import resolve

    with warnings.catch_warnings():  # only errors matter here; the run reports an inexact size
        warnings.simplefilter("ignore")
        for r in records:
            try:
                resolve(args.resolution or "0.06M", float(r["h_div_w"]))
            except ValueError as e:
                raise SystemExit(f"generate: prompt record {r['index']} ({r['prompt'][:40]!r}): {e}") from None


def _sampling_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    overrides = sampling_overrides(args)
    try:
        SamplingConfig().replace(**overrides)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"generate: {e}") from None
    return overrides


# -- running -------------------------------------------------------------------------------------
def _records(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from ..lit.predict import prompt_records, read_prompts_file

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += read_prompts_file(args.prompts_file)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"generate: --prompts-file: {e}") from None
    if not prompts:
        raise SystemExit("generate: give --prompt (repeatable) or --prompts-file")
    return prompt_records(prompts, seed=args.seed, num_images_per_prompt=args.num_images,
                          negative_prompt=args.negative_prompt, aspect_ratio=args.aspect_ratio)


def run(args: argparse.Namespace) -> int:
    """Check every argument, build the pipeline and the prompt records, then run the prediction loop."""
    import lightning.pytorch as pl

    from ..lit.predict import ImageWriter, InfinityPredictor, prompt_dataloader
    from ..pipeline import InfinityPipeline

    records = _records(args)
    _check_model(args)
    overrides = _sampling_from_args(args)
    _check_records(records, args)
    _check_out(args.out)
    try:
        accelerator = _accelerator(args.device, args.devices)
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    model = {k: getattr(args, k) for k in ("pipeline", "variant", "transformer", "tokenizer", "text_encoder")
             if getattr(args, k)}
    writer = ImageWriter(args.out, overwrite=args.overwrite, extra={"model": model, "dtype": args.dtype})
    if args.skip_existing:
        records = [r for r in records if not writer.paths(r["index"])[0].exists()]
        if not records:
            print(json.dumps({"written": 0, "out": str(args.out), "skipped": "all"}))
            return 0
    elif not args.overwrite:
        taken = [r for r in records if any(p.exists() for p in writer.paths(r["index"]))]
        if taken:
            more = f" (and the files of {len(taken) - 1} more record(s))" if len(taken) > 1 else ""
            raise SystemExit(f"generate: --out {args.out} already holds {writer.paths(taken[0]['index'])[0].name}"
                             f"{more}; use --overwrite, --skip-existing or another folder")

    pipe = InfinityPipeline.from_pretrained(
        args.pipeline, transformer=args.transformer, tokenizer=args.tokenizer, text_encoder=args.text_encoder,
        variant=args.variant, device="cpu", dtype=args.dtype, text_encoder_dtype=args.text_encoder_dtype,
        text_encoder_quantization=args.quantize_text_encoder, offload=args.offload, use_ema=args.use_ema)
    negatives = [r for r in records if r.get("negative_prompt")]
    try:  # every prompt's length, before the first image
        pipe.check_prompts([r["prompt"] for r in records], args.truncate_prompts, what="prompt of record",
                           labels=[r["index"] for r in records])
        pipe.check_prompts([r["negative_prompt"] for r in negatives], args.truncate_prompts,
                           what="negative prompt of record", labels=[r["index"] for r in negatives])
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    if args.offload:
        pipe.to("cuda" if accelerator == "gpu" else "cpu")
    predictor = InfinityPredictor(pipe, pipe.sampling.replace(**overrides), resolution=args.resolution,
                                  batch_size=args.batch_size, truncate_prompts=args.truncate_prompts)
    trainer = pl.Trainer(accelerator=accelerator, devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[writer])
    trainer.predict(predictor, prompt_dataloader(records, batch_size=args.batch_size), return_predictions=False)
    if trainer.is_global_zero:
        print(json.dumps({"written": len(writer.written) if args.devices == 1 else len(records),
                          "out": str(Path(args.out))}))
    return 0

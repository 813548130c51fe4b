"""``infinity-lightning generate``: images from prompts, one PNG + JSON per image.

Examples::

    infinity-lightning generate --pipeline weights/ --prompt "a red apple" --seed 1 --out out/
    infinity-lightning generate --transformer infinity_2b_reg.pth --tokenizer infinity_vae_d32reg.pth \\
        --text-encoder flan-t5-xl/ --prompts-file prompts.jsonl --dtype bf16 --devices 2 --out out/

Generation runs as a Lightning prediction loop, so ``--devices N`` splits the prompts over N
devices (record i goes to rank i % N); file names are the global record index.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..scales import PIXEL_BUDGETS

log = logging.getLogger(__name__)


def _resolution(value: str):
    if value in PIXEL_BUDGETS:
        return value
    try:
        size = int(value.lower().removesuffix("px"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected one of {sorted(PIXEL_BUDGETS)} or a pixel size") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the pixel size must be positive")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``generate``."""
    src = parser.add_argument_group("model")
    src.add_argument("--pipeline", help="pipeline folder (released or generic layout) or Hugging Face repo id")
    src.add_argument("--variant", choices=["2b", "8b", "8b_512", "125m"], help="released model in a folder holding several")
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
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")

    s = parser.add_argument_group("sampling (defaults: the model's released settings)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    s.add_argument("--tau", type=float, help="temperature")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--cfg-insertion-layer", type=int, default=0, help="0: guidance on logits; n<0: on hidden states")
    s.add_argument("--seed", type=int, default=0, help="image i (global index) uses seed + i")
    s.add_argument("--aspect-ratio", type=float, default=1.0, help="height / width (nearest template)")
    s.add_argument("--resolution", type=_resolution, help="0.06M, 0.25M, 0.60M, 1M or a pixel size (e.g. 256)")

    r = parser.add_argument_group("run")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="transformer/decoder precision (autocast)")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto")
    r.add_argument("--devices", type=int, default=1, help="devices for the prediction loop (DDP when > 1)")
    r.add_argument("--batch-size", type=int, default=1,
                   help="images per transformer batch (1 keeps each image independent of batching)")
    r.add_argument("--out", required=True, help="output folder for <index>.png / <index>.json")
    r.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    r.add_argument("--skip-existing", action="store_true", help="skip records whose PNG already exists")


def _accelerator(device: str) -> str:
    import torch

    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"--device {device!r}: expected cpu, cuda or auto")


def run(args: argparse.Namespace) -> int:
    """Build the pipeline and the prompt records, then run the prediction loop."""
    import lightning.pytorch as pl

    from ..lit.predict import ImageWriter, InfinityPredictor, prompt_dataloader, prompt_records, read_prompts_file
    from ..pipeline import InfinityPipeline

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise SystemExit("generate: give --prompt (repeatable) or --prompts-file")
    if not args.pipeline and not (args.transformer and args.tokenizer and args.text_encoder):
        raise SystemExit("generate: give --pipeline FOLDER, or --transformer, --tokenizer and --text-encoder")
    if args.num_images < 1:
        raise SystemExit("generate: --num-images must be >= 1")

    records = prompt_records(prompts, seed=args.seed, num_images_per_prompt=args.num_images,
                             negative_prompt=args.negative_prompt, aspect_ratio=args.aspect_ratio)
    writer = ImageWriter(args.out, overwrite=args.overwrite,
                         extra={"model": {k: getattr(args, k) for k in ("pipeline", "variant", "transformer",
                                                                        "tokenizer", "text_encoder") if getattr(args, k)},
                                "dtype": args.dtype})
    if args.skip_existing:
        records = [r for r in records if not writer.paths(r["index"])[0].exists()]
        if not records:
            print(json.dumps({"written": 0, "out": str(args.out), "skipped": "all"}))
            return 0

    accelerator = _accelerator(args.device)
    pipe = InfinityPipeline.from_pretrained(
        args.pipeline, transformer=args.transformer, tokenizer=args.tokenizer, text_encoder=args.text_encoder,
        variant=args.variant, device="cpu", dtype=args.dtype, text_encoder_dtype=args.text_encoder_dtype,
        text_encoder_quantization=args.quantize_text_encoder, offload=args.offload, use_ema=args.use_ema)
    if args.offload:
        pipe.to("cuda" if accelerator == "gpu" else "cpu")
    predictor = InfinityPredictor(pipe, batch_size=args.batch_size, cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                                  top_p=args.top_p, resolution=args.resolution,
                                  cfg_insertion_layer=args.cfg_insertion_layer)
    trainer = pl.Trainer(accelerator=accelerator, devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[writer])
    trainer.predict(predictor, prompt_dataloader(records, batch_size=args.batch_size), return_predictions=False)
    if trainer.is_global_zero:
        print(json.dumps({"written": len(writer.written) if args.devices == 1 else len(records),
                          "out": str(Path(args.out))}))
    return 0

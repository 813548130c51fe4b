"""``infinity-lightning variations``: images that keep the first scales of an image's bits.

Examples::

    infinity-lightning variations --pipeline weights/ --image photo.png --keep-scales 4 --seed 1 --out var.png
    infinity-lightning variations --pipeline weights/ --image a.png --image b.png --keep-scales 3 \\
        --num-images 4 --prompt "an oil painting" --out variations/

The first ``--keep-scales`` scales (layout and colours) are the image's; the later ones are
sampled, conditioned on ``--prompt`` (empty by default).  0 keeps nothing (text-to-image), the
number of scales keeps everything (the tokenizer's reconstruction); a value above the schedule's
number of scales is an error that names the valid range.  Outputs, seeds, the ``.json`` records,
``--lora`` adapters and the handling of bad images are those of ``infinity-lightning inpaint``.
"""
from __future__ import annotations

import argparse

from .inpaint import add_common_arguments, check_common, check_keep_scales, fail, load_pipeline, process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``variations``."""
    add_common_arguments(parser, prompt_default="")
    parser.add_argument("--keep-scales", type=int, required=True, metavar="K",
                        help="scales of the image kept (0 .. number of scales of the schedule)")


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, load the pipeline once, make the variations of every image."""
    command = "variations"
    check_common(command, args)
    if args.keep_scales < 0:
        raise fail(command, f"--keep-scales must be >= 0, got {args.keep_scales}")

    from .. import editing

    pipe = load_pipeline(args)
    check_keep_scales(command, args, pipe)

    def edit(i: int, image: str, seed: int):
        return editing.variations(pipe, image, args.prompt, args.keep_scales, seed=seed,
                                  negative_prompt=args.negative_prompt, cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                                  top_p=args.top_p, resolution=args.resolution, num_images_per_prompt=args.num_images)

    return process(command, args, edit)

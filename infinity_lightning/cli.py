"""The ``infinity-lightning`` command.

Each subcommand lives in ``infinity_lightning/commands/<name>.py`` and provides
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their
subcommand runs, so ``infinity-lightning --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: subcommand -> (module, one-line help)
COMMANDS = {
    "quickstart": ("infinity_lightning.commands.quickstart",
                   "train a tokenizer and a transformer on the built-in shapes set (CPU), generate and score"),
    "fit": ("infinity_lightning.commands.fit", "train from a recipe: infinity-lightning fit RECIPE [key=value ...]"),
    "generate": ("infinity_lightning.commands.generate", "generate images from prompts"),
    "reconstruct": ("infinity_lightning.commands.reconstruct", "encode and decode images with a tokenizer; PSNR/SSIM"),
    "inpaint": ("infinity_lightning.commands.inpaint",
                "regenerate the masked region of images (or outpaint them) by forcing the image's bits elsewhere"),
    "variations": ("infinity_lightning.commands.variations",
                   "variations of images that keep their first scales' bits"),
    "convert": ("infinity_lightning.commands.convert",
                "convert between Lightning checkpoints, the released .pth layout and safetensors"),
    "evaluate": ("infinity_lightning.commands.evaluate",
                 "score a pipeline on a shapes evaluation protocol with the strict checker"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinity-lightning", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not installed
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        parser.error(f"subcommand {args.command!r} is not available in this installation")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

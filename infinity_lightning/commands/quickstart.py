"""``infinity-lightning quickstart --out DIR``: train a tokenizer and a transformer on the built-in
shapes set on CPU, generate images for new seeds and score them.

The work is :func:`infinity_lightning.quickstart.run_quickstart`; this module parses the flags
and prints where the results are.  The run is driven by ``recipes/tokenizer/quickstart.yaml``
and ``recipes/var/quickstart.yaml``: copy them, change them, and pass them with
``--tokenizer-recipe`` / ``--var-recipe`` (or override single keys with ``--tokenizer-set`` /
``--var-set key=value``).
"""
from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``quickstart`` subcommand."""
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument("--budget-minutes", type=float, default=15.0,
                        help="wall-clock budget of the whole run; training follows it (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recipes and networks (default 0)")
    parser.add_argument("--protocol", default=None,
                        help="evaluation protocol file (default: the shipped strict protocol shapes_v1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: one per core; use 1 on a machine shared with other jobs)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few steps (a minute or two; the scores mean nothing)")
    parser.add_argument("--tokenizer-recipe", default="tokenizer/quickstart",
                        help="tokenizer recipe (default tokenizer/quickstart)")
    parser.add_argument("--var-recipe", default="var/quickstart", help="transformer recipe (default var/quickstart)")
    parser.add_argument("--tokenizer-set", nargs="*", default=[], metavar="key=value",
                        help="dot-list overrides of the tokenizer recipe (optim.lr=0.001)")
    parser.add_argument("--var-set", nargs="*", default=[], metavar="key=value",
                        help="dot-list overrides of the transformer recipe (trainer.max_steps=500)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``infinity-lightning quickstart``; returns 0 (also when the score misses the
    target: the summary says so)."""
    from ..quickstart import run_quickstart

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.budget_minutes <= 0:
        raise SystemExit("--budget-minutes must be positive")
    summary = run_quickstart(args.out, budget_minutes=args.budget_minutes, seed=args.seed, device=args.device,
                             threads=args.threads, quick=args.quick, tokenizer_recipe=args.tokenizer_recipe,
                             var_recipe=args.var_recipe, tokenizer_overrides=args.tokenizer_set,
                             var_overrides=args.var_set, protocol=args.protocol)
    print(f"summary: {summary['out']}/summary.json, report card: {summary['out']}/eval/report.md, "
          f"samples: {summary['out']}/eval/grid.png, TensorBoard: tensorboard --logdir {summary['out']}/logs")
    print(f"load it: InfinityPipeline.from_pretrained({summary['out']!r})")
    return 0

"""``infinity-lightning evaluate``: score a pipeline on a shapes protocol with the strict checker.

Examples::

    infinity-lightning evaluate --pipeline runs/quickstart --out eval/
    infinity-lightning evaluate --pipeline runs/quickstart --subset 8 --cfg 3 --tau 0.5 --out eval/

Every item of the protocol (default: the shipped ``shapes_v1``) is generated at the protocol's
image size with the item's seed, judged by
:class:`~infinity_lightning.evaluation.StrictShapesChecker`, and summarised in ``report.json``,
``report.md`` and ``grid.png`` under ``--out``; the overall score (the mean of the six
categories) and each category's accuracy are printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``evaluate``."""
    parser.add_argument("--pipeline", required=True, metavar="DIR", help="pipeline folder to evaluate")
    parser.add_argument("--protocol", metavar="FILE", help="protocol file (default: the shipped shapes_v1.json)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for report.json, report.md and grid.png")
    parser.add_argument("--subset", type=int, metavar="K", help="only K items per category (a fixed, even spread)")
    s = parser.add_argument_group("sampling (defaults: the pipeline's)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    s.add_argument("--tau", type=float, help="temperature")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _validate(args: argparse.Namespace) -> None:
    """Reject bad arguments before any model is loaded."""
    pipeline = Path(args.pipeline)
    if not pipeline.is_dir():
        raise SystemExit(f"evaluate: --pipeline {args.pipeline}: no such folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"evaluate: --out {args.out} exists and is not a folder")
    if args.subset is not None and args.subset < 1:
        raise SystemExit(f"evaluate: --subset must be >= 1, got {args.subset}")
    if args.batch_size < 1:
        raise SystemExit(f"evaluate: --batch-size must be >= 1, got {args.batch_size}")
    if args.cfg is not None and args.cfg < 0:
        raise SystemExit(f"evaluate: --cfg must be >= 0, got {args.cfg}")
    if args.tau is not None and args.tau <= 0:
        raise SystemExit(f"evaluate: --tau must be > 0, got {args.tau}")
    if args.top_k is not None and args.top_k < 0:
        raise SystemExit(f"evaluate: --top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SystemExit(f"evaluate: --top-p must be in (0, 1], got {args.top_p}")


def pipeline_generate_fn(folder: str, *, image_size: int, sampling: Dict[str, Any], batch_size: int,
                         device: str = "cpu") -> Callable[[List[str], List[int]], Any]:
    """The one place that calls the pipeline: load ``folder`` and return
    ``generate_fn(prompts, seeds) -> float tensor (N, 3, H, W) in [0, 1]`` at ``image_size``
    pixels with the given ``sampling`` settings (``cfg``, ``tau``, ``top_k``, ``top_p``)."""
    from infinity_lightning.pipeline import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained(folder, device=device)

    def generate_fn(prompts: List[str], seeds: List[int]):
        out = pipe(prompts, seed=seeds, output_type="tensor", batch_size=batch_size, resolution=image_size,
                   **sampling)
        images = getattr(out, "images", out)  # an output object holding a tensor in [-1, 1], or the tensor
        return (images.float().clamp(-1, 1) + 1) / 2

    return generate_fn


def run(args: argparse.Namespace) -> int:
    """Evaluate ``--pipeline`` and write the report; returns 0."""
    _validate(args)
    from infinity_lightning.evaluation import ProtocolError, evaluate, load_protocol

    try:
        protocol = load_protocol(args.protocol)
    except ProtocolError as e:
        raise SystemExit(f"evaluate: {e}") from None
    sampling = {k: v for k, v in (("cfg", args.cfg), ("tau", args.tau), ("top_k", args.top_k), ("top_p", args.top_p))
                if v is not None}
    generate_fn = pipeline_generate_fn(args.pipeline, image_size=protocol.image_size, sampling=sampling,
                                       batch_size=args.batch_size, device=args.device)
    settings: Dict[str, Optional[Any]] = {"pipeline": str(args.pipeline), "resolution": protocol.image_size,
                                          **sampling}
    report = evaluate(generate_fn, protocol, subset=args.subset, batch_size=args.batch_size, out_dir=args.out,
                      settings=settings)
    overall = report["overall"]
    lo, hi = overall["ci95"]
    print(f"overall {100 * overall['accuracy']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, "
          f"mean of {len(overall['categories_scored'])} categories, {report['protocol']['items']} images)")
    for name, score in report["categories"].items():
        print(f"  {name:<20s} {100 * score['accuracy']:5.1f}%  ({score['passed']}/{score['n']})")
    held = report["held_out_pairs"]
    if held["n"]:
        print(f"  {'held_out_pairs':<20s} {100 * held['accuracy']:5.1f}%  ({held['passed']}/{held['n']}, "
              "not in the overall score)")
    print(f"report: {report['files']['markdown']}, {report['files']['json']}, {report['files']['grid']}")
    return 0

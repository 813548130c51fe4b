"""Quality and speed of the generation options on a trained model: the strict protocol's score of
each option next to the exact fp32 sampler's, and the fraction of sampled bits equal to it.

    python benchmarks/generation_quality.py --pipeline runs/quickstart --subset 8 --threads 2
    python benchmarks/generation_quality.py --pipeline /path/to/quickstart --options exact,int8 --subset 4

The pipeline folder is a finished quick start (``infinity-lightning quickstart``) or any pipeline
folder whose prompts the shapes protocol understands.  For every option
(:data:`transformer.GEN_OPTIONS`: ``exact``, ``int8``, guidance off on the last scale, ...) the
protocol subset (``--subset`` items per category, :func:`select_subset`) is generated at the
protocol's seeds and judged by the strict checker; the JSON gives each option's overall score in
points, its difference from ``exact`` (``within_2_points``), the per-category scores, the fraction
of sampled bits equal to the exact run's on the same prompts and seeds, and the images per second
of a fixed batch timed interleaved over the options.  Exit status 1 when an option is more than
2 points below exact.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402
from transformer import DECODE_OPTIONS, GEN_OPTIONS  # noqa: E402

DEFAULT_OPTIONS = "exact,fast-fp32,int8,fast-unguided-last1,int8-unguided-last1"


def _sampling(option: str) -> Dict[str, Any]:
    opts = dict(GEN_OPTIONS[option])
    opts.update({("decode_" + k if k != "dtype" else "decode_dtype"): v for k, v in DECODE_OPTIONS[option].items()})
    return opts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="a pipeline folder (a finished quick start)")
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="comma list of " + ", ".join(GEN_OPTIONS))
    p.add_argument("--subset", type=int, default=8, help="protocol items per category")
    p.add_argument("--protocol", default=None, help="protocol file (default: the shipped shapes_v1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timing-images", type=int, default=16, help="images of the interleaved timing batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    options = [o for o in args.options.split(",") if o]
    unknown = [o for o in options if o not in GEN_OPTIONS]
    if unknown:
        p.error(f"unknown option(s) {unknown}; expected {', '.join(GEN_OPTIONS)}")
    if options[0] != "exact":
        options.insert(0, "exact")

    from infinity_lightning.evaluation import evaluate, load_protocol, select_subset
    from infinity_lightning.pipeline import InfinityPipeline

    device = C.setup(args.device, args.threads)
    info = C.machine_info(device)
    pipe = InfinityPipeline.from_pretrained(args.pipeline, device=device)
    protocol = select_subset(load_protocol(args.protocol), args.subset)
    bits: Dict[str, List[torch.Tensor]] = {}
    rows: List[Dict[str, Any]] = []
    for option in options:
        kept: List[torch.Tensor] = []

        def generate(prompts, seeds, option=option, kept=kept):
            out = pipe(prompts, seed=seeds, output_type="pt", batch_size=args.batch_size, progress=False,
                       return_bits=True, truncate_prompts=True, **_sampling(option))
            kept += [torch.cat([b.flatten() for b in image]) for image in out.bit_labels]
            return out.images

        report = evaluate(generate, protocol, batch_size=args.batch_size,
                          settings={"option": option, **{k: str(v) for k, v in _sampling(option).items()}})
        bits[option] = kept
        row = {"option": option, "sampling": {k: str(v) for k, v in _sampling(option).items()},
               "items": report["protocol"]["items"], "score_points": 100.0 * report["overall"]["accuracy"],
               "categories_points": {k: 100.0 * v["accuracy"] for k, v in report["categories"].items()},
               "generate_and_judge_seconds": report["protocol"]["seconds"]}
        if option.startswith("bf16") and not info["bf16_native"]:
            row["meaningful"] = False
        rows.append(row)
        print(f"# {option}: {row['score_points']:.1f} points", file=sys.stderr, flush=True)
    exact = rows[0]["score_points"]
    for row in rows:
        same = sum(int((a == b).sum()) for a, b in zip(bits[row["option"]], bits["exact"]))
        total = sum(a.numel() for a in bits["exact"])
        row["bit_agreement_with_exact_fp32"] = same / total
        row["score_difference_points_vs_exact"] = row["score_points"] - exact
        row["within_2_points"] = row["score_points"] >= exact - 2.0

    # speed: a fixed batch, options interleaved
    prompts = [it.prompt for it in protocol.items[:args.timing_images]]
    seeds = [it.seed for it in protocol.items[:args.timing_images]]
    times: Dict[str, List[float]] = {o: [] for o in options}
    call = lambda o: pipe(prompts, seed=seeds, output_type="pt", batch_size=args.batch_size,  # noqa: E731
                          progress=False, truncate_prompts=True, **_sampling(o))
    for o in options:
        call(o)
    for _ in range(args.repeats):
        for o in options:
            times[o].append(C.timed(lambda: call(o), device))
    for row in rows:
        sec = C.median(times[row["option"]])
        row["images_per_s_with_decode"] = len(prompts) / sec
        row["speedup_vs_exact"] = C.median(times["exact"]) / sec
        row["seconds_all"] = times[row["option"]]
    result = {"benchmark": "generation_quality", "pipeline": os.path.abspath(args.pipeline), "machine": info,
              "command": "python benchmarks/generation_quality.py " + " ".join(argv),
              "protocol": {"name": protocol.name, "subset_per_category": args.subset, "items": len(protocol.items)},
              "resolution": str(pipe.resolution), "rows": rows}
    print(json.dumps(result, indent=1))
    return 0 if all(r["within_2_points"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

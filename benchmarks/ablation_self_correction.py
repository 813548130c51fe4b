"""Ablation of Bitwise Self-Correction on the strict protocol, reusing a quick-start run.

The tokenizer, text encoder and encoded scenes of a finished ``infinity-lightning quickstart``
folder are kept; the transformer is trained again for each self-correction strength (flips on
every scale, the original's setting), each for the same wall-clock budget, and every model is
sampled at each temperature and judged on the protocol.  Prints JSON, then a markdown table.

    python benchmarks/ablation_self_correction.py --from runs/quickstart --out runs/ablation \
        --minutes 10 --strengths 0 0.1 0.2 0.3 --taus 0.5 1.0
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="a finished quick-start folder")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per strength)")
    parser.add_argument("--minutes", type=float, default=10.0, help="transformer training budget per strength")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--subset", type=int, default=None, help="protocol items per category (default: all)")
    parser.add_argument("--protocol", default=None, help="protocol file (default: the shipped shapes_v1)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from infinity_lightning.checkpoints import load_tokenizer
    from infinity_lightning.evaluation import evaluate, load_protocol
    from infinity_lightning.models.text_encoder import TextEncoder
    from infinity_lightning.quickstart import PhaseContext, export_pipeline, train_transformer
    from infinity_lightning.recipes import load_recipe, to_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    source, out = Path(args.source), Path(args.out)
    var_cfg = to_dict(load_recipe(source / "recipes" / "var.yaml"))
    tokenizer = load_tokenizer(source / "tokenizer.pth")
    encoder = TextEncoder.from_pretrained(source / "text_encoder")
    files = {"train": source / "data" / "train_latents.pt", "val": source / "data" / "val_latents.pt"}
    protocol = load_protocol(args.protocol)
    scales = len(json.loads((source / "summary.json").read_text())["tokenizer"]["schedule"])
    rows = []
    for strength in args.strengths:
        ctx = PhaseContext(out / f"bsc_{strength:g}", lambda s: print(s, file=sys.stderr, flush=True),
                           torch.device("cpu"), args.minutes * 60.0, False, int(var_cfg.get("seed", 0)))
        ctx.out.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(var_cfg)
        cfg["callbacks"]["self_correction"] = {"strength": strength, "layers": scales} if strength > 0 else None
        transformer, trained = train_transformer(ctx, cfg, files, tokenizer, encoder, args.minutes)
        pipe = export_pipeline(ctx, transformer, tokenizer, encoder, cfg)
        for tau in args.taus:
            def generate(prompts, seeds, tau=tau):
                return pipe(prompts, seed=seeds, output_type="pt", batch_size=64, progress=False, tau=tau).images

            t0 = time.perf_counter()
            report = evaluate(generate, protocol, subset=args.subset, out_dir=ctx.out / f"eval_tau{tau:g}")
            rows.append({"strength": strength, "layers": scales if strength > 0 else 0, "tau": tau,
                         "steps": trained["steps"], "val_bit_accuracy": trained["val_bit_accuracy"],
                         "overall": report["overall"]["accuracy"],
                         "categories": {k: v["accuracy"] for k, v in report["categories"].items()},
                         "held_out_pairs": report["held_out_pairs"]["accuracy"],
                         "eval_seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"source": str(source), "minutes_per_strength": args.minutes, "rows": rows}, indent=1))
    cats = list(rows[0]["categories"]) if rows else []
    print("\n| strength | tau | steps | val bit acc | overall | " + " | ".join(cats) + " | held-out |")
    print("|---" * (6 + len(cats)) + "|")
    for r in rows:
        print(f"| {r['strength']:g} | {r['tau']:g} | {r['steps']} | {r['val_bit_accuracy']:.3f} | {r['overall']:.3f} | "
              + " | ".join(f"{r['categories'][c]:.2f}" for c in cats) + f" | {r['held_out_pairs']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

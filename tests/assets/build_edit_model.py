"""Write the trained shapes pipeline behind the checker-judged editing tests (tests/assets/shapes_long).

    infinity-lightning quickstart --out runs/long --budget-minutes 60 --var-recipe var/shapes_long
    python tests/assets/build_edit_model.py --base runs/long --out tests/assets/shapes_long

``--base`` is a finished quick-start folder; the asset is its pipeline (tokenizer, text encoder,
transformer, sampling settings) with the transformer stored in bfloat16 (half the file; it loads
into float32 parameters and computes in float32), plus ``build.json``: the base's training
summary and strict-protocol scores.  The committed asset is the hour's recipe above (47.5 minutes
on a 2-core CPU; docs/experiments.md, "Longer run").

``--measure`` also prints the inpainting rates of tests/test_editing_trained.py at the build's
seeds (1000-1031): the bars of that test were set from these, before its own seeds (0-31) ran.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def export(base: Path, out: Path) -> Path:
    from infinity_lightning.pipeline import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained(base, device="cpu")
    pipe.transformer = pipe.transformer.to(torch.bfloat16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, format="safetensors")
    summary = json.loads((base / "summary.json").read_text())
    keep = {"base": base.name, "budget_minutes": summary.get("budget_minutes"),
            "tokenizer": {k: summary["tokenizer"][k] for k in ("parameters", "steps", "planned_steps", "psnr_db")},
            "transformer": {k: summary["transformer"][k] for k in ("preset", "parameters", "steps", "planned_steps",
                                                                    "batch_size", "val_bit_accuracy")},
            "shapes_v1": {"overall": summary["evaluation"]["overall"]["accuracy"],
                          **{k: v["accuracy"] for k, v in summary["evaluation"]["categories"].items()},
                          "held_out_pairs": summary["evaluation"]["held_out_pairs"]["accuracy"]},
            "minutes": round(summary["times"]["total"]["wall_s"] / 60, 1), "stored_dtype": "bfloat16"}
    (out / "build.json").write_text(json.dumps(keep, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a finished quick-start folder")
    p.add_argument("--out", required=True)
    p.add_argument("--measure", action="store_true", help="print the editing test's rates at seeds 1000-1031")
    args = p.parse_args(argv)
    out = export(Path(args.base), Path(args.out))
    print(f"wrote {out}")
    if args.measure:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from test_editing_trained import measure

        print(json.dumps(measure(out, range(1000, 1032)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

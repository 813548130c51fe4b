"""LoRA teaches the quick-start model a colour it never saw ("pink"): how long training takes,
how well the new word is drawn, and how far the quick start's own categories move.

    python benchmarks/lora_concept.py --quickstart runs/quickstart --out runs/lora_concept
    python benchmarks/lora_concept.py --tiny --out /tmp/lora_concept      # the mechanics, in a minute

1. The base pipeline (``--quickstart``, the folder ``infinity-lightning quickstart`` writes) is
   scored with the strict checker on the shipped protocol ``shapes_v1`` (the old categories) and
   on the new-concept protocol: :func:`~infinity_lightning.evaluation.build_shapes_protocol` over
   the quick start's world with pink added, keeping only the items that name pink (every category
   that can name a colour; the held-out pairs stay the quick start's).
2. ``recipes/var/lora_quickstart.yaml`` is trained through the recipe layer
   (:func:`~infinity_lightning.recipes.load_run_recipe`, :func:`~infinity_lightning.recipes.build_run`,
   a ``Trainer`` with the recipe's callbacks, its time budget included); the wall-clock and the
   process CPU time of the whole fit (setup included) are measured and the adapter is exported
   (``module.export``: ``<out>/lora_run/lora``).
3. The pipeline with the adapter (``InfinityPipeline.from_pretrained(..., lora=...)``) is scored on
   both protocols again, with the same seeds.

Prints one JSON document: per category of both protocols the accuracy before and after and the
change in points, the largest drop among the old categories, the training time and steps, and
the criteria: the new concept gained at least ``--min-gain`` points overall, no old category fell
by more than ``--max-drop`` points, and the fit took at most ``--max-minutes`` wall-clock minutes.
``--subset k`` scores k items per category of each protocol (a fixed spread, see
:func:`~infinity_lightning.evaluation.select_subset`); extra arguments are recipe overrides
(``trainer.max_steps=600``, ``model.lora.rank=8``, ``callbacks.time_budget.minutes=5``).

``--tiny`` writes a tiny random pipeline (with a text vocabulary that knows pink) instead of
reading a quick start, trains a few steps and scores two items per category: it checks that the
experiment runs end to end, and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RECIPE = "var/lora_quickstart"
CONCEPT = "pink"
#: overrides of --tiny: a few steps on a few scenes, nothing written but the adapter
TINY_OVERRIDES = ["data.num_samples=16", "data.batch_size=4", "model.lora.rank=4", "optim.warmup_steps=0",
                  "trainer.max_steps=4", "callbacks.sample_logger=null", "callbacks.checkpoint=null"]


def concept_protocol(per_category: int):
    """The quick start's world with the new colour, restricted to the items that name it."""
    from infinity_lightning.evaluation import (
        build_shapes_protocol,
        protocol_from_dict,
        select_subset,
    )
    from infinity_lightning.evaluation.protocol import QUICKSTART_WORLD

    world = dict(QUICKSTART_WORLD, colours=[*QUICKSTART_WORLD["colours"], CONCEPT])
    # about one item in nine names pink: build enough to keep per_category of them in each category
    protocol = protocol_from_dict(build_shapes_protocol(name=f"shapes_{CONCEPT}", world=world,
                                                        per_category=9 * per_category, held_out_per_pair=0),
                                  source=f"shapes with {CONCEPT}")
    named = [it for it in protocol.items if any(o.colour == CONCEPT for o in it.spec.objects)]
    return select_subset(protocol.with_items(named), per_category)


def generate_fn(pipe, image_size: int, batch_size: int):
    """``(prompts, seeds) -> (N, 3, H, W) in [0, 1]`` with the pipeline's sampling settings."""
    def run(prompts: List[str], seeds: List[int]):
        out = pipe(prompts, seed=seeds, output_type="pt", resolution=image_size, batch_size=batch_size,
                   progress=False)
        return out.images
    return run


def score(pipe, protocol, subset, batch_size: int) -> Dict[str, Any]:
    from infinity_lightning.evaluation import evaluate

    report = evaluate(generate_fn(pipe, protocol.image_size, batch_size), protocol, subset=subset,
                      batch_size=batch_size)
    return {"overall": report["overall"]["accuracy"], "items": report["protocol"]["items"],
            "categories": {name: s["accuracy"] for name, s in report["categories"].items()}}


def compare(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    def points(a, b):
        return None if a is None or b is None else round(100 * (b - a), 1)

    return {"items": before["items"], "overall_before": before["overall"], "overall_after": after["overall"],
            "overall_change_points": points(before["overall"], after["overall"]),
            "categories": {name: {"before": before["categories"][name], "after": after["categories"].get(name),
                                  "change_points": points(before["categories"][name], after["categories"].get(name))}
                           for name in before["categories"]}}


def tiny_quickstart(folder: Path) -> Path:
    """A tiny random pipeline folder (generic layout) whose text vocabulary knows the captions."""
    from infinity_lightning.datamodules import ShapesGenerator

    from infinity_lightning.tiny import make_tiny_pipeline

    words = ShapesGenerator(colours=[CONCEPT, "red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
                            shapes=["circle", "square", "triangle"])
    make_tiny_pipeline(folder, layout="generic", texts=[words.spec(i).caption for i in range(1000)])
    (folder / "pipeline.json").write_text(json.dumps({"format_version": 1, "default_resolution": 64}))
    return folder


def train(quickstart: Path, out: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    """Fit the LoRA recipe through the recipe layer; time it; export the adapter."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from infinity_lightning.recipes import build_run, load_run_recipe

    files = [f"model.weights={quickstart / 'transformer.pth'}", f"model.tokenizer={quickstart / 'tokenizer.pth'}",
             f"model.text_encoder={quickstart / 'text_encoder'}", f"output_dir={out}"]
    wall, cpu = time.perf_counter(), time.process_time()
    cfg, _, _ = load_run_recipe(RECIPE, files + list(overrides))
    run = build_run(cfg, out, source=RECIPE)
    trainer = pl.Trainer(callbacks=run.callbacks, logger=CSVLogger(save_dir=str(out), name="csv", version=""),
                         enable_progress_bar=False, enable_model_summary=False, **run.trainer_kwargs)
    trainer.fit(run.module, datamodule=run.datamodule)
    adapter = run.module.export(out)[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    budget = next((cb.summary() for cb in run.callbacks if type(cb).__name__ == "TimeBudget"), None)
    transformer = run.module.transformer
    return {"adapter": str(adapter), "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2),
            "threads": torch.get_num_threads(), "steps": int(trainer.global_step),
            "time_budget": budget, "rank": int(cfg.model.lora.rank),
            "trainable_parameters": sum(p.numel() for p in transformer.parameters() if p.requires_grad),
            "transformer_parameters": sum(p.numel() for p in transformer.parameters())}


def main(argv: Sequence[str] = ()) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"),
                        help="the quick start's folder (transformer.pth, tokenizer.pth, text_encoder/)")
    parser.add_argument("--out", type=Path, default=Path("runs/lora_concept"), help="where the run and adapter go")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: checks the mechanics only")
    parser.add_argument("--subset", type=int, default=None, help="items per category of the old protocol (all: 72)")
    parser.add_argument("--concept-items", type=int, default=24, help="items per category of the pink protocol")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    parser.add_argument("--min-gain", type=float, default=10.0, help="points the new concept must gain overall")
    parser.add_argument("--max-drop", type=float, default=5.0, help="points an old category may lose")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="wall-clock minutes the fit may take")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = parser.parse_args(list(argv))

    import torch

    from infinity_lightning.evaluation import load_protocol
    from infinity_lightning.pipeline import InfinityPipeline

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if args.tiny:
        args.quickstart = tiny_quickstart(args.out / "tiny_quickstart")
        args.subset, args.concept_items = args.subset or 2, min(args.concept_items, 2)
        overrides = TINY_OVERRIDES + overrides
    missing = [n for n in ("transformer.pth", "tokenizer.pth", "text_encoder") if not (args.quickstart / n).exists()]
    if missing:
        raise SystemExit(f"lora_concept: {args.quickstart} lacks {', '.join(missing)}; run `infinity-lightning "
                         f"quickstart --out {args.quickstart}` first (or pass --tiny)")
    old, new = load_protocol(), concept_protocol(args.concept_items)

    base = InfinityPipeline.from_pretrained(args.quickstart, device="cpu")
    before = {"old": score(base, old, args.subset, args.batch_size),
              "new": score(base, new, None, args.batch_size)}
    training = train(args.quickstart, args.out / "lora_run", overrides)
    adapted = InfinityPipeline.from_pretrained(args.quickstart, device="cpu", lora=training["adapter"])
    after = {"old": score(adapted, old, args.subset, args.batch_size),
             "new": score(adapted, new, None, args.batch_size)}

    old_cmp, new_cmp = compare(before["old"], after["old"]), compare(before["new"], after["new"])
    drops = [c["change_points"] for c in old_cmp["categories"].values() if c["change_points"] is not None]
    largest_drop = max([0.0] + [-d for d in drops])
    result = {
        "concept": CONCEPT, "recipe": RECIPE, "quickstart": str(args.quickstart), "tiny": bool(args.tiny),
        "overrides": overrides, "training": training,
        "new_concept": new_cmp, "old_categories": old_cmp, "largest_old_drop_points": round(largest_drop, 1),
        "criteria": {
            "new_concept_gain": (new_cmp["overall_change_points"] or 0.0) >= args.min_gain,
            "old_categories_within": largest_drop <= args.max_drop,
            "training_within_minutes": training["wall_minutes"] <= args.max_minutes,
            "thresholds": {"min_gain_points": args.min_gain, "max_drop_points": args.max_drop,
                           "max_wall_minutes": args.max_minutes},
        },
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""The quick start end to end in its ``--quick`` mode (tiny step counts, one protocol item per
category), and the pieces of its summary.

The full run's scores take minutes and are not asserted here; these tests check that every phase
runs, writes what it promises, that the numbers in ``summary.json`` are the right kind of numbers,
and that targets are never claimed for a run the time budget shortened.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from infinity_lightning.cli import build_parser
from infinity_lightning.quickstart import TARGETS, _judge_targets, format_summary, psnr, run_quickstart


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    lines = []
    summary = run_quickstart(out, quick=True, threads=1, budget_minutes=30, say=lines.append)
    return out, summary, lines


def test_quick_run_writes_every_output(quick_run):
    out, summary, lines = quick_run
    for name in ("summary.json", "eval/report.json", "eval/report.md", "eval/grid.png", "tokenizer.pth",
                 "transformer.pth", "transformer.json", "pipeline.json", "text_encoder/config.json",
                 "text_encoder/tokenizer_config.json", "recipes/tokenizer.yaml", "recipes/var.yaml"):
        assert (out / name).is_file(), name
    # the transformer recipe's checkpoint callback runs inside the quick start (it keeps its callbacks)
    assert list((out / "logs" / "transformer").rglob("last.ckpt"))
    for phase in ("tokenizer", "transformer", "eval"):
        assert list((out / "logs" / phase).rglob("events.out.tfevents.*")), f"no TensorBoard events for {phase}"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # the printed report card closes the run, one row per category
    assert "overall (mean of the categories)" in lines[-1] and "colour attribution" in lines[-1]


def test_quick_run_summary_numbers(quick_run):
    _, summary, _ = quick_run
    ev = summary["evaluation"]
    assert set(ev["categories"]) == {"single_object", "two_objects", "counting", "colours", "position",
                                     "colour_attribution"}
    for row in list(ev["categories"].values()) + [ev["held_out_pairs"]]:
        assert row["n"] == 1 and 0.0 <= row["accuracy"] <= 1.0 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    mean = sum(r["accuracy"] for r in ev["categories"].values()) / 6
    assert ev["overall"]["accuracy"] == pytest.approx(mean, abs=1e-4)
    tok = summary["tokenizer"]
    assert math.isfinite(tok["psnr_db"]) and tok["schedule"] == [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]
    assert tok["norm_groups"] == 1 and tok["steps"] == tok["planned_steps"] == 16  # the quick overrides apply
    tr = summary["transformer"]
    assert tr["steps"] == tr["planned_steps"] == 8 and tr["parameters"] > 2_000_000
    assert 0.55 < tr["val_bit_accuracy"] <= 1.0 and len(tr["val_bit_accuracy_per_scale"]) == 5
    assert summary["sampling"] == {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}
    assert summary["shortened"] is False and summary["targets"]["judged"] is True
    rows = summary["targets"]["rows"]
    assert rows["overall"]["met"] == (ev["overall"]["accuracy"] >= TARGETS["overall"])
    for phase in ("text_encoder", "tokenizer", "encode", "transformer", "evaluate"):
        assert summary["times"][phase]["wall_s"] > 0 and summary["times"][phase]["cpu_s"] >= 0


def test_quick_run_exports_load_as_a_pipeline(quick_run):
    from infinity_lightning import InfinityPipeline

    out, summary, _ = quick_run
    pipe = InfinityPipeline.from_pretrained(out, device="cpu")
    assert pipe.transformer.config.depth == 4 and pipe.transformer.config.embed_dim == 192
    assert pipe.tokenizer.config.norm_groups == 1 and pipe.tokenizer.config.base_ch == 16
    assert pipe.sampling.tau == summary["sampling"]["tau"] == 0.5
    assert [list(g) for g in pipe.schedule.grids] == summary["schedule"] == [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]
    first = pipe("a red circle", seed=5, output_type="pt").images
    again = pipe("a red circle", seed=5, output_type="pt").images
    assert first.shape == (1, 3, 64, 64) and torch.equal(first, again)


def _summary(accuracies, held_out=0.95, shortened=False):
    cats = {k: {"n": 72, "accuracy": v, "ci95": [max(0, v - 0.1), min(1, v + 0.1)]} for k, v in accuracies.items()}
    mean = sum(accuracies.values()) / len(accuracies)
    return {"evaluation": {"overall": {"accuracy": mean}, "categories": cats,
                           "held_out_pairs": {"n": 48, "accuracy": held_out, "ci95": [0.8, 1.0]}},
            "tokenizer": {"steps": 10, "planned_steps": 400, "shortened": shortened},
            "times": {"total": {"wall_s": 60.0}}}


def test_targets_are_not_claimed_for_a_shortened_run():
    good = dict(single_object=1.0, two_objects=0.9, counting=0.8, colours=0.95, position=0.8, colour_attribution=0.7)
    judged = _judge_targets(_summary(good), shortened=False)
    assert judged["judged"] and all(r["met"] for r in judged["rows"].values())
    cut = _judge_targets(_summary(good, shortened=True), shortened=True)
    assert not cut["judged"] and all(r["met"] is None for r in cut["rows"].values())
    assert all(r["measured"] is not None for r in cut["rows"].values())    # still reported, never claimed
    text = format_summary({**_summary(good, shortened=True), "targets": cut})
    assert "not judged: training was shortened" in text and "10 of 400 (shortened by the time budget)" in text
    weak = dict(good, counting=0.4)                                        # one category below 0.5
    rows = _judge_targets(_summary(weak), shortened=False)["rows"]
    assert rows["min_category"]["met"] is False and rows["min_category"]["measured"] == 0.4
    assert "NOT met" in format_summary({**_summary(weak), "targets": _judge_targets(_summary(weak), False)})


def test_psnr_of_known_error():
    target = torch.zeros(2, 3, 4, 4)
    assert psnr(target + 0.2, target) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-6)  # 0.1 in [0, 1] units


def test_cli_flags():
    args = build_parser().parse_args(["quickstart", "--out", "x", "--budget-minutes", "12", "--seed", "3",
                                      "--threads", "1", "--quick", "--var-set", "trainer.max_steps=5",
                                      "--protocol", "p.json"])
    assert (args.out, args.budget_minutes, args.seed, args.threads, args.quick, args.protocol) == \
        ("x", 12.0, 3, 1, True, "p.json")
    assert args.var_set == ["trainer.max_steps=5"] and args.device == "cpu"


def test_template_schedule_mode_trains_on_the_generation_schedule():
    from infinity_lightning.lit.tokenizer_module import BSQTokenizerModule
    from infinity_lightning.models.bsq_vae import BSQVAE
    from infinity_lightning.presets import tokenizer_config

    module = BSQTokenizerModule(BSQVAE(tokenizer_config("tiny_f8", base_ch=16, norm_groups=1)), schedule_mode="template",
                                perceptual_weight=0.0, adv_weight=0.0)
    assert [s[1:] for s in module.training_schedule(8, 8)] == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]

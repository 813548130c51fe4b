"""The quick start end to end in its ``--quick`` mode (tiny step counts), plus its budget guard.

The full run's prompt-following target (85% on 128 prompts) takes minutes and is not asserted
here; these tests check that every phase runs, writes what it promises, and that the numbers in
``summary.json`` are the right kind of numbers.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning.cli import build_parser
from infinity_lightning.quickstart import fit_steps, format_summary, psnr, run_quickstart


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    lines = []
    summary = run_quickstart(out, quick=True, num_eval_prompts=4, threads=1, budget_minutes=30, say=lines.append)
    return out, summary, lines


def test_quick_run_writes_every_output(quick_run):
    out, summary, lines = quick_run
    for name in ("summary.json", "samples.png", "tokenizer.pth", "transformer.pth", "transformer.json",
                 "pipeline.json", "text_encoder/config.json", "text_encoder/spiece.model",
                 "recipes/tokenizer.yaml", "recipes/var.yaml"):
        assert (out / name).is_file(), name
    for phase in ("tokenizer", "transformer", "eval"):
        assert list((out / "logs" / phase).rglob("events.out.tfevents.*")), f"no TensorBoard events for {phase}"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # the printed table closes the run
    assert "in-distribution prompts" in lines[-1] and "tokenizer PSNR" in lines[-1]


def test_quick_run_summary_numbers(quick_run):
    _, summary, _ = quick_run
    scores = summary["scores"]
    assert scores["in_distribution"]["n"] == 4
    assert scores["held_out_pairs"]["n"] == len(summary["held_out_pairs"]) == 3
    assert scores["two_objects"]["n"] == 2
    for group in ("in_distribution", "held_out_pairs", "two_objects"):
        for key in ("accuracy", "colour_accuracy", "shape_accuracy"):
            assert 0.0 <= scores[group][key] <= 1.0
        # "both right" can never beat either part
        assert scores[group]["accuracy"] <= min(scores[group]["colour_accuracy"], scores[group]["shape_accuracy"])
    tok = summary["tokenizer"]
    assert math.isfinite(tok["psnr_db"])
    # even 100 small steps reconstruct better than the best image that ignores the input
    assert tok["psnr_db"] > tok["psnr_mean_image_baseline_db"]
    assert 0.0 <= tok["checker_accuracy_on_reconstructions"] <= tok["checker_colour_accuracy_on_reconstructions"] <= 1.0
    assert tok["schedule"] == [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]
    assert tok["norm_groups"] == 1 and tok["steps"] == 100  # the quick overrides reach the tokenizer
    tr = summary["transformer"]
    assert tr["steps"] == 12 and tr["parameters"] > 2_000_000
    # a dozen steps already beat coin flips on the coarse scales' bits
    assert 0.55 < tr["val_bit_accuracy"] <= 1.0
    assert len(tr["val_bit_accuracy_per_scale"]) == 5
    assert summary["sampling"] == {"cfg": 3.0, "tau": summary["sampling"]["tau"], "top_k": 900, "top_p": 0.97,
                                   "resolution_px": 64}
    assert summary["pipeline_loads"] is True
    assert summary["target"]["met"] == (scores["in_distribution"]["accuracy"] >= 0.85)
    for phase in ("text_encoder", "tokenizer", "encode", "transformer", "evaluate", "total"):
        assert summary["times"][phase]["wall_s"] > 0 and summary["times"][phase]["cpu_s"] >= 0
    assert summary["budget"]["scale"] == 1.0


def test_quick_run_exports_load_as_a_pipeline(quick_run):
    from infinity_lightning import InfinityPipeline

    out, summary, _ = quick_run
    pipe = InfinityPipeline.from_pretrained(out, device="cpu")
    assert pipe.transformer.config.depth == 4 and pipe.transformer.config.embed_dim == 192
    assert pipe.tokenizer.config.norm_groups == 1 and pipe.tokenizer.config.base_ch == 16
    assert pipe.defaults["tau"] == summary["sampling"]["tau"]
    first = pipe("a red circle", seed=5, output_type="tensor")
    again = pipe("a red circle", seed=5, output_type="tensor")
    assert first.shape == (1, 3, 64, 64)
    assert torch.equal(first, again)


def test_quick_run_samples_grid(quick_run):
    out, _, _ = quick_run
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    # 4 + 3 + 2 captioned tiles of 128 px images: 8 columns, 2 rows
    assert grid.shape[1] == 8 * (128 + 8)
    assert grid.shape[0] == 2 * (128 + 8 + 26)
    assert grid.std() > 10  # images and captions, not a blank canvas


def test_fit_steps_scales_both_phases_to_the_budget():
    assert fit_steps(400, 1000, 0.5, 1.0, 1200.0) == (400, 1000, 1.0)
    tok, var, scale = fit_steps(400, 1000, 0.5, 1.0, 600.0)
    assert scale == pytest.approx(0.5) and (tok, var) == (200, 500)
    assert tok * 0.5 + var * 1.0 <= 600.0
    assert fit_steps(400, 1000, 0.5, 1.0, -5.0)[:2] == (10, 10)


def test_psnr_of_known_error():
    target = torch.zeros(2, 3, 4, 4)
    assert psnr(target + 0.2, target) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-6)  # 0.1 in [0, 1] units


def test_cli_flags():
    args = build_parser().parse_args(["quickstart", "--out", "x", "--budget-minutes", "12", "--seed", "3",
                                      "--num-eval-prompts", "200", "--threads", "1", "--quick",
                                      "--var-set", "trainer.max_steps=5"])
    assert (args.out, args.budget_minutes, args.seed, args.num_eval_prompts, args.threads, args.quick) == \
        ("x", 12.0, 3, 200, 1, True)
    assert args.var_set == ["trainer.max_steps=5"] and args.device == "cpu"
    assert build_parser().parse_args(["quickstart"]).num_eval_prompts >= 128


def test_format_summary_reports_a_missed_target():
    summary = {"scores": {"in_distribution": {"n": 128, "accuracy": 0.5, "colour_accuracy": 0.9,
                                              "shape_accuracy": 0.6}},
               "target": {"in_distribution_accuracy": 0.85, "met": False},
               "times": {"total": {"wall_s": 1.0, "cpu_s": 2.0}}}
    text = format_summary(summary)
    assert "50.0% of 128" in text and "NOT met" in text


def test_template_schedule_mode_trains_on_the_generation_schedule():
    from infinity_lightning.lit.tokenizer_module import BSQTokenizerModule
    from infinity_lightning.models.bsq_vae import BSQVAE
    from infinity_lightning.presets import tokenizer_config

    module = BSQTokenizerModule(BSQVAE(tokenizer_config("tiny_f8", base_ch=16, norm_groups=1)), schedule_mode="template",
                                perceptual_weight=0.0, adv_weight=0.0)
    assert [s[1:] for s in module.training_schedule(8, 8)] == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]

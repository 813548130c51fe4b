"""A tokenizer's reconstructions of a protocol's scenes, judged by the strict checker
(``calibrate(reconstruct=...)`` through benchmarks/evaluation_calibration.py's round trip): what a
transformer that predicted the encoder's bits would score, category by category."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infinity_lightning.checkpoints import load_tokenizer, save_tokenizer
from infinity_lightning.evaluation import build_shapes_protocol, protocol_from_dict
from infinity_lightning.evaluation.calibration import calibrate
from infinity_lightning.evaluation.protocol import TUNING_SEED_RANGE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from evaluation_calibration import main, tokenizer_round_trip  # noqa: E402

TRAINED = ROOT / "tests" / "assets" / "shapes_long" / "tokenizer.safetensors"


@pytest.fixture(scope="module")
def protocol():
    return protocol_from_dict(build_shapes_protocol(version=3, per_category=8, held_out_per_pair=2,
                                                    seed_range=TUNING_SEED_RANGE))


def _scores(protocol, tokenizer_file):
    result = calibrate(protocol, degradations=[], adversarial_per_family=1,
                       reconstruct=tokenizer_round_trip(str(tokenizer_file), protocol.image_size))
    return result["accepted_by_group"]


def test_renders_pass_and_a_trained_tokenizer_keeps_single_objects(protocol):
    scores = _scores(protocol, TRAINED)
    assert set(scores["clean"].values()) == {1.0}
    trained = scores["tokenizer_reconstruction"]
    assert trained["single_object"] >= 0.75 and trained["colours"] >= 0.75
    # what limits the hour's recipe: small objects of multi-object scenes do not survive the tokenizer
    assert trained["colour_attribution"] <= 0.25


def test_an_untrained_tokenizer_reaches_nothing(protocol, tmp_path):
    random = save_tokenizer(load_tokenizer("tiny_f8", base_ch=16, num_res_blocks=0, norm_groups=4),
                            tmp_path / "random.safetensors")
    scores = _scores(protocol, random)["tokenizer_reconstruction"]
    assert set(scores.values()) == {0.0}


def test_command_scores_reconstructions_by_category(capsys, tmp_path):
    import json

    path = tmp_path / "p.json"
    path.write_text(json.dumps(build_shapes_protocol(version=3, per_category=1, held_out_per_pair=1,
                                                     seed_range=TUNING_SEED_RANGE)))
    main(["--tokenizer", str(TRAINED), "--protocol", str(path), "--per-family", "1"])
    out = json.loads(capsys.readouterr().out)
    groups = out["accepted_by_group"]
    assert set(groups["tokenizer_reconstruction"]) == set(groups["clean"]) and out["tokenizer"] == str(TRAINED)

"""benchmarks/tokenizer_ceiling.py: a tokenizer's reconstructions of a protocol's scenes, judged by
the strict checker (what a transformer that predicted the encoder's bits would score)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from infinity_lightning.checkpoints import load_tokenizer
from infinity_lightning.evaluation import build_shapes_protocol, protocol_from_dict
from infinity_lightning.evaluation.protocol import TUNING_SEED_RANGE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tokenizer_ceiling  # noqa: E402

ASSET = ROOT / "tests" / "assets" / "shapes_long"


@pytest.fixture(scope="module")
def protocol():
    return protocol_from_dict(build_shapes_protocol(version=3, per_category=8, held_out_per_pair=2,
                                                    seed_range=TUNING_SEED_RANGE))


def test_renders_pass_and_a_trained_tokenizer_keeps_single_objects(protocol):
    renders = tokenizer_ceiling.ceiling(None, protocol)
    assert renders["overall"] == 1.0 and all(r["accuracy"] == 1.0 for r in renders["categories"].values())
    trained = tokenizer_ceiling.ceiling(tokenizer_ceiling._load_tokenizer(ASSET), protocol)["categories"]
    assert trained["single_object"]["accuracy"] >= 0.75 and trained["colours"]["accuracy"] >= 0.75
    # what limits the hour's recipe: small objects of multi-object scenes do not survive the tokenizer
    assert trained["colour_attribution"]["accuracy"] <= 0.25


def test_an_untrained_tokenizer_reaches_nothing(protocol):
    random = load_tokenizer("tiny_f8", base_ch=16, num_res_blocks=0, norm_groups=4).eval()
    result = tokenizer_ceiling.ceiling(random, protocol)
    assert result["overall"] == 0.0
    lo, hi = result["categories"]["single_object"]["ci95"]
    assert lo == 0.0 < hi < 0.5


def test_command_prints_json(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(build_shapes_protocol(version=3, per_category=1, held_out_per_pair=1,
                                                     seed_range=TUNING_SEED_RANGE)))
    assert tokenizer_ceiling.main(["--tokenizer", str(ASSET / "tokenizer.safetensors"), "--protocol", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["renders"]["overall"] == 1.0 and set(out["reconstructions"]["categories"]) == set(out["renders"]["categories"])

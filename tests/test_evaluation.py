"""The strict shapes evaluation: checker verdicts on correct and adversarial images, the frozen
protocol, the report card and the ``evaluate`` command."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from infinity_lightning.datamodules.shapes import PALETTE, ShapeObject, render_shapes
from infinity_lightning.evaluation import (
    CATEGORIES,
    EVALUATION_SEED_RANGE,
    TUNING_SEED_RANGE,
    ProtocolError,
    StrictShapesChecker,
    build_shapes_protocol,
    default_protocol_path,
    evaluate,
    load_protocol,
    parse_prompt,
    prompt_for,
    protocol_from_dict,
    protocol_to_json,
    select_subset,
    wilson_interval,
)
from infinity_lightning.evaluation.calibration import ADVERSARIAL_FAMILIES, adversarial_cases, render_item
from infinity_lightning.evaluation.checker import DEGRADATIONS, relations_between
from infinity_lightning.evaluation.specs import scene_for_spec

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


@pytest.fixture(scope="module")
def checker():
    return StrictShapesChecker()


@pytest.fixture(scope="module")
def clean_images(protocol):
    return [render_item(it, protocol) for it in protocol.items]


def _scene(*objects, size=64):
    return render_shapes([ShapeObject(*o) for o in objects], size, "gray")


# ------------------------------------------------------------------------------------------------
# protocol
# ------------------------------------------------------------------------------------------------
def test_shipped_protocol_is_the_builders_output_with_documented_seeds(protocol):
    data = build_shapes_protocol()
    assert default_protocol_path().read_text(encoding="utf-8") == protocol_to_json(data)
    assert protocol.to_dict() == data
    counts = {g: len(protocol.items_of(g)) for g in protocol.groups()}
    assert counts == {**{c: 72 for c in CATEGORIES}, "held_out_pairs": 48}
    assert len(protocol.items) == 480 >= 400
    lo, hi = EVALUATION_SEED_RANGE
    seeds = [it.seed for it in protocol.items]
    assert tuple(protocol.seed_range) == (lo, hi) and all(lo <= s < hi for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert TUNING_SEED_RANGE[1] <= lo  # evaluation seeds never tune a recipe
    # the held-out pairs are asked only in their own group, and every held-out pair is asked
    holdout = {tuple(p.split()) for p in protocol.world["holdout_pairs"]}
    for it in protocol.items:
        named = {o.pair for o in it.spec.objects}
        assert bool(named & holdout) == (it.category == "held_out_pairs"), it.id
        assert parse_prompt(it.prompt) == it.spec and prompt_for(it.spec) == it.prompt
    assert {it.spec.objects[0].pair for it in protocol.items_of("held_out_pairs")} == holdout
    # each category asks what its name says
    assert {it.spec.objects[0].count for it in protocol.items_of("counting")} == {2, 3}
    attribution = protocol.items_of("colour_attribution")
    assert all(a.colour != b.colour and a.shape != b.shape for a, b in (it.spec.objects for it in attribution))
    pairs = protocol.items_of("two_objects")
    assert all((a.colour == b.colour) != (a.shape == b.shape) for a, b in (it.spec.objects for it in pairs))
    relations = [it.spec.relation for it in protocol.items_of("position") if it.spec.relation]
    assert len(relations) == 36 and set(relations) == {"left of", "right of", "above", "below"}
    assert {it.spec.objects[0].colour for it in protocol.items_of("colours")} == set(protocol.world["colours"])
    # a different version is a different, equally valid protocol
    other = build_shapes_protocol(version=2, per_category=4, held_out_per_pair=1)
    assert len(other["items"]) == 27 and other["items"] != data["items"][:27]


def test_load_protocol_names_the_item_and_field(tmp_path, protocol):
    data = protocol.to_dict()

    def broken(edit):
        d = json.loads(json.dumps(data))
        edit(d)
        path = tmp_path / "p.json"
        path.write_text(json.dumps(d))
        with pytest.raises(ProtocolError) as e:
            load_protocol(path)
        return str(e.value)

    msg = broken(lambda d: d["items"][3]["spec"]["objects"][0].update(colour="pinkish"))
    assert "item #3 ('single_object/003')" in msg and "'spec.objects[0].colour'" in msg and "pinkish" in msg
    assert "\n" not in msg and str(tmp_path / "p.json") in msg
    assert "'seed'" in broken(lambda d: d["items"][0].update(seed=3))  # outside seed_range
    assert "duplicate id" in broken(lambda d: d["items"][1].update(id="single_object/000"))
    assert "'category'" in broken(lambda d: d["items"][0].update(category="style"))
    assert "held-out pair 'red square'" in broken(
        lambda d: d["items"][0]["spec"]["objects"][0].update(colour="red", shape="square"))
    assert "does not fit category 'counting'" in broken(lambda d: d["items"][144].update(spec=d["items"][0]["spec"]))
    assert "'world.shapes'" in broken(lambda d: d["world"].update(shapes=["hexagon"]))
    assert "'seed_range'" in broken(lambda d: d.update(seed_range=[5, 1]))
    assert "'version'" in broken(lambda d: d.pop("version"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        load_protocol(tmp_path / "bad.json")
    # any file of the format works, whatever its prompts' wording
    small = {**data, "name": "mine", "items": [dict(data["items"][0], prompt="a photo of a yellow square")]}
    mine = protocol_from_dict(small)
    assert mine.name == "mine" and mine.items[0].prompt == "a photo of a yellow square"


def test_subset_is_deterministic_and_spread(protocol):
    sub = select_subset(protocol, 3)
    assert [it.id for it in sub.items] == [it.id for it in select_subset(protocol, 3).items]
    assert {g: len(sub.items_of(g)) for g in sub.groups()} == {g: 3 for g in protocol.groups()}
    assert [it.id for it in sub.items_of("single_object")] == ["single_object/012", "single_object/036",
                                                                "single_object/060"]
    assert len(select_subset(protocol, 100).items) == len(protocol.items)
    with pytest.raises(ValueError, match="subset size"):
        select_subset(protocol, 0)


# ------------------------------------------------------------------------------------------------
# checker: positives
# ------------------------------------------------------------------------------------------------
def test_correct_renders_of_every_item_pass_clean_and_degraded(protocol, checker, clean_images):
    clean = [checker.check(img, it.spec, it.category) for it, img in zip(protocol.items, clean_images)]
    assert sum(v.passed for v in clean) / len(clean) >= 0.99, [v.reason for v in clean if not v.passed][:5]
    names = list(DEGRADATIONS)
    rng = np.random.default_rng(0)
    degraded = [checker.check(DEGRADATIONS[names[k % len(names)]](img, rng), it.spec, it.category)
                for k, (it, img) in enumerate(zip(protocol.items, clean_images))]
    assert sum(v.passed for v in degraded) / len(degraded) >= 0.99, [v.reason for v in degraded if not v.passed][:5]
    # the verdict carries the detections behind it
    v = clean[0]
    assert v.category == "single_object" and len(v.analysis.objects) == 1
    o = v.analysis.objects[0]
    assert (o.colour, o.shape) == protocol.items[0].spec.objects[0].pair and o.shape_iou > 0.9
    assert json.loads(json.dumps(v.to_dict()))["objects"][0]["colour"] == o.colour


def test_tensor_uint8_and_pil_inputs_agree(checker):
    img = _scene(("blue", "triangle", 0.5, 0.5, 0.6))
    u8 = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    inputs = ((img, (0, 1)), (np.asarray(img), (0, 1)), (u8.float() / 255, (0, 1)), (u8.float() / 127.5 - 1, (-1, 1)))
    for x, rng in inputs:
        assert StrictShapesChecker(value_range=rng).check(x, "a blue triangle").passed
    assert not StrictShapesChecker(value_range=(0, 1)).check(u8.float() / 127.5 - 1, "a blue triangle").passed


# ------------------------------------------------------------------------------------------------
# checker: adversarial images
# ------------------------------------------------------------------------------------------------
def test_every_adversarial_family_is_rejected(protocol, checker):
    cases = adversarial_cases(protocol, per_family=12, seed=1)
    assert set(cases) == set(ADVERSARIAL_FAMILIES) and all(cases[f] for f in ADVERSARIAL_FAMILIES)
    analysed = {}
    for family, items in cases.items():
        for case in items:
            if id(case.image) not in analysed:
                analysed[id(case.image)] = checker.analyse(case.image)
            verdict = checker.judge(analysed[id(case.image)], case.spec, case.category)
            assert not verdict.passed, (family, case.category, prompt_for(case.spec), verdict.reason)


def test_uniform_noise_never_passes_in_many_draws(checker):
    rng = np.random.default_rng(7)
    for k in range(60):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        assert not checker.check(noise, "a purple triangle").passed
    v = checker.check(noise, "a purple triangle")
    assert v.analysis.objects == [] and "no uniform background" in v.reason


def test_named_failures_get_the_right_reason(checker):
    # a red square beside a red circle is not "a red circle" (an extra object)
    v = checker.check(_scene(("red", "circle", 0.3, 0.5, 0.25), ("red", "square", 0.7, 0.5, 0.25)), "a red circle")
    assert not v.passed and v.reason.startswith("found 2 objects") and "expected 1" in v.reason
    # pink is not purple, cyan is not blue: the full palette names them
    v = checker.check(_scene(("pink", "circle", 0.5, 0.5, 0.5)), "a purple circle")
    assert not v.passed and v.analysis.objects[0].colour == "pink" and "is not purple" in v.reason
    v = checker.check(_scene(("cyan", "square", 0.5, 0.5, 0.5)), "a blue square")
    assert not v.passed and v.analysis.objects[0].colour == "cyan"
    # a flat 24 x 10 ellipse is no circle
    img = Image.new("RGB", (256, 256), PALETTE["gray"])
    ImageDraw.Draw(img).ellipse([80, 108, 176, 148], fill=PALETTE["red"])
    v = checker.check(img.reduce(4), "a red circle")
    assert not v.passed and v.analysis.objects[0].shape is None and "elongated" in v.reason
    # a diagonal line is no square
    img = Image.new("RGB", (256, 256), PALETTE["gray"])
    ImageDraw.Draw(img).line([(40, 40), (210, 200)], fill=PALETTE["red"], width=10)
    v = checker.check(img.reduce(4), "a red square")
    assert not v.passed and v.analysis.objects[0].shape is None
    # a 5-pixel speck is no object (counted apart)
    arr = np.asarray(_scene()).copy()
    arr[30:32, 30:32] = PALETTE["red"]
    arr[32, 30] = PALETTE["red"]
    v = checker.check(arr, "a red circle")
    assert not v.passed and v.analysis.specks == 1 and v.reason.startswith("found 0 objects")
    # the right shape in the wrong colour
    v = checker.check(_scene(("green", "circle", 0.5, 0.5, 0.5)), "a red circle")
    assert not v.passed and "green circle is not red" in v.reason
    # a blank image and a grid of all 24 pairs
    assert checker.check(_scene(), "a red circle").reason.startswith("found 0 objects")
    objs = [(c, s, (k % 6 + 0.5) / 6, (k // 6 + 1.5) / 6, 0.12)
            for k, (c, s) in enumerate((c, s) for c in ("red", "green", "blue", "yellow", "purple", "orange", "white",
                                                         "black") for s in ("circle", "square", "triangle"))]
    grid = checker.analyse(_scene(*objs))
    assert len(grid.objects) == 24
    for prompt in ("a red circle", "two red circles", "a red circle and a blue square"):
        assert not checker.judge(grid, parse_prompt(prompt)).passed


def test_counts_positions_and_attribution(checker):
    two = [("red", "circle", 0.2, 0.2, 0.22), ("red", "circle", 0.8, 0.8, 0.22)]
    assert checker.check(_scene(*two), "two red circles").passed
    assert "expected exactly 3" in checker.check(_scene(*two), "three red circles").reason
    assert not checker.check(_scene(*two, ("red", "circle", 0.5, 0.5, 0.22)), "two red circles").passed
    assert not checker.check(_scene(two[0], ("red", "square", 0.8, 0.8, 0.22)), "two red circles").passed
    # grid position: the centroid's cell
    one = _scene(("blue", "square", 0.15, 0.17, 0.22))
    assert checker.check(one, "a blue square at the top left").passed
    v = checker.check(one, "a blue square at the bottom right")
    assert "at the top left, expected the bottom right" in v.reason
    # relations, both ways round
    scene = _scene(("red", "circle", 0.2, 0.5, 0.22), ("blue", "square", 0.8, 0.5, 0.22))
    assert checker.check(scene, "a red circle to the left of a blue square").passed
    assert checker.check(scene, "a blue square to the right of a red circle").passed
    v = checker.check(scene, "a red circle to the right of a blue square")
    assert not v.passed and "is left of the blue square, expected right of" in v.reason
    assert not checker.check(scene, "a red circle above a blue square").passed
    # GenEval's rule: a mostly vertical offset is "above", not "left of"
    a, b = checker.analyse(_scene(("red", "circle", 0.45, 0.2, 0.22), ("blue", "square", 0.55, 0.8, 0.22))).objects
    pair = {a.colour: a, b.colour: b}
    assert relations_between(pair["red"], pair["blue"]) == ["above"]
    assert relations_between(pair["blue"], pair["red"]) == ["below"]
    # colour attribution: swapped colours are named as such
    swapped = _scene(("blue", "circle", 0.2, 0.5, 0.22), ("red", "square", 0.8, 0.5, 0.22))
    v = checker.check(swapped, "a red circle and a blue square")
    assert not v.passed and v.reason.startswith("colours swapped")
    assert checker.check(swapped, "a blue circle and a red square").passed


def test_categories_judge_what_they_name(checker):
    img = _scene(("red", "triangle", 0.5, 0.5, 0.5))
    spec = parse_prompt("a red circle")
    analysis = checker.analyse(img)
    assert not checker.judge(analysis, spec, "single_object").passed  # the shape is judged
    assert checker.judge(analysis, spec, "colours").passed  # only the colour is
    assert not checker.judge(analysis, parse_prompt("a blue circle"), "colours").passed
    with pytest.raises(ValueError, match="unknown category"):
        checker.judge(analysis, spec, "style")


# ------------------------------------------------------------------------------------------------
# report and runner
# ------------------------------------------------------------------------------------------------
def test_report_of_a_generator_right_on_half_the_items(protocol, tmp_path):
    sub = select_subset(protocol, 8)
    by_key = {(it.prompt, it.seed): it for it in sub.items}
    right = {it.id for g in sub.groups() for j, it in enumerate(sub.items_of(g)) if j % 2 == 0}
    calls = []

    def generate_fn(prompts, seeds):
        calls.append(len(prompts))
        out = []
        for p, s in zip(prompts, seeds):
            it = by_key[(p, s)]
            img = render_item(it, protocol) if it.id in right else Image.new("RGB", (64, 64), PALETTE["gray"])
            out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
        return torch.stack(out)

    report = evaluate(generate_fn, protocol, subset=8, batch_size=20, out_dir=tmp_path / "rep",
                      settings={"cfg": 3.0})
    assert calls == [20, 20, 16]
    lo, hi = wilson_interval(4, 8)
    assert (round(lo, 4), round(hi, 4)) == (0.2152, 0.7848)
    for g in CATEGORIES:
        assert report["categories"][g] == {"n": 8, "passed": 4, "accuracy": 0.5, "ci95": [0.2152, 0.7848]}
    assert report["overall"]["accuracy"] == 0.5 and report["overall"]["ci95"] == [0.2152, 0.7848]
    assert report["overall"]["categories_scored"] == list(CATEGORIES)
    held = report["held_out_pairs"]
    assert (held["n"], held["passed"]) == (8, 4) and sum(s["n"] for s in held["per_prompt"].values()) == 8
    assert {r["id"] for r in report["items"] if r["passed"]} == right
    assert all("found 0 " in r["reason"] and "expected" in r["reason"] for r in report["items"] if not r["passed"])
    assert report["protocol"]["subset"] == 8 and report["settings"] == {"cfg": 3.0}
    written = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert written["categories"] == report["categories"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| single_object | 8 | 4 | 50.0% | 21.5% - 78.5% |" in md and "**50.0%**" in md
    grid = Image.open(tmp_path / "rep" / "grid.png")
    assert grid.size[0] >= 128 * 5
    # a generator that returns [-1, 1] images, or the wrong count, is told so
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        evaluate(lambda p, s: torch.full((len(p), 3, 64, 64), -1.0), protocol, subset=1)
    with pytest.raises(ValueError, match="expected \\(2, 3, H, W\\)"):
        evaluate(lambda p, s: torch.zeros(1, 3, 64, 64), protocol, subset=1, batch_size=2)


# ------------------------------------------------------------------------------------------------
# command
# ------------------------------------------------------------------------------------------------
def test_evaluate_command_end_to_end_on_a_tiny_pipeline(tmp_path, capsys, protocol):
    from infinity_lightning.cli import main
    from infinity_lightning.tiny import make_tiny_pipeline

    with pytest.raises(SystemExit, match="--pipeline .*no such folder"):
        main(["evaluate", "--pipeline", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--subset must be >= 1"):
        main(["evaluate", "--pipeline", str(tmp_path), "--out", str(tmp_path / "o"), "--subset", "0"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(SystemExit, match="field 'items': missing"):
        main(["evaluate", "--pipeline", str(tmp_path), "--protocol", str(bad), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

    # the tiny T5's vocabulary is built from the protocol's prompts, so none is cut
    folder = make_tiny_pipeline(tmp_path / "tiny", layout="generic", transformer="tiny", tokenizer="tiny",
                                texts=[it.prompt for it in protocol.items])
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pipeline", str(folder), "--out", str(out), "--subset", "1", "--cfg", "2",
               "--tau", "0.5", "--batch-size", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("overall ") and "held_out_pairs" in printed
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert len(report["items"]) == 7 and set(report["categories"]) == set(CATEGORIES)
    assert report["protocol"]["subset"] == 1 and report["protocol"]["image_size"] == 64
    assert report["settings"]["cfg"] == 2.0 and report["settings"]["tau"] == 0.5
    assert all(isinstance(r["reason"], str) and r["reason"] for r in report["items"])
    assert 0.0 <= report["overall"]["accuracy"] <= 1.0


def test_evaluation_layers_and_a_light_command_module():
    # the evaluation package imports only foundations and the shapes world (static check)
    forbidden = ("infinity_lightning.pipeline", "infinity_lightning.quickstart", "infinity_lightning.commands",
                 "infinity_lightning.lit", "infinity_lightning.recipes", "infinity_lightning.callbacks",
                 "infinity_lightning.checkpoints")
    package = REPO_ROOT / "infinity_lightning" / "evaluation"
    files = sorted(package.glob("*.py"))
    assert {f.name for f in files} >= {"checker.py", "protocol.py", "report.py", "runner.py", "specs.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith(".."):
                    name = "infinity_lightning." + name.lstrip(".")
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
    # the command module is importable without torch (the CLI builds every parser)
    code = "import sys, infinity_lightning.commands.evaluate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_scene_for_spec_lays_out_what_the_spec_asks(protocol):
    for it in select_subset(protocol, 6).items:
        scene = scene_for_spec(it.spec, it.seed)
        assert scene == scene_for_spec(it.spec, it.seed)
        assert len(scene.objects) == it.spec.total_count
        assert sorted(o.colour + o.shape for o in scene.objects) == sorted(
            o.colour + o.shape for o in it.spec.objects for _ in range(o.count))


def test_training_captions_of_the_composed_mixture_pass_on_their_own_scenes(checker):
    from infinity_lightning.datamodules.shapes import ShapesGenerator

    gen = ShapesGenerator(shapes=("circle", "square", "triangle"), holdout_pairs=["red square"], seed=9)
    verdicts = [checker.check(img, spec.caption) for img, spec in (gen.render(i) for i in range(150))]
    assert sum(v.passed for v in verdicts) >= 149, [v.reason for v in verdicts if not v.passed]
    assert {v.category for v in verdicts} == set(CATEGORIES) - {"colours"}

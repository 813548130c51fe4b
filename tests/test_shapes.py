"""The procedural shapes dataset and the classical checker that scores generated images."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from infinity_lightning.datamodules import (
    ShapeObject,
    ShapesChecker,
    ShapesDataModule,
    ShapesGenerator,
    ShapeSpec,
    parse_caption,
    render_shapes,
)
from infinity_lightning.datamodules.shapes import (
    CELL_GAP,
    DEFAULT_COLOURS,
    DEFAULT_MODES,
    DEFAULT_SHAPES,
    POSITION_PHRASES,
    RELATIONS,
)

N = 160  # scenes scored per condition (all caption modes, all colours and shapes)


@pytest.fixture(scope="module")
def scenes():
    gen = ShapesGenerator(seed=0)
    specs = [gen.spec(i) for i in range(N)]
    return gen, specs, [render_shapes(s, 64, gen.background) for s in specs]


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_same_index_same_image_and_caption():
    a, b = ShapesGenerator(seed=3), ShapesGenerator(seed=3)
    for i in (0, 7, 10**9):
        (ia, sa), (ib, sb) = a.render(i), b.render(i)
        assert sa == sb and np.array_equal(np.asarray(ia), np.asarray(ib))
    assert a.spec(1) != a.spec(2)
    assert ShapesGenerator(seed=4).spec(0) != a.spec(0)


def test_grammar_covers_vocabulary_modes_and_counts():
    gen = ShapesGenerator(seed=0)
    specs = [gen.spec(i) for i in range(600)]
    caps = [s.caption for s in specs]
    assert {s.main.colour for s in specs} == set(DEFAULT_COLOURS)
    assert {s.main.shape for s in specs} == set(DEFAULT_SHAPES)
    assert any(c.startswith("two ") for c in caps) and any(c.startswith("three ") for c in caps)
    assert any(" at the top left" in c for c in caps) and any(" and a" in c for c in caps)
    for s in specs:  # the caption names what is drawn
        parsed = parse_caption(s.caption)
        assert parsed[0][:2] == (s.main.colour, s.main.shape)
        if parsed[0][2] > 1:
            assert len(s.objects) == parsed[0][2]
        if " and " in s.caption:
            assert [(o.colour, o.shape) for o in s.objects] == [p[:2] for p in parsed]
    single = ShapesGenerator(single_object=True)
    assert all(len(single.spec(i).objects) == 1 and len(single.spec(i).caption.split()) == 3 for i in range(50))


def test_holdout_pairs_never_appear_in_training_scenes():
    holdout = [("red", "triangle"), "blue circle"]
    gen = ShapesGenerator(holdout_pairs=holdout, seed=1)
    drawn = {(o.colour, o.shape) for i in range(2000) for o in gen.spec(i).objects}
    assert not drawn & {("red", "triangle"), ("blue", "circle")}
    assert ("red", "circle") in drawn and ("blue", "triangle") in drawn
    held = gen.holdout_specs(n_per_pair=2)
    assert sorted((s.main.colour, s.main.shape) for s in held) == sorted([("blue", "circle")] * 2 + [("red", "triangle")] * 2)
    dm = ShapesDataModule(holdout_pairs=holdout, batch_size=2)
    assert dm.holdout_prompts() == ["a blue circle", "a red triangle"]
    with pytest.raises(ValueError, match="unknown colour or shape"):
        ShapesGenerator(holdout_pairs=["red hexagon"])


def test_render_draws_the_requested_colour_and_background():
    spec = ShapeSpec((ShapeObject("red", "square", 0.5, 0.5, 0.5),), "a red square")
    arr = np.asarray(render_shapes(spec, 64, background="gray"))
    assert tuple(arr[32, 32]) == (220, 30, 30) and tuple(arr[2, 2]) == (128, 128, 128)
    assert abs((arr == (220, 30, 30)).all(-1).sum() - 32 * 32) <= 2 * 32  # side 0.5 of 64 px


@pytest.mark.parametrize("degrade", ["clean", "jpeg", "blur", "noise"])
def test_checker_is_right_on_rendered_images(scenes, degrade):
    _, specs, images = scenes
    rng = np.random.default_rng(0)
    if degrade == "jpeg":
        images = [_jpeg(im, 60) for im in images]
    elif degrade == "blur":
        images = [im.filter(ImageFilter.GaussianBlur(0.8)) for im in images]
    elif degrade == "noise":
        images = [Image.fromarray(np.clip(np.asarray(im) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8))
                  for im in images]
    score = ShapesChecker().score(images, specs)
    assert score["n"] == N
    assert score["colour_accuracy"] >= 0.98 and score["shape_accuracy"] >= 0.98 and score["accuracy"] >= 0.98


def test_checker_rejects_wrong_colour_and_wrong_shape(scenes):
    _, specs, images = scenes
    checker = ShapesChecker()
    wrong_colour, wrong_shape = [], []
    for k, s in enumerate(specs):
        present = {o.colour for o in s.objects}
        colour = [c for c in DEFAULT_COLOURS if c not in present][k % (len(DEFAULT_COLOURS) - len(present))]
        wrong_colour.append((colour, s.main.shape))
        shapes = [x for x in DEFAULT_SHAPES if x != s.main.shape]
        wrong_shape.append((s.main.colour, shapes[k % len(shapes)]))
    bad_colour = checker.score(images, wrong_colour)
    bad_shape = checker.score(images, wrong_shape)
    assert bad_colour["colour_accuracy"] == 0.0 and bad_colour["accuracy"] == 0.0
    # A pair scene may hold another object of the main colour with the wrong shape: allow a few.
    assert bad_shape["colour_accuracy"] == 1.0 and bad_shape["shape_accuracy"] <= 0.05
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert checker.check(blank, "a red circle") == {"colour": False, "shape": False, "both": False}


def test_checker_scores_datamodule_batches_from_captions():
    dm = ShapesDataModule(num_samples=64, batch_size=16, image_size=64, seed=2)
    checker = dm.checker()
    scores = [checker.score(b["images"], b["captions"]) for b in dm.train_dataloader()]
    assert sum(s["n"] for s in scores) == 64
    assert min(s["accuracy"] for s in scores) >= 0.98
    # Batch images are in [-1, 1] (the checker's default range); other ranges are declared.
    b = next(iter(dm.train_dataloader()))
    x, caption = b["images"][0], b["captions"][0]
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5
    assert checker.check(x, caption)["both"]
    assert ShapesChecker(value_range=(0.0, 1.0)).check((x + 1) / 2, caption)["both"]


def test_shapes_datamodule_epochs_and_new_samples():
    dm = ShapesDataModule(num_samples=8, batch_size=8, single_object=True, image_size=32)
    loader = dm.train_dataloader()
    e0 = next(iter(loader))
    e1 = next(iter(loader))
    assert e0["images"].shape == (8, 3, 32, 32) and e0["h_div_w_template"] == 1.0
    key = lambda b: sorted(zip(b["captions"], [float(x.sum()) for x in b["images"]]))  # noqa: E731
    assert key(e0) == key(e1)  # same scenes, reshuffled
    dm = ShapesDataModule(num_samples=8, batch_size=8, image_size=32, new_samples_each_epoch=True)
    loader = dm.train_dataloader()
    assert key(next(iter(loader))) != key(next(iter(loader)))


def test_checker_accepts_tensor_uint8_and_pil():
    spec = ShapeSpec((ShapeObject("blue", "triangle", 0.5, 0.5, 0.6),), "a blue triangle")
    img = render_shapes(spec, 64)
    u8 = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    pm1 = u8.float() / 127.5 - 1
    checker = ShapesChecker()
    for x in (img, u8, pm1, np.asarray(img)):
        assert checker.check(x, spec)["both"]
    assert checker.detect(img)[0].shape == "triangle"


QUICKSTART_HOLDOUT = ["red square", "green triangle", "blue circle"]


@pytest.mark.parametrize("modes, object_counts", [(None, {1, 2, 3}), ({"pair": 1}, {2}), ({"relation": 1}, {2}),
                                                  ({"count": 1}, {2, 3}), ({"position": 1}, {1})])
def test_holdout_pairs_are_never_named_in_any_caption(modes, object_counts):
    gen = ShapesGenerator(shapes=("circle", "square", "triangle"), holdout_pairs=QUICKSTART_HOLDOUT, modes=modes,
                          seed=11)
    held = {tuple(p.split()) for p in QUICKSTART_HOLDOUT}
    pattern = re.compile(r"\b(red squares?|green triangles?|blue circles?)\b")
    kinds = set()
    for i in range(1500):
        spec = gen.spec(i)
        assert not pattern.search(spec.caption), spec.caption
        assert not {p[:2] for p in parse_caption(spec.caption)} & held, spec.caption
        assert not {(o.colour, o.shape) for o in spec.objects} & held, spec.caption
        kinds.add(len(spec.objects))
    assert kinds == object_counts


def test_default_mixture_composes_every_caption_kind_in_its_proportions():
    gen = ShapesGenerator(seed=3)
    assert DEFAULT_MODES == {"single": 0.3, "pair": 0.25, "position": 0.15, "relation": 0.15, "count": 0.15}
    caps = [gen.spec(i).caption for i in range(4000)]
    relation_words = tuple(f" {p} " for p in RELATIONS.values())
    share = {
        "relation": sum(any(w in c for w in relation_words) for c in caps) / len(caps),
        "pair": sum(" and " in c for c in caps) / len(caps),
        "count": sum(c.split()[0] in ("two", "three") for c in caps) / len(caps),
        "position": sum(any(c.endswith(" " + p) for p in POSITION_PHRASES.values()) for c in caps) / len(caps),
    }
    share["single"] = 1 - sum(share.values())
    for mode, weight in DEFAULT_MODES.items():
        assert abs(share[mode] - weight) < 0.03, (mode, share[mode])
    # the quick start's switch still gives single objects only
    single = ShapesGenerator(single_object=True, modes={"relation": 1.0})
    assert all(len(single.spec(i).objects) == 1 for i in range(50))
    with pytest.raises(ValueError, match=r"unknown caption modes \['triples'\]"):
        ShapesGenerator(modes={"triples": 1.0})


def test_relation_scenes_stand_in_their_relation_and_objects_never_touch():
    gen = ShapesGenerator(modes={"relation": 1, "count": 1, "pair": 1}, seed=5)
    seen = set()
    for i in range(600):
        spec = gen.spec(i)
        for a, b in ((a, b) for k, a in enumerate(spec.objects) for b in spec.objects[k + 1:]):
            gap = max(abs(a.cx - b.cx) - (a.size + b.size) / 2, abs(a.cy - b.cy) - (a.size + b.size) / 2)
            assert gap >= CELL_GAP - 1e-9
        rel = next((r for r, phrase in RELATIONS.items() if f" {phrase} " in spec.caption), None)
        if rel is None:
            continue
        seen.add(rel)
        a, b = spec.objects
        dx, dy = a.cx - b.cx, a.cy - b.cy
        axis, other, sign = {"left of": (dx, dy, -1), "right of": (dx, dy, 1), "above": (dy, dx, -1),
                             "below": (dy, dx, 1)}[rel]
        assert axis * sign > 0.2 and abs(other) < abs(axis), spec
    assert seen == set(RELATIONS)


def test_datamodule_takes_the_mixture_from_recipe_arguments():
    dm = ShapesDataModule(num_samples=16, batch_size=16, image_size=32, modes={"count": 1.0},
                          shapes=["circle", "square", "triangle"], holdout_pairs=QUICKSTART_HOLDOUT)
    batch = next(iter(dm.train_dataloader()))
    assert all(c.split()[0] in ("two", "three") for c in batch["captions"])
    with pytest.raises(ValueError, match="unknown caption modes"):
        ShapesDataModule(modes={"pairs": 1.0})

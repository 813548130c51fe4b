"""Calibration of the strict checker: positives it must accept, adversarial images it must reject.

* :func:`render_item` draws a scene that satisfies a protocol item (laid out as the training
  grammar lays out scenes of its kind, from the item's seed).
* :func:`adversarial_cases` builds, for every failure the lenient checker let through, images
  paired with the prompt they could be mistaken for (:data:`ADVERSARIAL_FAMILIES`).
* :func:`calibrate` measures acceptance of clean, degraded (:data:`~.checker.DEGRADATIONS`) and
  optionally reconstructed renders of every protocol item, and rejection of each adversarial
  family; ``benchmarks/evaluation_calibration.py`` prints it as JSON.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from infinity_lightning.datamodules.shapes import PALETTE, POSITIONS, ShapeObject, render_shapes, shape_polygon

from .checker import DEGRADATIONS, HELD_OUT_GROUP, StrictShapesChecker, srgb_to_lab
from .protocol import Protocol, ProtocolItem, load_protocol
from .specs import ObjectSpec, PromptSpec, scene_for_spec

__all__ = ["render_item", "render_spec", "AdversarialCase", "adversarial_cases", "ADVERSARIAL_FAMILIES",
           "off_palette_colour", "calibrate"]

_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_SINGLE = ("single_object", "colours", HELD_OUT_GROUP)


def render_spec(spec: PromptSpec, seed: int, size: int = 64, background: str = "gray") -> Image.Image:
    """A scene satisfying ``spec`` (:func:`~.specs.scene_for_spec`) drawn at ``size`` pixels."""
    return render_shapes(scene_for_spec(spec, seed), size, background)


def render_item(item: ProtocolItem, protocol: Protocol) -> Image.Image:
    """A correct image for a protocol item, at the protocol's size and background."""
    return render_spec(item.spec, item.seed, protocol.image_size, protocol.world.get("background", "gray"))


@dataclass
class AdversarialCase:
    """An image that must fail ``spec`` under ``category``; ``family`` names the kind of trap."""

    family: str
    image: Image.Image
    spec: PromptSpec
    category: str


def off_palette_colour(colour: str, world_colours: Sequence[str], background: str = "gray") -> str:
    """The palette colour nearest to ``colour`` that is neither a world colour nor the background
    (pink for purple, cyan for blue): the colour a model that confuses hues would draw."""
    target = srgb_to_lab(PALETTE[colour])
    others = [c for c in PALETTE if c not in world_colours and c != background]
    return min(others, key=lambda c: float(np.linalg.norm(srgb_to_lab(PALETTE[c]) - target)))


def _with(spec: PromptSpec, index: int, **changes: Any) -> PromptSpec:
    objs = list(spec.objects)
    o = objs[index]
    objs[index] = ObjectSpec(changes.get("colour", o.colour), changes.get("shape", o.shape),
                             changes.get("count", o.count), changes.get("position", o.position))
    return PromptSpec(tuple(objs), changes.get("relation", spec.relation))


def _equidistant_mix(a: Sequence[int], b: Sequence[int]) -> Tuple[int, int, int]:
    """The RGB mix of ``a`` and ``b`` equally far from both in Lab (bisection on the mix weight)."""
    la, lb = srgb_to_lab(a), srgb_to_lab(b)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        t = (lo + hi) / 2
        mix = np.asarray(a) * (1 - t) + np.asarray(b) * t
        lab = srgb_to_lab(mix)
        if np.linalg.norm(lab - la) < np.linalg.norm(lab - lb):
            lo = t
        else:
            hi = t
    return tuple(int(round(v)) for v in np.asarray(a) * (1 - lo) + np.asarray(b) * lo)


def _canvas(size: int, background: str) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size * 4, size * 4), PALETTE[background])
    return img, ImageDraw.Draw(img)


def _grid_of_pairs(colours: Sequence[str], shapes: Sequence[str], size: int, background: str,
                   rng: np.random.Generator) -> Image.Image:
    pairs = [(c, s) for c in colours for s in shapes]
    order = rng.permutation(len(pairs))
    cols = int(np.ceil(np.sqrt(len(pairs) * 1.5)))
    rows = int(np.ceil(len(pairs) / cols))
    cell = 1.0 / max(cols, rows)
    objs = []
    for k, idx in enumerate(order):
        r, c = divmod(k, cols)
        objs.append(ShapeObject(pairs[idx][0], pairs[idx][1], (c + 0.5) * cell, (r + 0.5) * cell + (1 - rows * cell) / 2,
                                cell * 0.8))
    return render_shapes(objs, size, background)


def adversarial_cases(protocol: Optional[Protocol] = None, *, per_family: int = 48,
                      seed: int = 0) -> Dict[str, List[AdversarialCase]]:
    """Images that must fail, by family (see :data:`ADVERSARIAL_FAMILIES`), each paired with a
    prompt of the protocol it could be mistaken for.  At most ``per_family`` cases per family
    (the grid family pairs 4 images with every item instead).  Deterministic in ``seed``."""
    protocol = protocol or load_protocol()
    size, bg = protocol.image_size, protocol.world.get("background", "gray")
    colours, shapes = list(protocol.world["colours"]), list(protocol.world["shapes"])
    rng = np.random.default_rng([seed, 0xAD5])
    items = list(protocol.items)
    spread = [items[int(k)] for k in rng.permutation(len(items))]

    def pick(groups: Iterable[str], n: int = per_family) -> List[ProtocolItem]:
        chosen = [it for it in spread if it.category in groups]
        return chosen[:n]

    singles = pick(_SINGLE)
    out: Dict[str, List[AdversarialCase]] = {f: [] for f in ADVERSARIAL_FAMILIES}
    for it in spread[:per_family]:
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out["uniform_noise"].append(AdversarialCase("uniform_noise", Image.fromarray(noise), it.spec, it.category))
    for it in spread[per_family:2 * per_family]:
        low = int(rng.integers(3, 9))
        small = Image.fromarray(rng.integers(0, 256, (low, low, 3), dtype=np.uint8))
        out["smooth_noise"].append(AdversarialCase("smooth_noise", small.resize((size, size), Image.BICUBIC),
                                                   it.spec, it.category))
    for k, it in enumerate(spread[2 * per_family:3 * per_family]):
        # noise confined to a disc or square on a clean background: no background test stops it,
        # the object's colour spread and shape fit must
        img = np.array(Image.new("RGB", (size, size), PALETTE[bg]))
        low = int(rng.integers(3, 9))
        noise = (np.asarray(Image.fromarray(rng.integers(0, 256, (low, low, 3), dtype=np.uint8)).resize(
            (size, size), Image.BICUBIC)) if k % 2 else rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        yy, xx = np.mgrid[0:size, 0:size] / size
        r = rng.uniform(0.2, 0.35)
        region = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= r * r) if k % 4 < 2 else (
            (abs(xx - 0.5) <= r) & (abs(yy - 0.5) <= r))
        img[region] = noise[region]
        out["noise_patch"].append(AdversarialCase("noise_patch", Image.fromarray(img), it.spec, it.category))
    blank = Image.new("RGB", (size, size), PALETTE[bg])
    out["blank"] = [AdversarialCase("blank", blank, it.spec, it.category) for it in spread[:per_family]]
    grids = [_grid_of_pairs(colours, shapes, size, bg, rng) for _ in range(4)]
    out["grid_of_all_pairs"] = [AdversarialCase("grid_of_all_pairs", grids[k % 4], it.spec, it.category)
                                for k, it in enumerate(items)]
    for it in singles:
        o = it.spec.objects[0]
        wrong = [c for c in colours if c != o.colour][int(rng.integers(len(colours) - 1))]
        out["wrong_colour"].append(AdversarialCase("wrong_colour", render_spec(_with(it.spec, 0, colour=wrong), it.seed,
                                                                               size, bg), it.spec, it.category))
        off = off_palette_colour(o.colour, colours, bg)
        out["off_palette_colour"].append(AdversarialCase(
            "off_palette_colour", render_spec(_with(it.spec, 0, colour=off), it.seed, size, bg), it.spec, it.category))
        other = [s for s in shapes if s != o.shape][int(rng.integers(len(shapes) - 1))]
        if it.category != "colours":  # the colours category does not judge the named shape
            out["wrong_shape"].append(AdversarialCase(
                "wrong_shape", render_spec(_with(it.spec, 0, shape=other), it.seed, size, bg), it.spec, it.category))
        rgb = PALETTE[o.colour]
        img, draw = _canvas(size, bg)
        x, y = (rng.uniform(0.2, 0.8, 2) * size * 4)
        draw.rectangle([x, y, x + 8, y + 8], fill=rgb)
        draw.rectangle([x + 8, y, x + 12, y + 4], fill=rgb)  # about 5 pixels at the image size
        out["speck"].append(AdversarialCase("speck", img.reduce(4), it.spec, it.category))
        img, draw = _canvas(size, bg)
        a, b = rng.uniform(0.1, 0.3, 2) * size * 4, rng.uniform(0.7, 0.9, 2) * size * 4
        draw.line([tuple(a), tuple(b)], fill=rgb, width=int(rng.integers(8, 13)))
        out["line"].append(AdversarialCase("line", img.reduce(4), it.spec, it.category))
        img, draw = _canvas(size, bg)
        long_side, short_side = rng.uniform(0.33, 0.45) * size * 4, rng.uniform(0.14, 0.18) * size * 4
        w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        cx, cy = size * 2 + rng.uniform(-8, 8), size * 2 + rng.uniform(-8, 8)
        draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=rgb)
        out["flat_ellipse"].append(AdversarialCase("flat_ellipse", img.reduce(4), it.spec, it.category))
        img, draw = _canvas(size, bg)
        r = rng.uniform(0.09, 0.12) * size * 4
        lobes = 2 + len(out["irregular_blob"]) % 2  # a peanut of two discs, or a clover of three
        turn = rng.uniform(0, 2 * np.pi)
        for j in range(lobes):
            a = turn + 2 * np.pi * j / lobes
            reach = 0.75 * r if lobes == 2 else r  # overlapping lobes, one component
            dx, dy = reach * np.cos(a), reach * np.sin(a)
            draw.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=rgb)
        out["irregular_blob"].append(AdversarialCase("irregular_blob", img.reduce(4), it.spec, it.category))
        # perceptually halfway (equally far in Lab) between the named colour and its nearest other
        # palette colour
        lab = srgb_to_lab(rgb)
        neighbour = min((c for c in PALETTE if c not in (o.colour, bg)),
                        key=lambda c: float(np.linalg.norm(srgb_to_lab(PALETTE[c]) - lab)))
        mixed = _equidistant_mix(rgb, PALETTE[neighbour])
        scene = scene_for_spec(it.spec, it.seed)
        objects = [ShapeObject("gray", ob.shape, ob.cx, ob.cy, ob.size) for ob in scene.objects]
        img, draw = _canvas(size, bg)
        for ob in objects:  # drawn as render_shapes would, in the mixed colour
            side = ob.size * size * 4
            x0, y0 = ob.cx * size * 4 - side / 2, ob.cy * size * 4 - side / 2
            if ob.shape == "circle":
                draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=mixed)
            elif ob.shape == "square":
                draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=mixed)
            else:
                draw.polygon(shape_polygon(ob.shape, x0, y0, side), fill=mixed)
        out["blended_colour"].append(AdversarialCase("blended_colour", img.reduce(4), it.spec, it.category))
    pairs = [(c, s) for c in colours for s in shapes
             if f"{c} {s}" not in protocol.world.get("holdout_pairs", [])]
    for it in pick(set(_SINGLE) | {"two_objects", "colour_attribution", "position"}):
        if it.spec.relation is not None:
            continue
        named = {o.pair for o in it.spec.objects}
        extra = [p for p in pairs if p not in named][int(rng.integers(len(pairs) - len(named)))]
        objs = tuple(ObjectSpec(o.colour, o.shape, 1, o.position) for o in it.spec.objects)
        spec = PromptSpec(objs + (ObjectSpec(*extra),))
        out["extra_object"].append(AdversarialCase("extra_object", render_spec(spec, it.seed, size, bg),
                                                   it.spec, it.category))
        if len(objs) == 1:  # the extra object shares the named colour ("a red square beside a red circle")
            same = [s for s in shapes if s != objs[0].shape][0]
            spec = PromptSpec(objs + (ObjectSpec(objs[0].colour, same),))
            out["extra_object"].append(AdversarialCase("extra_object", render_spec(spec, it.seed + 1, size, bg),
                                                       it.spec, it.category))
    for it in pick({"counting"}):
        n = it.spec.objects[0].count
        for wrong in (n - 1, n + 1):
            out["wrong_count"].append(AdversarialCase("wrong_count", render_spec(_with(it.spec, 0, count=wrong),
                                                                                 it.seed, size, bg),
                                                      it.spec, it.category))
    for it in pick({"position"}):
        if it.spec.relation is not None:
            bad = _with(it.spec, 0, relation=_OPPOSITE[it.spec.relation])
        else:
            cell = it.spec.objects[0].position
            others = [c for c in POSITIONS if c != cell]
            bad = _with(it.spec, 0, position=others[int(rng.integers(len(others)))])
        out["swapped_position"].append(AdversarialCase("swapped_position", render_spec(bad, it.seed, size, bg),
                                                       it.spec, it.category))
    for it in pick({"colour_attribution"}):
        a, b = it.spec.objects
        bad = PromptSpec((ObjectSpec(b.colour, a.shape), ObjectSpec(a.colour, b.shape)))
        out["swapped_attribution"].append(AdversarialCase("swapped_attribution", render_spec(bad, it.seed, size, bg),
                                                          it.spec, it.category))
    return out


#: Adversarial families, each a failure the lenient checker let through.
ADVERSARIAL_FAMILIES: Tuple[str, ...] = (
    "uniform_noise", "smooth_noise", "noise_patch", "blank", "grid_of_all_pairs", "wrong_colour",
    "off_palette_colour", "blended_colour", "wrong_shape", "speck", "line", "flat_ellipse", "irregular_blob",
    "extra_object", "wrong_count", "swapped_position", "swapped_attribution",
)


def _rate(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def calibrate(protocol: Optional[Protocol] = None, *, checker: Optional[StrictShapesChecker] = None,
              degradations: Optional[Sequence[str]] = None, reconstruct: Optional[Callable[[Any], Any]] = None,
              adversarial_per_family: int = 48, seed: int = 0) -> Dict[str, Any]:
    """Acceptance and rejection rates of ``checker`` on ``protocol`` (default: the shipped one).

    ``accepted``: fraction of items whose correct render passes, clean, under each degradation
    and, with ``reconstruct`` (a function from a float tensor ``(B, 3, H, W)`` in [-1, 1] to the
    same, such as a tokenizer's encode-quantize-decode), after reconstruction.  ``rejected``:
    fraction of each adversarial family that fails.  ``failures`` lists a few reasons of each
    unexpected outcome.
    """
    protocol = protocol or load_protocol()
    checker = checker or StrictShapesChecker()
    degradations = list(DEGRADATIONS) if degradations is None else list(degradations)
    t0 = time.time()
    clean = [render_item(it, protocol) for it in protocol.items]
    accepted: Dict[str, float] = {}
    failures: Dict[str, List[str]] = {}

    by_group: Dict[str, Dict[str, float]] = {}

    def run(name: str, images: Sequence[Any]) -> None:
        flags: Dict[str, List[bool]] = {}
        for it, img in zip(protocol.items, images):
            verdict = checker.check(img, it.spec, it.category)
            flags.setdefault(it.category, []).append(verdict.passed)
            if not verdict.passed:
                failures.setdefault(name, []).append(f"{it.id} {it.prompt!r}: {verdict.reason}")
        accepted[name] = _rate([f for group in flags.values() for f in group])
        by_group[name] = {group: _rate(v) for group, v in flags.items()}

    run("clean", clean)
    for name in degradations:
        rng = np.random.default_rng([seed, 0xDE6, len(name)])
        run(name, [DEGRADATIONS[name](img, rng) for img in clean])
    if reconstruct is not None:
        import torch

        batch = torch.stack([torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1) for img in clean])
        x = batch.float() / 127.5 - 1
        with torch.no_grad():
            recon = torch.cat([reconstruct(x[i:i + 64]) for i in range(0, len(x), 64)])
        run("tokenizer_reconstruction", [((r.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
                                         for r in recon])
    rejected: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    cache: Dict[int, Any] = {}
    for family, cases in adversarial_cases(protocol, per_family=adversarial_per_family, seed=seed).items():
        flags = []
        for case in cases:
            key = id(case.image)
            if key not in cache:  # the grid images are shared by many cases: analyse once
                cache[key] = checker.analyse(case.image)
            verdict = checker.judge(cache[key], case.spec, case.category)
            flags.append(not verdict.passed)
            if verdict.passed:
                failures.setdefault(f"adversarial:{family}", []).append(
                    f"{case.category} {case.spec.to_dict()}: passed ({verdict.reason})")
        rejected[family], counts[family] = _rate(flags), len(flags)
    return {
        "protocol": f"{protocol.name} v{protocol.version}", "items": len(protocol.items),
        "image_size": protocol.image_size, "accepted": accepted, "accepted_by_group": by_group, "rejected": rejected,
        "adversarial_cases": counts, "failures": {k: v[:5] for k, v in failures.items()},
        "failure_counts": {k: len(v) for k, v in failures.items()}, "seconds": round(time.time() - t0, 1),
    }

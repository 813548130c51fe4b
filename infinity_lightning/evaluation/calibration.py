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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from infinity_lightning.datamodules.shapes import PALETTE, POSITIONS, ShapeObject, render_shapes

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
        top = (1 - rows * cell) / 2
        objs.append(ShapeObject(pairs[idx][0], pairs[idx][1], (c + 0.5) * cell, top + (r + 0.5) * cell, cell * 0.8))
    return render_shapes(objs, size, background)


class _Traps:
    """Builders of adversarial images for one protocol world (one method per family; each
    returns the images to judge against the item's own spec)."""

    def __init__(self, protocol: Protocol, rng: np.random.Generator) -> None:
        self.size = protocol.image_size
        self.bg = protocol.world.get("background", "gray")
        self.colours = list(protocol.world["colours"])
        self.shapes = list(protocol.world["shapes"])
        held = set(protocol.world.get("holdout_pairs", []))
        self.pairs = [(c, s) for c in self.colours for s in self.shapes if f"{c} {s}" not in held]
        self.rng = rng

    def _choice(self, values: Sequence[Any]) -> Any:
        return values[int(self.rng.integers(len(values)))]

    def _render(self, spec: PromptSpec, seed: int) -> Image.Image:
        return render_spec(spec, seed, self.size, self.bg)

    def _noise(self, smooth: bool) -> np.ndarray:
        if not smooth:
            return self.rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        low = int(self.rng.integers(3, 9))
        small = Image.fromarray(self.rng.integers(0, 256, (low, low, 3), dtype=np.uint8))
        return np.asarray(small.resize((self.size, self.size), Image.BICUBIC))

    # -- whole-image traps -------------------------------------------------------------------
    def uniform_noise(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        return [Image.fromarray(self._noise(False))]

    def smooth_noise(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        return [Image.fromarray(self._noise(True))]

    def noise_patch(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        # noise confined to a disc or square on a clean background: the background test cannot
        # stop it, the object's colour spread and shape fit must
        img = np.array(Image.new("RGB", (self.size, self.size), PALETTE[self.bg]))
        noise = self._noise(smooth=k % 2 == 1)
        yy, xx = np.mgrid[0:self.size, 0:self.size] / self.size
        r = self.rng.uniform(0.2, 0.35)
        disc = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= r * r
        region = disc if k % 4 < 2 else (abs(xx - 0.5) <= r) & (abs(yy - 0.5) <= r)
        img[region] = noise[region]
        return [Image.fromarray(img)]

    def blank(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        return [Image.new("RGB", (self.size, self.size), PALETTE[self.bg])]

    # -- one object, wrong -------------------------------------------------------------------
    def wrong_colour(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        wrong = self._choice([c for c in self.colours if c != it.spec.objects[0].colour])
        return [self._render(_with(it.spec, 0, colour=wrong), it.seed)]

    def off_palette_colour(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        off = off_palette_colour(it.spec.objects[0].colour, self.colours, self.bg)
        return [self._render(_with(it.spec, 0, colour=off), it.seed)]

    def blended_colour(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        # perceptually halfway (equally far in Lab) between the named colour and its nearest
        # other palette colour
        colour = it.spec.objects[0].colour
        lab = srgb_to_lab(PALETTE[colour])
        neighbour = min((c for c in PALETTE if c not in (colour, self.bg)),
                        key=lambda c: float(np.linalg.norm(srgb_to_lab(PALETTE[c]) - lab)))
        mixed = _equidistant_mix(PALETTE[colour], PALETTE[neighbour])
        scene = scene_for_spec(it.spec, it.seed)
        objects = [ShapeObject(mixed, o.shape, o.cx, o.cy, o.size) for o in scene.objects]  # type: ignore[arg-type]
        return [render_shapes(objects, self.size, self.bg)]

    def wrong_shape(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        if it.category == "colours":  # that category does not judge the named shape
            return []
        other = self._choice([s for s in self.shapes if s != it.spec.objects[0].shape])
        return [self._render(_with(it.spec, 0, shape=other), it.seed)]

    def _draw(self, it: ProtocolItem,
              paint: Callable[[ImageDraw.ImageDraw, Tuple[int, int, int]], None]) -> Image.Image:
        img, draw = _canvas(self.size, self.bg)
        paint(draw, PALETTE[it.spec.objects[0].colour])
        return img.reduce(4)

    def speck(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        x, y = self.rng.uniform(0.2, 0.8, 2) * self.size * 4

        def paint(draw, rgb):  # about 5 pixels at the image size
            draw.rectangle([x, y, x + 8, y + 8], fill=rgb)
            draw.rectangle([x + 8, y, x + 12, y + 4], fill=rgb)
        return [self._draw(it, paint)]

    def line(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        a, b = self.rng.uniform(0.1, 0.3, 2) * self.size * 4, self.rng.uniform(0.7, 0.9, 2) * self.size * 4
        width = int(self.rng.integers(8, 13))
        return [self._draw(it, lambda draw, rgb: draw.line([tuple(a), tuple(b)], fill=rgb, width=width))]

    def flat_ellipse(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        long_side, short_side = self.rng.uniform(0.33, 0.45, 1)[0], self.rng.uniform(0.14, 0.18, 1)[0]
        w, h = ((long_side, short_side) if k % 2 else (short_side, long_side))
        w, h = w * self.size * 4, h * self.size * 4
        cx, cy = self.size * 2 + self.rng.uniform(-8, 8, 2)
        return [self._draw(it, lambda draw, rgb: draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                                                              fill=rgb))]

    def irregular_blob(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        r = self.rng.uniform(0.09, 0.12) * self.size * 4
        lobes = 2 + k % 2  # a peanut of two discs, or a clover of three, overlapping: one component
        reach = 0.75 * r if lobes == 2 else r
        turn = self.rng.uniform(0, 2 * np.pi)
        cx, cy = self.size * 2 + self.rng.uniform(-8, 8, 2)

        def paint(draw, rgb):
            for j in range(lobes):
                a = turn + 2 * np.pi * j / lobes
                x, y = cx + reach * np.cos(a), cy + reach * np.sin(a)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        return [self._draw(it, paint)]

    # -- composition traps -------------------------------------------------------------------
    def extra_object(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        if it.spec.relation is not None:
            return []
        objs = tuple(ObjectSpec(o.colour, o.shape, 1, o.position) for o in it.spec.objects)
        named = {o.pair for o in objs}
        extra = self._choice([p for p in self.pairs if p not in named])
        out = [self._render(PromptSpec(objs + (ObjectSpec(*extra),)), it.seed)]
        if len(objs) == 1:  # an extra object of the named colour ("a red square beside a red circle")
            same = next(s for s in self.shapes if s != objs[0].shape)
            out.append(self._render(PromptSpec(objs + (ObjectSpec(objs[0].colour, same),)), it.seed + 1))
        return out

    def wrong_count(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        n = it.spec.objects[0].count
        return [self._render(_with(it.spec, 0, count=wrong), it.seed) for wrong in (n - 1, n + 1)]

    def swapped_position(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        if it.spec.relation is not None:
            bad = _with(it.spec, 0, relation=_OPPOSITE[it.spec.relation])
        else:
            bad = _with(it.spec, 0, position=self._choice([c for c in POSITIONS if c != it.spec.objects[0].position]))
        return [self._render(bad, it.seed)]

    def swapped_attribution(self, it: ProtocolItem, k: int) -> List[Image.Image]:
        a, b = it.spec.objects
        return [self._render(PromptSpec((ObjectSpec(b.colour, a.shape), ObjectSpec(a.colour, b.shape))), it.seed)]


#: Adversarial family -> the protocol groups whose prompts it is judged against (None: all).
_FAMILY_GROUPS: Dict[str, Optional[Tuple[str, ...]]] = {
    "uniform_noise": None, "smooth_noise": None, "noise_patch": None, "blank": None,
    **{f: _SINGLE for f in ("wrong_colour", "off_palette_colour", "blended_colour", "wrong_shape", "speck", "line",
                            "flat_ellipse", "irregular_blob")},
    "extra_object": _SINGLE + ("two_objects", "colour_attribution", "position"),
    "wrong_count": ("counting",), "swapped_position": ("position",), "swapped_attribution": ("colour_attribution",),
}


def adversarial_cases(protocol: Optional[Protocol] = None, *, per_family: int = 48,
                      seed: int = 0) -> Dict[str, List[AdversarialCase]]:
    """Images that must fail, by family (see :data:`ADVERSARIAL_FAMILIES`), each paired with a
    prompt of the protocol it could be mistaken for: ``per_family`` items per family (a family
    may draw two images for one item), drawn from the groups the family fools, in a shuffled
    order.  ``grid_of_all_pairs`` pairs 4 grids with every item instead.  Deterministic in
    ``seed``."""
    protocol = protocol or load_protocol()
    rng = np.random.default_rng([seed, 0xAD5])
    traps = _Traps(protocol, rng)
    items = list(protocol.items)
    shuffled = [items[int(k)] for k in rng.permutation(len(items))]
    out: Dict[str, List[AdversarialCase]] = {}
    for family, groups in _FAMILY_GROUPS.items():
        chosen = [it for it in shuffled if groups is None or it.category in groups][:per_family]
        build = getattr(traps, family)
        out[family] = [AdversarialCase(family, img, it.spec, it.category)
                       for k, it in enumerate(chosen) for img in build(it, k)]
    grids = [_grid_of_pairs(traps.colours, traps.shapes, traps.size, traps.bg, rng) for _ in range(4)]
    out["grid_of_all_pairs"] = [AdversarialCase("grid_of_all_pairs", grids[k % 4], it.spec, it.category)
                                for k, it in enumerate(items)]
    return {f: out[f] for f in ADVERSARIAL_FAMILIES}


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

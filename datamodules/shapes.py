"""A procedurally drawn captioned dataset of coloured shapes, and a checker for generated images.

Nothing is downloaded: a caption grammar picks colours, shapes, positions and counts
("a red circle", "a blue square at the top left", "two green triangles",
"a red circle and a blue square", "a red circle to the left of a blue square"),
:func:`render_shapes` draws the scene with Pillow (supersampled for anti-aliasing), and
:class:`ShapesChecker` tells with classical image analysis whether an image shows the caption's
main object in the right colour and shape.  That checker is lenient (it looks for the main object
only and accepts any nearest colour); the measure of whether a model learned the world is the
strict checker and protocol of :mod:`infinity_lightning.evaluation`.

Every sample is a pure function of ``(data_seed, index)``: the same index always gives the same
image and caption, for any number of workers, and any index is valid (the generator is
infinite; the DataModule draws ``num_samples`` of them per epoch).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .base import ImageTextDataModule, IndexedSource

RGB = Tuple[int, int, int]

#: Named colours (well separated in RGB, so a nearest-colour decision is robust to blur/JPEG).
PALETTE: Dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (145, 45, 200),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "cyan": (20, 200, 220),
    "pink": (250, 120, 190),
    "brown": (130, 75, 30),
}

DEFAULT_COLOURS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPE_NAMES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
DEFAULT_SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

#: 3 x 3 grid of positions: name -> (column, row) and the phrase used in captions.
POSITIONS: Dict[str, Tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}

#: Relations between two objects ("a red circle to the left of a blue square") -> caption phrase.
#: The first object named stands in that relation to the second.
RELATIONS: Dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                             "above": "above", "below": "below"}

#: Caption kinds and their default sampling weights: the composed mixture.  Single large objects
#: stay the largest share (0.3): they carry colour and shape at the size the tokenizer resolves
#: best, and every other kind builds on them.  Two-object captions come next (0.25) because they
#: serve two evaluation categories at once (both objects present, and each colour bound to its
#: own shape).  Grid positions, relations and counts get 0.15 each: enough that each evaluation
#: category sees several thousand captions in a quick-start-sized run, while the three kinds share
#: the small-object layout and so reinforce one another.
DEFAULT_MODES: Dict[str, float] = {"single": 0.3, "pair": 0.25, "position": 0.15, "relation": 0.15, "count": 0.15}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: colour and shape names, centre ``(cx, cy)`` and side ``size`` as
    fractions of the image side, and the grid position named in the caption (or ``None``)."""

    colour: str
    shape: str
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.6
    position: Optional[str] = None


@dataclass(frozen=True)
class ShapeSpec:
    """A scene: its objects (the first is the *main* object) and its caption."""

    objects: Tuple[ShapeObject, ...]
    caption: str

    @property
    def main(self) -> ShapeObject:
        """The object the caption names first."""
        return self.objects[0]


def _rgb(colour: Union[str, Sequence[int]]) -> RGB:
    if isinstance(colour, str):
        if colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; known colours: {sorted(PALETTE)}")
        return PALETTE[colour]
    c = tuple(int(v) for v in colour)
    if len(c) != 3:
        raise ValueError(f"a colour is a name or an (r, g, b) triple, got {colour!r}")
    return c  # type: ignore[return-value]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_polygon(shape: str, x0: float, y0: float, side: float) -> List[Tuple[float, float]]:
    """Vertices of a polygon shape (triangle, diamond, star) whose box has top-left corner
    ``(x0, y0)`` and side ``side``, as :func:`render_shapes` draws it."""
    return _polygon(shape, x0, y0, side)


def _polygon(shape: str, x0: float, y0: float, s: float) -> List[Tuple[float, float]]:
    cx, cy = x0 + s / 2, y0 + s / 2
    if shape == "triangle":
        return [(x0, y0 + s), (x0 + s, y0 + s), (cx, y0)]
    if shape == "diamond":
        return [(cx, y0), (x0 + s, cy), (cx, y0 + s), (x0, cy)]
    if shape == "star":
        outer, inner = s / 2, s / 2 * 0.45
        pts = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known shapes: {list(SHAPE_NAMES)}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, s: float, fill: Any) -> None:
    # Boxes are inclusive of their last pixel; a side under one pixel (the checker fitting a
    # speck in a generated image) is a one-pixel box, which Pillow accepts.
    last = max(s - 1, 0.0)
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + last, y0 + last], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + last, y0 + last], fill=fill)
    else:
        draw.polygon(_polygon(shape, x0, y0, s), fill=fill)


def render_shapes(spec: Union[ShapeSpec, Sequence[ShapeObject]], size: int = 64,
                  background: Union[str, Sequence[int]] = "gray", supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB ``size x size`` PIL image.

    Objects are drawn at ``supersample`` times the size and box-filtered down (anti-aliasing).
    """
    objects = spec.objects if isinstance(spec, ShapeSpec) else tuple(spec)
    big = size * supersample
    img = Image.new("RGB", (big, big), _rgb(background))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        s = obj.size * big
        _draw(draw, obj.shape, obj.cx * big - s / 2, obj.cy * big - s / 2, s, _rgb(obj.colour))
    return img.reduce(supersample) if supersample > 1 else img


#: Smallest gap between the boxes of objects in neighbouring grid cells, as a fraction of the
#: image side (3 px at 64 px): objects never touch, so each one is a separate component.
CELL_GAP = 0.05


def cell_object(rng: np.random.Generator, colour: str, shape: str, position: str) -> ShapeObject:
    """A small object (side 0.2-0.26 of the image) in the grid cell ``position``, its centre
    jittered within the cell so that its box stays :data:`CELL_GAP` / 2 inside the cell."""
    col, row = POSITIONS[position]
    size = float(rng.uniform(0.2, 0.26))
    jitter = (1 / 3 - size - CELL_GAP) / 2
    cx = (col + 0.5) / 3 + float(rng.uniform(-jitter, jitter))
    cy = (row + 0.5) / 3 + float(rng.uniform(-jitter, jitter))
    return ShapeObject(colour, shape, cx, cy, size, position)


def relation_cells(relation: str, rng: np.random.Generator) -> Tuple[str, str]:
    """Two grid positions (names of :data:`POSITIONS`) whose objects stand in ``relation``: the
    same row for "left of"/"right of", the same column for "above"/"below", so the offset between
    the objects points along the named axis."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; known: {list(RELATIONS)}")
    line = int(rng.integers(3))
    near, far = sorted(int(k) for k in rng.choice(3, size=2, replace=False))
    if relation in ("right of", "below"):
        near, far = far, near
    by_cell = {cell: name for name, cell in POSITIONS.items()}
    if relation in ("left of", "right of"):
        return by_cell[(near, line)], by_cell[(far, line)]
    return by_cell[(line, near)], by_cell[(line, far)]


def _normalise_pairs(pairs: Optional[Iterable[Any]]) -> frozenset:
    out = set()
    for p in pairs or ():
        if isinstance(p, str):
            parts = p.split()
            if len(parts) != 2:
                raise ValueError(f"holdout pair {p!r} must read '<colour> <shape>'")
            p = tuple(parts)
        colour, shape = p
        if colour not in PALETTE or shape not in SHAPE_NAMES:
            raise ValueError(f"holdout pair {p!r}: unknown colour or shape")
        out.add((colour, shape))
    return frozenset(out)


class ShapesGenerator:
    """Scene specs and images from a caption grammar, deterministic per index.

    Args:
        colours / shapes: vocabularies (names from :data:`PALETTE` and :data:`SHAPE_NAMES`).
        background: background colour name or RGB (must differ from every object colour).
        modes: caption kinds and weights (default :data:`DEFAULT_MODES`, a composed mixture):
            ``"single"`` (one large object, "a red circle"), ``"position"`` (one object in a
            3 x 3 grid cell, "a red circle at the top left"), ``"count"`` (2-``max_count`` equal
            objects, "two green triangles"), ``"pair"`` (two different objects, "a red circle and
            a blue square"), ``"relation"`` (two different objects in one row or column, "a red
            circle to the left of a blue square", see :data:`RELATIONS`).
        single_object: shorthand for ``modes={"single": 1}`` (the quick start).
        holdout_pairs: ``(colour, shape)`` pairs (or ``"colour shape"`` strings) never drawn and
            never named in any caption of any mode (the other objects of a two-object, count or
            relation scene are drawn from the training pairs too), to test compositional
            generalisation on them later (:meth:`holdout_specs`).
        seed: the content seed; sample ``i`` uses ``numpy.random.default_rng([seed, i])``.
    """

    def __init__(self, colours: Sequence[str] = DEFAULT_COLOURS, shapes: Sequence[str] = DEFAULT_SHAPES,
                 background: Union[str, Sequence[int]] = "gray", modes: Optional[Mapping[str, float]] = None,
                 single_object: bool = False, holdout_pairs: Optional[Iterable[Any]] = None,
                 max_count: int = 3, seed: int = 0) -> None:
        self.colours = tuple(colours)
        self.shapes = tuple(shapes)
        for c in self.colours:
            _rgb(c)
        for s in self.shapes:
            if s not in SHAPE_NAMES:
                raise ValueError(f"unknown shape {s!r}; known shapes: {list(SHAPE_NAMES)}")
        if not self.colours or not self.shapes:
            raise ValueError("colours and shapes must not be empty")
        self.background = _rgb(background)
        if any(_rgb(c) == self.background for c in self.colours):
            raise ValueError(f"background {background!r} equals an object colour; choose another background")
        modes = {"single": 1.0} if single_object else dict(modes or DEFAULT_MODES)
        unknown = set(modes) - set(DEFAULT_MODES)
        if unknown:
            raise ValueError(f"unknown caption modes {sorted(unknown)}; known: {sorted(DEFAULT_MODES)}")
        self.mode_names = [m for m, w in modes.items() if w > 0]
        weights = np.array([modes[m] for m in self.mode_names], dtype=np.float64)
        if not len(weights):
            raise ValueError("at least one caption mode needs a positive weight")
        self.mode_probs = weights / weights.sum()
        self.holdout = _normalise_pairs(holdout_pairs)
        self.train_pairs = [(c, s) for c in self.colours for s in self.shapes if (c, s) not in self.holdout]
        if not self.train_pairs:
            raise ValueError("holdout_pairs excludes every colour-shape pair")
        if not 2 <= max_count <= 4:
            raise ValueError("max_count must be between 2 and 4")
        self.max_count = max_count
        self.seed = int(seed)

    # -- specs --------------------------------------------------------------------------------
    def _cell_object(self, rng: np.random.Generator, colour: str, shape: str, position: str) -> ShapeObject:
        return cell_object(rng, colour, shape, position)

    def _pair(self, rng: np.random.Generator) -> Tuple[str, str]:
        return self.train_pairs[int(rng.integers(len(self.train_pairs)))]

    def spec_from_rng(self, rng: np.random.Generator, mode: Optional[str] = None,
                      pair: Optional[Tuple[str, str]] = None) -> ShapeSpec:
        """Draw one scene (``mode`` and the main ``(colour, shape)`` may be forced)."""
        if mode is None:
            mode = self.mode_names[int(rng.choice(len(self.mode_names), p=self.mode_probs))]
        colour, shape = pair if pair is not None else self._pair(rng)
        cells = list(POSITIONS)
        if mode == "single":
            size = float(rng.uniform(0.45, 0.72))
            margin = (1 - size) / 2 * 0.7
            obj = ShapeObject(colour, shape, 0.5 + float(rng.uniform(-margin, margin)),
                              0.5 + float(rng.uniform(-margin, margin)), size)
            return ShapeSpec((obj,), f"{_article(colour)} {colour} {shape}")
        if mode == "position":
            position = cells[int(rng.integers(len(cells)))]
            obj = self._cell_object(rng, colour, shape, position)
            return ShapeSpec((obj,), f"{_article(colour)} {colour} {shape} {POSITION_PHRASES[position]}")
        if mode == "count":
            n = int(rng.integers(2, self.max_count + 1))
            chosen = rng.choice(len(cells), size=n, replace=False)
            objs = tuple(self._cell_object(rng, colour, shape, cells[int(k)]) for k in chosen)
            return ShapeSpec(objs, f"{COUNT_WORDS[n]} {colour} {PLURALS[shape]}")
        if mode in ("pair", "relation"):
            other = self._pair(rng)
            for _ in range(16):
                if other != (colour, shape):
                    break
                other = self._pair(rng)
            first, second = f"{_article(colour)} {colour} {shape}", f"{_article(other[0])} {other[0]} {other[1]}"
            if mode == "pair":
                chosen = rng.choice(len(cells), size=2, replace=False)
                cell_a, cell_b = cells[int(chosen[0])], cells[int(chosen[1])]
                caption = f"{first} and {second}"
            else:
                relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
                cell_a, cell_b = relation_cells(relation, rng)
                caption = f"{first} {RELATIONS[relation]} {second}"
            a = self._cell_object(rng, colour, shape, cell_a)
            b = self._cell_object(rng, other[0], other[1], cell_b)
            return ShapeSpec((a, b), caption)
        raise ValueError(f"unknown caption mode {mode!r}")

    def spec(self, index: int) -> ShapeSpec:
        """The scene of sample ``index`` (any non-negative integer)."""
        return self.spec_from_rng(np.random.default_rng([self.seed, int(index)]))

    def render(self, index: int, size: int = 64) -> Tuple[Image.Image, ShapeSpec]:
        """``(image, spec)`` of sample ``index``."""
        spec = self.spec(index)
        return render_shapes(spec, size, self.background), spec

    def holdout_specs(self, n_per_pair: int = 1, mode: str = "single", seed: int = 1) -> List[ShapeSpec]:
        """Scenes of the held-out pairs only (for evaluation), ``n_per_pair`` of each."""
        rng = np.random.default_rng([self.seed, seed, 7])
        return [self.spec_from_rng(rng, mode, pair) for pair in sorted(self.holdout) for _ in range(n_per_pair)]


# ------------------------------------------------------------------------------------------------
# Checker
# ------------------------------------------------------------------------------------------------

_CAPTION_RE = re.compile(
    r"(?:(?P<article>an?|one|two|three|four)\s+)(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+?)s?\b"
)
_WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_SINGULAR = {v: k for k, v in PLURALS.items()}


def parse_caption(caption: str) -> List[Tuple[str, str, int]]:
    """``[(colour, shape, count), ...]`` named in a grammar caption, in order."""
    out = []
    for m in _CAPTION_RE.finditer(caption.lower()):
        colour, shape = m.group("colour"), m.group("shape")
        shape = _SINGULAR.get(shape, shape)
        if colour in PALETTE and shape in SHAPE_NAMES:
            out.append((colour, shape, _WORD_COUNTS[m.group("article")]))
    return out


@lru_cache(maxsize=None)
def _shape_stats() -> Dict[str, Tuple[float, float, float]]:
    """Per shape: area as a fraction of side^2, and the centroid offset from the box centre
    (x, y) in units of the side; measured on a large drawing."""
    n = 400
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    out = {}
    for shape in SHAPE_NAMES:
        canvas = Image.new("L", (n, n), 0)
        _draw(ImageDraw.Draw(canvas), shape, 0, 0, n, 255)
        m = np.asarray(canvas, dtype=np.float64) / 255
        area = m.sum()
        out[shape] = (area / n ** 2, ((m * xs).sum() / area - n / 2) / n, ((m * ys).sum() / area - n / 2) / n)
    return out


def _render_alpha(shape: str, cx: float, cy: float, side: float, x0: int, y0: int, w: int, h: int,
                  supersample: int = 4) -> np.ndarray:
    # Coverage (0..1) of a shape in the window [x0, x0 + w) x [y0, y0 + h) of the image grid.
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    _draw(ImageDraw.Draw(canvas), shape, (cx - x0 - side / 2) * supersample, (cy - y0 - side / 2) * supersample,
          side * supersample, 255)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255


def shape_geometry(shape: str) -> Tuple[float, float, float]:
    """``(area / side**2, centroid x offset / side, centroid y offset / side)`` of ``shape``
    (offsets from the centre of its box), so a measured area and centroid fix the box."""
    if shape not in SHAPE_NAMES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {list(SHAPE_NAMES)}")
    return _shape_stats()[shape]


def _blur(alpha: np.ndarray, radius: float) -> np.ndarray:
    if radius <= 0:
        return alpha
    img = Image.fromarray(np.round(alpha * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img, dtype=np.float32) / 255


#: RGB -> YCbCr (JPEG) rows; luma is weighted up when estimating coverage because JPEG keeps it
#: at full resolution while chroma is subsampled and smeared across object edges.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], dtype=np.float32)
_YCBCR_WEIGHTS = np.array([4.0, 1.0, 1.0], dtype=np.float32)


def label_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected components of a boolean mask (numpy only): ``(labels, n)`` with labels
    ``1..n`` in an int array of the mask's shape (0 outside the mask).  Every pixel takes the
    smallest label among its neighbours, then jumps to its label's label, until nothing changes."""
    h, w = mask.shape
    big = h * w
    # Labels are flat pixel indices; a padded frame of `big` keeps the neighbour shifts simple.
    flat = np.where(mask.ravel(), np.arange(big), big)
    lab = np.full((h + 2, w + 2), big, dtype=np.int64)
    inner = lab[1:-1, 1:-1]
    inner[...] = flat.reshape(h, w)
    table = np.append(flat, big)
    while True:
        nb = np.minimum.reduce([lab[1:-1, 1:-1], lab[:-2, 1:-1], lab[2:, 1:-1], lab[1:-1, :-2], lab[1:-1, 2:],
                                lab[:-2, :-2], lab[:-2, 2:], lab[2:, :-2], lab[2:, 2:]])
        nb = np.where(mask, nb, big)
        table[:big] = nb.ravel()
        for _ in range(4):  # pointer jumping: follow label chains
            nb = table[nb]
            table[:big] = nb.ravel()
        if np.array_equal(nb, inner):
            break
        inner[...] = nb
    uniq = np.unique(inner[mask])
    remap = np.zeros(big + 1, dtype=np.int64)
    remap[uniq] = np.arange(1, len(uniq) + 1)
    return np.where(mask, remap[inner], 0), len(uniq)


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _to_uint8(image: Any, value_range: Tuple[float, float]) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        x = image.detach().to("cpu")
        if x.dim() == 3 and x.shape[0] in (1, 3):
            x = x.permute(1, 2, 0)
        if x.dtype == torch.uint8:
            arr = x.numpy()
        else:
            lo, hi = value_range
            arr = ((x.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).numpy()
        return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError("numpy images must be uint8 (H, W, 3)")
    return arr


@dataclass
class DetectedObject:
    """A foreground component: nearest palette colour, best-fitting shape, the fit's mean squared
    coverage error (lower is better) and the area in pixels."""

    colour: str
    shape: str
    fit_error: float
    area: int


class ShapesChecker:
    """Checks that an image shows the caption's main object in the right colour and shape.

    Classical analysis, no learned weights: the background colour is the median of the border
    pixels; pixels far from it are foreground; 8-connected components smaller than
    ``min_area_fraction`` of the image are noise.  A component's colour is the palette colour
    nearest to the median of its interior (eroded) pixels.  Its shape is found by synthesis: the
    per-pixel coverage of the object (each pixel projected onto the background-to-colour line,
    luma weighted) gives the object's area and centroid; for each candidate shape these fix the
    side and centre, the shape is drawn anti-aliased there (and blurred a little, for blurry
    images), and the shape with the smallest squared coverage error wins.

    :meth:`check` returns ``{"colour": bool, "shape": bool, "both": bool}``: ``colour`` is true
    when some object has the main object's colour, ``shape`` when one of those objects also has
    its shape (without a colour match: when the largest object has the shape).

    It is lenient by design (a training-time signal): it ignores extra objects and every object
    but the main one, names any colour after its nearest vocabulary colour however far, and never
    rejects a poor shape fit, so noise, grids of objects or off-palette colours can pass.  Use
    :class:`infinity_lightning.evaluation.StrictShapesChecker` to decide whether a model learned.
    """

    def __init__(self, colours: Sequence[str] = DEFAULT_COLOURS, shapes: Sequence[str] = DEFAULT_SHAPES,
                 min_area_fraction: float = 0.004, foreground_threshold: float = 48.0,
                 blur_radii: Sequence[float] = (0.0, 1.0),
                 value_range: Tuple[float, float] = (-1.0, 1.0)) -> None:
        self.colours = tuple(colours)
        self.shapes = tuple(shapes)
        self.palette = np.array([_rgb(c) for c in self.colours], dtype=np.float32)
        self.min_area_fraction = min_area_fraction
        self.foreground_threshold = foreground_threshold
        self.blur_radii = tuple(blur_radii)
        self.value_range = value_range
        for shape in self.shapes:
            if shape not in SHAPE_NAMES:
                raise ValueError(f"unknown shape {shape!r}; known shapes: {list(SHAPE_NAMES)}")

    def _fit_shape(self, arr: np.ndarray, bg: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> Tuple[str, float]:
        h, w, _ = arr.shape
        d = (colour - bg) @ _YCBCR.T
        obs = (arr - bg) @ _YCBCR.T
        alpha = np.clip((obs * d * _YCBCR_WEIGHTS).sum(-1) / max(float((d * d * _YCBCR_WEIGHTS).sum()), 1.0), 0, 1)
        near = mask
        for _ in range(2):  # the anti-aliased rim lies just outside the thresholded mask
            p = np.pad(near, 1, constant_values=False)
            near = near | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        ys, xs = np.nonzero(near)
        x0, x1 = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 3, w)
        y0, y1 = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 3, h)
        a = (alpha * near)[y0:y1, x0:x1]
        area = float(a.sum())
        if area <= 0:
            return self.shapes[0], float("inf")
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        mx, my = float((a * xx).sum() / area), float((a * yy).sum() / area)
        stats = _shape_stats()
        best, best_err = self.shapes[0], float("inf")
        for shape in self.shapes:
            frac, dx, dy = stats[shape]
            side = (area / frac) ** 0.5
            model = _render_alpha(shape, mx - dx * side, my - dy * side, side, x0, y0, x1 - x0, y1 - y0)
            for radius in self.blur_radii:
                err = float(((_blur(model, radius) - a) ** 2).sum() / area)
                if err < best_err:
                    best, best_err = shape, err
        return best, best_err

    def detect(self, image: Any) -> List[DetectedObject]:
        """Objects found in an image (tensor ``(3, H, W)`` in ``value_range``, PIL, or uint8 array),
        largest first."""
        arr = _to_uint8(image, self.value_range).astype(np.float32)
        h, w, _ = arr.shape
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], 0)
        bg = np.median(border, axis=0)
        fg = np.sqrt(((arr - bg) ** 2).sum(-1)) > self.foreground_threshold
        labels, n = label_components(fg)
        if n == 0:
            return []
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        found = []
        for k in range(1, n + 1):
            if areas[k] < self.min_area_fraction * h * w:
                continue
            mask = labels == k
            inner = _erode(mask)
            pix = arr[inner] if inner.sum() >= 4 else arr[mask]
            colour_rgb = np.median(pix, axis=0)
            ci = int(np.argmin(((self.palette - colour_rgb) ** 2).sum(-1)))
            best, best_err = self._fit_shape(arr, bg, mask, self.palette[ci])
            found.append(DetectedObject(self.colours[ci], best, best_err, int(areas[k])))
        found.sort(key=lambda o: -o.area)
        return found

    @staticmethod
    def _target(spec: Any) -> Tuple[str, str]:
        if isinstance(spec, ShapeSpec):
            return spec.main.colour, spec.main.shape
        if isinstance(spec, ShapeObject):
            return spec.colour, spec.shape
        if isinstance(spec, str):
            parsed = parse_caption(spec)
            if not parsed:
                raise ValueError(f"caption {spec!r} names no '<colour> <shape>' object")
            return parsed[0][0], parsed[0][1]
        colour, shape = spec
        return colour, shape

    def check(self, image: Any, spec: Any) -> Dict[str, bool]:
        """Whether ``image`` shows the main object of ``spec`` (a :class:`ShapeSpec`, a caption,
        or a ``(colour, shape)`` pair) in the right colour and shape."""
        colour, shape = self._target(spec)
        objects = self.detect(image)
        same_colour = [o for o in objects if o.colour == colour]
        colour_ok = bool(same_colour)
        if colour_ok:
            shape_ok = any(o.shape == shape for o in same_colour)
        else:
            shape_ok = bool(objects) and objects[0].shape == shape
        return {"colour": colour_ok, "shape": shape_ok, "both": colour_ok and shape_ok}

    def score(self, images: Iterable[Any], specs: Iterable[Any]) -> Dict[str, float]:
        """Accuracies over a set: ``{"colour_accuracy", "shape_accuracy", "accuracy", "n"}``
        (``accuracy``: colour and shape both right).  ``images`` may be a batch tensor."""
        results = [self.check(img, spec) for img, spec in zip(images, specs)]
        n = len(results)
        if n == 0:
            return {"colour_accuracy": 0.0, "shape_accuracy": 0.0, "accuracy": 0.0, "n": 0}
        return {
            "colour_accuracy": sum(r["colour"] for r in results) / n,
            "shape_accuracy": sum(r["shape"] for r in results) / n,
            "accuracy": sum(r["both"] for r in results) / n,
            "n": n,
        }


# ------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------


class ShapesSource(IndexedSource):
    """``num_samples`` scenes of a :class:`ShapesGenerator` per epoch (new ones each epoch if
    ``new_samples_each_epoch``)."""

    def __init__(self, generator: ShapesGenerator, num_samples: int, new_samples_each_epoch: bool = False) -> None:
        self.generator = generator
        self.num_samples = int(num_samples)
        self.new_samples_each_epoch = new_samples_each_epoch
        self.epoch = 0
        self.index_skips = Counter()
        self.index_attempted = self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's scenes (only matters with ``new_samples_each_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def aspect_ratios(self) -> Sequence[float]:
        return np.ones(self.num_samples)

    def _global_index(self, index: int) -> int:
        return index + (self.epoch * self.num_samples if self.new_samples_each_epoch else 0)

    def load(self, index: int, rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Any, str]:
        spec = self.generator.spec(self._global_index(index))
        return render_shapes(spec, size[0], self.generator.background), spec.caption

    def describe(self, index: int) -> str:
        return f"shapes sample {self._global_index(index)}"


class ShapesDataModule(ImageTextDataModule):
    """Built-in offline dataset of coloured shapes with grammar captions (square images).

    Args (besides those of :class:`~.base.ImageTextDataModule`; ``image_size`` defaults to 64):
        num_samples: scenes per epoch.
        new_samples_each_epoch: draw new scenes every epoch (an endless stream) instead of
            reshuffling the same ``num_samples``.
        colours, shapes, background, modes, single_object, holdout_pairs, max_count: the grammar
            (see :class:`ShapesGenerator`).
        data_seed: content seed (defaults to ``seed``); scenes do not depend on ``seed``'s shuffle.
    """

    def __init__(self, *, num_samples: int = 10000, new_samples_each_epoch: bool = False,
                 colours: Sequence[str] = DEFAULT_COLOURS, shapes: Sequence[str] = DEFAULT_SHAPES,
                 background: Union[str, Sequence[int]] = "gray", modes: Optional[Mapping[str, float]] = None,
                 single_object: bool = False, holdout_pairs: Optional[Sequence[Any]] = None, max_count: int = 3,
                 data_seed: Optional[int] = None, image_size: Optional[int] = 64, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        if image_size is None:
            raise ValueError("ShapesDataModule draws square images: image_size is required")
        self.num_samples = int(num_samples)
        self.new_samples_each_epoch = new_samples_each_epoch
        self.generator = ShapesGenerator(colours, shapes, background, modes, single_object, holdout_pairs,
                                         max_count, self.seed if data_seed is None else int(data_seed))

    def build_source(self) -> ShapesSource:
        return ShapesSource(self.generator, self.num_samples, self.new_samples_each_epoch)

    def checker(self) -> ShapesChecker:
        """A :class:`ShapesChecker` for this dataset's vocabulary."""
        return ShapesChecker(self.generator.colours, self.generator.shapes)

    def holdout_prompts(self) -> List[str]:
        """Captions of the held-out colour-shape pairs ("a red triangle", ...)."""
        return [f"{_article(c)} {c} {s}" for c, s in sorted(self.generator.holdout)]

"""A strict, GenEval-style checker for images of the shapes world.

Every object is found, named only when it is clearly one colour and one shape of the world, and
the prompt's category decides what must hold (after GenEval, Ghosh et al. 2023):

========================  ===================================================================
category                  passes when
========================  ===================================================================
``single_object``         exactly one object, of the named colour and shape
``two_objects``           exactly two objects, the two named ones (no others)
``counting``              exactly N objects, all of the named colour and shape
``colours``               exactly one object, of the named colour, and a recognised shape
``position``              grid prompts: exactly one object, the named one, its centroid in the
                          named cell of the 3 x 3 grid; relation prompts: exactly the two named
                          objects, and the first stands in the relation to the second (GenEval's
                          rule: box-centre offset shrunk by 0.1 of the summed box sizes, then the
                          offset direction within 60 degrees of the axis)
``colour_attribution``    exactly two objects, each with its own named colour and shape
``held_out_pairs``        as ``single_object`` (the pairs no caption of training names)
========================  ===================================================================

Finding objects (:meth:`StrictShapesChecker.analyse`), all in CIE Lab (distances are ΔE76):

1. The background is the median colour of the border pixels; at least 60% of the border must lie
   within ΔE 12 of it, else the image has no background and holds no object (noise fails here).
2. Pixels farther than ΔE 20 from the background are foreground; its 8-connected components
   smaller than 0.6% of the image (25 pixels at 64 px) are specks, not objects (counted apart).
3. A component's colour is the median of its core (interior pixels at least 85% as far from the
   background as its farthest; rims and blur only mix in the background); its spread is the
   median distance of the core to that colour.  A colour is named only when the spread is at
   most 12 and the nearest colour of the *full* palette (pink, cyan, brown and gray included, so
   pink is never purple) is within ΔE 18 and at most 0.6 times as far as the second nearest.
4. A component's shape is fitted by synthesis: each pixel's coverage is its projection on the
   background-to-colour line; the coverage's area and centroid fix, for every shape of the world
   (circle, square, triangle, diamond, star, upright as the renderer draws them), the box of that
   shape; the shape is drawn anti-aliased there (and blurred by 0, 0.8 or 1.6 px, for soft
   images) and compared by soft IoU.  A shape is named only when the best IoU is at least 0.83,
   leads the runner-up by 0.025, and the coverage's second moments are no more elongated than
   1.6 : 1 (the triangle is 1.15 : 1; lines and flat ellipses are not objects of this world).

Calibration (``python benchmarks/evaluation_calibration.py [--tokenizer FILE]``; every item of
the shipped protocol, its scene drawn by :func:`~.specs.scene_for_spec`, 64 px; the numbers are
in :data:`CALIBRATION`):

* renders: 100% accepted clean, and 99.8-100% under each degradation of :data:`DEGRADATIONS`
  (JPEG quality 75, Gaussian blur 0.8 px, Gaussian noise sigma 6, a colour cast of up to 8 levels
  per channel, half-size down- and up-sampling); the shapes DataModule itself augments nothing.
* reconstructions by the quick-start tokenizer (trained on single objects, 273 steps; scales
  1-2-4-6-8): 100% of single objects, 97% of the colours items and 92% of the held-out pairs
  accepted (the rest are square-circle hybrids, IoU within 0.02 of each other), but 0-7% of the
  composed scenes: it blurs objects of 13-17 px into blobs.  A tokenizer trained for the same
  400 steps on the composed mixture still draws small objects as blobs and shifts colours
  (yellow to orange, blue to violet): 12.5% accepted.  Composed prompts need a tokenizer trained
  longer on composed scenes, and this checker is how to tell when it is good enough.
* adversarial images (:func:`~.calibration.adversarial_cases`), each judged against the prompt it
  could be mistaken for: uniform and smooth noise, noise patches on a clean background, blank
  images, grids of all 24 colour-shape pairs, the right shape in a wrong, off-palette (pink for
  purple, cyan for blue) or perceptually halfway colour, the wrong shape, 5-pixel specks, lines,
  flat ellipses, two- and three-lobed blobs, an extra object, wrong counts, swapped positions and
  swapped colour attribution: 100% rejected in every family.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

from infinity_lightning.datamodules.shapes import (
    PALETTE,
    POSITIONS,
    SHAPE_NAMES,
    label_components,
    shape_geometry,
    shape_polygon,
)

from .specs import ObjectSpec, PromptSpec, parse_prompt, spec_from_dict

__all__ = ["CATEGORIES", "HELD_OUT_GROUP", "GROUPS", "Thresholds", "Detection", "Analysis", "Verdict",
           "StrictShapesChecker", "srgb_to_lab", "relations_between", "infer_category", "DEGRADATIONS",
           "CALIBRATION"]

#: The six scored categories; the overall score is their mean.
CATEGORIES: Tuple[str, ...] = ("single_object", "two_objects", "counting", "colours", "position",
                               "colour_attribution")
#: Single-object prompts of the held-out colour-shape pairs, reported apart from the six.
HELD_OUT_GROUP = "held_out_pairs"
#: Every group a protocol item may belong to.
GROUPS: Tuple[str, ...] = CATEGORIES + (HELD_OUT_GROUP,)

#: Measured by ``benchmarks/evaluation_calibration.py`` (seed 0, 48 cases per adversarial family):
#: fractions of the shipped protocol's items accepted, per condition (and per group after a
#: tokenizer round trip), and of each adversarial family rejected.  See the module docstring.
CALIBRATION: Dict[str, Any] = {
    "protocol": "shapes v1, 480 items, 64 px",
    "accepted": {"clean": 1.0, "jpeg75": 0.9979, "blur0.8": 1.0, "noise6": 1.0, "colour_cast8": 1.0,
                 "half_resolution": 1.0},
    "accepted_after_reconstruction": {
        "quickstart_tokenizer_single_objects_273_steps": {
            "all": 0.4062, "single_object": 1.0, "two_objects": 0.0, "counting": 0.0694, "colours": 0.9722,
            "position": 0.0556, "colour_attribution": 0.0, "held_out_pairs": 0.9167},
        "tokenizer_composed_mixture_400_steps": {
            "all": 0.125, "single_object": 0.3194, "two_objects": 0.0, "counting": 0.1667, "colours": 0.3056,
            "position": 0.0417, "colour_attribution": 0.0, "held_out_pairs": 0.0},
    },
    "rejected": {family: 1.0 for family in (
        "uniform_noise", "smooth_noise", "noise_patch", "blank", "grid_of_all_pairs", "wrong_colour",
        "off_palette_colour", "blended_colour", "wrong_shape", "speck", "line", "flat_ellipse", "irregular_blob",
        "extra_object", "wrong_count", "swapped_position", "swapped_attribution")},
    "adversarial_cases": {"uniform_noise": 48, "smooth_noise": 48, "noise_patch": 48, "blank": 48,
                          "grid_of_all_pairs": 480, "wrong_colour": 48, "off_palette_colour": 48,
                          "blended_colour": 48, "wrong_shape": 29, "speck": 48, "line": 48, "flat_ellipse": 48,
                          "irregular_blob": 48, "extra_object": 74, "wrong_count": 96, "swapped_position": 48,
                          "swapped_attribution": 48},
}


# ------------------------------------------------------------------------------------------------
# colour space
# ------------------------------------------------------------------------------------------------
_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_D65 = np.array([0.95047, 1.0, 1.08883])


_LINEAR = np.where(np.arange(256) / 255 > 0.04045, ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4,
                   np.arange(256) / 255 / 12.92)


def srgb_to_lab(rgb: Any) -> np.ndarray:
    """sRGB values in 0..255 (any shape ``(..., 3)``; uint8 or float) -> CIE Lab (D65), float64."""
    arr = np.asarray(rgb)
    if arr.dtype == np.uint8:
        c = _LINEAR[arr]
    else:
        c = arr.astype(np.float64) / 255.0
        c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ (_SRGB_TO_XYZ.T / _D65)
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES: Tuple[str, ...] = tuple(PALETTE)
_PALETTE_LAB = srgb_to_lab(np.array([PALETTE[n] for n in _PALETTE_NAMES]))


# ------------------------------------------------------------------------------------------------
# thresholds and results
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """The checker's limits (ΔE76 in CIE Lab; fractions of the image; see the module docstring).

    Attributes:
        background_delta_e / min_background_border: a border pixel is background within this
            distance of the border median; at least this fraction of the border must be.
        foreground_delta_e: a pixel farther than this from the background is foreground.
        min_area_fraction: components smaller than this fraction of the image are specks.
        colour_max_delta_e: the nearest palette colour must be within this distance.
        colour_margin_ratio: ... and at most this fraction of the second nearest's distance.
        colour_max_spread: the 80th percentile of the interior's distances to its median.
        shape_min_iou / shape_min_margin: the best shape's soft IoU and its lead on the runner-up.
        max_elongation: largest ratio of the principal axes (square root of the eigenvalue ratio).
        blur_radii: Gaussian radii (pixels) tried on each drawn template.
        position_threshold: GenEval's relation margin, a fraction of the summed box sizes.
    """

    background_delta_e: float = 12.0
    min_background_border: float = 0.6
    foreground_delta_e: float = 20.0
    min_area_fraction: float = 0.006
    colour_max_delta_e: float = 18.0
    colour_margin_ratio: float = 0.6
    colour_max_spread: float = 12.0
    shape_min_iou: float = 0.83
    shape_min_margin: float = 0.025
    max_elongation: float = 1.6
    blur_radii: Tuple[float, ...] = (0.0, 0.8, 1.6)
    position_threshold: float = 0.1


@dataclass
class Detection:
    """One object found in an image.

    ``colour``/``shape`` are names, or ``None`` when the evidence is not clear (``problems`` says
    why); the remaining fields are the measurements behind them.  Coordinates are fractions of
    the image side: ``centroid`` ``(x, y)``, ``box`` ``(x0, y0, x1, y1)``.
    """

    colour: Optional[str]
    shape: Optional[str]
    area: int
    centroid: Tuple[float, float]
    box: Tuple[float, float, float, float]
    rgb: Tuple[int, int, int]
    colour_delta_e: float
    colour_runner_up: str
    colour_runner_up_delta_e: float
    colour_spread: float
    shape_iou: float
    shape_runner_up: str
    shape_runner_up_iou: float
    best_shape: str
    nearest_colour: str
    elongation: float
    problems: List[str] = field(default_factory=list)

    @property
    def pair(self) -> Tuple[Optional[str], Optional[str]]:
        """``(colour, shape)`` (either may be ``None``)."""
        return self.colour, self.shape

    def describe(self) -> str:
        """A short name: ``"red circle"``, or what is unclear (``"colour? (pink-ish) circle"``)."""
        colour = self.colour or f"colour?({self.nearest_colour}-ish)"
        shape = self.shape or f"shape?({self.best_shape}-ish)"
        return f"{colour} {shape}"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields, floats rounded."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4)
            elif isinstance(v, tuple):
                out[k] = [round(x, 4) if isinstance(x, float) else x for x in v]
        return out


@dataclass
class Analysis:
    """Everything found in one image: objects (largest first), the number of specks ignored, the
    background colour, and ``problem`` when the image has no usable background."""

    objects: List[Detection]
    specks: int
    background_rgb: Tuple[int, int, int]
    background_border_fraction: float
    problem: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form."""
        return {"objects": [o.to_dict() for o in self.objects], "specks": self.specks,
                "background_rgb": list(self.background_rgb),
                "background_border_fraction": round(self.background_border_fraction, 4), "problem": self.problem}


@dataclass
class Verdict:
    """The decision on one image: ``passed``, the ``category`` judged, a one-line ``reason`` (why it
    failed, or what was found when it passed) and the :class:`Analysis` behind it."""

    passed: bool
    category: str
    reason: str
    analysis: Analysis

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form."""
        return {"passed": self.passed, "category": self.category, "reason": self.reason,
                **self.analysis.to_dict()}


# ------------------------------------------------------------------------------------------------
# image input
# ------------------------------------------------------------------------------------------------
def _to_uint8(image: Any, value_range: Tuple[float, float]) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if type(image).__module__.startswith("torch"):
        x = image.detach().to("cpu")
        if x.dim() == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
            x = x.permute(1, 2, 0)
        if str(x.dtype) == "torch.uint8":
            arr = x.numpy()
        else:
            lo, hi = value_range
            arr = ((x.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round().numpy().astype(np.uint8)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3), got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an image (H, W, 3) or (3, H, W), got shape {tuple(arr.shape)}")
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=False)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1, constant_values=False)
        mask = mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def _gaussian(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (zero padding), kernel truncated at 3 sigma."""
    if sigma <= 0:
        return stack
    half = max(int(np.ceil(3 * sigma)), 1)
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k /= k.sum()
    k = k.astype(stack.dtype)
    h, w = stack.shape[-2:]
    padded = np.zeros(stack.shape[:-1] + (w + 2 * half,), dtype=stack.dtype)
    padded[..., half:half + w] = stack
    rows = k[0] * padded[..., 0:w]
    for j in range(1, len(k)):
        rows += k[j] * padded[..., j:j + w]
    padded = np.zeros(stack.shape[:-2] + (h + 2 * half, w), dtype=stack.dtype)
    padded[..., half:half + h, :] = rows
    out = k[0] * padded[..., 0:h, :]
    for j in range(1, len(k)):
        out += k[j] * padded[..., j:j + h, :]
    return out


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: Sequence[Tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: whether each point lies inside the polygon."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (xi, yi), (xj, yj) = vertices[i], vertices[(i + 1) % n]
        if yi == yj:
            continue
        crosses = (yi > y) != (yj > y)
        inside ^= crosses & (x < (xj - xi) * (y - yi) / (yj - yi) + xi)
    return inside


def shape_templates(area: float, centroid: Tuple[float, float], window: Tuple[int, int, int, int],
                    supersample: int = 4) -> np.ndarray:
    """Coverage ``(len(SHAPE_NAMES), h, w)`` of every shape, upright as the renderer draws it,
    sized to ``area`` pixels and placed with its centroid at ``centroid`` (pixel coordinates),
    over the pixel window ``(x0, y0, w, h)`` (each pixel sampled ``supersample``^2 times)."""
    x0, y0, w, h = window
    ss = supersample
    out = np.zeros((len(SHAPE_NAMES), h, w), dtype=np.float32)
    for k, shape in enumerate(SHAPE_NAMES):
        frac, dx, dy = shape_geometry(shape)
        side = (area / frac) ** 0.5
        bx, by = centroid[0] - (dx + 0.5) * side, centroid[1] - (dy + 0.5) * side
        # sample only the shape's own box (clipped to the window): the rest is empty
        ix0, iy0 = max(int(np.floor(bx)), x0), max(int(np.floor(by)), y0)
        ix1, iy1 = min(int(np.ceil(bx + side)) + 1, x0 + w), min(int(np.ceil(by + side)) + 1, y0 + h)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        px = ix0 + (np.arange((ix1 - ix0) * ss, dtype=np.float32) + 0.5) / ss
        py = iy0 + (np.arange((iy1 - iy0) * ss, dtype=np.float32) + 0.5) / ss
        x, y = np.meshgrid(px, py)
        if shape == "circle":
            inside = (x - bx - side / 2) ** 2 + (y - by - side / 2) ** 2 <= (side / 2) ** 2
        elif shape == "square":
            inside = (x >= bx) & (x < bx + side) & (y >= by) & (y < by + side)
        else:
            inside = _inside_polygon(x, y, shape_polygon(shape, bx, by, side))
        cover = inside.reshape(iy1 - iy0, ss, ix1 - ix0, ss).mean(axis=(1, 3), dtype=np.float32)
        out[k, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = cover
    return out


# ------------------------------------------------------------------------------------------------
# relations and categories
# ------------------------------------------------------------------------------------------------
def relations_between(a: Detection, b: Detection, threshold: float = 0.1) -> List[str]:
    """Relations in which ``a`` stands to ``b`` ("left of", "right of", "above", "below"), by
    GenEval's rule: the box-centre offset, each axis shrunk towards 0 by ``threshold`` times the
    two boxes' summed size on that axis, then normalised by the offset's length; a component
    beyond 0.5 (within 60 degrees of the axis) names the relation."""
    ca = np.array([(a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2])
    cb = np.array([(b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2])
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]])
    offset = ca - cb
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return []
    dx, dy = revised / norm
    out = []
    if dx < -0.5:
        out.append("left of")
    if dx > 0.5:
        out.append("right of")
    if dy < -0.5:
        out.append("above")
    if dy > 0.5:
        out.append("below")
    return out


def infer_category(spec: PromptSpec) -> str:
    """The category a spec belongs to when none is given: relations and grid positions are
    ``position``, counts above one ``counting``, two objects differing in colour and shape
    ``colour_attribution``, other pairs ``two_objects``, one object ``single_object``."""
    objs = spec.objects
    if spec.relation is not None or any(o.position for o in objs):
        return "position"
    if len(objs) == 1:
        return "counting" if objs[0].count > 1 else "single_object"
    if len(objs) == 2 and objs[0].colour != objs[1].colour and objs[0].shape != objs[1].shape:
        return "colour_attribution"
    return "two_objects"


def _cell_of(d: Detection) -> str:
    col = min(int(d.centroid[0] * 3), 2)
    row = min(int(d.centroid[1] * 3), 2)
    return next(name for name, cell in POSITIONS.items() if cell == (col, row))


def _names(objects: Sequence[Detection]) -> str:
    return ", ".join(o.describe() for o in objects) or "nothing"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------------
# the checker
# ------------------------------------------------------------------------------------------------
class StrictShapesChecker:
    """Finds and names every object of an image of the shapes world and judges it against a
    prompt's spec by category (see the module docstring for the rules and thresholds).

    Args:
        thresholds: the limits (:class:`Thresholds`; defaults calibrated on 64 px images).
        value_range: the range of float tensor images (``(0, 1)`` as the evaluation produces;
            ``(-1, 1)`` for model-range tensors).  PIL images and uint8 arrays need no range.
    """

    def __init__(self, thresholds: Optional[Thresholds] = None,
                 value_range: Tuple[float, float] = (0.0, 1.0)) -> None:
        self.thresholds = thresholds or Thresholds()
        self.value_range = value_range

    # -- finding objects ----------------------------------------------------------------------
    def analyse(self, image: Any) -> Analysis:
        """Find the objects of one image (tensor ``(3, H, W)`` in ``value_range``, PIL image or
        uint8 array ``(H, W, 3)``)."""
        th = self.thresholds
        rgb = _to_uint8(image, self.value_range)
        lab = srgb_to_lab(rgb)
        h, w, _ = lab.shape
        border = np.concatenate([lab[0], lab[-1], lab[1:-1, 0], lab[1:-1, -1]], 0)
        bg = np.median(border, axis=0)
        border_rgb = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]], 0)
        bg_rgb = tuple(int(v) for v in np.median(border_rgb, axis=0))
        border_ok = float((np.linalg.norm(border - bg, axis=-1) <= th.background_delta_e).mean())
        if border_ok < th.min_background_border:
            return Analysis([], 0, bg_rgb, border_ok,
                            f"no uniform background: {border_ok:.0%} of the border is within "
                            f"ΔE {th.background_delta_e:g} of its median")
        dist = np.linalg.norm(lab - bg, axis=-1)
        labels, n = label_components(dist > th.foreground_delta_e)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        objects, specks = [], 0
        for k in range(1, n + 1):
            if areas[k] < th.min_area_fraction * h * w:
                specks += 1
                continue
            objects.append(self._measure(rgb, lab, bg, dist, labels == k, labels))
        objects.sort(key=lambda o: -o.area)
        return Analysis(objects, specks, bg_rgb, border_ok)

    def _measure(self, rgb: np.ndarray, lab: np.ndarray, bg: np.ndarray, dist: np.ndarray, mask: np.ndarray,
                 labels: np.ndarray) -> Detection:
        th = self.thresholds
        h, w, _ = lab.shape
        problems: List[str] = []
        # colour: median of the core, the interior pixels farthest from the background (rims and
        # blur mix the object's colour with the background, which only brings it closer)
        strong = dist >= 0.85 * np.quantile(dist[mask], 0.95)
        core = _erode(mask) & strong
        if core.sum() < 6:
            core = mask & strong
        colour_lab = np.median(lab[core], axis=0)
        colour_rgb = tuple(int(v) for v in np.median(rgb[core], axis=0))
        spread = float(np.median(np.linalg.norm(lab[core] - colour_lab, axis=-1)))
        to_palette = np.linalg.norm(_PALETTE_LAB - colour_lab, axis=-1)
        order = np.argsort(to_palette)
        d1, d2 = float(to_palette[order[0]]), float(to_palette[order[1]])
        nearest, runner = _PALETTE_NAMES[order[0]], _PALETTE_NAMES[order[1]]
        colour: Optional[str] = nearest
        if spread > th.colour_max_spread:
            colour = None
            problems.append(f"colour not uniform (spread ΔE {spread:.1f} > {th.colour_max_spread:g})")
        elif d1 > th.colour_max_delta_e:
            colour = None
            problems.append(f"colour {colour_rgb} is ΔE {d1:.1f} from {nearest} (limit {th.colour_max_delta_e:g})")
        elif d1 > th.colour_margin_ratio * d2:
            colour = None
            problems.append(f"colour {colour_rgb} is between {nearest} (ΔE {d1:.1f}) and {runner} (ΔE {d2:.1f})")

        # coverage: each pixel's projection on the background-to-colour line, near this component
        axis = colour_lab - bg
        near = _dilate(mask, 2) & ((labels == 0) | mask)
        ys, xs = np.nonzero(near)
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        win = (slice(y0, y1), slice(x0, x1))
        alpha = np.clip(((lab[win] - bg) @ axis) / max(float(axis @ axis), 1e-6), 0, 1) * near[win]
        area = float(alpha.sum())
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        mx, my = float((alpha * xx).sum() / area), float((alpha * yy).sum() / area)
        cxx = float((alpha * (xx - mx) ** 2).sum() / area)
        cyy = float((alpha * (yy - my) ** 2).sum() / area)
        cxy = float((alpha * (xx - mx) * (yy - my)).sum() / area)
        eig = np.linalg.eigvalsh(np.array([[cxx, cxy], [cxy, cyy]]))
        elongation = float(np.sqrt(max(eig[1], 1e-9) / max(eig[0], 1e-9)))

        ious = self._shape_ious(alpha, (x0, y0), (mx, my), area, (w, h))
        ranked = sorted(ious, key=lambda s: -ious[s])
        best_shape, runner_shape = ranked[0], ranked[1]
        iou, runner_iou = ious[best_shape], ious[runner_shape]
        shape: Optional[str] = best_shape
        if elongation > th.max_elongation:
            shape = None
            problems.append(f"elongated {elongation:.2f}:1 (limit {th.max_elongation:g}:1)")
        elif iou < th.shape_min_iou:
            shape = None
            problems.append(f"no shape fits: best {best_shape} IoU {iou:.2f} < {th.shape_min_iou:g}")
        elif iou - runner_iou < th.shape_min_margin:
            shape = None
            problems.append(f"shape unclear: {best_shape} IoU {iou:.2f} vs {runner_shape} {runner_iou:.2f}")

        ys, xs = np.nonzero(mask)
        return Detection(
            colour=colour, shape=shape, area=int(mask.sum()), centroid=(mx / w, my / h),
            box=(float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h),
            rgb=colour_rgb, colour_delta_e=d1, colour_runner_up=runner, colour_runner_up_delta_e=d2,
            colour_spread=spread, shape_iou=iou, shape_runner_up=runner_shape, shape_runner_up_iou=runner_iou,
            best_shape=best_shape, nearest_colour=nearest, elongation=elongation, problems=problems)

    def _shape_ious(self, alpha: np.ndarray, origin: Tuple[int, int], centroid: Tuple[float, float], area: float,
                    image_size: Tuple[int, int]) -> Dict[str, float]:
        # Soft IoU of the coverage with each shape's template, the best over the blur radii.  The
        # window grows to hold every template (the largest, the star, spans 1.9 sqrt(area)) and
        # the blur, so no template is cut by it (the triangle's apex lies sqrt(area) from its
        # centroid).  About 40 samples across the object keep the templates exact to 1%.
        reach = area ** 0.5 + 3 * max(self.thresholds.blur_radii) + 1
        ox, oy = origin
        x0 = max(0, min(ox, int(np.floor(centroid[0] - reach))))
        y0 = max(0, min(oy, int(np.floor(centroid[1] - reach))))
        x1 = min(image_size[0], max(ox + alpha.shape[1], int(np.ceil(centroid[0] + reach))))
        y1 = min(image_size[1], max(oy + alpha.shape[0], int(np.ceil(centroid[1] + reach))))
        a = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        a[oy - y0:oy - y0 + alpha.shape[0], ox - x0:ox - x0 + alpha.shape[1]] = alpha
        supersample = int(min(4, max(1, np.ceil(40 / max(area, 1.0) ** 0.5))))
        templates = shape_templates(area, centroid, (x0, y0, x1 - x0, y1 - y0), supersample)
        best = np.zeros(len(SHAPE_NAMES))
        for radius in self.thresholds.blur_radii:
            t = _gaussian(templates, radius)
            iou = np.minimum(t, a).sum(axis=(1, 2)) / np.maximum(np.maximum(t, a).sum(axis=(1, 2)), 1e-9)
            best = np.maximum(best, iou)
        return {shape: float(v) for shape, v in zip(SHAPE_NAMES, best)}

    # -- judging ------------------------------------------------------------------------------
    def check(self, image: Any, spec: Union[str, PromptSpec, Dict[str, Any]],
              category: Optional[str] = None) -> Verdict:
        """Judge one image against a spec (a :class:`~.specs.PromptSpec`, its dict form, or a
        grammar caption) under ``category`` (default: :func:`infer_category`)."""
        spec = parse_prompt(spec) if isinstance(spec, str) else spec_from_dict(spec)
        return self.judge(self.analyse(image), spec, category)

    def judge(self, analysis: Analysis, spec: PromptSpec, category: Optional[str] = None) -> Verdict:
        """Apply the category's rule to an :class:`Analysis` (no image work)."""
        category = category or infer_category(spec)
        if category not in GROUPS:
            raise ValueError(f"unknown category {category!r}; known: {list(GROUPS)}")
        rule = _RULES[category]
        if analysis.problem:
            return Verdict(False, category, analysis.problem, analysis)
        reason = rule(self, analysis.objects, spec)
        return Verdict(reason is None, category, reason or f"found {_names(analysis.objects)}", analysis)

    # Each rule returns None when the image passes, else the reason it fails.
    def _expect_count(self, objects: Sequence[Detection], n: int) -> Optional[str]:
        if len(objects) != n:
            return f"found {_plural(len(objects), 'object')} ({_names(objects)}), expected {n}"
        return None

    @staticmethod
    def _mismatch(d: Detection, colour: Optional[str], shape: Optional[str]) -> Optional[str]:
        if colour is not None and d.colour != colour:
            why = f" ({d.problems[0]})" if d.colour is None and d.problems else ""
            return f"{d.describe()} is not {colour}{why}"
        if shape is not None and d.shape != shape:
            shape_problems = [p for p in d.problems if "shape" in p or "elongated" in p]
            why = f" ({shape_problems[0]})" if d.shape is None and shape_problems else ""
            return f"{d.describe()} is not a {shape}{why}"
        return None

    def _single(self, objects: Sequence[Detection], spec: PromptSpec) -> Optional[str]:
        if len(spec.objects) != 1 or spec.objects[0].count != 1:
            raise ValueError("a single-object verdict needs a spec of one object of count 1")
        target = spec.objects[0]
        return self._expect_count(objects, 1) or self._mismatch(objects[0], target.colour, target.shape)

    def _colours(self, objects: Sequence[Detection], spec: PromptSpec) -> Optional[str]:
        if len(spec.objects) != 1 or spec.objects[0].count != 1:
            raise ValueError("a colours verdict needs a spec of one object of count 1")
        d = objects[0] if len(objects) == 1 else None
        if d is None:
            return self._expect_count(objects, 1)
        colour_problem = self._mismatch(d, spec.objects[0].colour, None)
        if colour_problem:
            return colour_problem
        if d.shape is None:
            return f"{d.describe()} is no recognisable shape ({d.problems[-1]})"
        return None

    def _match_exactly(self, objects: Sequence[Detection], spec: PromptSpec) -> Optional[str]:
        wanted = sorted(o.pair for o in spec.objects for _ in range(o.count))
        miss = self._expect_count(objects, len(wanted))
        if miss:
            return miss
        found = [d.pair for d in objects]
        if sorted(found, key=str) == sorted(wanted, key=str):
            return None
        names = " and ".join(f"{c} {s}" for c, s in wanted)
        if len(wanted) == 2 and all(d.colour and d.shape for d in objects):
            (ca, sa), (cb, sb) = wanted
            if sorted(found) == sorted([(ca, sb), (cb, sa)]):
                return f"colours swapped: found {_names(objects)}, expected {names}"
        return f"found {_names(objects)}, expected {names}"

    def _counting(self, objects: Sequence[Detection], spec: PromptSpec) -> Optional[str]:
        if len(spec.objects) != 1:
            raise ValueError("a counting verdict needs a spec of one object kind with a count")
        target = spec.objects[0]
        matching = sum(d.pair == target.pair for d in objects)
        if len(objects) == target.count and matching == target.count:
            return None
        return (f"found {_plural(matching, f'{target.colour} {target.shape}')} among "
                f"{_plural(len(objects), 'object')} ({_names(objects)}), expected exactly {target.count}")

    def _position(self, objects: Sequence[Detection], spec: PromptSpec) -> Optional[str]:
        if spec.relation is None:
            if len(spec.objects) != 1 or spec.objects[0].position is None:
                raise ValueError("a position verdict needs a relation or one object with a grid position")
            target = spec.objects[0]
            problem = self._single(objects, PromptSpec((ObjectSpec(target.colour, target.shape),)))
            if problem:
                return problem
            cell = _cell_of(objects[0])
            if cell != target.position:
                return f"{objects[0].describe()} is at the {cell}, expected the {target.position}"
            return None
        problem = self._match_exactly(objects, spec)
        if problem:
            return problem
        a_spec, b_spec = spec.objects
        a = next(d for d in objects if d.pair == a_spec.pair)
        b = next(d for d in objects if d is not a and d.pair == b_spec.pair)
        rel = relations_between(a, b, self.thresholds.position_threshold)
        if spec.relation not in rel:
            found = " and ".join(rel) if rel else "in no clear relation to"
            return f"{a.describe()} is {found} the {b.describe()}, expected {spec.relation}"
        return None


_RULES: Dict[str, Callable[[StrictShapesChecker, Sequence[Detection], PromptSpec], Optional[str]]] = {
    "single_object": StrictShapesChecker._single,
    "held_out_pairs": StrictShapesChecker._single,
    "colours": StrictShapesChecker._colours,
    "two_objects": StrictShapesChecker._match_exactly,
    "colour_attribution": StrictShapesChecker._match_exactly,
    "counting": StrictShapesChecker._counting,
    "position": StrictShapesChecker._position,
}


# ------------------------------------------------------------------------------------------------
# degradations for calibration
# ------------------------------------------------------------------------------------------------
def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    # Full-resolution chroma: 4:2:0 subsampling would halve the colour resolution, which no
    # tokenizer does, and smear the colour of a 13-pixel object into the background.
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75, subsampling=0)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 6, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def _cast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _half(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    return img.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)


#: Image degradations the checker must tolerate (name -> ``f(image, rng) -> image``): stand-ins
#: for the artefacts of a tokenizer's decoder.  The shapes DataModule itself augments nothing (a
#: scene is drawn at the training size, so its resize-and-crop is the identity).
DEGRADATIONS: Dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "jpeg75": _jpeg,
    "blur0.8": lambda img, rng: img.filter(ImageFilter.GaussianBlur(0.8)),
    "noise6": _noise,
    "colour_cast8": _cast,
    "half_resolution": _half,
}

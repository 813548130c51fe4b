"""Scale schedules: :class:`ScaleSchedule`, built once by :func:`resolve` (or :func:`latent_schedule`).

Infinity predicts an image scale by scale, coarse to fine.  A *scale schedule* is the list of
token grids ``(h_k, w_k)`` of those scales; the transformer sees ``sum(h_k * w_k)`` tokens.
Schedules come from fixed tables: 15 aspect-ratio *templates* (height / width), each with a
13-step list of grids; a *pixel budget* (``"0.06M"``, ``"0.25M"``, ``"0.60M"``, ``"1M"``) keeps the
first 7, 10, 12 or 13 steps.  A schedule drawn from a template table also fixes the 2-D RoPE
positions (they are rescaled onto the template's 1M grid), which is why custom schedules must be
prefixes of a table.

Two views of one schedule (see docs/model.md, "Glossary"):

* the **token side** (what the transformer sees): the grids themselves, iterated as ``(1, h, w)``;
* the **tokenizer side** (the latent grids the BSQ-VAE quantizes): the same grids, or doubled
  ``(1, 2h, 2w)`` with 2x2 spatial patchify (the 8B model's stride-8 tokenizer).

The image a schedule describes is ``token_stride x last grid`` pixels, where the token stride is
the pixels per token side (16 for every released tokenizer).

Everything that needs per-scale sizes, offsets or token counts reads them from the object; it is
immutable and hashable, so caches key on it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence as SequenceABC
from functools import cached_property, lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "ScaleSchedule",
    "resolve",
    "latent_schedule",
    "as_schedule",
    "nearest_template",
    "check_budget",
    "TEMPLATES",
    "TEMPLATE_RATIOS",
    "PIXEL_BUDGETS",
    "LATENT_MODES",
]

Grid = Tuple[int, int]
#: What :func:`resolve` accepts as a resolution: a pixel budget, a pixel size or explicit grids.
Resolution = Union[str, int, float, Sequence[Sequence[int]], "ScaleSchedule"]

#: Base templates h/w -> 13-step (h, w) grids.  The inverse ratios are derived below.
_BASE_GRIDS: Dict[float, List[Grid]] = {
    1.0: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.25: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.5: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.75: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.0: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.5: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.0: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}

#: Steps kept per pixel budget.
PIXEL_BUDGETS: Dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

#: How :func:`latent_schedule` covers a latent grid.
LATENT_MODES = ("template", "dynamic", "dense", "single")


def _build_templates() -> Dict[float, Tuple[Grid, ...]]:
    # Dict order matters for argmin ties: each base ratio is followed by its inverse.
    out: Dict[float, Tuple[Grid, ...]] = {}
    for ratio, grids in _BASE_GRIDS.items():
        out[ratio] = tuple(grids)
        if ratio != 1.0:
            out[int(1000 / ratio) / 1000] = tuple((w, h) for h, w in grids)
    return out


#: Aspect-ratio template (h/w) -> 13-step (h, w) grid table, in the original dict order
#: 1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333.
TEMPLATES: Dict[float, Tuple[Grid, ...]] = _build_templates()
TEMPLATE_RATIOS: List[float] = list(TEMPLATES)


def nearest_template(aspect_ratio: float) -> float:
    """The template ratio (h/w) closest to ``aspect_ratio`` (the first one on ties)."""
    if not aspect_ratio > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {aspect_ratio!r}")
    return min(TEMPLATE_RATIOS, key=lambda r: abs(r - aspect_ratio))


def check_budget(budget: str) -> int:
    """The number of steps of a pixel budget; ``ValueError`` naming the valid budgets otherwise."""
    if budget not in PIXEL_BUDGETS:
        raise ValueError(f"unknown pixel budget {budget!r}; expected one of {sorted(PIXEL_BUDGETS)}")
    return PIXEL_BUDGETS[budget]


def _table_template(grids: Tuple[Grid, ...]) -> Optional[float]:
    """The first template whose table starts with ``grids``, or None."""
    for ratio, table in TEMPLATES.items():
        if len(grids) <= len(table) and table[: len(grids)] == grids:
            return ratio
    return None


class ScaleSchedule(SequenceABC):
    """One scale schedule: token grids, coarse to fine, and everything derived from them.

    Iterating (and indexing) gives the token-side grids as ``(1, h, w)`` tuples, so a schedule
    can be passed wherever a list of grids is expected; slicing gives the prefix schedule.

    Attributes:
        grids: token-side ``(h, w)`` per scale.
        template: the aspect-ratio template whose table the grids are a prefix of (``None`` for a
            custom schedule; its RoPE positions then use its own last grid).
        patchify: whether the tokenizer side is the 2x2-patchified grid (``(2h, 2w)``).
    """

    __slots__ = ("grids", "template", "patchify", "__dict__")

    def __init__(self, grids: Sequence[Sequence[int]], template: Optional[float] = None, patchify: bool = False,
                 *, _checked_template: bool = False) -> None:
        parsed = tuple(_parse_grid(g) for g in grids)
        if not parsed:
            raise ValueError("a scale schedule needs at least one scale")
        if not _checked_template:
            found = _table_template(parsed)
            if template is None:
                template = found
            elif found is None or (found != float(template) and TEMPLATES[float(template)][: len(parsed)] != parsed):
                raise ValueError(f"grids {list(parsed)} are not a prefix of template {template}'s table")
        object.__setattr__(self, "grids", parsed)
        object.__setattr__(self, "template", None if template is None else float(template))
        object.__setattr__(self, "patchify", bool(patchify))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ScaleSchedule is immutable")

    def __reduce__(self):
        return (ScaleSchedule, (self.grids, self.template, self.patchify))

    # -- sequence of (1, h, w) -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            grids = self.grids[index]
            if index.start not in (None, 0) or index.step not in (None, 1):
                return [(1, h, w) for h, w in grids]
            return self.prefix(len(grids))
        h, w = self.grids[index]
        return (1, h, w)

    def __iter__(self):
        return ((1, h, w) for h, w in self.grids)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, ScaleSchedule):
            return (self.grids, self.template, self.patchify) == (other.grids, other.template, other.patchify)
        if isinstance(other, (list, tuple)):
            try:
                return [tuple(int(x) for x in g) for g in other] == list(self)
            except (TypeError, ValueError):
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.grids, self.template, self.patchify))

    def __repr__(self) -> str:
        grids = ", ".join(f"{h}x{w}" for h, w in self.grids)
        extra = f"template {self.template}" if self.template is not None else "custom"
        return f"ScaleSchedule({grids}; {extra}{'; patchify' if self.patchify else ''}; {self.num_tokens} tokens)"

    # -- derived sizes (computed once per object) ------------------------------------------------
    @cached_property
    def sizes(self) -> Tuple[int, ...]:
        """Tokens per scale ``h_k * w_k``."""
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def offsets(self) -> Tuple[int, ...]:
        """Start token of each scale, K + 1 entries (the last is :attr:`num_tokens`)."""
        out = [0]
        for n in self.sizes:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def num_tokens(self) -> int:
        """Sequence length L (tokens of all scales)."""
        return self.offsets[-1]

    @property
    def last_grid(self) -> Grid:
        """The token grid of the last (finest) scale."""
        return self.grids[-1]

    @cached_property
    def tokenizer_side(self) -> "ScaleSchedule":
        """The latent grids the tokenizer quantizes: the grids, doubled with patchify."""
        if not self.patchify:
            return ScaleSchedule(self.grids, self.template, False, _checked_template=True)
        return ScaleSchedule(tuple((2 * h, 2 * w) for h, w in self.grids), self.template, False,
                             _checked_template=True)

    @cached_property
    def rope_reference_grid(self) -> Grid:
        """The grid RoPE positions are rescaled onto: the 1M grid of the first template (in table
        order) whose table starts with these grids, or the own last grid for a custom schedule."""
        template = _table_template(self.grids)
        return self.last_grid if template is None else TEMPLATES[template][-1]

    def pixel_size(self, token_stride: int = 16) -> Tuple[int, int]:
        """(H, W) in pixels of the image this schedule describes (``token_stride`` px per token side)."""
        h, w = self.last_grid
        return int(token_stride) * h, int(token_stride) * w

    def prefix(self, num_scales: int) -> "ScaleSchedule":
        """The first ``num_scales`` scales."""
        if not 1 <= num_scales <= len(self):
            raise ValueError(f"num_scales must be in 1..{len(self)}, got {num_scales}")
        if num_scales == len(self):
            return self
        return ScaleSchedule(self.grids[:num_scales], self.template, self.patchify, _checked_template=True)

    def with_patchify(self, patchify: bool) -> "ScaleSchedule":
        """The same grids with the tokenizer side doubled (or not)."""
        if bool(patchify) == self.patchify:
            return self
        return ScaleSchedule(self.grids, self.template, patchify, _checked_template=True)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly form (what exported pipelines store); :meth:`from_dict` reverses it."""
        return {"grids": [list(g) for g in self.grids], "template": self.template, "patchify": self.patchify}

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> "ScaleSchedule":
        """Read :meth:`to_dict`'s form; a clear ``ValueError`` naming ``source`` otherwise."""
        if not isinstance(data, dict) or "grids" not in data:
            raise ValueError(f"{source}: expected {{'grids': [[h, w], ...], 'template': ..., 'patchify': ...}}, "
                             f"got {data!r}")
        try:
            return cls(data["grids"], data.get("template"), bool(data.get("patchify", False)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


def _parse_grid(grid: Any) -> Grid:
    try:
        values = [int(v) for v in grid]
    except (TypeError, ValueError):
        raise ValueError(f"a schedule entry must be (h, w) or (1, h, w) integers, got {grid!r}") from None
    if len(values) == 3:
        if values[0] != 1:
            raise ValueError(f"a schedule entry (t, h, w) must have t = 1 for images, got {grid!r}")
        values = values[1:]
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"a schedule entry must be (h, w) or (1, h, w) with positive sizes, got {grid!r}")
    return values[0], values[1]


@lru_cache(maxsize=256)
def _cached(grids: Tuple[Grid, ...], patchify: bool) -> ScaleSchedule:
    return ScaleSchedule(grids, None, patchify)


def as_schedule(value: Union[ScaleSchedule, Sequence[Sequence[int]]], patchify: Optional[bool] = None) -> ScaleSchedule:
    """``value`` as a :class:`ScaleSchedule` (a list of ``(1, h, w)`` or ``(h, w)`` grids is read
    once and cached); ``patchify`` sets the tokenizer-side view (``None``: keep / off)."""
    if isinstance(value, ScaleSchedule):
        return value if patchify is None else value.with_patchify(patchify)
    grids = tuple(_parse_grid(g) for g in value)
    return _cached(grids, bool(patchify))


def _check_aspect_ratio(aspect_ratio: float) -> float:
    ratio = float(aspect_ratio)
    lo, hi = min(TEMPLATE_RATIOS), max(TEMPLATE_RATIOS)
    if not (lo * 0.9 <= ratio <= hi * 1.1):
        raise ValueError(f"aspect ratio (h/w) {aspect_ratio!r} is outside the templates ({lo} ... {hi}); "
                         f"the model knows these ratios: {TEMPLATE_RATIOS}")
    return nearest_template(ratio)


def _pixel_size(resolution: Union[str, int, float]) -> float:
    try:
        size = float(str(resolution).lower().removesuffix("px")) if isinstance(resolution, str) else float(resolution)
    except ValueError:
        raise ValueError(f"resolution {resolution!r}: expected one of {sorted(PIXEL_BUDGETS)}, a pixel size such "
                         "as 256 or '1024px', or a list of (h, w) grids") from None
    if not size > 0 or math.isinf(size):
        raise ValueError(f"resolution must be a positive pixel size, got {resolution!r}")
    return size


@lru_cache(maxsize=512)
def _resolve_cached(resolution: Any, template: float, token_stride: int, patchify: bool) -> ScaleSchedule:
    table = TEMPLATES[template]
    if isinstance(resolution, tuple):  # explicit grids
        schedule = ScaleSchedule(resolution, None, patchify)
        if schedule.template is None:
            raise ValueError(f"scale schedule {list(schedule.grids)} is not a prefix of any aspect-ratio template "
                             "(2-D RoPE positions are only defined for table schedules); "
                             f"template {template} has {list(table)}")
        return schedule
    if isinstance(resolution, str) and resolution in PIXEL_BUDGETS:
        return ScaleSchedule(table[: PIXEL_BUDGETS[resolution]], template, patchify, _checked_template=True)
    size = _pixel_size(resolution)
    sides = [token_stride * math.sqrt(h * w) for h, w in table]
    if size > sides[-1] * 1.1:
        raise ValueError(f"resolution {resolution!r} is larger than the largest schedule of the templates "
                         f"(about {sides[-1]:.0f} px, the '1M' budget)")
    n = min(range(1, len(table) + 1), key=lambda i: abs(sides[i - 1] - size))
    if abs(sides[n - 1] - size) > 0.05 * size:
        h, w = table[n - 1]
        warnings.warn(f"resolution {resolution!r} is not a schedule size; using the nearest, "
                      f"{token_stride * h}x{token_stride * w} px", stacklevel=4)
    return ScaleSchedule(table[:n], template, patchify, _checked_template=True)


def resolve(resolution: Resolution, aspect_ratio: float = 1.0, *, token_stride: int = 16,
            patchify: bool = False) -> ScaleSchedule:
    """The :class:`ScaleSchedule` for what a user states once.

    Args:
        resolution: a pixel budget (``"0.06M"``, ``"0.25M"``, ``"0.60M"``, ``"1M"``: the released
            tables), a pixel size (``256``, ``"1024px"``: the prefix of the template's table whose
            image side ``sqrt(H * W)`` is closest, with a warning when it is more than 5% off; sizes
            below 256 px give schedules shorter than any budget, for small models), an explicit
            list of ``(h, w)`` / ``(1, h, w)`` grids (a prefix of a template table), or a
            schedule (returned with ``patchify`` applied).
        aspect_ratio: h/w, mapped to the nearest template (ignored for explicit grids).
        token_stride: pixels per token side (16 for every released tokenizer; 8 for a stride-8
            tokenizer without patchify), used to turn pixel sizes into grids.
        patchify: the tokenizer side is the 2x2-patchified grid.
    """
    if isinstance(resolution, ScaleSchedule):
        return resolution.with_patchify(patchify)
    if isinstance(resolution, (list, tuple)):
        key: Any = tuple(_parse_grid(g) for g in resolution)
    elif isinstance(resolution, (str, int, float)) and not isinstance(resolution, bool):
        key = resolution
    else:
        raise ValueError(f"resolution {resolution!r}: expected a pixel budget {sorted(PIXEL_BUDGETS)}, a pixel size "
                         "or a list of (h, w) grids")
    template = 1.0 if isinstance(key, tuple) else _check_aspect_ratio(aspect_ratio)
    return _resolve_cached(key, template, int(token_stride), bool(patchify))


@lru_cache(maxsize=256)
def latent_schedule(latent_h: int, latent_w: int, mode: str = "template", patchify: bool = False) -> ScaleSchedule:
    """The schedule whose last grid is a given latent grid (tokenizer training and evaluation).

    Modes: ``"template"``, the prefix of a template table that ends at the grid (the nearest
    template of ``h/w`` first, then any template; the schedule a transformer generates at that
    size); ``"dynamic"``, a pixel budget's schedule ending at the grid (the released tables);
    ``"dense"``, every side 1..16, then steps of 4 to 32 and of 8 to 64 (square grids; not a
    template prefix); ``"single"``: only the full grid.  With ``patchify`` the latent grid is the
    tokenizer side, so the token grids are half of it.
    """
    if mode not in LATENT_MODES:
        raise ValueError(f"unknown schedule mode {mode!r}; expected one of {LATENT_MODES}")
    h, w = int(latent_h), int(latent_w)
    if patchify:
        if h % 2 or w % 2:
            raise ValueError(f"a patchified latent grid must have even sides, got {h}x{w}")
        h, w = h // 2, w // 2
    if mode == "single":
        return ScaleSchedule([(h, w)], None, patchify)
    if mode == "dense":
        if h != w:
            raise ValueError("dense schedules are defined for square latents only")
        sides = [s for s in list(range(1, 17)) + [20, 24, 28, 32, 40, 48, 56, 64] if s <= h]
        if sides[-1] != h:
            sides.append(h)
        return ScaleSchedule([(s, s) for s in sides], None, patchify)
    if mode == "dynamic":
        for ratio, table in TEMPLATES.items():
            for n in PIXEL_BUDGETS.values():
                if table[n - 1] == (h, w):
                    return ScaleSchedule(table[:n], ratio, patchify, _checked_template=True)
        raise ValueError(f"no dynamic schedule ends at latent grid {h}x{w}")
    first = nearest_template(h / w)
    for ratio in [first] + [r for r in TEMPLATE_RATIOS if r != first]:
        table = TEMPLATES[ratio]
        if (h, w) in table:
            return ScaleSchedule(table[: table.index((h, w)) + 1], ratio, patchify, _checked_template=True)
    raise ValueError(f"no aspect-ratio template has the grid {h}x{w}; choose an image size whose token grid is in "
                     f"a template table (template {first}: {list(TEMPLATES[first])})")

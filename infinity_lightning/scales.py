"""Scale schedules and aspect-ratio templates.

Infinity predicts an image scale by scale.  A *scale schedule* is a list of ``(t, h, w)`` grids
(``t`` is always 1 for images), coarse to fine; the transformer sees ``sum(h * w)`` tokens.
Schedules come from fixed tables: 15 aspect-ratio *templates* (height / width), each with a
13-step list of grids; a *pixel budget* (``"0.06M"``, ``"0.25M"``, ``"0.60M"``, ``"1M"``) keeps the
first 7, 10, 12 or 13 steps.  The image size is ``16 * last grid`` (VAE stride 16).

On the tokenizer side the schedule is the same for stride-16 tokenizers; with 2x2 spatial
patchify (the 8B model's stride-8 tokenizer) every grid is doubled: ``(1, 2h, 2w)``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

Grid = Tuple[int, int, int]
Schedule = List[Grid]

#: Base templates h/w -> 13-step (h, w) grids.  The inverse ratios are derived below.
_BASE_GRIDS: Dict[float, List[Tuple[int, int]]] = {
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

#: The (raw) ``t`` values of the original tables; images always use t = 1.
PREDEFINED_T = [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15, 17, 21]


def _build_templates() -> Dict[float, List[Tuple[int, int]]]:
    # Dict order matters for argmin ties: each base ratio is followed by its inverse.
    out: Dict[float, List[Tuple[int, int]]] = {}
    for ratio, grids in _BASE_GRIDS.items():
        out[ratio] = grids
        if ratio != 1.0:
            out[int(1000 / ratio) / 1000] = [(w, h) for h, w in grids]
    return out


#: Aspect-ratio template (h/w) -> 13-step (h, w) grid list, in the original dict order
#: 1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333.
TEMPLATES: Dict[float, List[Tuple[int, int]]] = _build_templates()
TEMPLATE_RATIOS: List[float] = list(TEMPLATES)


def nearest_template(h_div_w: float) -> float:
    """The template ratio closest to ``h_div_w`` (first one on ties, as the original's argmin)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {h_div_w!r}")
    return min(TEMPLATE_RATIOS, key=lambda r: abs(r - h_div_w))


def _check_pn(pn: str) -> int:
    if pn not in PIXEL_BUDGETS:
        raise ValueError(f"unknown pixel budget {pn!r}; expected one of {sorted(PIXEL_BUDGETS)}")
    return PIXEL_BUDGETS[pn]


def get_scale_schedule(h_div_w: float, pn: str = "1M", *, exact: bool = False) -> Schedule:
    """Token-side schedule ``[(1, h, w), ...]`` for an aspect ratio and pixel budget.

    ``h_div_w`` is mapped to the nearest template unless ``exact`` is set, in which case it must
    be one of :data:`TEMPLATE_RATIOS`.
    """
    n = _check_pn(pn)
    if exact:
        if h_div_w not in TEMPLATES:
            raise ValueError(f"h_div_w={h_div_w!r} is not a template; templates are {TEMPLATE_RATIOS}")
        template = h_div_w
    else:
        template = nearest_template(h_div_w)
    return [(1, h, w) for h, w in TEMPLATES[template][:n]]


def full_schedule(template: float) -> Schedule:
    """The 13-step (1M) schedule of a template (used for the RoPE position grid)."""
    return [(1, h, w) for h, w in TEMPLATES[template]]


def image_size(schedule: Sequence[Sequence[int]], stride: int = 16) -> Tuple[int, int]:
    """Pixel size (H, W) of the image a token schedule describes (``stride`` x last grid)."""
    _, h, w = schedule[-1]
    return stride * h, stride * w


def get_pixel_size(h_div_w: float, pn: str = "1M") -> Tuple[int, int]:
    """Pixel size (H, W) of the nearest template's schedule for a pixel budget."""
    return image_size(get_scale_schedule(h_div_w, pn))


def num_tokens(schedule: Sequence[Sequence[int]]) -> int:
    """Sequence length L = sum of h * w over the schedule."""
    return sum(int(h) * int(w) for _, h, w in schedule)


def scale_offsets(schedule: Sequence[Sequence[int]]) -> List[int]:
    """Start token index of each scale (length K + 1, last entry = L)."""
    out = [0]
    for _, h, w in schedule:
        out.append(out[-1] + int(h) * int(w))
    return out


def template_of_schedule(schedule: Sequence[Sequence[int]]) -> float:
    """The template whose table the schedule is a prefix of.

    Raises ``ValueError`` if the schedule is not a prefix of any template's 13-step list, because
    the RoPE positions of Infinity are only defined for table schedules.
    """
    grids = [(int(h), int(w)) for _, h, w in schedule]
    for ratio, table in TEMPLATES.items():
        if len(grids) <= len(table) and table[: len(grids)] == grids:
            return ratio
    raise ValueError(
        f"scale schedule {grids} is not a prefix of any aspect-ratio template; "
        "use get_scale_schedule(h_div_w, pn) to obtain a valid schedule"
    )


def tokenizer_schedule(schedule: Sequence[Sequence[int]], patchify: bool = False) -> Schedule:
    """Tokenizer-side (VAE latent) schedule: the token schedule, doubled when 2x2 patchify is on."""
    if patchify:
        return [(1, 2 * int(h), 2 * int(w)) for _, h, w in schedule]
    return [(1, int(h), int(w)) for _, h, w in schedule]


def latent_schedule(latent_h: int, latent_w: int, mode: str = "dynamic") -> Schedule:
    """Schedule for quantising a latent grid when none is given (tokenizer evaluation / training).

    ``"dynamic"``: the template schedule whose last grid equals the latent grid (the Infinity
    schedules), ``"dense"``: every side length 1..16, then steps of 4 to 32 and of 8 to 64 (square
    latents), ``"single"``: only the full grid.
    """
    if mode == "single":
        return [(1, latent_h, latent_w)]
    if mode == "dynamic":
        for table in TEMPLATES.values():
            for n in PIXEL_BUDGETS.values():
                if table[n - 1] == (latent_h, latent_w):
                    return [(1, h, w) for h, w in table[:n]]
        raise ValueError(f"no dynamic schedule ends at latent grid {latent_h}x{latent_w}")
    if mode == "dense":
        if latent_h != latent_w:
            raise ValueError("dense schedules are defined for square latents only")
        sides = list(range(1, 17)) + [20, 24, 28, 32] + [40, 48, 56, 64]
        sides = [s for s in sides if s <= latent_h]
        if sides[-1] != latent_h:
            sides.append(latent_h)
        return [(1, s, s) for s in sides]
    raise ValueError(f"unknown schedule mode {mode!r}; expected 'dynamic', 'dense' or 'single'")


def dynamic_resolution_table() -> Dict[float, Dict[str, Dict[str, object]]]:
    """The full table: template -> pn -> {"scales": schedule, "pixel": (H, W)}."""
    table: Dict[float, Dict[str, Dict[str, object]]] = {}
    for ratio in TEMPLATES:
        table[ratio] = {}
        for pn in PIXEL_BUDGETS:
            sched = get_scale_schedule(ratio, pn, exact=True)
            table[ratio][pn] = {"scales": sched, "pixel": image_size(sched)}
    return table

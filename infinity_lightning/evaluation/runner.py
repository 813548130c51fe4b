"""Run a protocol against any image generator and score it with the strict checker.

``generate_fn(prompts: list[str], seeds: list[int])`` returns a float tensor ``(N, 3, H, W)`` in
[0, 1], one image per prompt and seed.  :func:`evaluate` calls it batch by batch in protocol
order, judges every image (:class:`~.checker.StrictShapesChecker`), and builds the report
(:mod:`.report`).  :func:`select_subset` picks a cheap, deterministic subset (``k`` items per
category) for monitoring during training.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .checker import StrictShapesChecker
from .protocol import Protocol, load_protocol
from .report import build_report, write_report

__all__ = ["GenerateFn", "select_subset", "evaluate"]

#: ``generate_fn(prompts, seeds) -> float tensor (N, 3, H, W) in [0, 1]``.
GenerateFn = Callable[[List[str], List[int]], Any]


def select_subset(protocol: Protocol, k: int) -> Protocol:
    """``k`` items of every group (all of a group that has fewer), spread evenly over the group
    in file order: item ``floor((2j + 1) n / 2k)`` for ``j < k``.  The same ``k`` always selects
    the same items."""
    if k < 1:
        raise ValueError(f"subset size must be >= 1, got {k}")
    chosen = []
    for group in protocol.groups():
        items = protocol.items_of(group)
        n = len(items)
        picks = range(n) if k >= n else sorted({(2 * j + 1) * n // (2 * k) for j in range(k)})
        chosen += [items[i] for i in picks]
    order = {it.id: i for i, it in enumerate(protocol.items)}
    return protocol.with_items(sorted(chosen, key=lambda it: order[it.id]))


def _as_uint8_images(images: Any, n: int, batch_prompts: Sequence[str]) -> np.ndarray:
    """Validate ``generate_fn``'s output and turn it into uint8 ``(N, H, W, 3)``."""
    if type(images).__module__.startswith("torch"):
        images = images.detach().to("cpu").float().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[1] != 3:
        raise ValueError(f"generate_fn returned shape {tuple(arr.shape)} for {n} prompts; "
                         f"expected ({n}, 3, H, W) (first prompt: {batch_prompts[0]!r})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"generate_fn returned {arr.dtype} images; expected floats in [0, 1]")
    if not np.isfinite(arr).all():
        raise ValueError(f"generate_fn returned NaN or infinite values (first prompt: {batch_prompts[0]!r})")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"generate_fn returned values in [{lo:.3f}, {hi:.3f}]; expected [0, 1] "
                         "(images in [-1, 1] become (x + 1) / 2)")
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def evaluate(generate_fn: GenerateFn, protocol: Union[None, Protocol, str, os.PathLike] = None, *,
             subset: Optional[int] = None, batch_size: int = 32, out_dir: Union[None, str, os.PathLike] = None,
             checker: Optional[StrictShapesChecker] = None, settings: Optional[Mapping[str, Any]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Any]:
    """Generate an image for every protocol item, judge it and return the report dict.

    Args:
        generate_fn: ``(prompts, seeds) -> float tensor (N, 3, H, W) in [0, 1]``.
        protocol: a :class:`~.protocol.Protocol`, a protocol file, or ``None`` for the shipped one.
        subset: evaluate only ``subset`` items per category (:func:`select_subset`).
        batch_size: prompts per ``generate_fn`` call.
        out_dir: when given, write ``report.json``, ``report.md`` and ``grid.png`` there.
        checker: the judge (default :class:`~.checker.StrictShapesChecker` with its defaults).
        settings: generation settings recorded in the report.
        progress: called as ``progress(done, total)`` after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol)
    full_size = len(protocol.items)
    if subset is not None:
        protocol = select_subset(protocol, subset)
    checker = checker or StrictShapesChecker()
    items = list(protocol.items)
    results: List[Dict[str, Any]] = []
    images: List[np.ndarray] = []
    t0 = time.time()
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [it.prompt for it in batch]
        out = _as_uint8_images(generate_fn(prompts, [it.seed for it in batch]), len(batch), prompts)
        for it, img in zip(batch, out):
            verdict = checker.check(img, it.spec, it.category)
            results.append({"id": it.id, "category": it.category, "prompt": it.prompt, "seed": it.seed,
                            "passed": verdict.passed, "reason": verdict.reason,
                            "objects": [o.describe() for o in verdict.analysis.objects],
                            "specks": verdict.analysis.specks,
                            "detections": [o.to_dict() for o in verdict.analysis.objects]})
            images.append(img)
        if progress is not None:
            progress(len(results), len(items))
    described = {"name": protocol.name, "version": protocol.version, "source": protocol.source,
                 "items": len(items), "protocol_items": full_size, "subset": subset,
                 "image_size": int(images[0].shape[0]) if images else None,
                 "seconds": round(time.time() - t0, 1)}
    report = build_report(results, protocol=described, settings=settings)
    if out_dir is not None:
        report["files"] = write_report(report, out_dir, images)
    return report

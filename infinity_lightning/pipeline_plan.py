"""The plan of one pipeline call: per-image seeds, random streams, schedules and batches.

:func:`plan_call` checks a call's image-count, seed, generator, aspect-ratio and batch arguments
before any work and groups the images into transformer batches (images of one schedule, at most
``batch_size`` at a time).  Image ``i`` (prompt-major, then ``num_images_per_prompt``) gets seed
``seed + i`` and its own ``torch.Generator``, so its bits never depend on the rest of the call.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .sampling import SamplingConfig
from .scales import ScaleSchedule

__all__ = ["CallPlan", "plan_call", "random_streams", "progress_hook"]

Streams = Union[torch.Generator, List[torch.Generator]]


@dataclasses.dataclass
class CallPlan:
    """One validated call: config, per-image seeds / generators / schedules / prompt index
    (``owner``), and the batches of image indices."""

    config: SamplingConfig
    seeds: List[Optional[int]]
    generators: Streams
    schedules: List[ScaleSchedule]
    owner: List[int]
    batches: List[List[int]]


def progress_hook(bar) -> SimpleNamespace:
    """A sampling hook that advances ``bar`` once per scale."""
    def on_bits(scale: int, bits: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return bits
    return SimpleNamespace(on_bits=on_bits)


def plan_call(schedule_for: Callable[[float, Any], ScaleSchedule], device: torch.device, n_prompts: int, seed: Any,
              generator: Any, aspect_ratio: Union[float, Sequence[float]], resolution: Any,
              num_images_per_prompt: int, batch_size: Optional[int], config: SamplingConfig) -> CallPlan:
    """The :class:`CallPlan` of a call (``schedule_for(aspect_ratio, resolution)``: the pipeline's)."""
    if n_prompts == 0:
        raise ValueError("no prompts given")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    n = n_prompts * num_images_per_prompt
    owner = [i // num_images_per_prompt for i in range(n)]
    ratios = [aspect_ratio] * n_prompts if isinstance(aspect_ratio, (int, float)) else list(aspect_ratio)
    if len(ratios) != n_prompts:
        raise ValueError(f"{len(ratios)} aspect ratios for {n_prompts} prompts; give one or one per prompt")
    per_prompt = [schedule_for(float(r), resolution) for r in ratios]
    schedules = [per_prompt[p] for p in owner]
    seeds, generators = random_streams(seed, generator, n, device)
    groups: Dict[ScaleSchedule, List[int]] = {}
    for i, schedule in enumerate(schedules):
        groups.setdefault(schedule, []).append(i)
    batches = []
    for members in groups.values():
        step = len(members) if (batch_size is None or isinstance(generators, torch.Generator)) else int(batch_size)
        batches += [members[j:j + step] for j in range(0, len(members), step)]
    return CallPlan(config, seeds, generators, schedules, owner, batches)


def random_streams(seed: Any, generator: Any, n: int, device: torch.device) -> Tuple[List[Optional[int]], Streams]:
    """(per-image seeds, per-image generators or one shared generator) for ``n`` images.

    ``seed``: a base (image i: ``seed + i``), one per image, or None (a base drawn from torch's
    global generator); ``generator``: instead of seeds, one per image or one shared (seeds None).
    """
    if generator is not None:
        if seed is not None:
            raise ValueError("give seed or generator, not both")
        gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if not isinstance(generator, torch.Generator) and len(gens) != n:
            raise ValueError(f"{len(gens)} generators for {n} images; give one generator or one per image")
        for i, g in enumerate(gens):
            if not isinstance(g, torch.Generator) or g.device.type != device.type:
                raise ValueError(f"generator {i} must be a torch.Generator on {device.type} (the pipeline's "
                                 f"device), got {getattr(g, 'device', type(g).__name__)}")
        return [None] * n, generator if isinstance(generator, torch.Generator) else gens
    if seed is None:
        base = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        seeds = [base + i for i in range(n)]
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(n)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images; give one base seed or one per image")
    return seeds, [torch.Generator(device=device).manual_seed(s) for s in seeds]

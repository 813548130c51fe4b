"""Decoded images -> the output types of the pipeline and the editing functions.

``"pil"`` (list of RGB images), ``"np"`` (uint8 (N, H, W, 3)), ``"pt"`` (float (N, 3, H, W) in
[0, 1], as diffusers) and ``"tensor"`` (float (N, 3, H, W) in [-1, 1], the decoder's range;
``pt == (tensor + 1) / 2``).  Pixels are converted by truncation, as the original code does
(:func:`~infinity_lightning.sampling.images_to_uint8`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .sampling import images_to_uint8

__all__ = ["OUTPUT_TYPES", "check_output_type", "to_output"]

OUTPUT_TYPES = ("pil", "np", "pt", "tensor")


def check_output_type(output_type: Any) -> str:
    """``output_type`` if it is one of :data:`OUTPUT_TYPES`, else a ``ValueError`` listing them."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def to_output(images: Sequence[torch.Tensor], output_type: str) -> Any:
    """Decoder outputs, each (3, H, W) in [-1, 1], as ``output_type``; images of different sizes
    (several aspect ratios in one call) come as a list of single-image outputs."""
    if len({tuple(t.shape) for t in images}) > 1:
        return [to_output([t], output_type)[0] for t in images]
    x = torch.stack(list(images)).float().cpu()
    if output_type == "tensor":
        return x
    if output_type == "pt":
        return (x + 1) / 2
    pixels = images_to_uint8(x)
    if output_type == "np":
        return pixels.numpy()
    from PIL import Image

    return [Image.fromarray(p.numpy()) for p in pixels]

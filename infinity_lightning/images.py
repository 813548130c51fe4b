"""Image loading, resizing and conversion with Pillow and torch (no torchvision).

The conventions are those of the original training transform (docs/model.md#data) and output path:

* pixels enter the models as ``uint8 / 255 * 2 - 1`` in [-1, 1], channels first;
* :func:`resize_cover_crop` resizes with LANCZOS so the image covers the target, then crops the
  centre (offsets ``floor((size - target) / 2)``);
* model output in [-1, 1] becomes uint8 by truncation of ``(x + 1) / 2 * 255`` (no rounding).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .io import PathLike
from infinity_lightning import scales


__all__ = [
    "load_image", "upright", "oriented_size", "to_rgb", "cover_size", "resize_cover_crop", "center_crop", "crop_to_multiple",
    "pil_to_tensor", "tensor_to_pil", "template_size", "hstack",
]


def to_rgb(img: Image.Image, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB.

    Images with transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) are
    composited on ``background`` (white), so transparent areas do not turn black; CMYK, YCbCr,
    greyscale and palette images are converted by Pillow; 16/32-bit integer and float greyscale
    images are scaled to 8 bits by their value range.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


#: The EXIF tag that says how a camera held the picture.
EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated / mirrored as its EXIF orientation says
    (phones store portrait photos as landscape pixels plus a tag), with the tag removed."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: take the pixels as they are
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def oriented_size(img: Image.Image) -> Tuple[int, int]:
    """``(width, height)`` of :func:`upright` ``(img)`` from the header alone (EXIF orientations
    5-8 turn the picture by 90 degrees)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return w, h
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: PathLike) -> Image.Image:
    """Open an image file and return it as an RGB :class:`PIL.Image.Image`, upright as its EXIF
    orientation says (:func:`upright`, :func:`to_rgb`).

    ``FileNotFoundError`` for a missing path, ``IsADirectoryError`` for a folder, ``ValueError``
    for a file that is not a readable image; each names the path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(upright(img))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def cover_size(width: int, height: int, tgt_h: int, tgt_w: int) -> Tuple[int, int]:
    """Size ``(new_w, new_h)`` that covers ``tgt_h x tgt_w`` with the aspect ratio kept (docs/model.md#data).

    If ``w/h <= tgt_w/tgt_h`` the width becomes ``tgt_w`` and the height ``int(tgt_w*h/w)``,
    otherwise the height becomes ``tgt_h`` and the width ``int(tgt_h*w/h)``.  Where the int
    truncation would land one pixel short of the target, the target is used instead, so the centre
    crop always fits (the original skips such samples).
    """
    if width <= 0 or height <= 0 or tgt_h <= 0 or tgt_w <= 0:
        raise ValueError(f"sizes must be positive: image {width}x{height}, target {tgt_w}x{tgt_h}")
    if width / height <= tgt_w / tgt_h:
        return tgt_w, max(int(tgt_w * height / width), tgt_h)
    return max(int(tgt_h * width / height), tgt_w), tgt_h


def center_crop(img: Image.Image, tgt_h: int, tgt_w: int) -> Image.Image:
    """Crop ``tgt_h x tgt_w`` from the centre, offsets ``floor((size - target) / 2)``."""
    w, h = img.size
    if w < tgt_w or h < tgt_h:
        raise ValueError(f"cannot crop {tgt_w}x{tgt_h} from an image of {w}x{h}")
    left, top = (w - tgt_w) // 2, (h - tgt_h) // 2
    return img.crop((left, top, left + tgt_w, top + tgt_h))


def resize_cover_crop(img: Image.Image, tgt_h: int, tgt_w: int) -> Image.Image:
    """LANCZOS resize so the image covers ``tgt_h x tgt_w`` (:func:`cover_size`), then centre crop."""
    new_w, new_h = cover_size(img.size[0], img.size[1], tgt_h, tgt_w)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), resample=Image.LANCZOS)
    return center_crop(img, tgt_h, tgt_w)


def crop_to_multiple(img: Image.Image, multiple: int) -> Image.Image:
    """Centre-crop both sides down to a multiple of ``multiple`` (e.g. the tokenizer stride)."""
    w, h = img.size
    tgt_w, tgt_h = (w // multiple) * multiple, (h // multiple) * multiple
    if tgt_w == 0 or tgt_h == 0:
        raise ValueError(f"image of {w}x{h} is smaller than the stride {multiple}")
    if (tgt_w, tgt_h) == (w, h):
        return img
    return center_crop(img, tgt_h, tgt_w)


def template_size(height: int, width: int, pn: str = "0.25M") -> Tuple[int, int]:
    """Pixel size (H, W) of the aspect-ratio template nearest to ``height / width`` at the pixel
    budget ``pn`` (``"0.06M"`` = 256x256 for square images, ``"0.25M"``, ``"0.60M"``, ``"1M"``)."""
    return scales.resolve(pn, height / width).pixel_size()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1]: ``uint8 / 255 * 2 - 1``."""
    img = to_rgb(img)
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div(255.0) * 2 - 1


def tensor_to_pil(x: torch.Tensor) -> Union[Image.Image, List[Image.Image]]:
    """Tensor in [-1, 1], (3, H, W) or (B, 3, H, W) -> one RGB image or a list of them.

    uint8 values are ``trunc((x + 1) / 2 * 255)`` like the original output path; values outside
    [-1, 1] are clamped first.
    """
    if x.dim() == 4:
        return [tensor_to_pil(xi) for xi in x]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    u8 = ((x + 1) / 2).mul(255).to(torch.uint8)
    arr = u8.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L").convert("RGB")
    return Image.fromarray(arr, mode="RGB")


def hstack(images: Sequence[Image.Image], gap: int = 0, background=(255, 255, 255)) -> Image.Image:
    """Place images side by side (top-aligned) on one canvas."""
    if not images:
        raise ValueError("no images to stack")
    width = sum(im.size[0] for im in images) + gap * (len(images) - 1)
    height = max(im.size[1] for im in images)
    canvas = Image.new("RGB", (width, height), background)
    x = 0
    for im in images:
        canvas.paste(to_rgb(im), (x, 0))
        x += im.size[0] + gap
    return canvas

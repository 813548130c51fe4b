"""Image decoding and the training transform (docs/model.md#data).

* :func:`open_image` decodes a file or bytes to an RGB ``PIL.Image`` and turns every way an
  image can be unusable (missing, empty, not an image, truncated, decompression bomb) into a
  :class:`SkipSample` with a reason, so the datasets can count and skip it.
* :func:`resize_and_crop` is the original transform: resize so the image covers the target
  (LANCZOS), then centre crop (:mod:`infinity_lightning.images`; where the original's ``int``
  truncation would leave ``tgt - 1`` pixels, the side is rounded up to ``tgt``).
* :func:`to_model_range` turns a PIL image into a float tensor ``(3, H, W)`` in ``[-1, 1]``.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import torch
from PIL import Image, UnidentifiedImageError

from infinity_lightning.images import oriented_size, pil_to_tensor, resize_cover_crop, to_rgb, upright

#: Default pixel limit of a decoded image (decompression-bomb guard): 64 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024

#: File extensions treated as images by the folder and webdataset loaders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a short key counted by :class:`SkipCounter`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(source: Union[str, os.PathLike, bytes], *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               name: str = "") -> Image.Image:
    """Decode an image file (or its bytes) to a fully loaded RGB image, upright as its EXIF
    orientation says (:func:`infinity_lightning.images.upright`).

    Raises :class:`SkipSample` with reason ``missing_file``, ``empty_file``, ``not_an_image``,
    ``too_large`` (more than ``max_pixels`` pixels, PIL's decompression-bomb guard included) or
    ``corrupt_image`` (truncated or undecodable data).  ``name`` is used in messages for bytes.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if len(source) == 0:
            raise SkipSample("empty_file", label)
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SkipSample("missing_file", label) from None
        except OSError as e:
            raise SkipSample("missing_file", f"{label} ({e})") from None
        if path.is_dir():
            raise SkipSample("not_an_image", f"{label} is a folder")
        if size == 0:
            raise SkipSample("empty_file", label)
        fp = str(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SkipSample("too_large", f"{label}: {w}x{h} exceeds {max_pixels} pixels")
                img.load()
                return to_rgb(upright(img))
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_large", f"{label}: {e}") from None
    except UnidentifiedImageError:
        raise SkipSample("not_an_image", label) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        raise SkipSample("corrupt_image", f"{label}: {type(e).__name__}: {e}") from None


def image_aspect(source: Union[str, os.PathLike], *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> float:
    """Height / width of an image file as it is seen (EXIF orientation applied), read from its
    header only (no decoding)."""
    path = Path(source)
    try:
        if path.stat().st_size == 0:
            raise SkipSample("empty_file", str(path))
    except FileNotFoundError:
        raise SkipSample("missing_file", str(path)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = oriented_size(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_large", f"{path}: {e}") from None
    except UnidentifiedImageError:
        raise SkipSample("not_an_image", str(path)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipSample("corrupt_image", f"{path}: {e}") from None
    if w * h > max_pixels:
        raise SkipSample("too_large", f"{path}: {w}x{h} exceeds {max_pixels} pixels")
    if w <= 0 or h <= 0:
        raise SkipSample("corrupt_image", f"{path}: size {w}x{h}")
    return h / w


def resize_and_crop(img: Image.Image, tgt_h: int, tgt_w: int) -> Image.Image:
    """Resize to cover ``(tgt_h, tgt_w)`` with LANCZOS, then centre crop to exactly that size
    (:func:`infinity_lightning.images.resize_cover_crop`)."""
    if img.size == (tgt_w, tgt_h):
        return img
    return resize_cover_crop(img, tgt_h, tgt_w)


def to_model_range(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor ``(3, H, W)`` in ``[-1, 1]`` (``uint8 / 255 * 2 - 1``)."""
    return pil_to_tensor(img)


def transform_image(img: Image.Image, tgt_h: int, tgt_w: int) -> torch.Tensor:
    """The full training transform: :func:`resize_and_crop` then :func:`to_model_range`."""
    return to_model_range(resize_and_crop(img, tgt_h, tgt_w))

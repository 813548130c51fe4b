"""Image helpers: mode conversion, cover-resize-crop sizes and offsets, value ranges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning import images, scales


def test_rgba_is_composited_on_white():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)   # opaque red
    arr[0, 1] = (0, 0, 0, 0)       # transparent black -> white
    arr[1, 0] = (0, 0, 0, 128)     # half-transparent black -> grey
    rgb = np.asarray(images.to_rgb(Image.fromarray(arr, mode="RGBA")))
    assert tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert all(abs(int(c) - 127) <= 1 for c in rgb[1, 0])


def test_greyscale_palette_and_cmyk_become_rgb():
    grey = images.to_rgb(Image.fromarray(np.array([[0, 200]], dtype=np.uint8), mode="L"))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 1].tolist() == [200, 200, 200]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(images.to_rgb(pal))[0, 1].tolist() == [10, 20, 30]

    pal.info["transparency"] = 1  # palette index 1 transparent -> white
    assert np.asarray(images.to_rgb(pal))[0, 1].tolist() == [255, 255, 255]

    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(images.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]

    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))  # 16-bit greyscale
    assert np.asarray(images.to_rgb(deep))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_load_image_converts_on_open(tmp_path):
    path = tmp_path / "a.png"
    Image.new("LA", (5, 3), (10, 255)).save(path)
    img = images.load_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    with pytest.raises(FileNotFoundError):
        images.load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("size,target,expected", [
    ((640, 480), (256, 256), (341, 256)),    # landscape: height to target, width int(256*640/480)
    ((480, 640), (256, 256), (256, 341)),    # portrait: width to target
    ((1000, 500), (720, 1440), (1440, 720)),  # exact ratio
    ((451, 300), (192, 288), (288, 192)),    # ratio 1.503 vs 1.5: width int(192*451/300) = 288
    ((300, 451), (288, 192), (192, 288)),
])
def test_cover_size(size, target, expected):
    w, h = size
    tgt_h, tgt_w = target
    if w / h <= tgt_w / tgt_h:
        plain = (tgt_w, int(tgt_w * h / w))
    else:
        plain = (int(tgt_h * w / h), tgt_h)
    got = images.cover_size(w, h, tgt_h, tgt_w)
    assert got == expected
    assert got == (max(plain[0], tgt_w), max(plain[1], tgt_h))  # the original's rule (docs/model.md#data), never short of the target


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (100, 100), (1000, 500), (33, 77), (451, 300)])
@pytest.mark.parametrize("target", [(64, 64), (48, 96), (96, 48)])
def test_resize_cover_crop_always_gives_the_target(size, target):
    out = images.resize_cover_crop(Image.new("RGB", size, (1, 2, 3)), *target)
    assert out.size == (target[1], target[0])


def test_center_crop_offsets_are_floored():
    arr = np.tile(np.arange(7, dtype=np.uint8)[None, :, None], (5, 1, 3)) * 30  # column index encoded
    img = Image.fromarray(arr)
    out = np.asarray(images.center_crop(img, 2, 4))
    assert out[0, :, 0].tolist() == [30, 60, 90, 120]   # left offset floor((7-4)/2) = 1
    assert out.shape == (2, 4, 3)


def test_crop_to_multiple_of_stride():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    out = images.crop_to_multiple(img, 16)
    assert out.size == (448, 288)
    assert np.array_equal(np.asarray(out), np.asarray(img)[6:294, 1:449])
    assert images.crop_to_multiple(out, 16) is out


def test_tensor_round_trip_and_value_range():
    arr = np.array([[[0, 127, 255], [1, 128, 254]]], dtype=np.uint8)  # 1 x 2 pixels
    x = images.pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float().div(255) * 2 - 1)
    back = np.asarray(images.tensor_to_pil(x))
    # Truncation, not rounding: 254/255*2-1 comes back to 254 only because the float is exact enough.
    assert np.abs(back.astype(int) - arr.astype(int)).max() <= 1
    # (x+1)/2*255 = 127.9 truncates to 127; out-of-range values are clamped.
    y = torch.tensor([127.9 / 255 * 2 - 1, 2.0, -3.0]).view(3, 1, 1)
    assert np.asarray(images.tensor_to_pil(y))[0, 0].tolist() == [127, 255, 0]
    batch = images.tensor_to_pil(torch.zeros(2, 3, 4, 5))
    assert len(batch) == 2 and batch[0].size == (5, 4)


def test_template_size_is_the_nearest_template():
    assert images.template_size(300, 451, "0.06M") == scales.resolve("0.06M", 300 / 451).pixel_size()
    assert images.template_size(512, 512, "0.25M") == (512, 512)
    h, w = images.template_size(1000, 500, "1M")
    assert (h, w) == (1440, 720)


def test_hstack():
    strip = images.hstack([Image.new("RGB", (4, 3)), Image.new("RGB", (5, 6))], gap=2)
    assert strip.size == (11, 6)

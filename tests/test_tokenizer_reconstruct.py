"""``infinity-lightning reconstruct`` end to end on real photos (scikit-image) with a tiny tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning import cli, images
from infinity_lightning.checkpoints import save_tokenizer
from infinity_lightning.commands.reconstruct import prepare_image, proportional_schedule
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.presets import TokenizerConfig

import skimage.data as skdata  # noqa: E402  (test extra)

TINY = TokenizerConfig(codebook_dim=8, base_ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, patch_size=4, norm_groups=8)


@pytest.fixture
def tokenizer_path(tmp_path):
    torch.manual_seed(0)
    return save_tokenizer(BSQVAE(TINY), tmp_path / "tiny_vae.pth")  # released layout


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / mse))


def test_reconstruct_writes_images_metrics_and_progression(tmp_path, tokenizer_path, capsys):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    out = tmp_path / "out"
    rc = cli.main(["reconstruct", "--tokenizer", str(tokenizer_path), str(photo), "--out", str(out),
                   "--size", "64", "--progression"])
    assert rc == 0
    recon = Image.open(out / "astronaut_recon.png")
    assert recon.size == (64, 64)
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["images"][0]
    assert row["size"] == [64, 64] and row["original_size"] == [512, 512]
    # latent 16x16 -> the Infinity 256-px schedule (7 scales)
    assert [tuple(s) for s in row["schedule"]] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8),
                                                   (1, 12, 12), (1, 16, 16)]
    assert row["bits"] == 8 * sum(h * w for _, h, w in row["schedule"])
    # The reported PSNR is that of the written PNG against the resized input.
    target = np.asarray(images.resize_cover_crop(images.load_image(photo), 64, 64))
    assert row["psnr"] == pytest.approx(_psnr(np.asarray(recon), target), abs=1e-3)
    assert -1.0 <= row["ssim"] <= 1.0
    assert metrics["mean"]["psnr"] == pytest.approx(row["psnr"])
    strip = Image.open(out / "astronaut_progression.png")
    assert strip.size == (8 * 64 + 7 * 2, 64)  # input + 7 scales, 2-px gaps
    # The last panel of the strip is the full reconstruction.
    assert np.array_equal(np.asarray(strip)[:, -64:], np.asarray(recon))
    assert len(row["psnr_per_scale"]) == 7
    assert "astronaut" in capsys.readouterr().out


def test_reconstruct_crops_sizes_the_stride_does_not_divide(tmp_path, tokenizer_path):
    # A 45x70 piece of a real photo: 45 and 70 are not multiples of the stride 4.
    photo = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()[100:145, 150:220]).save(photo)
    out = tmp_path / "none"
    assert cli.main(["reconstruct", "--tokenizer", str(tokenizer_path), str(photo), "--out", str(out),
                     "--resize", "none"]) == 0
    assert Image.open(out / "cat_recon.png").size == (68, 44)  # centre crop to multiples of 4
    row = json.loads((out / "metrics.json").read_text())["images"][0]
    assert row["size"] == [44, 68]
    # 11x17 latent has no Infinity schedule: the proportional fallback ends at the grid.
    assert [tuple(s) for s in row["schedule"]] == proportional_schedule(11, 17)
    assert tuple(row["schedule"][-1]) == (1, 11, 17)


def test_resize_modes_of_the_command(tmp_path):
    photo = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(photo)  # 451 x 300
    vae = BSQVAE(TINY)
    parser = cli.build_parser()

    def prepared(*flags):
        args = parser.parse_args(["reconstruct", "--tokenizer", "x", str(photo), "--out", "o", *flags])
        return prepare_image(str(photo), vae, args)[0].size

    assert prepared() == (256, 256)
    assert prepared("--size", "96") == (96, 96)
    h, w = images.template_size(300, 451, "0.25M")
    assert prepared("--resize", "template") == (w, h)
    assert prepared("--resize", "template", "--pn", "0.06M") == images.template_size(300, 451, "0.06M")[::-1]
    assert prepared("--resize", "none") == (448, 300)
    # the command checks the size against the tokenizer before reading any image
    tok = save_tokenizer(vae, tmp_path / "vae.pth")
    with pytest.raises(SystemExit, match="not a multiple of the tokenizer stride 4"):
        cli.main(["reconstruct", "--tokenizer", str(tok), str(photo), "--out", str(tmp_path / "o"), "--size", "65"])


def test_two_images_with_the_same_name_and_a_preset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.fromarray(skdata.coffee()[:64, :64]).save(a / "x.png")
    Image.fromarray(skdata.rocket()[:64, :64]).save(b / "x.png")
    out = tmp_path / "out"
    assert cli.main(["reconstruct", "--tokenizer", "tiny", str(a / "x.png"), str(b / "x.png"),
                     "--out", str(out), "--resize", "none", "--dtype", "bf16"]) == 0
    assert (out / "x_recon.png").exists() and (out / "x_2_recon.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["images"]] == ["x", "x_2"]
    assert metrics["mean"]["ssim"] == pytest.approx(sum(r["ssim"] for r in metrics["images"]) / 2)


def test_proportional_schedule_is_monotone_and_ends_at_the_grid():
    for h, w in [(11, 17), (3, 40), (1, 1), (64, 64)]:
        s = proportional_schedule(h, w)
        assert s[0][1:] == (1, 1) and s[-1] == (1, h, w)
        assert all(a[1] <= b[1] and a[2] <= b[2] and a != b for a, b in zip(s, s[1:]))

"""What a new user meets first: image folders without captions, EXIF-rotated photos, file
permissions of exports, batch commands that skip a bad item, sample grids with their prompts,
local paths never sent to the Hub, quiet loading of small text encoders."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning.cli import UserExit, main


def _folder(root: Path, n: int = 6, captions: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 32), (40 * i, 255 - 40 * i, 128)).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"colour number {i}")
    return root


# -- image folders without captions --------------------------------------------------------------
def test_a_plain_image_folder_trains_a_tokenizer_but_not_a_transformer(tmp_path):
    from infinity_lightning.datamodules import ImageFolderDataModule, TooManySkipsError

    folder = _folder(tmp_path / "photos")
    tokenizer_data = ImageFolderDataModule(data_dir=folder, batch_size=2, image_size=16, require_captions=False)
    batches = list(tokenizer_data.train_dataloader())
    assert len(batches) == 3 and all(b["captions"] == ["", ""] for b in batches)
    assert batches[0]["images"].shape == (2, 3, 16, 16)
    # text-to-image training needs the captions: every image is skipped, and that is an error
    var_data = ImageFolderDataModule(data_dir=folder, batch_size=2, image_size=16)
    with pytest.raises(TooManySkipsError, match="missing_caption"):
        var_data.setup("fit")
    # a sidecar caption is still read when there is one
    (folder / "0.txt").write_text("a caption")
    mixed = ImageFolderDataModule(data_dir=folder, batch_size=6, image_size=16, require_captions=False, shuffle=False)
    assert sorted(next(iter(mixed.train_dataloader()))["captions"]) == ["", "", "", "", "", "a caption"]


def test_tokenizer_recipes_read_uncaptioned_folders(tmp_path):
    from infinity_lightning.recipes import build_run, load_run_recipe

    folder = _folder(tmp_path / "photos", n=8)
    cfg, _, _ = load_run_recipe("tokenizer/d16_256", [f"data.data_dir={folder}", "model.preset=tiny_f8",
                                                      "schedule.resolution=64", "data.batch_size=4"])
    run = build_run(cfg, tmp_path / "run")
    assert run.datamodule.require_captions is False
    batch = next(iter(run.datamodule.train_dataloader()))
    assert batch["images"].shape == (4, 3, 64, 64)
    # a recipe may still ask for captions explicitly
    cfg, _, _ = load_run_recipe("tokenizer/d16_256", [f"data.data_dir={folder}", "model.preset=tiny_f8",
                                                      "schedule.resolution=64", "+data.require_captions=true"])
    assert build_run(cfg, tmp_path / "run2").datamodule.require_captions is True


# -- EXIF orientation ------------------------------------------------------------------------------
def _rotated_jpeg(path: Path) -> Path:
    """A landscape JPEG (white left quarter) tagged 'rotate 90 degrees clockwise to display'."""
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :20] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_is_applied_when_images_are_loaded(tmp_path):
    from infinity_lightning.datamodules.transforms import image_aspect, open_image
    from infinity_lightning.images import load_image

    path = _rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as raw:
        assert raw.size == (80, 40)  # the stored pixels are landscape
    for img in (load_image(path), open_image(path)):
        assert img.size == (40, 80)  # shown upright: portrait
        arr = np.asarray(img, dtype=np.float32)
        assert arr[:15].mean() > 200 and arr[-40:].mean() < 30  # the white quarter is now at the top
    assert image_aspect(path) == pytest.approx(2.0)  # buckets use the upright shape
    plain = tmp_path / "plain.png"
    Image.new("RGB", (80, 40)).save(plain)
    assert load_image(plain).size == (80, 40) and image_aspect(plain) == 0.5


# -- exports ---------------------------------------------------------------------------------------
def test_exports_get_the_usual_file_permissions(tmp_path):
    from infinity_lightning.checkpoints import load_tokenizer, save_tokenizer
    from infinity_lightning.io import atomic_save_safetensors

    old = os.umask(0o022)
    try:
        vae = load_tokenizer("tiny_f8")
        paths = [save_tokenizer(vae, tmp_path / "t.safetensors"), save_tokenizer(vae, tmp_path / "t.pth"),
                 atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")]
        assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in paths] == ["0o644"] * 3
        os.umask(0o077)
        assert stat.S_IMODE(atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "y.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_saved_pipeline_folder_is_readable_by_others(tmp_path):
    from infinity_lightning.pipeline import InfinityPipeline
    from infinity_lightning.tiny import make_tiny_pipeline

    old = os.umask(0o022)
    try:
        pipe = InfinityPipeline.from_pretrained(make_tiny_pipeline(tmp_path / "tiny", layout="generic"), device="cpu")
        out = pipe.save_pretrained(tmp_path / "saved")
        folders = [out / "text_encoder"]
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in folders] == ["0o755"]  # not mkdtemp's 0700
        assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}, files
    finally:
        os.umask(old)


# -- batch commands ----------------------------------------------------------------------------------
def test_reconstruct_skips_a_bad_image_and_scores_the_others(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), "red").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rotated = _rotated_jpeg(tmp_path / "phone.jpg")
    out = tmp_path / "out"
    status = main(["reconstruct", "--tokenizer", "tiny_f8", str(good), str(bad), str(rotated), "--size", "32",
                   "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1  # finished, but not everything could be used
    report = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in report["images"]] == ["good", "phone"]
    assert [s["image"] for s in report["skipped"]] == [str(bad)] and "cannot read image" in report["skipped"][0]["error"]
    assert report["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in report["images"]]))
    assert (out / "good_recon.png").is_file() and not (out / "bad_recon.png").exists()
    assert f"skipped {bad}" in captured.err
    assert report["images"][1]["original_size"] == [80, 40]  # (height, width) of the upright photo
    # every image readable: status 0
    assert main(["reconstruct", "--tokenizer", "tiny_f8", str(good), "--size", "32", "--out", str(tmp_path / "o2")]) == 0


# -- sample grids ----------------------------------------------------------------------------------
def test_sample_grids_carry_their_prompts():
    from infinity_lightning.callbacks.sample_logger import label_grid, make_grid

    images = torch.zeros(3, 3, 32, 32)  # black tiles
    plain = make_grid(images, nrow=3)
    labelled = label_grid(images, ["a red circle", "a blue square", "x"], nrow=3)
    assert labelled.shape[2] == plain.shape[2] and labelled.shape[1] > plain.shape[1]  # a caption strip below
    strip = labelled[:, 2 + 32:, 2:34]  # under the first tile
    assert (strip < 0.5).any() and (strip > 0.5).any()  # dark text on white
    empty = label_grid(images, ["", "", ""], nrow=3)[:, 2 + 32:, 2:34]
    assert (empty > 0.5).all()  # no label, no ink
    with pytest.raises(ValueError, match="one label per image"):
        label_grid(images, ["a", "b"])


# -- local paths and the Hub -----------------------------------------------------------------------
def test_a_missing_local_folder_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    from infinity_lightning import loading

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(loading, "_snapshot", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="'runs/nope' does not exist .*local folder runs/ exists"):
        loading.check_source("runs/nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.check_source("./weights")
    assert loading.check_source("someone/model") is None  # no such folder here: a Hub repository id
    with pytest.raises(UserExit, match="runs/nope"):
        main(["generate", "--pipeline", "runs/nope", "--prompt", "x", "--out", "o"])


def test_small_text_encoders_load_without_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from infinity_lightning.quiet import hf_progress_bars_off, is_small_model
    from infinity_lightning.tiny import make_tiny_t5

    folder = make_tiny_t5(tmp_path / "t5", d_model=32, num_heads=1)
    assert is_small_model(folder) and hf_logging.is_progress_bar_enabled()
    with hf_progress_bars_off():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()  # restored
    with hf_progress_bars_off(enabled=False):
        assert hf_logging.is_progress_bar_enabled()
    from infinity_lightning.recipes.build import build_text_encoder

    capfd.readouterr()
    build_text_encoder(str(folder), {}, tmp_path)
    assert "Loading weights" not in capfd.readouterr().err
    from infinity_lightning.models.text_encoder import TextEncoder

    encoder = TextEncoder.from_pretrained(folder)  # the quick start and the pipeline load it directly
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    from infinity_lightning.loading import save_components
    from infinity_lightning.sampling import SamplingConfig
    from tests.test_var_module import tiny_tokenizer, tiny_transformer

    save_components(tmp_path / "pipe", tiny_transformer(), tiny_tokenizer(), encoder, 64, SamplingConfig())
    assert (tmp_path / "pipe" / "text_encoder" / "config.json").is_file()
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()

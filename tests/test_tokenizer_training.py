"""Tokenizer training: overfitting real photos, the adversarial phase, export and recipes."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import lightning.pytorch as pl  # noqa: E402

from infinity_lightning.checkpoints import load_tokenizer  # noqa: E402
from infinity_lightning.datamodules.photos import PhotoCropsDataModule, PhotoCropsDataset  # noqa: E402
from infinity_lightning.lit.tokenizer_module import BSQTokenizerModule  # noqa: E402
from infinity_lightning.models.bsq_vae import BSQVAE  # noqa: E402
from infinity_lightning.models.tokenizer_losses import PatchDiscriminator, PerceptualLoss  # noqa: E402
from infinity_lightning.presets import tokenizer_config  # noqa: E402
from infinity_lightning.recipes import RecipeError, build_run, load_recipe, load_run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "tokenizer").glob("*.yaml"))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


def _trainer(max_steps: int, **kw) -> pl.Trainer:
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "max_steps": max_steps,
          "num_sanity_val_steps": 0, **kw}
    return pl.Trainer(**kw)


def _photo_batch(size: int = 32, n: int = 4) -> torch.Tensor:
    ds = PhotoCropsDataset(PHOTOS, size, n, seed=0, hflip=False)
    return torch.stack([ds[i]["images"] for i in range(n)])


class _Repeat(torch.utils.data.Dataset):
    """The same fixed batch ``steps`` times, as dicts (the DataModules' batch format)."""

    def __init__(self, images: torch.Tensor, steps: int):
        self.images, self.steps = images, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        return {"images": self.images, "captions": ["photo"] * len(self.images)}


def _loader(images: torch.Tensor, steps: int) -> DataLoader:
    return DataLoader(_Repeat(images, steps), batch_size=None)


class _TinyFeatures(torch.nn.Module):
    """Random conv feature extractor standing in for Inception in rFID tests."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def overfit():
    """Train tiny_f8 on 4 fixed 32 px photo crops; PSNR/SSIM before and after, steps/s."""
    torch.manual_seed(0)
    images = _photo_batch()
    module = BSQTokenizerModule(BSQVAE(tokenizer_config("tiny_f8")), perceptual_weight=0.0, adv_weight=0.0,
                                commitment_weight=0.05, entropy_weight=0.005, schedule_mode="dense",
                                optim={"lr": 2e-3, "grad_clip": 1.0, "betas": (0.9, 0.99)},
                                fid_feature=_TinyFeatures())
    val = _loader(images, 1)
    before = {k: float(v) for k, v in _trainer(1).validate(module, val, verbose=False)[0].items()}
    steps = 60
    trainer = _trainer(steps)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=_loader(images, steps))
    elapsed = time.perf_counter() - start
    after = {k: float(v) for k, v in _trainer(1).validate(module, val, verbose=False)[0].items()}
    print(f"\ntiny_f8 32px overfit: PSNR {before['val/psnr']:.2f} -> {after['val/psnr']:.2f} dB, "
          f"SSIM {before['val/ssim']:.3f} -> {after['val/ssim']:.3f}, {steps / elapsed:.2f} steps/s")
    return {"module": module, "images": images, "before": before, "after": after, "trainer": trainer}


def test_overfits_real_photos(overfit):
    before, after = overfit["before"], overfit["after"]
    assert after["val/psnr"] > before["val/psnr"] + 8.0
    assert after["val/ssim"] > before["val/ssim"] + 0.2
    assert overfit["trainer"].global_step == 60
    # Codebook statistics are logged and sensible: 16 bits, usage fractions in [0, 1].
    assert 0.0 <= after["val/bit_usage_min"] <= after["val/bit_usage_max"] <= 1.0
    assert 0.0 < after["val/bit_entropy"] <= 1.0
    assert 0.0 < after["val/unique_code_frac"] <= 1.0
    assert overfit["module"].bit_usage.shape == (16,)
    # rFID through the pluggable feature module: finite, and lower after training.
    assert math.isfinite(after["val/rfid"]) and after["val/rfid"] < before["val/rfid"]


def test_log_images_returns_inputs_and_reconstructions(overfit):
    module = overfit["module"]
    out = module.log_images(prompts=["ignored"], seeds=[1])
    assert set(out) == {"inputs", "reconstructions"}
    assert out["inputs"].shape == out["reconstructions"].shape == (4, 3, 32, 32)
    assert out["reconstructions"].min() >= 0 and out["reconstructions"].max() <= 1
    torch.testing.assert_close(out["inputs"], (overfit["images"] + 1) / 2)
    mse = (out["inputs"] - out["reconstructions"]).pow(2).mean()
    assert 10 * math.log10(1 / mse) == pytest.approx(overfit["after"]["val/psnr"], abs=0.5)
    explicit = module.log_images(batch={"images": overfit["images"][:2]})
    assert explicit["reconstructions"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("fmt,name", [("released", "tok.pth"), ("safetensors", "tok.safetensors")])
def test_export_reload_identical(overfit, tmp_path, fmt, name):
    module = overfit["module"]
    path = module.export(tmp_path / name, format=fmt)
    loaded = load_tokenizer(path)
    tok = module.tokenizer.eval()
    x = overfit["images"]
    with torch.no_grad():
        ref, ref_bits = tok(x, [(1, 1, 1), (1, 2, 2), (1, 4, 4)])
        got, got_bits = loaded(x, [(1, 1, 1), (1, 2, 2), (1, 4, 4)])
    assert torch.equal(ref, got)
    assert all(torch.equal(a, b) for a, b in zip(ref_bits, got_bits))


OPTIM_KEYS = ("lr", "warmup_steps", "warmup_start_factor", "lr_schedule", "final_lr_factor", "max_steps", "grad_clip")


def _small_module(**kw) -> BSQTokenizerModule:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        perceptual = PerceptualLoss("tiny")
    optim = {"lr": 1e-3, "betas": (0.9, 0.99), **{k: kw.pop(k) for k in OPTIM_KEYS if k in kw}}
    kw = {"perceptual": perceptual, "perceptual_weight": 0.1, "adv_weight": 0.3,
          "discriminator": PatchDiscriminator(channels=8, n_layers=2), "optim": optim, **kw}
    return BSQTokenizerModule(BSQVAE(tokenizer_config("tiny_f8")), **kw)


def test_discriminator_phase_updates_discriminator_and_generator_loss():
    images = _photo_batch(n=2)
    module = _small_module(disc_start_step=2, lecam_weight=0.01)
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    _trainer(2).fit(module, train_dataloaders=_loader(images, 2))
    # Before disc_start_step the discriminator is untouched.
    assert all(torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert not module.adversarial_active() or module.global_step >= 2
    trainer = _trainer(4)
    trainer.fit(module, train_dataloaders=_loader(images, 2))
    # Two more batches with the discriminator on: its weights moved, and global_step counts batches.
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert "train/d_loss" in trainer.callback_metrics and "train/g_adv" in trainer.callback_metrics
    assert module.lecam.anchor_real.item() != 0.0

    # Generator loss with and without the adversarial term, on the same forward pass.
    module.train()
    out = module.reconstruct(images, train=False)
    with_adv = module.generator_losses(images, out, adversarial=True)
    without = module.generator_losses(images, out, adversarial=False)
    assert "g_adv" in with_adv and "g_adv" not in without
    expected = without["total"] + 0.3 * with_adv["adaptive_weight"] * with_adv["g_adv"]
    torch.testing.assert_close(with_adv["total"], expected)
    assert with_adv["adaptive_weight"].item() > 0
    assert not torch.allclose(with_adv["total"], without["total"])


def test_non_saturating_bf16_and_cosine_schedule():
    images = _photo_batch(n=2)
    module = _small_module(disc_start_step=0, disc_loss="non_saturating", warmup_steps=2, lr_schedule="cosine",
                           warmup_start_factor=0.5, final_lr_factor=0.1, max_steps=4, scale_drop_rate=0.5)
    enc_before = module.tokenizer.encoder.conv_in.conv.weight.detach().clone()
    trainer = _trainer(3, precision="bf16-mixed")
    trainer.fit(module, train_dataloaders=_loader(images, 3))
    metrics = trainer.callback_metrics
    assert all(math.isfinite(float(metrics[k])) for k in ("train/loss", "train/d_loss", "train/g_adv"))
    assert not torch.equal(enc_before, module.tokenizer.encoder.conv_in.conv.weight)
    # warm-up from 0.5 over two steps (0.5, 0.75), then cosine from 1 at step 2 to 0.1 at the last
    # step (max_steps - 1 = 3): factors 0.5, 0.75, 1.0 for the three steps taken
    opt_g, opt_d = trainer.optimizers
    assert [f(s) for s in range(5) for f in opt_g_lambdas(trainer)] == pytest.approx([0.5, 0.75, 1.0, 0.1, 0.1])
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)          # after 3 scheduler steps
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2 * opt_g.param_groups[0]["lr"])


def opt_g_lambdas(trainer):
    return trainer.lr_scheduler_configs[0].scheduler.lr_lambdas


def test_stochastic_scale_dropping_keeps_last_scale():
    module = _small_module(scale_drop_rate=0.5, schedule_mode="dense")
    full = module.training_schedule(8, 8, train=False)
    assert full == [(1, s, s) for s in range(1, 9)]
    torch.manual_seed(0)
    seen = [module.training_schedule(8, 8, train=True) for _ in range(50)]
    assert all(s[-1] == (1, 8, 8) and set(s) <= set(full) and s == sorted(s) for s in seen)
    lengths = [len(s) for s in seen]
    assert min(lengths) < 8 and 3 <= sum(lengths) / len(lengths) <= 6.5
    with pytest.raises(ValueError, match="schedule_mode"):
        _small_module(schedule_mode="sparse")


def test_plain_tensor_batches_and_bad_batches():
    module = _small_module(adv_weight=0.0, discriminator=None)
    images = _photo_batch(n=2)
    trainer = _trainer(1)
    trainer.fit(module, train_dataloaders=DataLoader([images], batch_size=None))
    assert trainer.global_step == 1
    with pytest.raises(KeyError, match="images"):
        module.log_images(batch={"pixels": images})


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_and_build(recipe, tmp_path):
    """Every tokenizer recipe validates and builds (made cheap: tiny model, photo crops)."""
    raw = load_recipe(recipe)
    overrides = ["trainer.max_steps=1", "schedule.resolution=32"]
    if "perceptual_arch" in raw.module.keys():  # recipes with a perceptual loss: its cheap network
        overrides.append("module.perceptual_arch=tiny")
    if "data_dir" in raw.data.keys():  # a "???" value is not "in" a DictConfig
        overrides.append(f"data.data_dir={tmp_path}")
    if "weights" in raw.model.keys():
        weights = tmp_path / "vae.pth"
        from infinity_lightning.checkpoints import save_tokenizer

        save_tokenizer(BSQVAE(tokenizer_config("tiny_f8")), weights)
        overrides.append(f"model.weights={weights}")
    else:
        overrides.append("model.preset=tiny_f8")
    cfg, kind, _ = load_run_recipe(recipe, overrides)
    assert kind == "tokenizer"
    cfg.data = {"name": "photos", "batch_size": 2, "train_samples": 4, "val_samples": 2}
    cfg.callbacks = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = build_run(cfg, tmp_path)
    module, dm = run.module, run.datamodule
    assert isinstance(module, BSQTokenizerModule) and isinstance(dm, PhotoCropsDataModule)
    assert dm.size == 32                                  # the data's size comes from schedule.resolution
    assert module.tokenizer.training and all(p.requires_grad for p in module.tokenizer.parameters())
    assert run.trainer_kwargs["max_steps"] == 1
    assert module.hparams.adv_weight == raw.module.adv_weight
    assert module.hparams.schedule_mode == raw.schedule.mode
    assert module.optim.lr == pytest.approx(raw.optim.lr)


def _tokenizer_recipe(**sections):
    cfg = {"kind": "tokenizer", "schedule": {"resolution": 32, "mode": "dense"}, "model": {"preset": "tiny_f8"},
           "module": {"perceptual_weight": 0.0, "adv_weight": 0.0}, "optim": {"lr": 1e-3},
           "data": {"name": "photos"}}
    cfg.update(sections)
    return cfg


def test_build_rejects_unknown_and_missing_keys(tmp_path):
    with pytest.raises(RecipeError, match="entropy_wieght"):
        build_run(_tokenizer_recipe(module={"entropy_wieght": 0.1}), tmp_path)
    with pytest.raises(RecipeError, match="max_stesp"):
        build_run(_tokenizer_recipe(trainer={"max_stesp": 3}), tmp_path)
    with pytest.raises(RecipeError, match="unknown key 'optimizer'"):
        build_run({**_tokenizer_recipe(), "optimizer": {}}, tmp_path)
    with pytest.raises(RecipeError, match="exactly one"):
        build_run(_tokenizer_recipe(model={}), tmp_path)
    with pytest.raises(RecipeError, match="data.image_size is derived from schedule.resolution"):
        build_run(_tokenizer_recipe(data={"name": "photos", "image_size": 32}), tmp_path)
    with pytest.raises(RecipeError, match="module.optim is set by the recipe builder"):
        build_run(_tokenizer_recipe(module={"optim": {}}), tmp_path)
    with pytest.raises(RecipeError, match="model.weights"):
        load_run_recipe(REPO / "recipes" / "tokenizer" / "finetune_d32_reg.yaml")
    run = build_run(_tokenizer_recipe(), tmp_path)
    assert run.module.perceptual is None and run.module.discriminator is None and run.datamodule.size == 32
    assert run.trainer_kwargs == {} and run.callbacks == []


def test_recipe_callbacks_checkpoint_dir_and_sample_logger(tmp_path):
    callbacks = build_run(_tokenizer_recipe(callbacks={
        "checkpoint": {"save_last": True}, "lr_monitor": None, "ema": None,
        "sample_logger": {"folder": str(tmp_path / "samples"), "every_n_steps": 2}}), tmp_path).callbacks
    assert [type(c).__name__ for c in callbacks] == ["ModelCheckpoint", "SampleLogger"]
    assert callbacks[0].dirpath == str(tmp_path / "checkpoints")
    module = _small_module(adv_weight=0.0, discriminator=None)
    trainer = _trainer(2, callbacks=callbacks, enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=_loader(_photo_batch(n=2), 2))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["inputs", "reconstructions"]
    assert list((tmp_path / "samples" / "reconstructions").glob("*.png"))
    # The checkpoint holds the tokenizer under "tokenizer.": load_tokenizer reads it directly.
    loaded = load_tokenizer(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.tokenizer.state_dict().values()))
    with pytest.raises(RecipeError, match=r"unknown key 'callbacks.NoSuchCallback'. Allowed keys in callbacks: checkpoint"):
        build_run(_tokenizer_recipe(callbacks={"NoSuchCallback": {}}), tmp_path)


def test_photo_crops_datamodule():
    dm = PhotoCropsDataModule(image_size=24, photos=PHOTOS, train_samples=6, val_samples=3, batch_size=3)
    val = next(iter(dm.val_dataloader()))
    again = next(iter(PhotoCropsDataModule(image_size=24, photos=PHOTOS, val_samples=3, batch_size=3).val_dataloader()))
    assert val["images"].shape == (3, 3, 24, 24) and len(val["captions"]) == 3
    assert torch.equal(val["images"], again["images"])  # validation crops are fixed by the seed
    assert val["images"].min() >= -1 and val["images"].max() <= 1 and val["images"].std() > 0.05
    torch.manual_seed(0)
    first = next(iter(dm.train_dataloader()))["images"]
    second = next(iter(dm.train_dataloader()))["images"]
    assert first.shape == (3, 3, 24, 24) and not torch.equal(first, second)  # fresh random crops
    assert set(PhotoCropsDataModule(image_size=16).photos) >= set(PHOTOS)
    with pytest.raises(KeyError, match="not available"):
        PhotoCropsDataModule(photos=["no_such_photo"])

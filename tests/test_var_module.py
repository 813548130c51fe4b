"""BitwiseVARModule: loss, reweighting, text dropout, flips, non-finite steps, latents, generation, overfitting.

Everything runs on tiny components: the "tiny" transformer, the "tiny_f8" tokenizer at 32 px
(4x4 latents, scales 1, 2, 4: 21 tokens) and a hashing text encoder (a fixed random vector per
word), single-threaded.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List

import lightning.pytorch as pl
import pytest
import torch

from infinity_lightning.datamodules.latents import LatentsDataModule, precompute_latents
from infinity_lightning.lit.losses import bit_accuracies, bitwise_cross_entropy, scale_token_weights
from infinity_lightning.lit.optim import OptimConfig
from infinity_lightning.lit.var_module import BitwiseVARModule, NonFiniteLossError, derive_seed
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.models.infinity import InfinityTransformer, init_weights
from infinity_lightning.models.text_encoder import TextFeatures
from infinity_lightning.presets import tokenizer_config, transformer_config
from infinity_lightning.sampling import SamplingConfig
from infinity_lightning.scales import latent_schedule



# -- shared tiny components (also used by the other VAR test files) ----------------------------
class HashTextEncoder:
    """Stand-in text encoder: each word (and an end token) maps to a fixed random vector."""

    def __init__(self, width: int = 64):
        self.width = width

    def _vec(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        return torch.randn(self.width, generator=g)

    def encode(self, captions: List[str]) -> TextFeatures:
        return TextFeatures.pack([torch.stack([self._vec(w) for w in c.split()] + [self._vec("</s>")])
                                  for c in captions])


def tiny_transformer(seed: int = 0, **overrides: Any) -> InfinityTransformer:
    model = InfinityTransformer(transformer_config("tiny", **overrides))
    init_weights(model, generator=torch.Generator().manual_seed(seed))
    return model


def tiny_tokenizer(seed: int = 0) -> BSQVAE:
    torch.manual_seed(seed)
    return BSQVAE(tokenizer_config("tiny_f8")).eval()


OPTIM_KEYS = set(OptimConfig.__dataclass_fields__)


def make_module(**kwargs: Any) -> BitwiseVARModule:
    """A module on the tiny components at 32 px; optimiser keys (``lr=``...) go to its OptimConfig,
    ``bsc_strength``/``bsc_layers`` are set as the SelfCorrectionSchedule callback sets them."""
    transformer = kwargs.pop("transformer", None) or tiny_transformer()
    tokenizer = kwargs.pop("tokenizer", None) or tiny_tokenizer()
    optim = {"lr": 1e-3, **{k: kwargs.pop(k) for k in list(kwargs) if k in OPTIM_KEYS}}
    bsc = {k: kwargs.pop(k) for k in ("bsc_strength", "bsc_layers") if k in kwargs}
    defaults: Dict[str, Any] = dict(resolution=32, cond_drop_rate=0.0,
                                    sampling=SamplingConfig(top_k=0, top_p=0.0, tau=1.0))
    defaults.update(kwargs)
    module = BitwiseVARModule(transformer, tokenizer, HashTextEncoder(), optim=optim, **defaults)
    for name, value in bsc.items():
        setattr(module, name, value)
    return module


def shapes_batch(n: int = 4, size: int = 32, seed: int = 0) -> Dict[str, Any]:
    from infinity_lightning.datamodules.shapes import ShapesDataModule

    dm = ShapesDataModule(num_samples=n, batch_size=n, image_size=size, single_object=True, seed=seed)
    return next(iter(dm.train_dataloader()))


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    base = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                accelerator="cpu", devices=1)
    base.update(kwargs)
    return pl.Trainer(**base)


SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]


# -- loss weights ---------------------------------------------------------------------------
def test_per_scale_reweighting_matches_spec_numbers():
    w = scale_token_weights(SCHEDULE, reweight=True)
    # sqrt sizes 1, 2, 4 (sum 7): token weights 1/7, 1/(2*7), 1/(4*7); scale totals 1/7, 2/7, 4/7
    expected = torch.tensor([1 / 7] + [1 / 14] * 4 + [1 / 28] * 16)
    assert torch.allclose(w, expected, atol=1e-7)
    totals = [float(t.sum()) for t in w.split([1, 4, 16])]
    assert totals == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-6)
    uniform = scale_token_weights(SCHEDULE, reweight=False)
    assert torch.allclose(uniform, torch.full((21,), 1 / 21))
    assert [float(t.sum()) for t in uniform.split([1, 4, 16])] == pytest.approx([1 / 21, 4 / 21, 16 / 21])
    assert float(w.sum()) == pytest.approx(1.0) and not torch.allclose(w, uniform)


def test_bitwise_cross_entropy_is_bce_on_logit_difference():
    g = torch.Generator().manual_seed(0)
    B, L, d = 2, 21, 16
    logits = torch.randn(B, L, 2 * d, generator=g)
    labels = torch.randint(0, 2, (B, L, d), generator=g, dtype=torch.uint8)
    w = scale_token_weights(SCHEDULE, reweight=True)
    loss, per_token = bitwise_cross_entropy(logits, labels, w)
    z = logits.view(B, L, d, 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[..., 1] - z[..., 0], labels.float(), reduction="none")
    assert torch.allclose(per_token, bce.mean(-1), atol=1e-6)
    assert float(loss) == pytest.approx(float((bce.mean(-1) * w).sum(1).mean()), abs=1e-6)
    uniform, _ = bitwise_cross_entropy(logits, labels, scale_token_weights(SCHEDULE, False))
    assert abs(float(uniform) - float(loss)) > 1e-4
    smoothed, _ = bitwise_cross_entropy(logits, labels, w, label_smoothing=0.1)
    assert float(smoothed) != pytest.approx(float(loss))
    acc = bit_accuracies(logits, labels, SCHEDULE)
    pred = (z[..., 1] > z[..., 0]).to(torch.uint8)
    assert float(acc["acc"]) == pytest.approx(float((pred == labels).float().mean()))
    assert float(acc["acc_scale"][0]) == pytest.approx(float((pred[:, :1] == labels[:, :1]).float().mean()))
    assert float(acc["token_acc"]) == pytest.approx(float((pred == labels).all(-1).float().mean()))


def test_schedule_from_template_and_grid():
    assert latent_schedule(8, 8) == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
    with pytest.raises(ValueError, match="grid 7x7"):
        latent_schedule(7, 7)
    m = make_module(resolution="0.06M")
    assert m.schedule_for(1.0)[-1] == (1, 16, 16)
    m = make_module(resolution=[[1, 1], [2, 2], [4, 4]])
    assert m.schedule_for(2.0) == SCHEDULE
    assert make_module().schedule_for(1.0) == SCHEDULE                  # 32 px with the stride-8 tokenizer
    no_grid = make_module(resolution=None)
    assert no_grid.schedule_for(1.0, (8, 8))[-1] == (1, 8, 8)           # the table up to the data's grid
    with pytest.raises(ValueError, match="needs the tokenizer"):
        BitwiseVARModule(tiny_transformer(), None, None, resolution=64)


def test_a_batch_whose_grid_disagrees_with_the_resolution_is_refused():
    m = make_module(resolution="0.06M")                                  # 16x16 tokens, the data gives 4x4
    with pytest.raises(ValueError, match="latent grid is 4x4 but the scale schedule ends at"):
        m.compute_loss(shapes_batch(), "val")


# -- text dropout, flips, randomness ----------------------------------------------------------
def test_text_dropout_only_in_training():
    batch = shapes_batch()
    dropping = make_module(cond_drop_rate=1.0)
    keeping = make_module(cond_drop_rate=0.0)
    val_drop = float(dropping.compute_loss(batch, "val")["loss"])
    val_keep = float(keeping.compute_loss(batch, "val")["loss"])
    assert val_drop == val_keep  # identical weights, no dropout in validation
    train_drop = dropping.compute_loss(batch, "train")
    train_keep = keeping.compute_loss(batch, "train")
    assert train_drop["dropped"] == 4 and train_keep["dropped"] == 0
    assert abs(float(train_drop["loss"]) - float(train_keep["loss"])) > 1e-6


def test_flips_follow_seed_and_step_and_stay_out_of_validation():
    batch = shapes_batch()
    m = make_module(bsc_strength=0.5, bsc_layers=3)
    base = make_module()
    a = float(m.compute_loss(batch, "train")["loss"])
    b = float(m.compute_loss(batch, "train")["loss"])
    assert a == b  # same (seed, step): same flips
    assert a != float(base.compute_loss(batch, "train")["loss"])  # flips change labels/inputs
    assert float(m.compute_loss(batch, "val")["loss"]) == float(base.compute_loss(batch, "val")["loss"])
    other = make_module(bsc_strength=0.5, bsc_layers=3, seed=1)
    assert float(other.compute_loss(batch, "train")["loss"]) != a
    assert derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1)


# -- non-finite steps ----------------------------------------------------------------------------
def test_nonfinite_loss_is_skipped_and_counted():
    batch = shapes_batch()
    m = make_module(max_nonfinite_steps=1)
    with torch.no_grad():
        m.transformer.head.bias.fill_(float("nan"))
    assert m.training_step(batch, 0) is None
    assert m.nonfinite_steps == 1
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=1"):
        m.training_step(batch, 1)


def test_nonfinite_gradients_are_dropped():
    m = make_module()
    for p in m.transformer.parameters():
        p.grad = torch.ones_like(p)
    m.on_before_optimizer_step(None)
    assert m.nonfinite_steps == 0 and all(p.grad is not None for p in m.transformer.parameters())
    m.transformer.head.weight.grad[0, 0] = float("inf")
    m.on_before_optimizer_step(None)
    assert m.nonfinite_steps == 1 and all(p.grad is None for p in m.transformer.parameters())


def test_nonfinite_steps_leave_weights_unchanged_in_a_fit():
    from infinity_lightning.datamodules.shapes import ShapesDataModule

    m = make_module()
    with torch.no_grad():
        m.transformer.head.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in m.transformer.state_dict().items()}
    quiet_trainer(max_steps=2).fit(m, ShapesDataModule(num_samples=4, batch_size=2, image_size=32))
    assert m.nonfinite_steps == 2
    after = m.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


# -- latents, frozen modules, hooks ----------------------------------------------------------------
def test_precomputed_latents_give_the_same_loss(tmp_path):
    from infinity_lightning.datamodules.shapes import ShapesDataModule

    dm = ShapesDataModule(num_samples=4, batch_size=4, image_size=32, shuffle=False)
    m = make_module()
    path = precompute_latents(m.tokenizer, dm.train_dataloader(), tmp_path / "latents.pt",
                              text_encoder=HashTextEncoder())
    latents_dm = LatentsDataModule(path, batch_size=4, shuffle=False)
    lbatch = next(iter(latents_dm.train_dataloader()))
    ibatch = next(iter(dm.train_dataloader()))
    assert lbatch["latents"].shape == (4, 16, 4, 4) and lbatch["captions"] == ibatch["captions"]
    assert "text_features" in lbatch and "images" not in lbatch
    no_tokenizer = BitwiseVARModule(m.transformer, None, None, resolution=None, cond_drop_rate=0.0)
    a = float(m.compute_loss(ibatch, "val")["loss"])
    b = float(no_tokenizer.compute_loss(lbatch, "val")["loss"])
    assert a == pytest.approx(b, abs=1e-6)
    assert latents_dm.plan(0) != latents_dm.plan(1) or len(latents_dm.plan(0)) == 1


def test_frozen_modules_stay_eval_and_out_of_checkpoints():
    m = make_module()
    m.train()
    assert m.transformer.training and not m.tokenizer.training
    assert not any(p.requires_grad for p in m.tokenizer.parameters())
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("transformer.") for k in ckpt["state_dict"])
    m.on_load_checkpoint(ckpt)
    m.load_state_dict(ckpt["state_dict"], strict=True)


def test_configure_model_calls_parallelize_fn_once_with_a_mesh():
    calls = []
    m = make_module(parallelize_fn=lambda model, mesh: calls.append((model, mesh)))
    m.configure_model()
    assert calls == []  # no device mesh: plain single-device or DDP run
    mesh = object()
    m._device_mesh = mesh
    m.configure_model()
    m.configure_model()
    assert calls == [(m.transformer, mesh)]


def test_generation_log_images():
    m = make_module()
    out = m.log_images(prompts=["a red circle", "a blue square"], seeds=[3, 4])["samples"]
    assert out.shape == (2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    again = m.log_images(prompts=["a blue square"], seeds=[4])["samples"]
    # an image depends only on its prompt and seed (up to batched rounding of the matrix products)
    assert (again[0] - out[1]).abs().max() < 1e-4
    other = m.log_images(prompts=["a blue square"], seeds=[5])["samples"]
    assert (other[0] - out[1]).abs().max() > 1e-3


# -- learning --------------------------------------------------------------------------------------
def test_overfits_a_handful_of_images():
    from infinity_lightning.datamodules.shapes import ShapesDataModule

    torch.manual_seed(0)
    m = make_module(lr=3e-3, reweight_loss_by_scale=True)
    dm = ShapesDataModule(num_samples=4, batch_size=4, image_size=32, single_object=True)
    first = float(m.compute_loss(shapes_batch(), "val")["acc"])
    trainer = quiet_trainer(max_steps=80, gradient_clip_val=5.0)
    trainer.fit(m, dm)
    acc = float(trainer.callback_metrics["train/acc"])
    assert first < 0.7 and acc > 0.95, (first, acc)
    assert float(trainer.callback_metrics["train/acc_scale0"]) > 0.9


def test_self_attention_checkpointing_gives_the_same_gradients():
    """activation_checkpointing='self-attn' recomputes the self-attention and keeps the gradients."""
    import math

    from infinity_lightning.models.infinity import InfinityTransformer
    from infinity_lightning.presets import transformer_config

    grads = []
    for mode in (None, "self-attn"):
        torch.manual_seed(0)
        model = InfinityTransformer(transformer_config("tiny", drop_path_rate=0.0))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[-1] if p.dim() > 1 else 1))
        model.set_activation_checkpointing(mode)
        model.train()
        kv = torch.randn(5, 64)
        text = (kv, [2, 3], torch.tensor([0, 2, 5], dtype=torch.int32), 3)
        model(text, torch.randn(2, 4, 16), [(1, 1, 1), (1, 2, 2)]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

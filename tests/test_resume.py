"""Resuming: exact continuation from Lightning checkpoints, released weights with
``drop_mismatched``, original training checkpoints."""
from __future__ import annotations

from typing import List

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from infinity_lightning.callbacks import EMA, SelfCorrectionSchedule
from infinity_lightning.io import StateDictMismatchError
from infinity_lightning.recipes.build import build_transformer, load_transformer_weights
from infinity_lightning.transformer_checkpoints import save_transformer
from tests.test_var_module import make_module, quiet_trainer, tiny_transformer



class LossRecorder(pl.Callback):
    """Records (global_step, loss) after every optimizer step."""

    def __init__(self) -> None:
        self.losses: List[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def _run(max_steps: int, tmp, ckpt_path=None, save_every=None):
    from infinity_lightning.datamodules.shapes import ShapesDataModule

    torch.manual_seed(0)
    # drop-path (global RNG), text dropout, flips with a ramped strength, a cosine LR, EMA:
    # every source of randomness and every piece of state a resume has to restore.
    module = make_module(transformer=tiny_transformer(drop_path_rate=0.2), lr=3e-3, lr_schedule="cosine",
                         warmup_steps=2, max_steps=8, cond_drop_rate=0.5, bsc_strength=0.3, bsc_layers=3)
    dm = ShapesDataModule(num_samples=8, batch_size=2, image_size=32, seed=0)  # 4 batches per epoch
    recorder = LossRecorder()
    callbacks = [recorder, SelfCorrectionSchedule(strength=0.3, layers=3, mode="linear", start_step=0, end_step=8,
                                                  log=False),
                 EMA(decay=0.9, attribute="transformer")]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=str(tmp), every_n_train_steps=save_every, save_top_k=-1))
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, gradient_clip_val=1.0,
                            enable_checkpointing=bool(save_every))
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, recorder.losses, callbacks[2]


def test_resume_continues_exactly(tmp_path):
    full, full_losses, full_ema = _run(8, tmp_path / "a", save_every=4)
    ckpt = tmp_path / "a" / "epoch=0-step=4.ckpt"
    assert ckpt.exists()
    resumed, resumed_losses, resumed_ema = _run(8, tmp_path / "b", ckpt_path=str(ckpt))
    assert [s for s, _ in resumed_losses] == [5, 6, 7, 8]
    expected = dict(full_losses)
    for step, loss in resumed_losses:
        assert loss == pytest.approx(expected[step], abs=1e-6), (step, loss, expected[step])
    for (k, a), b in zip(full.transformer.state_dict().items(), resumed.transformer.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    ema_a, ema_b = full_ema.ema_state_dict(), resumed_ema.ema_state_dict()
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)
    # the checkpoint holds the transformer, not the frozen tokenizer
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert sd and all(k.startswith("transformer.") for k in sd)
    # and loads as plain transformer weights
    loaded = build_transformer({"weights": str(ckpt)})
    assert torch.equal(loaded.state_dict()["head.weight"], sd["transformer.head.weight"])


def test_drop_mismatched_loads_the_rest_strictly(tmp_path, caplog):
    source = tiny_transformer(seed=1)
    path = save_transformer(source, tmp_path / "released.pth")
    src = source.state_dict()
    # bits per token 8 instead of 16: word_embed and head do not fit
    cfg = {"transformer": "tiny", "weights": str(path), "overrides": {"codebook_dim": 8}}
    with pytest.raises(StateDictMismatchError, match="head.weight"):
        build_transformer(cfg)
    with caplog.at_level("WARNING"):
        model = build_transformer({**cfg, "drop_mismatched": ["head", "word_embed"]})
    assert model.dropped_keys == ["head.bias", "head.weight", "word_embed.weight"]
    assert "head.weight" in caplog.text and "word_embed.weight" in caplog.text
    own = model.state_dict()
    assert own["head.weight"].shape == (16, 64)
    for k, v in own.items():
        if k not in model.dropped_keys:
            assert torch.equal(v, src[k]), k
    # only the listed groups may be dropped
    with pytest.raises(StateDictMismatchError, match="word_embed.weight"):
        build_transformer({**cfg, "drop_mismatched": ["head"]})
    # a different text width drops cfg_uncond and every text tensor
    text_cfg = {"transformer": "tiny", "weights": str(path), "overrides": {"text_channels": 32},
                "drop_mismatched": ["text"]}
    model = build_transformer(text_cfg)
    assert "cfg_uncond" in model.dropped_keys and "text_proj_for_ca.0.weight" in model.dropped_keys
    assert all(k == "cfg_uncond" or "text" in k for k in model.dropped_keys)
    assert torch.equal(model.state_dict()["head.weight"], src["head.weight"])
    with pytest.raises(ValueError, match="unknown group"):
        load_transformer_weights(tiny_transformer(), path, ["heads"])


def test_original_training_checkpoint_loads(tmp_path):
    source = tiny_transformer(seed=2)
    ema = tiny_transformer(seed=3)
    path = tmp_path / "ar-ckpt-giter001K-ep0-iter1000-last.pth"
    torch.save({"epoch": 0, "iter": 1000, "arch": "infinity_tiny",
                "trainer": {"gpt_fsdp": source.state_dict(), "gpt_ema_fsdp": ema.state_dict(),
                            "config": {"label_smooth": 0.0}}}, path)
    model = build_transformer({"transformer": "tiny", "weights": str(path)})
    assert model.training and all(p.requires_grad for p in model.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    from_ema = build_transformer({"transformer": "tiny", "weights": str(path), "use_ema_weights": True})
    assert torch.equal(from_ema.state_dict()["head.weight"], ema.state_dict()["head.weight"])
    # architecture inferred from the shapes when no preset is named
    inferred = build_transformer({"weights": str(path)})
    assert inferred.config.embed_dim == 64 and inferred.config.depth == 2

"""ProtocolEvaluation: a protocol subset scored during training, logged per category, EMA weights."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from infinity_lightning.callbacks import EMA, ProtocolEvaluation
from infinity_lightning.datamodules.shapes import ShapesDataModule
from tests.test_var_module import make_module

CATEGORIES = {"single_object", "two_objects", "counting", "colours", "position", "colour_attribution"}


def _fit(tmp_path, callbacks, steps=2):
    module = make_module(resolution=64)          # 64 px images, the protocol's size
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(module, ShapesDataModule(num_samples=4, batch_size=2, image_size=64))
    return module, trainer


def test_scores_every_n_steps_and_logs_each_category(tmp_path):
    ev = ProtocolEvaluation(every_n_steps=1, subset=1, at_fit_end=True)
    assert len(ev.protocol.items) == 7                 # one item of each of the six categories + held-out pairs
    _, trainer = _fit(tmp_path, [ev])
    assert [step for step, _ in ev.history] == [1, 2]  # the end of fit was just scored: not again
    for _, scores in ev.history:
        assert set(scores) == CATEGORIES | {"overall", "held_out_pairs"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    import csv

    rows = list(csv.DictReader(open(trainer.logger.log_dir + "/metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {f"eval/{c}" for c in CATEGORIES} | {"eval/overall"} <= logged


def test_uses_the_ema_weights_when_present(tmp_path):
    seen = []
    ema = EMA(decay=0.5, attribute="transformer")
    ev = ProtocolEvaluation(every_n_steps=0, subset=1)

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            original = pl_module.log_images

            def spy(*args, **kwargs):
                seen.append(pl_module.transformer.head.weight.detach().clone())
                return original(*args, **kwargs)

            pl_module.log_images = spy

    module, _ = _fit(tmp_path, [ema, Spy(), ev], steps=3)
    assert seen and ev.history[-1][0] == 3
    averaged = ema.ema_state_dict()["head.weight"]
    assert torch.equal(seen[-1], averaged.to(seen[-1].dtype))
    assert not torch.equal(averaged, module.transformer.head.weight.detach())  # the live weights came back


def test_bad_settings():
    with pytest.raises(ValueError, match="subset >= 1"):
        ProtocolEvaluation(subset=0)

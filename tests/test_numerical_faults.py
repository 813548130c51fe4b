"""Numerical faults in a real fit: a non-finite loss or gradient skips the step (weights and
optimizer state untouched, the step counted, logged and checkpointed); too many stop the run.

The module trains the "tiny" transformer on fixed random latents and text features (no tokenizer,
no text encoder); a batch with NaN latents gives a NaN loss, and a callback writes an infinite
value into one gradient to fault the gradient alone.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import lightning.pytorch as pl
import pytest
import torch

from infinity_lightning.lit.var_module import BitwiseVARModule, NonFiniteLossError
from infinity_lightning.models.infinity import InfinityTransformer, init_weights
from infinity_lightning.presets import transformer_config



def make_module(**kwargs: Any) -> BitwiseVARModule:
    """The tiny transformer with a fixed init, trained on latents (4x4 grid, 3 scales)."""
    model = InfinityTransformer(transformer_config("tiny", cond_drop_rate=0.0))
    init_weights(model, generator=torch.Generator().manual_seed(0))
    opts: Dict[str, Any] = dict(resolution=None, optim={"lr": 1e-2}, cond_drop_rate=0.0, log_per_scale=False)
    opts.update(kwargs)
    return BitwiseVARModule(model, None, None, **opts)


class FixedLatents(pl.LightningDataModule):
    """One fixed random batch per step; the batches at ``nan_steps`` carry NaN latents."""

    def __init__(self, nan_steps: Sequence[int] = (), steps: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.batches = []
        for i in range(steps):
            latents = torch.randn(2, 16, 4, 4, generator=g)
            if i in nan_steps:
                latents[0, 0, 0, 0] = float("nan")
            self.batches.append({"latents": latents, "text_features": [torch.randn(3 + i, 64, generator=g)
                                                                       for _ in range(2)],
                                 "captions": ["x", "y"], "h_div_w_template": 1.0})

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None, shuffle=False)


class Snapshots(pl.Callback):
    """Copies of the trainable weights and of the optimizer's moments after every step."""

    def __init__(self) -> None:
        self.weights: List[Dict[str, torch.Tensor]] = []
        self.moments: List[Dict[int, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._snap(trainer, pl_module)

    def _snap(self, trainer, pl_module) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.transformer.named_parameters()})
        state = trainer.optimizers[0].state
        self.moments.append({i: state[p]["exp_avg"].clone() for i, p in enumerate(pl_module.transformer.parameters())
                             if p in state and "exp_avg" in state[p]})


class InfiniteGradient(pl.Callback):
    """Writes +inf into one element of one gradient at the given batches (the loss stays finite)."""

    def __init__(self, batches: Sequence[int]) -> None:
        self.batches = set(batches)
        self.index = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.index = batch_idx

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.index in self.batches:
            pl_module.transformer.head.weight.grad[0, 0] = float("inf")


def _trainer(max_steps: int, callbacks=(), **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, callbacks=list(callbacks), **kwargs)


def _same(a: Dict[Any, torch.Tensor], b: Dict[Any, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finite(weights: Dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_nan_loss_skips_the_step_and_is_counted_logged_and_checkpointed(tmp_path):
    from infinity_lightning.reliability import AtomicCheckpointIO

    module, snaps = make_module(), Snapshots()
    trainer = _trainer(4, [snaps], gradient_clip_val=5.0, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, FixedLatents(nan_steps=[1]))
    w = snaps.weights  # w[0]: initial, w[i]: after step i
    assert trainer.global_step == 4 and module.nonfinite_steps == 1
    assert not _same(w[0], w[1]), "a normal step moves the weights"
    assert _same(w[1], w[2]), "the NaN step must leave the weights untouched"
    assert _same(snaps.moments[1], snaps.moments[2]), "... and the optimizer's moments"
    assert not _same(w[2], w[3]) and all(_finite(x) for x in w)
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert saved["nonfinite_steps"] == 1
    fresh = make_module()
    fresh.on_load_checkpoint(saved)
    assert fresh.nonfinite_steps == 1


def test_infinite_gradient_skips_the_step_even_with_clipping():
    """Clipping an infinite norm would turn every gradient into NaN; the step is dropped first."""
    module, snaps = make_module(), Snapshots()
    trainer = _trainer(4, [snaps, InfiniteGradient([2])], gradient_clip_val=5.0)
    trainer.fit(module, FixedLatents())
    w = snaps.weights
    assert module.nonfinite_steps == 1
    assert _same(w[2], w[3]) and _same(snaps.moments[2], snaps.moments[3])
    assert not _same(w[1], w[2]) and not _same(w[3], w[4])
    assert all(_finite(x) for x in w)


def test_reference_run_without_faults_moves_every_step():
    """Control for the two tests above: without a fault every step changes the weights."""
    snaps = Snapshots()
    _trainer(3, [snaps]).fit(make_module(), FixedLatents())
    assert all(not _same(a, b) for a, b in zip(snaps.weights, snaps.weights[1:]))


def test_too_many_nonfinite_steps_stop_the_run_with_a_clear_message():
    module, snaps = make_module(max_nonfinite_steps=1), Snapshots()
    trainer = _trainer(4, [snaps])
    with pytest.raises(NonFiniteLossError, match=r"2 steps had a non-finite loss \(limit "
                                                 r"module.max_nonfinite_steps=1\)"):
        trainer.fit(module, FixedLatents(nan_steps=[1, 2]))
    assert module.nonfinite_steps == 2
    assert _same(snaps.weights[1], snaps.weights[-1]) and _finite(snaps.weights[-1])


def test_gradient_faults_count_towards_the_same_limit():
    module = make_module(max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm .*max_nonfinite_steps=1"):
        _trainer(4, [InfiniteGradient([0, 2])]).fit(module, FixedLatents())

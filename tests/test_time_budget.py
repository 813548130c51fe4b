"""TimeBudget: the learning-rate schedule and the stop follow elapsed time (a fake clock here)."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest

from infinity_lightning.callbacks import TimeBudget
from tests.test_numerical_faults import FixedLatents, _trainer, make_module

LR, FINAL, STEPS = 1e-2, 0.1, 8


def _cosine(step: int) -> float:
    """The cosine schedule by hand: 1 at step 0, FINAL at the last step (STEPS - 1)."""
    return FINAL + (1 - FINAL) * (0.5 + 0.5 * math.cos(math.pi * step / (STEPS - 1)))


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _fit(seconds_per_call: float, minutes: float = 1.0):
    clock = {"t": 0.0}

    def fake_clock():
        clock["t"] += seconds_per_call
        return clock["t"]

    module = make_module(optim={"lr": LR, "lr_schedule": "cosine", "final_lr_factor": FINAL})
    budget, lrs = TimeBudget(minutes=minutes, clock=fake_clock), LrRecorder()
    _trainer(STEPS, [budget, lrs]).fit(module, FixedLatents(steps=STEPS))
    return budget, lrs.lrs


def test_a_slow_run_is_compressed_into_the_budget_and_stops():
    # every clock read advances 7.5 s (one read when training starts, one at the start and one at
    # the end of each step): step k starts 15 k + 7.5 s into a 60 s budget, and the budget is
    # spent at the end of the fourth step
    budget, lrs = _fit(seconds_per_call=7.5)
    summary = budget.summary()
    assert summary["planned_steps"] == STEPS and summary["steps"] == 4 and summary["shortened"] is True
    assert summary["fraction"] == pytest.approx(4 / 8, abs=1e-3)
    # time fractions 0.125, 0.375, 0.625, 0.875 -> the schedule's values at steps 1, 3, 5, 7 of 8:
    # the schedule still ends at its final value
    assert lrs == pytest.approx([LR * _cosine(s) for s in (1, 3, 5, 7)])
    assert lrs[-1] == pytest.approx(LR * FINAL)


def test_a_fast_run_keeps_the_recipe_schedule():
    budget, lrs = _fit(seconds_per_call=1e-3)
    assert budget.summary()["steps"] == STEPS and budget.summary()["shortened"] is False
    assert lrs == pytest.approx([LR * _cosine(s) for s in range(STEPS)])


def test_needs_a_positive_budget_and_max_steps():
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(minutes=0)
    module = make_module()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[TimeBudget(minutes=1)])
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(module, FixedLatents(steps=2))

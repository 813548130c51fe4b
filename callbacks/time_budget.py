"""Train for a wall-clock budget: the learning-rate schedule and the stop follow elapsed time.

A recipe's ``trainer.max_steps`` and LR schedule assume a machine of some speed.  On a slower (or
busier) machine a fixed step count overruns the budget, and stopping early would leave the run at
a high learning rate.  :class:`TimeBudget` makes the run's *progress* the larger of the step
fraction and the time fraction,

    progress = max(step / max_steps, elapsed / budget)

sets every optimizer's learning rate to the schedule's value at ``progress * max_steps`` before
each step, and stops once ``progress`` reaches 1.  On a fast machine nothing changes; on a slow
one the schedule is compressed into the budget and still ends at its final value.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["TimeBudget"]


class TimeBudget(Callback):
    """Fit ``trainer.max_steps`` steps, or as many as ``minutes`` allow, on a complete LR schedule.

    Args:
        minutes: wall-clock budget of the fit, counted from the first training batch.
        drive_lr: set the learning rate from the time-driven progress (the module's
            ``optim`` :class:`~infinity_lightning.lit.optim.OptimConfig` defines the schedule);
            ``False`` only stops at the budget.
        clock: seconds since some fixed point (``time.perf_counter``; tests pass their own).

    After the fit, :meth:`summary` says how many steps ran out of how many were planned and
    whether the run was shortened by the budget.
    """

    def __init__(self, minutes: float, drive_lr: bool = True, clock: Callable[[], float] = time.perf_counter) -> None:
        if not minutes > 0:
            raise ValueError(f"TimeBudget minutes must be positive, got {minutes!r}")
        self.seconds = float(minutes) * 60.0
        self.drive_lr = bool(drive_lr)
        self.clock = clock
        self.start: Optional[float] = None
        self.planned_steps: Optional[int] = None
        self.steps_done = 0
        self.elapsed = 0.0
        self.shortened = False

    def progress(self, step: int, now: Optional[float] = None) -> float:
        """The run's progress in [0, 1] at optimizer step ``step``."""
        now = self.clock() if now is None else now
        elapsed = now - (self.start if self.start is not None else now)
        by_steps = step / self.planned_steps if self.planned_steps else 0.0
        return min(1.0, max(by_steps, elapsed / self.seconds))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None:
            raise ValueError("TimeBudget needs trainer.max_steps (the length of the LR schedule it compresses)")
        self.planned_steps = int(max_steps)
        self.start = self.clock()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        optim = getattr(pl_module, "optim", None)
        if not self.drive_lr or optim is None:
            return
        from infinity_lightning.lit.optim import lr_factor

        step = trainer.global_step
        virtual = max(step, int(round(self.progress(step) * self.planned_steps)))
        factor = lr_factor(min(virtual, self.planned_steps - 1), **optim.schedule(self.planned_steps))
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if "initial_lr" in group:
                    group["lr"] = group["initial_lr"] * factor

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # decided after a step, so that no step starts past the budget
        step = trainer.global_step
        if step < self.planned_steps and self.progress(step) >= 1.0:
            self.shortened = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps_done = int(trainer.global_step)
        now = self.clock()
        self.elapsed = now - (self.start if self.start is not None else now)
        self.shortened = self.shortened or (self.planned_steps is not None and self.steps_done < self.planned_steps)

    def summary(self) -> Dict[str, Any]:
        """``{"planned_steps", "steps", "fraction", "shortened", "seconds", "budget_seconds"}``."""
        planned = self.planned_steps or 0
        return {"planned_steps": planned, "steps": self.steps_done,
                "fraction": round(self.steps_done / planned, 3) if planned else None,
                "shortened": bool(self.shortened), "seconds": round(self.elapsed, 1),
                "budget_seconds": round(self.seconds, 1)}

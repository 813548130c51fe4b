"""Schedule of Bitwise Self-Correction (docs/model.md#bitwise-self-correction) over optimizer steps.

Bitwise Self-Correction flips bits of the teacher-forced prefix during training.  Two numbers
control it, and this callback sets both on the LightningModule before every training batch:

* ``pl_module.bsc_strength`` (float): the largest flip probability; the per-scale probability is
  drawn uniformly from {0, 0.01, ..., strength} every step (``noise_apply_strength``, 0.3 in the
  original's train.sh).
* ``pl_module.bsc_layers`` (int): how many of the first scales get flips
  (``noise_apply_layers``, 13 in train.sh; 0 turns the correction off).

The original keeps both constant; ``mode="linear"`` or ``"cosine"`` ramps them from start to end
values between ``start_step`` and ``end_step``.  Validation uses its own pair
(``pl_module.val_bsc_strength``, ``pl_module.val_bsc_layers``; off by default, the original's
validation script used 0.2): this callback is the one place a recipe configures the correction.  The values are a pure function of
``trainer.global_step`` (optimizer steps), so a resumed run continues the ramp with nothing saved.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["SelfCorrectionSchedule"]

_MODES = ("constant", "linear", "cosine")


class SelfCorrectionSchedule(Callback):
    """Set ``pl_module.bsc_strength`` and ``pl_module.bsc_layers`` from the optimizer step.

    Args:
        strength: flip strength (max flip probability in [0, 1]); the end value of a ramp.
        layers: number of corrupted scales (>= 0); the end value of a ramp.
        mode: ``"constant"`` (as the original), ``"linear"`` or ``"cosine"``.
        start_strength, start_layers: values at and before ``start_step`` (ramps only).
        start_step, end_step: the ramp runs over optimizer steps [start_step, end_step]; after
            ``end_step`` the end values hold.
        val_strength, val_layers: flips in validation (default none).
        log: log ``bsc/strength`` and ``bsc/layers`` every step.

    ``layers`` is interpolated as a float and rounded half up to an int.
    """

    def __init__(self, strength: float = 0.3, layers: int = 13, mode: str = "constant",
                 start_strength: float = 0.0, start_layers: int = 0, start_step: int = 0,
                 end_step: Optional[int] = None, val_strength: float = 0.0, val_layers: int = 0,
                 log: bool = True) -> None:
        if mode not in _MODES:
            raise ValueError(f"SelfCorrectionSchedule mode must be one of {_MODES}, got {mode!r}")
        for name, value in (("strength", strength), ("start_strength", start_strength), ("val_strength", val_strength)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"SelfCorrectionSchedule {name} must be in [0, 1], got {value}")
        for name, value in (("layers", layers), ("start_layers", start_layers), ("val_layers", val_layers)):
            if int(value) != value or value < 0:
                raise ValueError(f"SelfCorrectionSchedule {name} must be a non-negative int, got {value}")
        if mode != "constant":
            if end_step is None or end_step <= start_step:
                raise ValueError(f"SelfCorrectionSchedule mode={mode!r} needs end_step > start_step "
                                 f"(got start_step={start_step}, end_step={end_step})")
        self.strength = float(strength)
        self.layers = int(layers)
        self.mode = mode
        self.start_strength = float(start_strength)
        self.start_layers = int(start_layers)
        self.start_step = int(start_step)
        self.end_step = end_step
        self.val_strength = float(val_strength)
        self.val_layers = int(val_layers)
        self.log = log

    def values_at(self, step: int) -> Tuple[float, int]:
        """``(strength, layers)`` at optimizer step ``step``."""
        if self.mode == "constant":
            return self.strength, self.layers
        t = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        if self.mode == "cosine":
            # half-cosine ease: 0 at the start, 1 at the end, flat at both ends
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        strength = self.start_strength + (self.strength - self.start_strength) * t
        layers = self.start_layers + (self.layers - self.start_layers) * t
        return strength, int(math.floor(layers + 0.5))

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> Tuple[float, int]:
        strength, layers = self.values_at(trainer.global_step)
        pl_module.bsc_strength = strength
        pl_module.bsc_layers = layers
        return strength, layers

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Set the attributes before any sanity-check validation reads them.
        self._apply(trainer, pl_module)
        pl_module.val_bsc_strength = self.val_strength
        pl_module.val_bsc_layers = self.val_layers

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.val_bsc_strength = self.val_strength
        pl_module.val_bsc_layers = self.val_layers

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        strength, layers = self._apply(trainer, pl_module)
        if self.log:
            pl_module.log("bsc/strength", strength, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("bsc/layers", float(layers), on_step=True, on_epoch=False, batch_size=1)

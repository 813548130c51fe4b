"""Lightning callbacks, installed as ``infinity_lightning.callbacks``.

:data:`CALLBACKS` names the callbacks a recipe's ``callbacks`` section can switch on
(``name: {keyword arguments}``, ``name: true`` for the defaults, ``null`` to switch one off);
adding a callback means writing it and adding one entry here.
"""
from typing import Any, Dict, Mapping, Tuple

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from .ema import EMA
from .evaluation import ProtocolEvaluation
from .sample_logger import SampleLogger, make_grid
from .self_correction import SelfCorrectionSchedule
from .time_budget import TimeBudget

#: Recipe name -> (callback class, default keyword arguments).
CALLBACKS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "self_correction": (SelfCorrectionSchedule, {}),
    "ema": (EMA, {}),
    "sample_logger": (SampleLogger, {}),
    "checkpoint": (ModelCheckpoint, {}),
    "lr_monitor": (LearningRateMonitor, {"logging_interval": "step"}),
    "time_budget": (TimeBudget, {}),
    "evaluation": (ProtocolEvaluation, {}),
}


def build_callback(name: str, kwargs: Mapping[str, Any]) -> Callback:
    """The callback registered as ``name`` with its defaults updated by ``kwargs``."""
    if name not in CALLBACKS:
        raise ValueError(f"unknown callback {name!r}; known: {sorted(CALLBACKS)}")
    cls, defaults = CALLBACKS[name]
    return cls(**{**defaults, **dict(kwargs)})


__all__ = ["CALLBACKS", "EMA", "ProtocolEvaluation", "SampleLogger", "SelfCorrectionSchedule", "TimeBudget", "build_callback", "make_grid"]

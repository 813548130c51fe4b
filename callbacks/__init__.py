"""Lightning callbacks, installed as ``infinity_lightning.callbacks``."""
from .ema import EMA
from .sample_logger import SampleLogger, make_grid
from .self_correction import SelfCorrectionSchedule

__all__ = ["EMA", "SampleLogger", "SelfCorrectionSchedule", "make_grid"]

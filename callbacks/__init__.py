"""Lightning callbacks, installed as ``infinity_lightning.callbacks``."""

"""Lightning DataModules, installed as ``infinity_lightning.datamodules``."""

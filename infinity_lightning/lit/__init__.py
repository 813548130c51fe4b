"""LightningModules for tokenizer training and bitwise VAR training."""

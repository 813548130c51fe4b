"""Loading the parity fixtures (layout described in the fixtures' README)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from infinity_lightning.checkpoints import load_tokenizer, load_transformer


def load(path: Path, name: str):
    return torch.load(path / name, map_location="cpu", weights_only=True)


def text_tuple(inputs):
    return (inputs["text_kv_compact"], inputs["text_lens"], inputs["text_cu_seqlens_k"], inputs["text_max_seqlen_k"])


def models(path: Path):
    return load_transformer(path / "infinity.pth"), load_tokenizer(path / "vae.pth")


def config(path: Path):
    return json.loads((path / "config.json").read_text())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()

"""notebooks/tokenizer.ipynb runs top to bottom in a fresh kernel and shows what it promises."""
from __future__ import annotations

import json

import pytest

from .notebook_runner import count_images, run_notebook


def test_tokenizer_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook("tokenizer.ipynb", tmp_path, monkeypatch)
    assert count_images(outputs) == 2  # reconstructions, per-scale progression
    assert "exported and reloaded: tiny_vae.pth" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["scales"] == 4
    # Forty steps on four crops already reconstruct far better than the untrained ~9 dB.
    assert summary["psnr"] > 15 and summary["ssim"] > 0.2
    first, last = summary["progression_psnr_first_last"]
    assert last == pytest.approx(summary["psnr"], abs=0.05) and last > first + 2
    assert 0 < summary["bit_entropy_mean"] <= 1 and 0 < summary["unique_code_fraction_finest"] <= 1

"""notebooks/finetune.ipynb runs top to bottom in a fresh kernel of this environment."""
from __future__ import annotations

import json

from .notebook_runner import count_images, run_notebook


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook("finetune.ipynb", tmp_path, monkeypatch)
    assert count_images(outputs) == 1
    assert "exported and reloaded: transformer.pth, identical weights: True" in text
    assert "lr: 0.003" in text  # the overrides reached the recipe
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["image_size"] == [32, 32]
    # thirty steps on eight images: the loss falls well below the untrained ~0.69 per bit
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    assert summary["last_bit_accuracy"] > 0.6
    assert (tmp_path / "runs" / "finetune_notebook" / "tiny_t5_64" / "config.json").exists()

"""notebooks/edit_and_lora.ipynb runs top to bottom in a fresh kernel: inpainting, variations, a
few LoRA steps from the recipe layer, and the adapter loaded, scaled, unloaded and fused."""
from __future__ import annotations

import json

from .notebook_runner import count_images, run_notebook


def test_edit_and_lora_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook("edit_and_lora.ipynb", tmp_path, monkeypatch)
    assert count_images(outputs) == 3  # inpaintings, variations, adapter strengths
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["inpaint_keeps_bits"] is True and summary["scales"] == 3
    assert summary["steps"] == 6
    assert summary["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert summary["adapter_changes_the_image"] is True and summary["unload_restores_exactly"] is True
    assert summary["fused"] == ["default"] and summary["adapters_after_fuse"] == []
    assert "LoRA rank 4: 11776 trainable of" in text
    assert (tmp_path / "runs" / "lora_notebook" / "lora" / "adapter_config.json").exists()

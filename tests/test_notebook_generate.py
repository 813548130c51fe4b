"""notebooks/generate.ipynb runs top to bottom in a fresh kernel and shows the images it promises."""
from __future__ import annotations

import json

from .notebook_runner import count_images, run_notebook


def test_generate_notebook_runs(tmp_path, monkeypatch):
    outputs, text = run_notebook("generate.ipynb", tmp_path, monkeypatch)
    assert count_images(outputs) == 4  # generated pair, progression, cfg strip, tau strip
    assert "same seed, same images: True" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["scales"] == 5
    diffs = summary["cfg_mean_abs_diff_vs_cfg1"]
    assert diffs["1.0"] == 0 and diffs["3.0"] > 5 and diffs["6.0"] > 5
    agreement = summary["tau_bit_agreement_between_seeds"]
    assert agreement["0.1"] > agreement["0.5"] + 0.1 and agreement["0.5"] >= agreement["1.0"] - 0.02

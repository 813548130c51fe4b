"""notebooks/generate.ipynb runs top to bottom in a fresh kernel and shows the images it promises."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "generate.ipynb"


def _kernel_spec_dir(tmp_path: Path) -> Path:
    # A kernel spec pointing at this interpreter, so the kernel imports the same environment as
    # the tests whatever `python` is on PATH.
    spec = tmp_path / "kernels" / "infinity-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "infinity-lightning tests", "language": "python"}))
    return tmp_path


def test_generate_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="infinity-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 4  # generated pair, progression, cfg strip, tau strip
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "same seed, same images: True" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["scales"] == 5
    diffs = summary["cfg_mean_abs_diff_vs_cfg1"]
    assert diffs["1.0"] == 0 and diffs["3.0"] > 5 and diffs["6.0"] > 5
    agreement = summary["tau_bit_agreement_between_seeds"]
    assert agreement["0.1"] > agreement["0.5"] + 0.1 and agreement["0.5"] >= agreement["1.0"] - 0.02

"""notebooks/tokenizer.ipynb runs top to bottom in a fresh kernel and shows what it promises."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
pytest.importorskip("skimage", reason="the notebook's photos come from scikit-image (test extra)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tokenizer.ipynb"


def _kernel_spec_dir(tmp_path: Path) -> Path:
    # A kernel spec pointing at this interpreter, so the kernel imports the same environment as
    # the tests whatever `python` is on PATH.
    spec = tmp_path / "kernels" / "infinity-tokenizer-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "infinity-lightning tests", "language": "python"}))
    return tmp_path


def test_tokenizer_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="infinity-tokenizer-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 2  # reconstructions, per-scale progression
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "exported and reloaded: tiny_vae.pth" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["scales"] == 4
    # Forty steps on four crops already reconstruct far better than the untrained ~9 dB.
    assert summary["psnr"] > 15 and summary["ssim"] > 0.2
    first, last = summary["progression_psnr_first_last"]
    assert last == pytest.approx(summary["psnr"], abs=0.05) and last > first + 2
    assert 0 < summary["bit_entropy_mean"] <= 1 and 0 < summary["unique_code_fraction_finest"] <= 1

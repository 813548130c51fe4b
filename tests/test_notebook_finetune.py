"""notebooks/finetune.ipynb runs top to bottom in a fresh kernel of this environment."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finetune.ipynb"
KERNEL = "infinity-finetune-test"


def _kernel_spec_dir(tmp_path: Path) -> Path:
    # A kernel spec that starts this interpreter (the project's virtual environment), whatever
    # `python` is on PATH; one thread, as the other training tests.
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "infinity-lightning tests", "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}))
    return tmp_path


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "exported and reloaded: transformer.pth, identical weights: True" in text
    assert "lr: 0.003" in text  # the overrides reached the recipe
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["image_size"] == [32, 32]
    # thirty steps on eight images: the loss falls well below the untrained ~0.69 per bit
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    assert summary["last_bit_accuracy"] > 0.6
    assert (tmp_path / "runs" / "finetune_notebook" / "tiny_t5_64" / "config.json").exists()

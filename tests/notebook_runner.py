"""Run a notebook of ``notebooks/`` top to bottom in a fresh kernel of this environment."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "infinity-lightning-tests"


def run_notebook(name: str, tmp_path: Path, monkeypatch, timeout: int = 300) -> Tuple[List[Dict], str]:
    """Execute ``notebooks/<name>`` with ``tmp_path`` as working folder.

    The kernel spec starts this interpreter (the project's environment, whatever ``python`` is
    on PATH), offline and with one thread.  Returns the code cells' outputs and their stream text;
    fails on any cell error.
    """
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "infinity-lightning tests", "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return outputs, text


def count_images(outputs: List[Dict]) -> int:
    return len([o for o in outputs if "image/png" in o.get("data", {})])

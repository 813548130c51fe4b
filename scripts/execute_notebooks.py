"""Execute notebooks top to bottom and save them with their outputs.

    python scripts/execute_notebooks.py                      # every notebook in notebooks/
    python scripts/execute_notebooks.py notebooks/generate.ipynb

Each notebook runs in a fresh kernel of this interpreter, offline, with one thread, in a temporary
working folder (what it writes there is discarded), exactly as the tests run it
(``tests/notebook_runner.py``).  The saved file keeps the outputs readers should see and drops what
changes from run to run (execution counts, timings, kernel metadata), so a re-run changes only what
the code prints; a picture shown both as PNG and as JPEG is saved as JPEG only.  A notebook whose saved size exceeds ``--max-kb`` (default 300) is an error: show
smaller images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "infinity-lightning-notebooks"


def execute(path: Path, timeout: int = 600) -> int:
    """Run ``path`` in place; returns the saved size in bytes."""
    import nbclient
    import nbformat

    with tempfile.TemporaryDirectory(prefix="notebook-") as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "infinity-lightning", "language": "python",
            "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}))
        os.environ["JUPYTER_PATH"] = str(Path(tmp)) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
        work = Path(tmp) / "work"
        work.mkdir()
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                                resources={"metadata": {"path": str(work)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.metadata.pop("execution", None)
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = None
                # paths of the temporary folder say nothing to a reader
                if output.get("output_type") == "stream":
                    output["text"] = output["text"].replace(str(work) + os.sep, "")
                # a picture shown as both PNG and JPEG keeps the JPEG (noise compresses badly as PNG)
                data = output.get("data", {})
                if "image/png" in data and "image/jpeg" in data:
                    del data["image/png"]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)
    return path.stat().st_size


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--max-kb", type=int, default=300, help="largest saved size in KB (default 300)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    too_big = []
    for path in paths:
        size = execute(path)
        print(f"{path}: {size / 1024:.0f} KB")
        if size > args.max_kb * 1024:
            too_big.append(path)
    if too_big:
        print(f"error: saved notebooks above {args.max_kb} KB: {', '.join(map(str, too_big))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

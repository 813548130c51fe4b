"""The import-layer contract (.importlinter) holds, checked by import-linter on the installed
layout, and it does catch an upward import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _installed_layout(root: Path) -> Path:
    """The package as it installs: callbacks/ and datamodules/ inside infinity_lightning/."""
    pkg = root / "infinity_lightning"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "infinity_lightning", pkg, ignore=ignore)
    for name in ("callbacks", "datamodules"):
        shutil.copytree(REPO / name, pkg / name, ignore=ignore)
    return pkg


def _lint(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(lint), str(REPO / ".importlinter")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contract_holds_and_catches_an_upward_import(tmp_path):
    pkg = _installed_layout(tmp_path)
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Contracts: 2 kept, 0 broken." in kept.stdout
    # a training module that reads recipes breaks the layers
    (pkg / "lit" / "upward.py").write_text("from infinity_lightning.recipes import load_recipe\n")
    # a model that imports Lightning breaks the numerics contract
    (pkg / "models" / "heavy.py").write_text("import lightning.pytorch\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in broken.stdout
    assert "infinity_lightning.lit.upward -> infinity_lightning.recipes" in broken.stdout
    assert "infinity_lightning.models.heavy -> lightning" in broken.stdout

"""The wheel installs callbacks/, datamodules/ and recipes/ under infinity_lightning."""
import subprocess
import sys
import zipfile

from .conftest import REPO_ROOT


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("infinity_lightning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "infinity_lightning/callbacks/__init__.py" in names
    assert "infinity_lightning/datamodules/__init__.py" in names
    assert any(n.startswith("infinity_lightning/recipes_data/var/") and n.endswith(".yaml") for n in names)
    assert not any(n.startswith(("callbacks/", "datamodules/", "tests/")) for n in names)
    # every source file lands in the wheel (a subpackage missing from setup.py would not)
    expected = {f"infinity_lightning/{f.relative_to(REPO_ROOT / 'infinity_lightning').as_posix()}"
                for f in (REPO_ROOT / "infinity_lightning").rglob("*.py") if "__pycache__" not in f.parts}
    for folder in ("callbacks", "datamodules"):
        expected |= {f"infinity_lightning/{folder}/{f.name}" for f in (REPO_ROOT / folder).glob("*.py")}
    assert sorted(expected - names) == []
    assert "infinity_lightning/evaluation/protocols/shapes_v1.json" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "infinity-lightning = infinity_lightning.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

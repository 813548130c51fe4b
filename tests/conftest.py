"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

# Tests run on small models in parallel processes (pytest -n 2): one thread per process avoids
# oversubscribing the cores; subprocesses (distributed tests, notebooks) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_dir() -> Path:
    """The parity fixture directory: ``$INFINITY_PARITY_DIR`` or ``../shared/reference/parity/main``."""
    env = os.environ.get("INFINITY_PARITY_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "reference" / "parity" / "main"
    return path.resolve()


@pytest.fixture(scope="session")
def parity_path() -> Path:
    path = parity_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"parity fixtures not found in {path}; set INFINITY_PARITY_DIR to a fixture directory"
        )
    return path


@pytest.fixture
def single_thread():
    """Run a test single-threaded (the fixtures were computed with one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_fixture(path: Path, name: str):
    return torch.load(path / name, map_location="cpu", weights_only=True)

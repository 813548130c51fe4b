"""Untrusted files: a pickle that would run code is refused everywhere a user hands us a file, and
no ``torch.load`` in the package can skip ``weights_only=True``.

The payload is a class whose ``__reduce__`` makes unpickling call ``os.system("touch MARKER")``;
each loader must raise and the marker must never appear.  A control unpickles the payload
unrestricted (in a subprocess) to show it is live.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinity_lightning.io import CheckpointError, read_weights, safe_load

REPO = Path(__file__).resolve().parents[1]
#: Source trees shipped as the package (``callbacks/`` and ``datamodules/`` install under it) and
#: the helper scripts of these tests.
SCANNED = ("infinity_lightning", "callbacks", "datamodules", "recipes", "tests/reliability")


class _RunsCode:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_file(path: Path, marker: Path, payload_key: str = "payload", **extra) -> Path:
    """A torch.save file holding plausible tensors and the code-running payload."""
    obj = {"state_dict": {"w": torch.zeros(2)}, payload_key: _RunsCode(f"touch {marker}"), **extra}
    torch.save(obj, path)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran.marker"
    yield path
    assert not path.exists(), "unpickling ran the payload's code"


def test_the_payload_is_live(tmp_path):
    """Control: an unrestricted load of the same file does run the payload."""
    live = tmp_path / "live.marker"
    evil = _evil_file(tmp_path / "evil.pth", live)
    code = f"import torch; torch.load({str(evil)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO),
                   env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert live.exists()


def test_safe_load_and_read_weights_refuse_code(tmp_path, marker):
    evil = _evil_file(tmp_path / "evil.pth", marker)
    for load in (lambda: safe_load(evil), lambda: read_weights(evil)):
        with pytest.raises(CheckpointError, match=r"refusing to load .*evil.pth.* would run code"):
            load()


def test_load_transformer_and_load_tokenizer_refuse_code(tmp_path, marker):
    from infinity_lightning.checkpoints import load_tokenizer, load_transformer

    evil = _evil_file(tmp_path / "transformer.pth", marker)
    with pytest.raises(CheckpointError, match="refusing to load transformer file .*transformer.pth"):
        load_transformer(evil)
    with pytest.raises(CheckpointError, match="refusing to load transformer file"):
        load_transformer(evil, config="tiny")
    evil_vae = _evil_file(tmp_path / "vae.pth", marker, payload_key="vae")
    with pytest.raises(CheckpointError, match="refusing to load tokenizer file .*vae.pth"):
        load_tokenizer(evil_vae)


def test_pipeline_refuses_code_in_either_component(tmp_path, marker):
    from infinity_lightning.pipeline import InfinityPipeline
    from infinity_lightning.tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path / "pipe", layout="generic")
    good_transformer = tmp_path / "transformer.pth"
    shutil.move(folder / "transformer.pth", good_transformer)
    _evil_file(folder / "transformer.pth", marker)
    with pytest.raises(CheckpointError, match="refusing to load transformer file"):
        InfinityPipeline.from_pretrained(folder, device="cpu")
    shutil.move(good_transformer, folder / "transformer.pth")
    _evil_file(folder / "tokenizer.pth", marker, payload_key="vae")
    with pytest.raises(CheckpointError, match="refusing to load tokenizer file"):
        InfinityPipeline.from_pretrained(folder, device="cpu")


def test_resume_refuses_code(tmp_path, marker):
    """A Lightning checkpoint with a payload: resuming picks it (the archive itself is well
    formed), and the atomic checkpoint IO of every recipe run refuses it, inside ``Trainer.fit``."""
    import lightning.pytorch as pl

    from infinity_lightning.reliability import AtomicCheckpointIO, find_resume_checkpoint
    from tests.test_numerical_faults import FixedLatents, make_module

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    evil = _evil_file(folder / "last.ckpt", marker, payload_key="callbacks", global_step=3, epoch=0)
    assert find_resume_checkpoint(folder) == evil
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    with pytest.raises(CheckpointError, match="refusing to load checkpoint file .*last.ckpt"):
        trainer.fit(make_module(), FixedLatents([0]), ckpt_path=str(evil))
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        AtomicCheckpointIO().load_checkpoint(evil)


def test_cached_data_files_refuse_code(tmp_path, marker):
    """Latents files and text-feature cache entries are user files too."""
    from infinity_lightning.datamodules import TextFeatureCache
    from infinity_lightning.datamodules.latents import LatentsDataModule

    evil = _evil_file(tmp_path / "latents.pth", marker, payload_key="latents")
    with pytest.raises(CheckpointError, match="refusing to load latents file"):
        LatentsDataModule(evil).setup()
    cache = TextFeatureCache(tmp_path / "cache", encoder=lambda caps: [torch.ones(2, 4) for _ in caps])
    entry = cache.path("a red circle")
    entry.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_RunsCode(f"touch {marker}"), entry)
    # A refused entry is treated as missing and recomputed, never unpickled unrestricted.
    (features,) = cache.get(["a red circle"])
    assert torch.equal(features, torch.ones(2, 4))


# -- the source scan -------------------------------------------------------------------------
def _torch_load_calls(source: str, filename: str):
    """``(line, has weights_only=True)`` of every call that is ``torch.load`` (any alias of the
    torch module, ``torch.serialization.load``, or ``load`` imported from torch)."""
    tree = ast.parse(source, filename)
    torch_names, load_names = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch", "torch.serialization"):
                    torch_names.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            for a in node.names:
                if a.name == "load":
                    load_names.add(a.asname or "load")
                if a.name == "serialization":
                    torch_names.add(a.asname or "serialization")

    def is_torch_load(func) -> bool:
        if isinstance(func, ast.Name):
            return func.id in load_names
        if isinstance(func, ast.Attribute) and func.attr == "load":
            base = ast.unparse(func.value)
            return base in torch_names or base in {f"{t}.serialization" for t in torch_names}
        return False

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and is_torch_load(node.func):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            out.append((node.lineno, safe))
    return out


def test_scanner_finds_unsafe_calls():
    code = ("import torch\nimport torch as T\nfrom torch import load as L\n"
            "torch.load('a', weights_only=True)\ntorch.load('b')\nT.load('c', weights_only=False)\n"
            "L('d', weights_only=flag)\ntorch.serialization.load('e', weights_only=True)\n")
    assert _torch_load_calls(code, "x.py") == [(4, True), (5, False), (6, False), (7, False), (8, True)]


def test_every_torch_load_in_the_package_passes_weights_only_true():
    files = [p for root in SCANNED for p in sorted((REPO / root).rglob("*.py"))]
    assert len(files) > 30
    unsafe, total = [], 0
    for path in files:
        calls = _torch_load_calls(path.read_text(encoding="utf-8"), str(path))
        total += len(calls)
        unsafe += [f"{path.relative_to(REPO)}:{line}" for line, safe in calls if not safe]
    assert total >= 3  # the scan sees the loaders (io.safe_load, the text cache, parallel.py)
    assert not unsafe, f"torch.load without a literal weights_only=True: {unsafe}"


def test_no_plain_pickle_loads_in_the_package():
    offenders = []
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for bad in ("pickle.load(", "pickle.loads(", "pickle.Unpickler(", "dill.load", "joblib.load"):
                if bad in text:
                    offenders.append(f"{path.relative_to(REPO)}: {bad}")
    assert not offenders, offenders

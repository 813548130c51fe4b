"""Kill a training run with SIGKILL (between checkpoints, then while a checkpoint is being
written), resume it, and compare it with a run that was never interrupted.

The runs are ``tests/reliability/train.py`` subprocesses: the tiny recipe
``tests/reliability/tiny_var.yaml`` through ``infinity-lightning fit``'s own setup, 6 batches per
epoch, 10 steps, a checkpoint every 3 steps (steps 3 and 9 in the middle of an epoch, step 6 at
its end).  Every step's loss goes to a file,
flushed per line.  Text features are not memoised (``module.cache_text_features: false``): the
memo holds each caption's features from the batch that first encoded it, and a resumed run
encodes them in other batches (other padding), which changes them in the 7th digit.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from infinity_lightning.reliability import (FAULT_PAUSE_SAVE_ENV, find_resume_checkpoint, read_loss_log,
                                            verify_checkpoint)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "reliability" / "train.py"
TIMEOUT = 240.0


def _start(out: Path, loss_file: Path, extra: List[str] = (), env: Optional[Dict[str, str]] = None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    log = open(out.parent / f"{out.name}.{int(time.time() * 1000)}.log", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(loss_file), *extra],
                            cwd=str(REPO), env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=TIMEOUT) == 0, f"training subprocess failed: {proc.args}"


def _lines(path: Path) -> int:
    return len(read_loss_log(path)) if path.exists() else 0


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_sigkill_mid_training_and_mid_save_then_resume_matches_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref_loss, run_loss = tmp_path / "reference.loss", tmp_path / "run.loss"
    ckpts = run_dir / "checkpoints"

    # The reference and the first attempt start together (two cores); the first attempt is
    # killed once step 5 is logged: after the step-3 checkpoint, in the middle of training.
    reference = _start(ref_dir, ref_loss)
    first = _start(run_dir, run_loss)
    _wait_for(lambda: _lines(run_loss) >= 5, first, "step 5 of the first attempt")
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    killed_at = read_loss_log(run_loss)[-1][0]
    assert 5 <= killed_at < 10
    newest = find_resume_checkpoint(ckpts)
    assert newest is not None and _step_of(newest) == 3 * (killed_at // 3)

    # Second attempt: resumes (ckpt_path=auto) and is killed while the step-9 checkpoint is being
    # written: after its temporary file is complete, before the rename.
    marker = tmp_path / "saving.marker"
    second = _start(run_dir, run_loss, ["ckpt_path=auto"], {FAULT_PAUSE_SAVE_ENV: f"9:120:{marker}"})
    _wait_for(marker.exists, second, "the step-9 checkpoint save")
    tmp_file = Path(marker.read_text())
    assert tmp_file.parent == ckpts and tmp_file.name.startswith(".") and tmp_file.stat().st_size > 0
    second.send_signal(signal.SIGKILL)
    assert second.wait(timeout=30) == -signal.SIGKILL

    # The half-saved checkpoint is garbage beside the intact older ones; resuming skips it.
    assert tmp_file.exists(), "the temporary file of the interrupted save is left behind"
    assert not list(ckpts.glob("*step=9*.ckpt")), "a checkpoint that was never renamed must not exist"
    assert verify_checkpoint(ckpts / "epoch=0-step=6.ckpt") is None
    assert _step_of(ckpts / "last.ckpt") == 6
    resume_from = find_resume_checkpoint(ckpts)
    assert resume_from is not None and _step_of(resume_from) == 6

    # Third attempt: resumes from step 6 (the end of epoch 0) and finishes.
    third = _start(run_dir, run_loss, ["ckpt_path=auto"])
    _finish(third)
    _finish(reference)

    reference_losses = dict(read_loss_log(ref_loss))
    assert sorted(reference_losses) == list(range(1, 11))
    logged = read_loss_log(run_loss)
    # Every step any attempt logged (steps after a checkpoint are run again after a resume) has
    # the reference's loss, and the steps after the last checkpoint were all logged.
    for step, loss in logged:
        assert math.isclose(loss, reference_losses[step], rel_tol=0, abs_tol=1e-6), (step, loss, reference_losses[step])
    assert {s for s, _ in logged} == set(range(1, 11))
    assert [s for s, _ in logged[-4:]] == [7, 8, 9, 10]
    assert len(logged) > 10  # steps were repeated after the resumes

    final, expected = load_file(str(run_dir / "final.safetensors")), load_file(str(ref_dir / "final.safetensors"))
    assert sorted(final) == sorted(expected)
    worst = max(float((final[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert worst <= 1e-6, f"final weights differ from the uninterrupted run by {worst}"
    # The third attempt wrote the step-9 checkpoint the second one was killed in.
    assert _step_of(ckpts / "last.ckpt") == 9 and verify_checkpoint(ckpts / "epoch=1-step=9.ckpt") is None

"""Atomic writes: readable results, no partial files."""
import os
import stat

import pytest
import torch

from infinity_lightning.io import atomic_save, atomic_write


def test_atomic_save_gives_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_save({"x": torch.ones(2)}, tmp_path / "a.pth")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_save({"step": 1}, target)

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]

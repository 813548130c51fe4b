"""``infinity-lightning fit``: a tiny recipe end to end, outputs, resume, recipe errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from infinity_lightning.cli import main
from infinity_lightning.recipes import RecipeError

TINY = ["schedule.resolution=32", "data.num_samples=8", "data.batch_size=4",
        "optim.warmup_steps=0", "callbacks.sample_logger.every_n_steps=2",
        "callbacks.sample_logger.prompts=[a red circle]", "callbacks.sample_logger.seeds=[0]",
        "callbacks.checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1"]



def _scalars(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_fit_quickstart_writes_checkpoints_logs_and_resolved_recipe(tmp_path):
    out = tmp_path / "run"
    assert main(["fit", "var/quickstart", "trainer.max_steps=3", *TINY, "--output-dir", str(out)]) == 0
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "epoch=0-step=2.ckpt" in ckpts
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and "optimizer_states" in state
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["kind"] == "var" and recipe["output_dir"] == str(out)
    assert recipe["data"]["seed"] == 0 and recipe["schedule"]["resolution"] == 32  # interpolations and overrides applied
    acc = _scalars(out / "tb")
    tags = acc.Tags()
    assert {"train/loss", "train/acc", "train/token_acc", "train/acc_scale0", "train/acc_scale2"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert all(0 < e.value < 2 for e in acc.Scalars("train/loss"))
    assert any(t.startswith("samples/") for t in tags["images"])
    assert (out / "samples" / "samples" / "step_00000002.png").exists()

    # resume from the newest checkpoint and train two more steps
    assert main(["fit", "var/quickstart", "trainer.max_steps=5", *TINY, "--output-dir", str(out),
                 "--ckpt-path", "last"]) == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    assert yaml.safe_load((out / "recipe.yaml").read_text())["ckpt_path"].endswith("last.ckpt")


def test_fit_rejects_bad_recipes(tmp_path):
    with pytest.raises(RecipeError, match="module.lrr"):
        main(["fit", "var/quickstart", "+module.lrr=1", "--output-dir", str(tmp_path), "--dry-run"])
    with pytest.raises(RecipeError, match="model.weights"):
        main(["fit", "var/finetune_2b", "--output-dir", str(tmp_path), "--dry-run"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: var/quickstart\nmodule:\n  warmup: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml.*module.warmup"):
        main(["fit", str(bad), "--output-dir", str(tmp_path), "--dry-run"])
    with pytest.raises(FileNotFoundError, match="no (complete )?checkpoint"):
        main(["fit", "var/quickstart", "--output-dir", str(tmp_path / "empty"), "--ckpt-path", "last", "--dry-run"])

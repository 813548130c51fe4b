"""``infinity-lightning fit``: a tiny recipe end to end, outputs, resume, run folders, recipe errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from infinity_lightning.checkpoints import load_tokenizer, save_tokenizer
from infinity_lightning.cli import UserExit, main

TINY = ["schedule.resolution=32", "data.num_samples=8", "data.batch_size=4",
        "optim.warmup_steps=0", "callbacks.sample_logger.every_n_steps=2",
        "callbacks.sample_logger.prompts=[a red circle]", "callbacks.sample_logger.seeds=[0]",
        "callbacks.checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1",
        "model.random_tokenizer=true"]


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
    # the learning rate is logged under its name, per parameter group (never lr-AdamW/pg1)
    lr_tags = sorted(t for t in tags["scalars"] if t.startswith("lr"))
    assert lr_tags == ["lr/decay", "lr/no_decay"], lr_tags
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]
    assert all(0 < e.value < 2 for e in acc.Scalars("train/loss"))
    assert any(t.startswith("samples/") for t in tags["images"])
    assert (out / "samples" / "samples" / "step_00000002.png").exists()
    events = sorted(p.name for p in (out / "tb").glob("events.*"))
    assert len(events) == 1

    # a second run into the same folder is refused: it would mix the logs and replace last.ckpt
    with pytest.raises(UserExit, match=r"--output-dir .*run already holds a run \(recipe.yaml, tb/ logs, "
                                        r"checkpoints/\); resume it with --ckpt-path last"):
        main(["fit", "var/quickstart", "trainer.max_steps=3", *TINY, "--output-dir", str(out)])
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3

    # resume from the newest checkpoint and train two more steps
    assert main(["fit", "var/quickstart", "trainer.max_steps=5", *TINY, "--output-dir", str(out),
                 "--ckpt-path", "last"]) == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    assert yaml.safe_load((out / "recipe.yaml").read_text())["ckpt_path"].endswith("last.ckpt")

    # --dry-run writes nothing, not even the resolved recipe
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["fit", "var/quickstart", "trainer.max_steps=9", *TINY, "--output-dir", str(out), "--dry-run",
                 "--overwrite"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"]["max_steps"] == 5

    # --overwrite starts over: one events file, the old checkpoints gone
    assert main(["fit", "var/quickstart", "trainer.max_steps=1", *TINY, "--output-dir", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1
    assert len(list((out / "tb").glob("events.*"))) == 1


def test_dry_run_of_a_new_folder_creates_nothing(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["fit", "var/quickstart", *TINY, "--output-dir", str(out), "--dry-run"]) == 0
    assert not (tmp_path / "new").exists()
    assert "nothing was written" in capsys.readouterr().out


def test_print_recipe_shows_the_resolved_recipe_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fit", "var/finetune_2b", "model.weights=w.pth", "model.tokenizer=t.pth", "model.text_encoder=t5",
                 "data.name=folder", "data.data_dir=my_images/", "~data.seed", "--output-dir", str(out),
                 "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert not out.exists()
    # the jsonl DataModule's own keys are gone, the keys both take stay, the deleted one is gone
    assert printed["data"] == {"name": "folder", "data_dir": "my_images/", "batch_size": 2, "num_workers": 4}
    assert printed["output_dir"] == str(out) and printed["model"]["weights"] == "w.pth"


def test_a_random_tokenizer_needs_an_opt_in_and_a_file_keeps_its_settings(tmp_path, capsys):
    with pytest.raises(UserExit, match=r"model.tokenizer 'tiny_f8' is a preset with random weights; give a trained "
                                       r"tokenizer file .* or set model.random_tokenizer=true"):
        main(["fit", "var/quickstart", "--output-dir", str(tmp_path / "a"), "--dry-run"])
    assert capsys.readouterr().err.startswith("error: recipe ")
    # a trained tokenizer whose file stores the preset's widths and norm_groups 'auto' against the
    # recipe's overrides (base_ch 16, no residual blocks, norm_groups 4): every contradiction is named
    path = save_tokenizer(load_tokenizer("tiny_f8"), tmp_path / "tokenizer.pth")
    with pytest.raises(UserExit, match=r"model.tokenizer_overrides: tokenizer file .*tokenizer.pth stores its "
                                       r"architecture, and the override base_ch=16 \(the file has 32\), "
                                       r"num_res_blocks=0 \(the file has 1\), norm_groups=4 \(the file has 'auto'\) "
                                       r"contradicts it"):
        main(["fit", "var/quickstart", f"model.tokenizer={path}", "--output-dir", str(tmp_path / "b"), "--dry-run"])
    # the same file with the override removed (or one that repeats the file's value) is used as it is
    assert main(["fit", "var/quickstart", f"model.tokenizer={path}", "model.tokenizer_overrides={}", *TINY[:-1],
                 "--output-dir", str(tmp_path / "b"), "--dry-run"]) == 0
    agreeing = save_tokenizer(load_tokenizer("tiny_f8", base_ch=16, num_res_blocks=0, norm_groups=4),
                              tmp_path / "tok_quickstart.pth")
    assert main(["fit", "var/quickstart", f"model.tokenizer={agreeing}", *TINY[:-1],
                 "--output-dir", str(tmp_path / "c"), "--dry-run"]) == 0


def test_fit_rejects_bad_recipes(tmp_path, capsys):
    with pytest.raises(UserExit, match="module.lrr"):
        main(["fit", "var/quickstart", "+module.lrr=1", "--output-dir", str(tmp_path), "--dry-run"])
    with pytest.raises(UserExit, match="model.weights"):
        main(["fit", "var/finetune_2b", "--output-dir", str(tmp_path), "--dry-run"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: var/quickstart\nmodule:\n  warmup: 3\n")
    with pytest.raises(UserExit, match=r"bad.yaml.*module.warmup"):
        main(["fit", str(bad), "--output-dir", str(tmp_path), "--dry-run"])
    with pytest.raises(UserExit, match="no (complete )?checkpoint"):
        main(["fit", "var/quickstart", "--output-dir", str(tmp_path / "empty"), "--ckpt-path", "last", "--dry-run"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserExit, match=r"--output-dir .*file exists and is not a folder"):
        main(["fit", "var/quickstart", "--output-dir", str(tmp_path / "file"), "--dry-run"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 5 and all(line.startswith("error: ") for line in errors)

"""Bad configuration and bad inputs to a recipe run: each gets one clear message naming the key
or file and what was expected.  Also: truncated and corrupt checkpoints are detected before
they are used, and a recipe run reports skipped data records in its logs.

Everything here builds recipes without training (``prepare``) or uses tiny components, except
the bad-data runs (three steps of the tiny recipe on a jsonl folder with broken records).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from infinity_lightning.commands.fit import prepare, resolve_ckpt_path
from infinity_lightning.io import CheckpointError
from infinity_lightning.recipes import RecipeError, load_recipe, to_dict
from infinity_lightning.reliability import (AtomicCheckpointIO, check_trainer_settings, find_resume_checkpoint,
                                            verify_checkpoint)

#: The pinned tiny recipe of the reliability tests (see the file).
TINY = Path(__file__).resolve().parent / "reliability" / "tiny_var.yaml"



def _prepare(tmp_path: Path, *overrides: str):
    return prepare(str(TINY), list(overrides), output_dir=str(tmp_path / "run"), logger="none")


# -- recipe keys and types ------------------------------------------------------------------------
def test_unknown_keys_name_the_key_the_file_and_the_choices(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text(f"base: {TINY}\nmodule:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"mine.yaml: unknown key 'module.learning_rate'.*Allowed keys in module"):
        prepare(str(bad), [], output_dir=str(tmp_path / "run"), logger="none")
    with pytest.raises(RecipeError, match=r"key 'trainer.max_step' is not in .*tiny_var.yaml.*Did you mean: "
                                          r"trainer.max_steps"):
        _prepare(tmp_path, "trainer.max_step=3")
    with pytest.raises(RecipeError, match=r"unknown key 'trainer.max_stpes' \(did you mean max_steps"):
        _prepare(tmp_path, "+trainer.max_stpes=3")
    with pytest.raises(RecipeError, match=r"unknown key 'callbacks.checkpoint.every_n_step'. Did you mean: "
                                          r"every_n_train_steps"):
        _prepare(tmp_path, "+callbacks.checkpoint.every_n_step=3")
    with pytest.raises(RecipeError, match=r"unknown key 'data.num_sample'. Did you mean: num_samples"):
        _prepare(tmp_path, "+data.num_sample=3")


def test_wrong_types_name_the_key_the_value_and_the_expected_type(tmp_path):
    with pytest.raises(RecipeError, match=r"'optim.lr' = 'fast' \(str\) does not match the expected type "
                                          r"Optional\[float\]"):
        _prepare(tmp_path, "optim.lr=fast")
    with pytest.raises(RecipeError, match=r"'optim.optimizer' = 'sgd' .*Literal\['adamw', 'adamw8bit'\]"):
        _prepare(tmp_path, "optim.optimizer=sgd")
    with pytest.raises(RecipeError, match=r"'seed' = 1.5 \(float\) .*expected type int"):
        _prepare(tmp_path, "seed=1.5")
    # The trainer section is free-form (Lightning's arguments): its common keys are checked here.
    with pytest.raises(RecipeError, match=r"'trainer.max_steps' = 'ten' \(str\); expected an integer"):
        _prepare(tmp_path, "trainer.max_steps=ten")
    with pytest.raises(RecipeError, match=r"'trainer.gradient_clip_val' = 'high' \(str\); expected a number"):
        _prepare(tmp_path, "optim.grad_clip=null", "+trainer.gradient_clip_val=high")
    with pytest.raises(RecipeError, match=r"set the gradient clipping once, in optim.grad_clip"):
        _prepare(tmp_path, "+trainer.gradient_clip_val=1.0")


def test_missing_required_value_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match="model.weights"):
        prepare("var/finetune_2b", [], output_dir=str(tmp_path / "run"), logger="none")


# -- components that do not fit together ----------------------------------------------------------
def test_tokenizer_that_does_not_match_the_transformer(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer has 8 bits per position but the transformer expects 16 "
                                         r"\(model.tokenizer vs model.transformer\)"):
        _prepare(tmp_path, "model.tokenizer_overrides={codebook_dim: 8}")
    # A tokenizer file given as the transformer's weights, and the other way round.
    from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer

    save_tokenizer(load_tokenizer("tiny_f8"), tmp_path / "vae.pth")
    save_transformer(load_transformer("tiny"), tmp_path / "gpt.pth")
    with pytest.raises(CheckpointError, match=r"vae.pth.* tokenizer"):
        load_transformer(tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match=r"gpt.pth.* transformer"):
        load_tokenizer(tmp_path / "gpt.pth")


def test_text_encoder_width_that_does_not_match_the_transformer(tmp_path):
    with pytest.raises(ValueError, match=r"text encoder's width is 32 but the transformer's text_channels is 64"):
        _prepare(tmp_path, "model.text_encoder=tiny:32")


# -- resolutions and aspect ratios ----------------------------------------------------------------
def test_image_size_outside_the_template_tables(tmp_path):
    # a pixel size between two schedule sizes: the nearest one is used, with a warning, and the
    # data's image size follows the schedule (they cannot disagree)
    with pytest.warns(UserWarning, match="resolution 40 is not a schedule size; using the nearest, 32x32 px"):
        run = _prepare(tmp_path, "schedule.resolution=40", "trainer.max_steps=1")
    assert run["datamodule"].image_size == 32 and run["module"].schedule_for(1.0).pixel_size(8) == (32, 32)


def test_unknown_pixel_budget_and_resolution(tmp_path):
    from infinity_lightning.scales import resolve

    with pytest.raises(RecipeError, match=r"schedule.resolution: resolution '2M': expected one of \['0.06M', "
                                          r"'0.25M', '0.60M', '1M'\]"):
        _prepare(tmp_path, "schedule.resolution=2M")
    with pytest.raises(ValueError, match=r"resolution '3M': expected one of .*, a pixel size"):
        resolve("3M", 1.0)
    with pytest.raises(ValueError, match="resolution must be a positive pixel size"):
        resolve(-256, 1.0)


# -- prompts longer than the text encoder takes ---------------------------------------------------
def test_prompt_longer_than_the_text_encoder_takes(tmp_path):
    from infinity_lightning.models.text_encoder import PromptTruncatedWarning, TextEncoder
    from infinity_lightning.tiny import make_tiny_t5

    folder = make_tiny_t5(tmp_path / "t5", ["a red circle on a blue square"] * 4)
    long_prompt = " ".join(["a red circle"] * 20)
    strict = TextEncoder.from_pretrained(folder, max_length=32, on_too_long="error")
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, more than max_length=32"):
        strict.encode(["a red circle", long_prompt])
    lenient = TextEncoder.from_pretrained(folder, max_length=32)
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 0 has \d+ tokens, more than max_length=32; it is cut"):
        feats = lenient.encode([long_prompt])
    assert feats.lens == [32]


# -- devices and precisions this machine lacks ----------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without a GPU")
def test_devices_and_precisions_the_machine_lacks(tmp_path):
    with pytest.raises(RecipeError, match=r"tiny_var.yaml: 'trainer.accelerator' = 'gpu' but this machine has no "
                                          r"usable CUDA GPU.*trainer.accelerator=cpu"):
        _prepare(tmp_path, "trainer.accelerator=gpu")
    with pytest.raises(RecipeError, match=r"'trainer.precision' = '16-mixed' \(fp16\) needs a CUDA GPU.*bf16-mixed"):
        _prepare(tmp_path, "trainer.precision=16-mixed")
    with pytest.raises(RecipeError, match="'trainer.accelerator' = 'tpu' needs torch_xla"):
        check_trainer_settings({"accelerator": "tpu"})
    with pytest.raises(RecipeError, match="'trainer.precision' = 'transformer-engine' needs the transformer_engine"):
        check_trainer_settings({"accelerator": "cpu", "precision": "transformer-engine"})
    check_trainer_settings({"accelerator": "cpu", "precision": "bf16-mixed", "devices": 2, "max_steps": 3})
    # The pipeline and the generate command on a device that is not there.
    from infinity_lightning.commands.generate import _accelerator

    with pytest.raises(ValueError, match="--device 'tpu': expected cpu, cuda or auto"):
        _accelerator("tpu")


# -- truncated and corrupt checkpoints -----------------------------------------------------------
def _checkpoint(path: Path, step: int) -> Path:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((256,), float(step))}},
                                         path)
    return path


def test_truncated_zero_byte_and_corrupt_checkpoints_are_detected_and_skipped(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    good = _checkpoint(folder / "epoch=0-step=2.ckpt", 2)
    data = good.read_bytes()
    truncated = folder / "epoch=0-step=4.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the tensor record: the zip directory is intact
    corrupt = folder / "epoch=0-step=6.ckpt"
    corrupt.write_bytes(bytes(flipped))
    empty = folder / "last.ckpt"
    empty.write_bytes(b"")
    assert verify_checkpoint(good) is None
    assert "truncated" in verify_checkpoint(truncated)
    assert "CRC-32" in verify_checkpoint(corrupt)
    assert "empty (0 bytes)" in verify_checkpoint(empty)
    with caplog.at_level(logging.WARNING, logger="infinity_lightning.reliability"):
        assert find_resume_checkpoint(folder) == good
    messages = " ".join(r.getMessage() for r in caplog.records)
    for name in ("last.ckpt", "step=6", "step=4"):
        assert name in messages
    # The fit command: auto/last fall back to the good one; an explicit broken path is refused.
    assert resolve_ckpt_path("auto", tmp_path) == str(good)
    assert resolve_ckpt_path("last", tmp_path) == str(good)
    with pytest.raises(CheckpointError, match=r"step=4.ckpt is truncated .*--ckpt-path auto"):
        resolve_ckpt_path(str(truncated), tmp_path)
    # Loading through Lightning's checkpoint IO names the file too.
    with pytest.raises(CheckpointError, match=r"checkpoint .*step=6.ckpt is corrupt"):
        AtomicCheckpointIO().load_checkpoint(corrupt)
    assert AtomicCheckpointIO().load_checkpoint(good)["global_step"] == 2
    # Nothing usable: auto starts afresh, last is an error.
    good.unlink()
    assert resolve_ckpt_path("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_ckpt_path("last", tmp_path)


def test_incomplete_distributed_checkpoint_folders_are_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    complete = folder / "epoch=0-step=2.ckpt"
    complete.mkdir(parents=True)
    (complete / ".metadata").write_bytes(b"x")
    (complete / "__0_0.distcp").write_bytes(b"x")
    torch.save({"global_step": 2}, complete / "meta.pt")
    partial = folder / "epoch=0-step=4.ckpt"  # killed before .metadata and meta.pt were written
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x")
    assert "incomplete distributed checkpoint" in verify_checkpoint(partial)
    assert find_resume_checkpoint(folder) == complete


def test_atomic_save_leaves_the_old_checkpoint_when_writing_fails(tmp_path):
    path = _checkpoint(tmp_path / "last.ckpt", 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "x": Unpicklable()}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was removed


def test_recipe_runs_use_the_atomic_checkpoint_io(tmp_path):
    run = _prepare(tmp_path, "trainer.max_steps=1")
    assert isinstance(run["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)


# -- bad data in a recipe run ----------------------------------------------------------------------
def _jsonl_with_bad_records(root: Path) -> Path:
    img = root / "img"
    img.mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 90)).save(img / f"good{i}.png")
        lines.append(json.dumps({"image_path": f"img/good{i}.png", "h_div_w": 1.0, "long_caption": f"shape {i}"}))
    Image.new("RGB", (32, 32), "blue").save(img / "named_wrong.jpg", format="PNG")  # wrong extension: fine
    lines.append(json.dumps({"image_path": "img/named_wrong.jpg", "h_div_w": 1.0, "long_caption": "blue"}))
    (img / "zero.png").write_bytes(b"")
    lines.append(json.dumps({"image_path": "img/zero.png", "h_div_w": 1.0, "long_caption": "zero"}))
    lines.append(json.dumps({"image_path": "img/good0.png", "h_div_w": 1.0, "long_caption": " "}))
    lines.append('{"image_path": "img/good1.png", ')
    (root / "1.000_000000012.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _jsonl_recipe(tmp_path: Path, data_dir: Path, **data) -> Path:
    cfg = to_dict(load_recipe(TINY))
    cfg["data"] = {"name": "jsonl", "data_dir": str(data_dir), "batch_size": 4, "seed": 0, "drop_last": False,
                   **data}
    cfg["callbacks"].update(sample_logger=None, lr_monitor=False, checkpoint=None)
    cfg["trainer"].update(max_steps=3, log_every_n_steps=1)
    path = tmp_path / "jsonl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_skipped_records_reach_the_logs_of_a_recipe_run(tmp_path, caplog):
    from infinity_lightning.datamodules import TooManySkipsError

    data_dir = _jsonl_with_bad_records(tmp_path / "data")
    recipe = _jsonl_recipe(tmp_path, data_dir, max_skip_fraction=0.5)
    run = prepare(str(recipe), [], output_dir=str(tmp_path / "run"), logger="csv")
    with caplog.at_level(logging.INFO, logger="infinity_lightning.datamodules"):
        run["trainer"].fit(run["module"], datamodule=run["datamodule"])
    metrics = run["trainer"].callback_metrics
    assert float(metrics["data/skipped"]) == 2.0
    assert float(metrics["data/skipped_empty_file"]) == 1.0 and float(metrics["data/skipped_empty_caption"]) == 1.0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "zero.png" in messages and "skipped 2 of" in messages and "data epoch 0" in messages
    assert "malformed_line" in messages  # counted while indexing
    csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "data/skipped_empty_file" in csv.splitlines()[0]
    # The same data with a stricter threshold stops the run with a message naming the reasons.
    strict = _jsonl_recipe(tmp_path, data_dir, max_skip_fraction=0.1)
    shutil.rmtree(tmp_path / "run")
    run = prepare(str(strict), [], output_dir=str(tmp_path / "run"), logger="none")
    with pytest.raises(TooManySkipsError, match=r"max_skip_fraction=0.1.*empty_"):
        run["trainer"].fit(run["module"], datamodule=run["datamodule"])

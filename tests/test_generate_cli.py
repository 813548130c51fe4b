"""``infinity-lightning generate`` end to end on a tiny pipeline folder."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infinity_lightning.cli import build_parser, main
from infinity_lightning.commands import generate as generate_command
from infinity_lightning.pipeline import InfinityPipeline
from infinity_lightning.presets import RELEASED_VARIANTS
from infinity_lightning.sampling import SamplingConfig, _option
from infinity_lightning.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"), layout="released")


def test_generate_from_prompts(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--pipeline", str(folder), "--prompt", "a photo of a dog", "--prompt", "a bowl of fruit",
               "--seed", "5", "--resolution", "64", "--cfg", "2.5", "--out", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["000000.json", "000000.png", "000001.json", "000001.png"]
    pipe = InfinityPipeline.from_pretrained(folder, device="cpu")
    for i, prompt in enumerate(["a photo of a dog", "a bowl of fruit"]):
        meta = json.loads((out / f"{i:06d}.json").read_text())
        assert meta["prompt"] == prompt and meta["seed"] == 5 + i and meta["settings"]["cfg"] == 2.5
        assert meta["model"] == {"pipeline": str(folder)} and meta["dtype"] == "fp32"
        direct = pipe(prompt, seed=5 + i, cfg=2.5, resolution=64, output_type="np")[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), direct)
    # existing files are kept unless asked
    with pytest.raises(SystemExit, match=r"--out .* already holds 000000.png; use --overwrite, --skip-existing"):
        main(["generate", "--pipeline", str(folder), "--prompt", "x", "--resolution", "64", "--out", str(out)])
    assert main(["generate", "--pipeline", str(folder), "--prompt", "a photo of a dog", "--prompt", "a cat",
                 "--resolution", "64", "--out", str(out), "--skip-existing"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_generate_from_jsonl_with_components(folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a photo of a dog", "h_div_w": 0.5}\n{"prompt": "a cat", "seed": 9}\n')
    out = tmp_path / "out"
    rc = main(["generate", "--transformer", str(folder / "infinity_2b_reg.pth"),
               "--tokenizer", str(folder / "infinity_vae_d32reg.pth"), "--text-encoder", str(folder / "flan-t5-xl"),
               "--prompts-file", str(prompts), "--num-images", "2", "--negative-prompt", "a blue car",
               "--resolution", "64", "--dtype", "bf16", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    metas = [json.loads((out / f"{i:06d}.json").read_text()) for i in range(4)]
    assert [m["seed"] for m in metas] == [0, 1, 9, 10]
    assert all(m["negative_prompt"] == "a blue car" and m["dtype"] == "bf16" for m in metas)
    w, h = Image.open(out / "000000.png").size
    assert h * 2 == w and Image.open(out / "000002.png").size == (64, 64)


def test_generate_argument_errors(folder, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--pipeline", str(folder), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--transformer, --tokenizer and --text-encoder"):
        main(["generate", "--transformer", "x.pth", "--prompt", "a", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--resolution", "huge", "--out", str(tmp_path)])
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(SystemExit, match=f"generate: --pipeline: pipeline folder '{missing}' does not exist"):
        main(["generate", "--pipeline", missing, "--prompt", "a", "--out", str(tmp_path / "out")])
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match="--out .*taken exists and is not a folder"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--out", str(tmp_path / "taken")])
    with pytest.raises(SystemExit, match="taken is a file, so the folder cannot be created"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--out", str(tmp_path / "taken" / "sub")])
    with pytest.raises(SystemExit, match=r"generate: tau \(temperature\) must be > 0"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--tau", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"top_p must be in \[0, 1\]"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--top-p", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="outside the templates"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--aspect-ratio", "9",
              "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="generate: --device 'tpu': expected cpu, cuda or auto"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--device", "tpu", "--out", str(tmp_path / "o")])
    for flag in ("--num-images", "--batch-size", "--devices"):
        with pytest.raises(SystemExit):
            main(["generate", "--pipeline", str(folder), "--prompt", "a", flag, "0", "--out", str(tmp_path / "o")])
        assert "must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was generated


def test_generate_refuses_an_unwritable_out(folder, tmp_path, monkeypatch):
    # os.access is the check (a chmod would not stop root, who runs some CI containers)
    monkeypatch.setattr(generate_command.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'new' / 'out'}: {tmp_path} is not writable"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--out", str(tmp_path / "new" / "out")])


def test_prompt_length_is_checked_before_generating(folder, tmp_path):
    long_prompt = " ".join(["a red apple on a wooden table"] * 8)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"generate: prompt of record 1 has \d+ tokens, more than the 32"):
        main(["generate", "--pipeline", str(folder), "--prompt", "a photo of a dog", "--prompt", long_prompt,
              "--resolution", "64", "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())
    with pytest.warns(UserWarning, match="are cut to 32 tokens"):
        assert main(["generate", "--pipeline", str(folder), "--prompt", long_prompt, "--truncate-prompts",
                     "--resolution", "64", "--out", str(out)]) == 0
    assert (out / "000000.png").is_file()


def _sampling_flags(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    group = next(g for g in sub._action_groups if g.title.startswith("sampling"))
    return sub, {a.dest: a for a in group._group_actions}


def test_sampling_flags_are_the_cli_fields_of_sampling_config(folder, tmp_path):
    cli_fields = [f for f in dataclasses.fields(SamplingConfig) if f.metadata.get("cli") is not None]
    assert {f.name for f in cli_fields} >= {"cfg", "tau", "top_k", "top_p", "cfg_insertion_layer"}
    sub, flags = _sampling_flags(build_parser())
    assert {d for d in flags if d not in ("seed", "aspect_ratio", "resolution")} == {f.name for f in cli_fields}
    for f in cli_fields:
        action = flags[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.type is f.metadata["cli"] and action.help == f.metadata["help"] and action.default is None
    assert sub._option_string_actions["--variant"].choices == sorted(RELEASED_VARIANTS)
    # a field added with cli= becomes a working flag with nothing else changed
    extended = dataclasses.make_dataclass(
        "Extended", [("eta", float, _option(0.5, "a new option", float)), ("verbose", bool, _option(False, "x", bool))],
        bases=(SamplingConfig,), frozen=True)
    parser = argparse.ArgumentParser()
    generate_command.add_sampling_arguments(parser, extended)
    args = parser.parse_args(["--eta", "0.25", "--top-k", "7", "--verbose"])
    overrides = generate_command.sampling_overrides(args, extended)
    assert overrides == {"eta": 0.25, "top_k": 7, "verbose": True}
    assert extended().replace(**overrides).eta == 0.25
    # the flags reach the sampler: the recorded settings and the image follow --cfg-insertion-layer
    out = tmp_path / "out"
    assert main(["generate", "--pipeline", str(folder), "--prompt", "a photo of a dog", "--seed", "3", "--top-k", "1",
                 "--cfg-insertion-layer", "-1", "--resolution", "64", "--out", str(out)]) == 0
    meta = json.loads((out / "000000.json").read_text())
    assert meta["settings"]["top_k"] == 1 and meta["settings"]["cfg_insertion_layer"] == -1
    pipe = InfinityPipeline.from_pretrained(folder, device="cpu")
    direct = pipe("a photo of a dog", seed=3, top_k=1, cfg_insertion_layer=-1, resolution=64, output_type="np")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000000.png")), direct)


def test_console_command_lists_generate_and_convert():
    res = subprocess.run([sys.executable, "-m", "infinity_lightning.cli", "generate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--prompts-file" in res.stdout and "--negative-prompt" in res.stdout
    res = subprocess.run([sys.executable, "-m", "infinity_lightning.cli", "convert", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--use-ema" in res.stdout

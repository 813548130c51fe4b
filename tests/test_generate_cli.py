"""``infinity-lightning generate`` end to end on a tiny pipeline folder."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from infinity_lightning.cli import main
from infinity_lightning.pipeline import InfinityPipeline, make_tiny_pipeline


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
    with pytest.raises(FileExistsError):
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


def test_generate_argument_errors(folder, tmp_path):
    with pytest.raises(SystemExit, match="--prompt"):
        main(["generate", "--pipeline", str(folder), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--transformer, --tokenizer and --text-encoder"):
        main(["generate", "--transformer", "x.pth", "--prompt", "a", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["generate", "--pipeline", str(folder), "--prompt", "a", "--resolution", "huge", "--out", str(tmp_path)])


def test_console_command_lists_generate_and_convert():
    res = subprocess.run([sys.executable, "-m", "infinity_lightning.cli", "generate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--prompts-file" in res.stdout and "--negative-prompt" in res.stdout
    res = subprocess.run([sys.executable, "-m", "infinity_lightning.cli", "convert", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--use-ema" in res.stdout

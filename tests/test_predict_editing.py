"""Editing records in the prediction loop: inpaint, outpaint and variations next to text prompts,
each image equal to the pipeline's own editing call; records checked before any work."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image

from infinity_lightning.lit.predict import ImageWriter, InfinityPredictor, prompt_dataloader, prompt_records
from infinity_lightning.pipeline import InfinityPipeline
from infinity_lightning.tiny import make_tiny_pipeline

RES = 64


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("tiny"), layout="generic")
    return InfinityPipeline.from_pretrained(folder, device="cpu")


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(1)
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(image)
    m = np.zeros((RES, RES), np.uint8)
    m[16:40, 8:48] = 255
    Image.fromarray(m, mode="L").save(mask)
    return str(image), str(mask)


def test_editing_records_run_next_to_text_prompts(pipe, inputs, tmp_path):
    image, mask = inputs
    prompts = ["a photo of a dog",
               {"prompt": "a red car", "image": image, "mask": mask, "blend": True, "feather": 2, "seed": 7},
               {"prompt": "", "image": image, "keep_scales": 2},
               {"prompt": "a wide view", "image": image, "outpaint": 0.5, "anchor": "left"}]
    records = prompt_records(prompts, seed=20)
    assert [r.get("edit") for r in records] == [None, "inpaint", "variations", "outpaint"]
    module = InfinityPredictor(pipe, resolution=RES)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ImageWriter(tmp_path / "out")])
    trainer.predict(module, prompt_dataloader(records, batch_size=2), return_predictions=False)

    def written(i):
        return np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png"))

    np.testing.assert_array_equal(written(0), pipe("a photo of a dog", seed=20, resolution=RES, output_type="np")[0])
    np.testing.assert_array_equal(written(1), pipe.inpaint("a red car", image, mask, blend=True, feather=2, seed=7,
                                                           resolution=RES, output_type="np")[0])
    np.testing.assert_array_equal(written(2), pipe.variations(image, "", 2, seed=22, resolution=RES,
                                                              output_type="np")[0])
    wide = pipe.outpaint("a wide view", image, 0.5, anchor="left", seed=23, resolution=RES, output_type="np")[0]
    np.testing.assert_array_equal(written(3), wide)
    assert wide.shape[1] == 2 * wide.shape[0]
    meta = json.loads((tmp_path / "out" / "000001.json").read_text())
    assert meta["edit"] == "inpaint" and meta["mask"] == mask and meta["seed"] == 7
    assert meta["settings"]["edit"] == "inpaint" and meta["settings"]["feather"] == 2
    assert json.loads((tmp_path / "out" / "000003.json").read_text())["settings"]["box"][:2] == [0, 0]  # anchored left
    assert "edit" not in json.loads((tmp_path / "out" / "000000.json").read_text())["settings"]


@pytest.mark.parametrize("prompt,message", [
    ({"prompt": "x", "mask": "m.png"}, r"prompt 0: \['mask'\] edit an image, but the prompt names no 'image'"),
    ({"prompt": "x", "image": "a.png", "mask": "m.png", "outpaint": 0.5}, "give 'mask' .* or 'outpaint'"),
    ({"prompt": "x", "image": "a.png", "keep_scales": -1}, "'keep_scales' must be a whole number >= 0"),
    ({"prompt": "x", "image": "a.png", "grow": 2}, r"\['grow'\] do not apply to variations"),
])
def test_editing_records_are_checked(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt_records([prompt])


def test_a_bad_image_names_its_record(pipe, inputs, tmp_path):
    _, mask = inputs
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    records = prompt_records([{"prompt": "x", "image": str(bad), "mask": mask}])
    with pytest.raises(ValueError, match=f"record 0 \\(inpaint of {bad}\\): cannot read image"):
        InfinityPredictor(pipe, resolution=RES).predict_step(records)


def test_editing_commands_load_lora_adapters(pipe, inputs, tmp_path, capsys):
    """``--lora`` loads the adapter before editing; the output is the adapted pipeline's."""
    import torch

    from infinity_lightning import lora
    from infinity_lightning.checkpoints import load_transformer
    from infinity_lightning.cli import main

    folder = tmp_path / "pipe"
    make_tiny_pipeline(folder, layout="generic")
    adapted = load_transformer(folder / "transformer.pth")
    torch.manual_seed(3)
    lora.add_lora(adapted, lora.LoraSettings(rank=2, alpha=64, init="random", targets=("head",)))
    adapter = lora.save_lora(adapted, tmp_path / "adapter")
    image, _ = inputs
    out = tmp_path / "var.png"
    assert main(["variations", "--pipeline", str(folder), "--image", image, "--keep-scales", "1", "--seed", "5",
                 "--resolution", str(RES), "--lora", str(adapter), "--out", str(out)]) == 0
    expected = InfinityPipeline.from_pretrained(folder, device="cpu", lora=adapter).variations(
        image, "", 1, seed=5, resolution=RES, output_type="np")[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    base = InfinityPipeline.from_pretrained(folder, device="cpu").variations(image, "", 1, seed=5, resolution=RES,
                                                                             output_type="np")[0]
    assert (base != expected).any()                                   # the adapter was used
    assert json.loads(out.with_suffix(".json").read_text())["lora"] == [str(adapter)]
    with pytest.raises(SystemExit, match="--lora folder\\(s\\) not found: .*nowhere"):
        main(["variations", "--pipeline", str(folder), "--image", image, "--keep-scales", "1",
              "--lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "v2.png")])

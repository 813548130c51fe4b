"""The prediction loop: InfinityPredictor under Trainer.predict and the ImageWriter callback."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from PIL import Image
from torch.utils.data import SequentialSampler

from infinity_lightning.lit.predict import (ImageWriter, InfinityPredictor, PromptRecordDataset, prompt_dataloader,
                                            prompt_records, read_prompts_file)
from infinity_lightning.pipeline import InfinityPipeline
from infinity_lightning.sampling import SamplingConfig
from infinity_lightning.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_tiny_pipeline(tmp_path_factory.mktemp("tiny"), layout="generic")
    return InfinityPipeline.from_pretrained(folder, device="cpu")


def _trainer(out, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[ImageWriter(out, **kw)])


def test_predict_writes_one_png_and_json_per_prompt(pipe, tmp_path):
    prompts = ["a photo of a dog", {"prompt": "a cat sitting on a mat", "negative_prompt": "a blue car",
                                    "seed": 100}, "a bowl of fruit"]
    records = prompt_records(prompts, seed=40)
    assert [(r["index"], r["seed"]) for r in records] == [(0, 40), (1, 100), (2, 42)]
    module = InfinityPredictor(pipe, pipe.sampling.replace(tau=0.8), resolution=64)
    trainer = _trainer(tmp_path / "out")
    trainer.predict(module, prompt_dataloader(records, batch_size=2), return_predictions=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000000.json", "000000.png", "000001.json", "000001.png", "000002.json", "000002.png"]
    for r in records:
        written = np.asarray(Image.open(tmp_path / "out" / f"{r['index']:06d}.png"))
        direct = pipe(r["prompt"], seed=r["seed"], negative_prompt=r.get("negative_prompt"), resolution=64, tau=0.8,
                      output_type="np")[0]
        np.testing.assert_array_equal(written, direct)
        meta = json.loads((tmp_path / "out" / f"{r['index']:06d}.json").read_text())
        assert meta["prompt"] == r["prompt"] and meta["seed"] == r["seed"] and meta["index"] == r["index"]
        assert meta["settings"]["tau"] == 0.8 and meta["settings"]["cfg"] == 3.0 and meta["settings"]["resolution"] == 64
        assert (meta["width"], meta["height"]) == (64, 64) and meta.get("negative_prompt") == r.get("negative_prompt")
    # a second run into the same folder refuses to replace the files
    with pytest.raises(FileExistsError, match="000000.png already exists"):
        _trainer(tmp_path / "out").predict(module, prompt_dataloader(records[:1]), return_predictions=False)
    writer = ImageWriter(tmp_path / "out", overwrite=True)
    img = Image.new("RGB", (4, 4))
    writer.write(img, {"index": 0, "prompt": "x", "seed": 1})
    with pytest.raises(FileExistsError, match="written twice"):
        writer.write(img, {"index": 0, "prompt": "x", "seed": 1})


def test_predict_step_returns_images_and_records(pipe):
    module = InfinityPredictor(pipe, resolution=64)
    batch = {"prompt": ["a photo of a dog", "a bowl of fruit"], "seed": [3, 4], "index": [7, 8],
             "h_div_w": [1.0, 0.5]}
    out = module.predict_step(batch, 0)
    assert [r["index"] for r in out["records"]] == [7, 8]
    assert out["images"][0].size == (64, 64) and out["images"][1].size[0] > out["images"][1].size[1]
    assert out["records"][0]["settings"] == {**pipe.sampling.to_dict(), "resolution": 64}
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig, got dict"):
        InfinityPredictor(pipe, {"cfg": 2.0})
    with pytest.raises(ValueError, match="resolution 'huge'"):
        InfinityPredictor(pipe, resolution="huge")


def test_predictor_passes_one_sampling_config(pipe):
    config = SamplingConfig(cfg=1.0, tau=0.5, top_k=2)
    module = InfinityPredictor(pipe, config, resolution=64)
    assert module.sampling is config
    out = module.predict_step([{"prompt": "a photo of a dog", "seed": 6, "index": 0}])
    direct = pipe("a photo of a dog", seed=6, resolution=64, sampling=config, output_type="np")[0]
    np.testing.assert_array_equal(np.asarray(out["images"][0]), direct)
    assert (np.asarray(out["images"][0]) != pipe("a photo of a dog", seed=6, resolution=64, output_type="np")[0]).any()
    assert out["records"][0]["settings"]["tau"] == 0.5 and out["records"][0]["settings"]["cfg"] == 1.0
    long_prompt = " ".join(["a red apple on a wooden table"] * 8)
    with pytest.raises(ValueError, match="prompt 0 has .* tokens, more than the 32"):
        module.predict_step([{"prompt": long_prompt, "seed": 6, "index": 0}])
    lenient = InfinityPredictor(pipe, config, resolution=64, truncate_prompts=True)
    with pytest.warns(UserWarning, match="are cut to 32 tokens"):
        assert lenient.predict_step([{"prompt": long_prompt, "seed": 6, "index": 0}])["images"][0].size == (64, 64)


def test_records_split_across_ranks_without_repeats():
    ds = PromptRecordDataset(prompt_records([f"p{i}" for i in range(5)]))
    parts = [list(UnrepeatedDistributedSamplerWrapper(SequentialSampler(ds), num_replicas=2, rank=r, shuffle=False))
             for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="repeated indices"):
        PromptRecordDataset([{"index": 0, "prompt": "a"}, {"index": 0, "prompt": "b"}])


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a dog\n\n# comment\na cat\n")
    assert read_prompts_file(txt) == ["a dog", "a cat"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a dog", "seed": 5}\n{"text": "a cat", "h_div_w": 2.0}\n')
    recs = prompt_records(read_prompts_file(jl), seed=1, num_images_per_prompt=2)
    assert [(r["index"], r["prompt"], r["seed"], r["h_div_w"]) for r in recs] == [
        (0, "a dog", 5, 1.0), (1, "a dog", 6, 1.0), (2, "a cat", 3, 2.0), (3, "a cat", 4, 2.0)]
    jl.write_text('{"caption_missing": 1}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: expected an object"):
        read_prompts_file(jl)

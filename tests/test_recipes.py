"""Every recipe under recipes/ builds: module, DataModule, callbacks and Trainer (through the
``fit`` command's ``prepare``), with tiny stand-ins where a recipe needs weights or data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from infinity_lightning.commands.fit import prepare
from infinity_lightning.lit.var_module import BitwiseVARModule
from infinity_lightning.recipes import RecipeError, list_recipes



def _jsonl_folder(root: Path) -> Path:
    """The original on-disk layout (docs/model.md#data) with four 256 px images."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (256, 256), colour).save(root / f"{i}.png")
        lines.append(json.dumps({"image_path": f"{i}.png", "h_div_w": 1.0, "long_caption": f"a {colour} square",
                                 "text": colour}))
    (root / "1.000_000000004.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _image_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (64, 64), colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {colour} square")
    return root


def _stand_ins(name: str, tmp: Path) -> List[str]:
    """Overrides replacing the weights and data a recipe needs by tiny local files."""
    # the var recipes' preset tokenizers (random weights) are what these builds are about
    out = [f"+output_dir={tmp / 'run'}", "model.random_tokenizer=true"] if name.startswith("var/") else []
    if name in ("var/quickstart", "var/shapes_long"):
        return out + ["data.num_samples=16"]
    if name == "var/emoji":
        return out + ["data.max_emoji=16"]
    if name == "var/pretrain_layer12_256":
        # the real layer12c4 architecture; a d32 tokenizer of the tiny layout; a tiny text encoder
        return out + ["model.tokenizer=tiny", "+model.tokenizer_overrides.codebook_dim=32",
                      "+model.overrides.text_channels=64", "model.text_encoder=tiny:64",
                      f"data.data_dir={_jsonl_folder(tmp / 'jsonl')}"]
    if name == "var/finetune_2b":
        from infinity_lightning.transformer_checkpoints import save_transformer
        from tests.test_var_module import tiny_transformer

        weights = save_transformer(tiny_transformer(seed=5), tmp / "infinity_tiny.pth")
        return out + [f"model.weights={weights}", "model.tokenizer=tiny", "model.text_encoder=tiny:64",
                      f"data.data_dir={_jsonl_folder(tmp / 'jsonl')}"]
    if name in ("var/lora_quickstart", "var/lora_2b"):
        # the quick start's (or the 2B's) files: a tiny transformer and a tokenizer file
        from infinity_lightning.checkpoints import save_tokenizer
        from infinity_lightning.models.bsq_vae import BSQVAE
        from infinity_lightning.presets import tokenizer_config
        from infinity_lightning.transformer_checkpoints import save_transformer
        from tests.test_var_module import tiny_transformer

        weights = save_transformer(tiny_transformer(seed=5), tmp / "transformer.pth")
        tokenizer = save_tokenizer(BSQVAE(tokenizer_config("tiny")), tmp / "tokenizer.pth")
        data = ["data.num_samples=16"] if name == "var/lora_quickstart" else [
            f"data.data_dir={_jsonl_folder(tmp / 'jsonl')}"]
        return [f"+output_dir={tmp / 'run'}", f"model.weights={weights}", f"model.tokenizer={tokenizer}",
                "model.text_encoder=tiny:64", *data]
    if name == "tokenizer/finetune_d32_reg":
        from infinity_lightning.checkpoints import save_tokenizer
        from infinity_lightning.models.bsq_vae import BSQVAE
        from infinity_lightning.presets import tokenizer_config

        weights = save_tokenizer(BSQVAE(tokenizer_config("tiny", codebook_dim=32)), tmp / "vae_d32_tiny.pth")
        return [f"model.weights={weights}", f"data.data_dir={_image_folder(tmp / 'images')}"]
    if name in ("tokenizer/d16_256", "tokenizer/d32_256"):
        return [f"data.data_dir={_image_folder(tmp / 'images')}"]
    return []


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_builds(name, tmp_path):
    run = prepare(name, _stand_ins(name, tmp_path), output_dir=str(tmp_path / "run"), logger="none")
    assert run["kind"] == name.split("/")[0]
    assert isinstance(run["trainer"], pl.Trainer)
    assert (tmp_path / "run" / "recipe.yaml").exists()
    module = run["module"]
    if run["kind"] == "var":
        assert isinstance(module, BitwiseVARModule)
        cfg = run["cfg"]
        assert module.resolution == cfg.schedule.resolution
        assert module.cond_drop_rate == pytest.approx(cfg.module.cond_drop_rate)
        assert sum(p.requires_grad for p in module.tokenizer.parameters()) == 0
        if cfg.model.get("lora"):
            # adapters only, and checkpoints that keep only them
            from infinity_lightning.lora import is_lora_key

            trainable = [n for n, p in module.transformer.named_parameters() if p.requires_grad]
            assert trainable and all(is_lora_key(n) for n in trainable)
            assert ".lora_A.default." in trainable[0] and module.trainable_filter is not None
            assert module.transformer.block_list()[0].sa.mat_qkv.r["default"] == cfg.model.lora.rank
        else:
            assert all(p.requires_grad for p in module.transformer.parameters())
        names = {type(c).__name__ for c in run["trainer"].callbacks}
        if cfg.callbacks.self_correction is not None:
            assert "SelfCorrectionSchedule" in names
        if cfg.callbacks.ema is not None:
            assert "EMA" in names
        if cfg.callbacks.sample_logger is not None:
            assert "SampleLogger" in names
        expected = {"var/pretrain_layer12_256": (12, 768, 4), "var/quickstart": (4, 192, 1),
                    "var/emoji": (4, 192, 1), "var/finetune_2b": (2, 64, 2)}.get(name)
        assert module.transformer.attention_backend == (cfg.model.get("attention_backend") or "exact")
        if expected is not None:
            c = module.transformer.config
            assert (c.depth, c.embed_dim, c.block_chunks) == expected
        if name == "var/finetune_2b":
            # loaded weights, not a fresh init
            from tests.test_var_module import tiny_transformer

            ref = tiny_transformer(seed=5).state_dict()
            assert torch.equal(module.transformer.state_dict()["head.weight"], ref["head.weight"])
            assert module.transformer.activation_checkpointing == "full-block"
            assert run["trainer"].precision == "bf16-mixed"
            assert run["trainer"].gradient_clip_val == 5.0                  # from optim.grad_clip
        if name == "var/lora_2b":
            assert module.transformer.activation_checkpointing == "full-block"
            assert run["trainer"].precision == "bf16-mixed" and module.resolution == "1M"


def test_var_recipes_reject_unknown_and_missing_keys(tmp_path):
    with pytest.raises(RecipeError, match="model.weigths"):
        prepare("var/quickstart", ["+model.weigths=x"], output_dir=str(tmp_path), logger="none")
    with pytest.raises(RecipeError, match="callbacks.ema.decay_rate"):
        prepare("var/quickstart", ["callbacks.ema={decay_rate: 0.9}"], output_dir=str(tmp_path), logger="none")
    with pytest.raises(RecipeError, match="data.data_dir.*model.text_encoder.*model.tokenizer"):
        prepare("var/pretrain_layer12_256", [], output_dir=str(tmp_path), logger="none")
    with pytest.raises(Exception, match="drop_mismatched"):
        prepare("var/quickstart", ["model.drop_mismatched=[heads]"], output_dir=str(tmp_path), logger="none")
    with pytest.raises(RecipeError, match="model.attention_backend"):
        prepare("var/quickstart", ["model.attention_backend=flash"], output_dir=str(tmp_path), logger="none")


def test_strategy_keys_map_to_our_strategies(tmp_path):
    from infinity_lightning.recipes import build_run, load_run_recipe

    cfg, _, _ = load_run_recipe("var/quickstart", ["model.random_tokenizer=true", "trainer.max_steps=1", "+trainer.strategy=fsdp",
                                                   "model.text_encoder=null"])
    with pytest.raises(ValueError, match="fsdp2"):
        build_run(cfg, tmp_path)
    cfg, _, _ = load_run_recipe("var/quickstart", ["model.random_tokenizer=true", "+trainer.strategy=fsdp2", "optim.optimizer=adamw8bit",
                                                   "model.text_encoder=null"])
    with pytest.raises(ValueError, match="8-bit"):
        build_run(cfg, tmp_path)
    cfg, _, _ = load_run_recipe("var/quickstart", ["model.random_tokenizer=true", "+trainer.strategy=fsdp2", "+module.parallelize.mixed_precision=fp32",
                                                   "model.text_encoder=null"])
    run = build_run(cfg, tmp_path)
    assert type(run.trainer_kwargs["strategy"]).__name__ == "FSDP2Strategy"
    assert run.module.parallelize_fn is not None and run.module.parallelize_fn.keywords["mixed_precision"] == "fp32"


def test_schedule_is_stated_once_and_the_data_size_follows(tmp_path):
    from infinity_lightning.recipes import build_run, load_run_recipe

    cfg, _, _ = load_run_recipe("var/quickstart", ["model.random_tokenizer=true", "schedule.resolution=32", "model.text_encoder=null"])
    run = build_run(cfg, tmp_path)
    assert run.datamodule.image_size == 32 and run.module.schedule_for(1.0)[-1] == (1, 4, 4)
    cfg, _, _ = load_run_recipe("var/quickstart", ["model.random_tokenizer=true", "+data.image_size=32", "model.text_encoder=null"])
    with pytest.raises(RecipeError, match="data.image_size is derived from schedule.resolution"):
        build_run(cfg, tmp_path)
    cfg, _, _ = load_run_recipe("var/pretrain_layer12_256", ["model.tokenizer=tiny", "model.random_tokenizer=true",
                                                             "model.text_encoder=null",
                                                             f"data.data_dir={tmp_path}"])
    assert cfg.schedule.resolution == "0.06M"


def test_multi_node_keys_of_the_documented_launch_commands():
    """The keys docs/distributed.md uses exist in the large recipes (no '+' needed)."""
    from infinity_lightning.recipes import load_recipe

    for name in ("var/finetune_2b", "var/pretrain_layer12_256"):
        cfg = load_recipe(name, ["trainer.devices=8", "trainer.num_nodes=2", "trainer.strategy=fsdp2"])
        assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (8, 2, "fsdp2")

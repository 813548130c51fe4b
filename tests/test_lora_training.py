"""LoRA through the recipe layer: ``infinity-lightning fit`` of a tiny ``var/lora_quickstart``
(adapter-only checkpoints, exact resume, EMA of the adapters only, the adapter exported as a PEFT
folder the pipeline loads), recipe errors, the 8-bit base refused with FSDP2, the module's export
without LoRA, and a 2-process FSDP2 run resumed from an adapter-only sharded checkpoint."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinity_lightning import lora
from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer
from infinity_lightning.cli import main
from infinity_lightning.io import CheckpointError
from infinity_lightning.lit.var_module import BitwiseVARModule
from infinity_lightning.recipes import RecipeError, build_run, load_run_recipe
from infinity_lightning.transformer_checkpoints import save_transformer

from .test_transformer import tiny_text
from .test_var_module import tiny_transformer

pytest.importorskip("peft")

TINY = ["schedule.resolution=32", "data.num_samples=8", "data.batch_size=4", "optim.warmup_steps=0",
        "model.lora.rank=4", "callbacks.sample_logger=null", "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.ema={decay: 0.5}", "callbacks.lr_monitor=false", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Stand-ins for the quick start's exported transformer and tokenizer."""
    root = tmp_path_factory.mktemp("lora_files")
    from infinity_lightning.models.bsq_vae import BSQVAE
    from infinity_lightning.presets import tokenizer_config

    torch.manual_seed(0)
    return {"weights": save_transformer(tiny_transformer(seed=5), root / "transformer.pth"),
            "tokenizer": save_tokenizer(BSQVAE(tokenizer_config("tiny")), root / "tokenizer.pth")}


def overrides(files, *extra):
    return [f"model.weights={files['weights']}", f"model.tokenizer={files['tokenizer']}",
            "model.text_encoder=tiny:64", *TINY, *extra]


def adapters_of(checkpoint) -> dict:
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("transformer.")}


def test_lora_recipe_fits_resumes_and_exports_an_adapter_the_pipeline_loads(files, tmp_path, capsys):
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(["fit", "var/lora_quickstart", *overrides(files, "trainer.max_steps=3"), "--output-dir",
                 str(straight), "--logger", "none"]) == 0
    step2 = straight / "checkpoints" / "epoch=0-step=2.ckpt"
    first = torch.load(step2, map_location="cpu", weights_only=False)
    saved = adapters_of(first)
    # adapter-only checkpoints: no base weight, no frozen tokenizer or text encoder
    assert saved and all(lora.is_lora_key(k) for k in saved) and not any(
        k.startswith(("tokenizer.", "text_encoder.")) for k in first["state_dict"])
    n_adapter = sum(v.numel() for v in saved.values())
    assert n_adapter == 2 * 1472 * 4                                   # rank 4 on the tiny model's 2 blocks
    # the EMA averages the adapters only
    assert set(first["ema_state"]["weights"]) == {k[len("transformer."):] for k in saved}

    # resumed from step 2 (the frozen weights come from model.weights), the third step is the same
    assert main(["fit", "var/lora_quickstart", *overrides(files, "trainer.max_steps=3"), "--output-dir", str(out),
                 "--logger", "none", "--ckpt-path", str(step2)]) == 0
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    uninterrupted = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == uninterrupted["global_step"] == 3
    for k, v in adapters_of(uninterrupted).items():
        assert torch.equal(adapters_of(resumed)[k], v), k
        assert not torch.equal(v, saved[k]), k                          # the third step moved every adapter
    averages = uninterrupted["ema_state"]["weights"]
    assert all(torch.equal(resumed["ema_state"]["weights"][k], v) for k, v in averages.items())
    assert "transformer exported to" in capsys.readouterr().out

    # <output_dir>/lora is PEFT's layout and holds the trained weights; the pipeline loads it
    from infinity_lightning.models.text_encoder import TextEncoder
    from infinity_lightning.pipeline import InfinityPipeline

    folder = out / "lora"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    pipe = InfinityPipeline(load_transformer(files["weights"]), load_tokenizer(files["tokenizer"]),
                            TextEncoder.from_pretrained(out / "tiny_t5_64"), device="cpu", resolution=32)
    x = torch.randint(0, 2, (2, 4, 16), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    with torch.no_grad():
        base = pipe.transformer(tiny_text(2, 64), x, [(1, 1, 1), (1, 2, 2)])
    assert pipe.load_lora(folder) == "default"
    loaded = lora.lora_state_dict(pipe.transformer)
    for k, v in adapters_of(resumed).items():
        assert torch.equal(loaded[k[len("transformer."):].replace(".default.", ".")], v), k
    with torch.no_grad():
        assert not torch.equal(pipe.transformer(tiny_text(2, 64), x, [(1, 1, 1), (1, 2, 2)]), base)
    assert len(pipe("a pink circle", seed=0, output_type="np").images) == 1


def test_adapter_checkpoints_refuse_other_adapters_and_keep_trained_biases(files, tmp_path):
    cfg, _, _ = load_run_recipe("var/lora_quickstart", overrides(files))
    module = build_run(cfg, tmp_path / "a").module
    checkpoint = {"state_dict": module.trainable_filter(
        {f"transformer.{k}": v for k, v in module.transformer.state_dict().items()})}
    assert checkpoint["state_dict"] and all(lora.is_lora_key(k) for k in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)                               # the frozen rest is filled in
    assert set(checkpoint["state_dict"]) >= {f"transformer.{k}" for k in module.transformer.state_dict()}

    cfg, _, _ = load_run_recipe("var/lora_quickstart", overrides(files, "model.lora.targets=[ffn.fc1]",
                                                                 "model.lora.bias=lora_only"))
    other = build_run(cfg, tmp_path / "b").module
    kept = other.trainable_filter({f"transformer.{k}": v for k, v in other.transformer.state_dict().items()})
    biases = sorted(k for k in kept if not lora.is_lora_key(k))
    assert biases == ["transformer.block_chunks.0.module.0.ffn.fc1.base_layer.bias",
                      "transformer.block_chunks.1.module.0.ffn.fc1.base_layer.bias"]
    with pytest.raises(CheckpointError, match="LoRA checkpoint does not match the module: the module has no LoRA "
                                              "layers for"):
        other.on_load_checkpoint({"state_dict": dict(checkpoint["state_dict"])})


@pytest.mark.parametrize("extra,message", [
    (["model.lora.rank=0"], r"model.lora: LoraSettings.rank must be an integer >= 1"),
    (["model.lora.targets=[sa.nope]"], r"model.lora: LoRA target 'sa.nope' matches no module"),
    (["+model.lora.ranks=4"], r"unknown key 'model.lora.ranks'"),
    (["model.lora.quantize_base=8bit", "+trainer.strategy=fsdp2"],
     r"model.lora.quantize_base=8bit cannot be used with trainer.strategy=fsdp2: int8 base weights"),
])
def test_lora_recipe_errors_name_the_key(files, tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        cfg, _, _ = load_run_recipe("var/lora_quickstart", overrides(files, *extra))
        build_run(cfg, tmp_path)


def test_eight_bit_base_builds_without_fsdp2(files, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg, _, _ = load_run_recipe("var/lora_quickstart", overrides(files, "model.lora.quantize_base=8bit"))
    module = build_run(cfg, tmp_path).module
    layer = module.transformer.block_list()[0].ffn.fc1
    assert type(layer.get_base_layer()).__name__ == "Linear8bitLt"
    assert all(lora.is_lora_key(n) for n, p in module.transformer.named_parameters() if p.requires_grad)


def test_export_without_lora_writes_the_transformer(tmp_path):
    module = BitwiseVARModule(tiny_transformer(seed=3), None, None, resolution=None)
    paths = module.export(tmp_path)
    assert paths == [tmp_path / "transformer.safetensors"] and (tmp_path / "transformer.json").exists()
    reloaded = load_transformer(paths[0]).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in module.transformer.state_dict().items())
    assert not (tmp_path / "lora").exists()


# ---------------------------------------------------------------------------------------------
# FSDP2: adapter-only sharded checkpoints resume (one 2-process launch, about 60 s on 2 cores)
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_fit")
    script = Path(__file__).resolve().parent / "distributed" / "lora_fit.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out


def test_fsdp2_resumes_from_an_adapter_only_sharded_checkpoint(fsdp_run):
    import torch.distributed.checkpoint as dcp

    straight = torch.load(fsdp_run / "uninterrupted.pt", weights_only=False)
    resumed = torch.load(fsdp_run / "resumed.pt", weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["base_unchanged"] and all(lora.is_lora_key(n) for n in straight["trainable"])
    # the sharded checkpoint holds the adapters and their EMA averages, nothing of the base
    keys = [k for k in dcp.FileSystemReader(str(fsdp_run / "ckpt" / "epoch=0.ckpt")).read_metadata().state_dict_metadata
            if k.startswith("state_dict.")]
    assert len(keys) == 2 * len(straight["trainable"]) and all(lora.is_lora_key(k) for k in keys)
    for k, v in straight["adapters"].items():
        assert torch.equal(resumed["adapters"][k], v), k
    for k, v in straight["ema"].items():
        assert torch.equal(resumed["ema"][k], v), k
    # the exported adapter (gathered from the shards) loads into a plain transformer
    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
    try:
        import tiny_setup
    finally:
        sys.path.pop(0)
    model = tiny_setup.make_transformer()
    lora.load_lora(model, fsdp_run / "export" / "lora")
    for k, v in lora.lora_state_dict(model).items():
        assert torch.equal(v, resumed["adapters"][k.replace(".lora_A.", ".lora_A.default.")
                                                  .replace(".lora_B.", ".lora_B.default.")]), k


def test_fsdp2_refuses_a_checkpoint_without_the_trained_parameters(fsdp_run):
    error = json.loads((fsdp_run / "refused.json").read_text())["error"]
    assert error.startswith("CheckpointError: checkpoint ") and "lacks 97 trained parameter(s)" in error
    assert "transformer.block_chunks.0.module.0.ada_gss" in error


def test_fsdp2_export_without_lora_gathers_the_whole_transformer(fsdp_run):
    weights = torch.load(fsdp_run / "full.pt", weights_only=False)
    exported = load_transformer(fsdp_run / "full" / "transformer.safetensors").state_dict()
    assert set(exported) <= set(weights)
    assert all(torch.equal(v, weights[k]) for k, v in exported.items())

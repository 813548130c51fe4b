"""LoRA fine-tuning through PEFT on the tiny transformer: trainable parameters, training, PEFT
files, scales, several adapters, unloading, merged export, Lightning checkpoint filtering, 8-bit
base weights, and a 2-process FSDP2 / DDP run.

The tiny preset: width C = 64, FFN width F = 256, 2 blocks (in 2 chunks).  Per block and rank r
the default targets add r * (in + out) parameters each::

    sa.mat_qkv 64 -> 192: 256 r    sa.proj 64 -> 64: 128 r     ca.mat_q 64 -> 64: 128 r
    ca.mat_kv  64 -> 128: 192 r    ca.proj 64 -> 64: 128 r     ffn.fc1 64 -> 256: 320 r
    ffn.fc2   256 -> 64:  320 r                                 block: 1472 r, model: 2944 r
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from infinity_lightning import lora
from infinity_lightning.checkpoints import load_transformer, save_transformer
from infinity_lightning.io import CheckpointError

from .test_transformer import randomize, tiny_text

pytest.importorskip("peft")

SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]          # 21 tokens
#: (in, out) of the default targets in one tiny block
TINY_TARGET_SHAPES = {"sa.mat_qkv": (64, 192), "sa.proj": (64, 64), "ca.mat_q": (64, 64), "ca.mat_kv": (64, 128),
                      "ca.proj": (64, 64), "ffn.fc1": (64, 256), "ffn.fc2": (256, 64)}
TINY_BLOCKS = ("block_chunks.0.module.0", "block_chunks.1.module.0")
SETTINGS = lora.LoraSettings(rank=4, alpha=8)


def tiny(seed: int = 0, **overrides) -> nn.Module:
    """The tiny transformer with every path active (the training init leaves the blocks silent)."""
    return randomize(load_transformer("tiny", cond_drop_rate=0.0, **overrides), seed).eval()


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (2, 20, 16), generator=g).float() * 2 - 1
    return tiny_text(2, 64), x


def run(model: nn.Module, seed: int = 3) -> torch.Tensor:
    text, x = inputs(seed)
    with torch.no_grad():
        return model(text, x, SCHEDULE)


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2) -> list:
    """AdamW on a toy loss (the mean squared logit) over the trainable parameters."""
    text, x = inputs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(text, x, SCHEDULE).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One adapter trained for three steps and saved: its folder, the base and adapted outputs."""
    model = tiny()
    base = run(model)
    torch.manual_seed(0)
    lora.add_lora(model, SETTINGS)
    losses = train_steps(model)
    folder = lora.save_lora(model, tmp_path_factory.mktemp("lora") / "adapter")
    return {"folder": folder, "base": base, "adapted": run(model), "losses": losses,
            "lora_state": lora.lora_state_dict(model)}


# ---------------------------------------------------------------------------------------------
# injection and training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4])
def test_only_the_adapters_train_with_hand_counted_sizes(rank):
    model = tiny()
    total_before = sum(p.numel() for p in model.parameters())
    counts = lora.add_lora(model, lora.LoraSettings(rank=rank, alpha=rank))
    expected = len(TINY_BLOCKS) * sum(rank * (i + o) for i, o in TINY_TARGET_SHAPES.values())
    assert expected == 2944 * rank
    assert counts.trainable == expected
    assert counts.total == total_before + expected
    assert counts.layers == 14
    assert sorted(counts.targets) == sorted(f"{b}.{t}" for b in TINY_BLOCKS for t in TINY_TARGET_SHAPES)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    for b in TINY_BLOCKS:
        for t, (i, o) in TINY_TARGET_SHAPES.items():
            assert trainable[f"{b}.{t}.lora_A.default.weight"] == (rank, i)
            assert trainable[f"{b}.{t}.lora_B.default.weight"] == (o, rank)
    # the text path and the head are neither adapted nor trainable
    assert type(model.head) is nn.Linear and type(model.text_proj_for_sos.ca.mat_kv) is nn.Linear
    assert not model.head.weight.requires_grad and not model.cfg_uncond.requires_grad


def test_bias_modes_count_the_biases_by_hand():
    # per block: sa.proj, ca.mat_q, ca.proj, fc2 (64 each), fc1 (256), sa.q_bias, sa.v_bias, ca.v_bias (64 each)
    adapted_biases = 2 * (4 * 64 + 256 + 3 * 64)
    model = tiny()
    assert lora.add_lora(model, lora.LoraSettings(rank=1, bias="lora_only")).trainable == 2944 + adapted_biases
    # "all" adds each block's ca_norm.bias (64) and the biases outside the blocks: the text pool's
    # v_bias and proj.bias, text_proj_for_ca.0/.2, word_embed (64 each), shared_ada_lin (6 x 64),
    # head_nm.ada_lin (2 x 64), head (2 x 16)
    outside = 5 * 64 + 6 * 64 + 2 * 64 + 2 * 16
    model = tiny()
    counts = lora.add_lora(model, lora.LoraSettings(rank=1, bias="all"))
    assert counts.trainable == 2944 + adapted_biases + 2 * 64 + outside
    assert model.head.bias.requires_grad and not model.head.weight.requires_grad


def test_zero_initialised_b_keeps_outputs_and_training_changes_only_adapters():
    model = tiny()
    base = run(model)
    base_params = {id(p): p.detach().clone() for p in model.parameters()}
    lora.add_lora(model, SETTINGS)
    # B = 0 adds exact zeros; the bias of the fused q/k/v product is added after the product,
    # which is the same sum for these widths: the outputs are identical, not just close.
    assert torch.equal(run(model), base)
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    adapted = run(model)
    assert (adapted - base).abs().max() > 0.1
    kept = [p for p in model.parameters() if id(p) in base_params]
    assert len(kept) == len(base_params)
    for p in kept:
        assert torch.equal(p, base_params[id(p)])
    moved = [n for n, p in model.named_parameters() if ".lora_B." in n and p.abs().max() > 0]
    assert len(moved) == 14


def test_training_with_activation_checkpointing_gives_the_same_step():
    plain, ckpt = tiny(), tiny()
    torch.manual_seed(1)
    lora.add_lora(plain, SETTINGS)
    torch.manual_seed(1)
    lora.add_lora(ckpt, SETTINGS)
    ckpt.set_activation_checkpointing("full-block")
    assert train_steps(plain, 2) == train_steps(ckpt, 2)
    recomputed = lora.lora_state_dict(ckpt)
    for n, a in lora.lora_state_dict(plain).items():
        assert torch.equal(a, recomputed[n]), n


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def test_saved_folder_is_peft_format(trained):
    folder = trained["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name      # 0644 under the usual umask
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none" and config["init_lora_weights"] is True
    pattern = config["target_modules"]
    model = tiny()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(n for n in linears if re.fullmatch(pattern, n)) == sorted(
        f"{b}.{t}" for b in TINY_BLOCKS for t in TINY_TARGET_SHAPES)
    assert re.fullmatch(pattern, "blocks.7.ffn.fc2")                      # the other nesting too
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {}
    for b in TINY_BLOCKS:
        for t, (i, o) in TINY_TARGET_SHAPES.items():
            expected[f"{b}.{t}.lora_A.weight"] = (4, i)
            expected[f"{b}.{t}.lora_B.weight"] = (o, 4)
    assert keys == expected


def test_save_then_load_into_a_fresh_model_is_exact(trained):
    model = tiny()
    name = lora.load_lora(model, trained["folder"])
    assert name == "default"
    assert torch.equal(run(model), trained["adapted"])
    assert lora.lora_adapters(model) == {"default": {"rank": 4, "alpha": 8.0, "scale": 1.0, "active": True,
                                                     "trainable": False, "layers": 14}}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0  # loaded for inference
    # the adapter's safetensors file may be named directly
    other = tiny()
    lora.load_lora(other, trained["folder"] / "adapter_model.safetensors", trainable=True)
    assert sum(p.numel() for p in other.parameters() if p.requires_grad) == 2944 * 4


def test_peft_loads_the_folder_with_its_own_functions(trained):
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = tiny()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(trained["folder"])), model)
    result = set_peft_model_state_dict(model, load_file(str(trained["folder"] / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert torch.equal(run(model), trained["adapted"])


def test_adapter_loads_across_block_nestings_and_peft_model_prefixes(trained, tmp_path):
    # blocks.{i} instead of block_chunks.{c}.module.{j}: randomize draws the same numbers in the same order
    flat = tiny(block_chunks=1)
    assert "blocks.1.sa.mat_qkv.weight" in flat.state_dict()
    lora.load_lora(flat, trained["folder"])
    assert torch.equal(run(flat), trained["adapted"])
    # PeftModel.save_pretrained prefixes every key with base_model.model.
    from safetensors.torch import load_file, save_file

    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    sd = load_file(str(trained["folder"] / "adapter_model.safetensors"))
    save_file({"base_model.model." + k: v for k, v in sd.items()}, str(prefixed / "adapter_model.safetensors"))
    (prefixed / "adapter_config.json").write_text((trained["folder"] / "adapter_config.json").read_text())
    model = tiny()
    lora.load_lora(model, prefixed)
    assert torch.equal(run(model), trained["adapted"])


# ---------------------------------------------------------------------------------------------
# scales and several adapters
# ---------------------------------------------------------------------------------------------
def test_scale_zero_is_base_and_half_is_in_between(trained):
    model = tiny()
    lora.load_lora(model, trained["folder"], scale=0.0)
    assert torch.equal(run(model), trained["base"])
    layer = model.block_list()[0].ffn.fc1
    lora.set_lora_scale(model, "default", 1.0)
    full = layer.get_delta_weight("default").clone()
    assert torch.equal(run(model), trained["adapted"])
    lora.set_lora_scale(model, "default", 0.5)
    assert torch.equal(layer.get_delta_weight("default"), 0.5 * full)
    assert layer.scaling["default"] == 0.5 * 8 / 4
    half = run(model)
    to_base = float((half - trained["base"]).norm())
    to_full = float((half - trained["adapted"]).norm())
    span = float((trained["adapted"] - trained["base"]).norm())
    assert 0.2 * span < to_base < 0.8 * span and 0.2 * span < to_full < 0.8 * span
    assert lora.lora_adapters(model)["default"]["scale"] == 0.5


def test_two_adapters_side_by_side(trained):
    model = tiny()
    torch.manual_seed(7)
    lora.add_lora(model, lora.LoraSettings(rank=2, alpha=2, init="random", targets=("ffn.fc1", "head")), "second")
    second_only = run(model)
    second_state = lora.lora_state_dict(model, "second")
    first = lora.load_lora(model, trained["folder"], adapter_name="first")
    assert set(lora.lora_adapters(model)) == {"second", "first"}
    assert all(a["active"] for a in lora.lora_adapters(model).values())
    assert lora.lora_adapters(model)["second"]["trainable"] and not lora.lora_adapters(model)["first"]["trainable"]
    both = run(model)
    assert (both - trained["adapted"]).abs().max() > 1e-3 and (both - second_only).abs().max() > 1e-3

    lora.set_adapters(model, [first])
    assert torch.equal(run(model), trained["adapted"])
    assert lora.lora_adapters(model)["second"]["active"] is False
    lora.set_adapters(model, ["first", "second"], [1.0, 0.0])
    assert torch.equal(run(model), trained["adapted"])
    lora.set_adapters(model, ["second", "first"], [1.0, 1.0])   # the updates add up in this order
    assert torch.equal(run(model), both)

    # merging both into the weights reproduces the two adapters' sum
    merged = tiny()
    lora.load_lora(merged, trained["folder"], adapter_name="first")
    torch.manual_seed(7)
    lora.add_lora(merged, lora.LoraSettings(rank=2, alpha=2, init="random", targets=("ffn.fc1", "head")), "second")
    for k, v in lora.lora_state_dict(merged, "second").items():
        assert torch.equal(v, second_state[k]), k
    assert lora.merge_lora(merged) == ["first", "second"]
    torch.testing.assert_close(run(merged), both, rtol=0, atol=1e-5 * float(both.abs().max()))

    # removing one adapter leaves exactly the other
    lora.unload_lora(model, "second")
    assert list(lora.lora_adapters(model)) == ["first"]
    assert not any(".second." in k for k in model.state_dict())
    assert torch.equal(run(model), trained["adapted"])


def test_adapters_on_the_fast_attention_path_and_on_bf16_blocks(trained):
    fast = tiny()
    lora.load_lora(fast, trained["folder"])
    fast.set_attention_backend("fast")
    scale = float(trained["adapted"].abs().max())
    torch.testing.assert_close(run(fast), trained["adapted"], rtol=0, atol=1e-5 * scale)

    half = tiny().cast_blocks(torch.bfloat16)          # the released inference setting
    counts = lora.add_lora(half, SETTINGS, adapter_name="fresh")
    assert {p.dtype for n, p in half.named_parameters() if p.requires_grad} == {torch.float32}
    assert counts.trainable == 2944 * 4
    lora.unload_lora(half)
    lora.load_lora(half, trained["folder"])
    assert {p.dtype for n, p in half.named_parameters() if lora.is_lora_key(n)} == {torch.float32}
    text, x = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = half(text, x, SCHEDULE).float()
    # bf16 blocks alone move the tiny model's logits by about 7e-3 (relative)
    assert float((adapted - trained["adapted"]).norm() / trained["adapted"].norm()) < 3e-2
    lora.merge_lora(half)
    assert half.block_list()[0].ffn.fc1.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        merged = half(text, x, SCHEDULE).float()
    assert float((merged - adapted).norm() / adapted.norm()) < 2e-2   # the update rounded into bf16 weights


# ---------------------------------------------------------------------------------------------
# unload and merge
# ---------------------------------------------------------------------------------------------
def test_unload_restores_the_exact_base_model(trained):
    model = tiny()
    keys = list(model.state_dict())
    model.head.weight.requires_grad_(False)   # a choice made before LoRA survives it
    lora.add_lora(model, SETTINGS)
    train_steps(model, 1)
    lora.load_lora(model, trained["folder"], adapter_name="loaded")
    lora.unload_lora(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(run(model), trained["base"])
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("mat_qkv", "fc1", "proj")))
    assert not hasattr(model, "peft_config")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["head.weight"]
    # and the model takes a new adapter afterwards
    assert lora.add_lora(model, SETTINGS).trainable == 2944 * 4


def test_merge_then_released_export_gives_the_adapted_outputs(trained, tmp_path):
    model = tiny()
    keys = list(model.state_dict())
    lora.load_lora(model, trained["folder"])
    assert lora.merge_lora(model) == ["default"]
    assert list(model.state_dict()) == keys
    assert type(model.block_list()[0].sa.mat_qkv) is nn.Linear
    merged = run(model)
    scale = float(trained["adapted"].abs().max())
    torch.testing.assert_close(merged, trained["adapted"], rtol=0, atol=1e-5 * scale)
    assert (merged - trained["base"]).abs().max() > 0.1
    path = save_transformer(model, tmp_path / "merged.pth", format="released")
    reloaded = load_transformer(path)
    assert list(reloaded.state_dict()) == keys
    assert torch.equal(run(reloaded), merged)


# ---------------------------------------------------------------------------------------------
# adapter-only Lightning checkpoints
# ---------------------------------------------------------------------------------------------
def test_checkpoint_filter_keeps_only_adapters_and_restore_fills_the_rest():
    model = tiny()
    lora.add_lora(model, SETTINGS)
    train_steps(model, 1)
    module_sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    saved = lora.lora_checkpoint_filter(module_sd)
    assert len(saved) == 28 and all(".lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == 2944 * 4
    kept = lora.lora_checkpoint_filter(module_sd, keep=["transformer.head.bias"])
    assert set(kept) == set(saved) | {"transformer.head.bias"}

    configs = lora.lora_configs(model)
    assert list(configs) == ["default"] and configs["default"]["r"] == 4 and configs["default"]["peft_type"] == "LORA"
    json.dumps(configs)                       # storable in a checkpoint as it is

    fresh = tiny()
    lora.add_lora(fresh, SETTINGS)
    current = {f"transformer.{k}": v for k, v in fresh.state_dict().items()}
    restored = lora.lora_checkpoint_restore(saved, current)
    assert list(restored) != [] and set(restored) == set(current)
    fresh.load_state_dict({k[len("transformer."):]: v for k, v in restored.items()}, strict=True)
    assert torch.equal(run(fresh), run(model))

    with pytest.raises(CheckpointError, match="lacks 1 LoRA keys") as err:
        lora.lora_checkpoint_restore({k: v for k, v in list(saved.items())[1:]}, current)
    assert "\n" not in str(err.value)
    plain = {f"transformer.{k}": v for k, v in tiny().state_dict().items()}
    with pytest.raises(CheckpointError, match="call add_lora with the same settings"):
        lora.lora_checkpoint_restore(saved, plain)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_targets_name_themselves_and_the_available_linears():
    model = tiny()
    with pytest.raises(ValueError) as err:
        lora.add_lora(model, lora.LoraSettings(targets=("sa.mat_qkv", "sa.qkv")))
    message = _one_line(err)
    assert "'sa.qkv' matches no module" in message
    assert "Linears in every block: sa.mat_qkv, sa.proj, ca.mat_q, ca.mat_kv, ca.proj, ffn.fc1, ffn.fc2" in message
    assert "head" in message and "text_proj_for_ca.0" in message
    with pytest.raises(ValueError, match="'ffn' is a FFN, not a Linear"):
        lora.add_lora(model, lora.LoraSettings(targets=("ffn",)))
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"rank": 2.0}, "rank must be an integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"targets": ()}, "targets is empty"),
    ({"targets": ("sa.mat_qkv", "sa.mat_qkv")}, "more than once"),
    ({"targets": ("sa.*",)}, "is not a module name"),
    ({"bias": "some"}, "bias must be one of"),
    ({"init": "pissa"}, "init must be one of"),
])
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraSettings(**kwargs)


def test_adapter_names_and_unknown_adapters_are_refused():
    model = tiny()
    lora.add_lora(model, SETTINGS)
    with pytest.raises(ValueError, match="already in the transformer"):
        lora.add_lora(model, SETTINGS)
    with pytest.raises(ValueError, match="identifier"):
        lora.add_lora(model, SETTINGS, adapter_name="a.b")
    with pytest.raises(KeyError, match="no LoRA adapter 'style'.*default"):
        lora.set_lora_scale(model, "style", 0.5)
    with pytest.raises(ValueError, match="2 adapter names but 1 weights"):
        lora.set_adapters(model, ["default", "default"], [1.0])
    with pytest.raises(ValueError, match="first adapter"):
        lora.add_lora(model, SETTINGS, adapter_name="other", quantize_base="8bit")
    with pytest.raises(ValueError, match="quantize_base must be one of"):
        lora.add_lora(tiny(), SETTINGS, quantize_base="4bit")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.merge_lora(tiny())


def test_bad_adapter_files_give_clear_errors(trained, tmp_path):
    model = tiny()
    with pytest.raises(CheckpointError, match="LoRA adapter folder not found") as err:
        lora.load_lora(model, tmp_path / "missing")
    _one_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no adapter_config.json"):
        lora.load_lora(model, empty)
    (empty / "adapter_config.json").write_text((trained["folder"] / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no adapter_model.safetensors"):
        lora.load_lora(model, empty)
    # a transformer export in place of the adapter weights
    save_transformer(tiny(), empty / "adapter_model.safetensors", format="safetensors")
    with pytest.raises(CheckpointError, match="is not a LoRA adapter: .* are no lora_A/lora_B weights") as err:
        lora.load_lora(model, empty)
    _one_line(err)
    # a config that is not LoRA
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="not a LoRA adapter config .*IA3"):
        lora.load_lora(model, other)
    (other / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        lora.load_lora(model, other)
    # an adapter trained on another width: refused, and the model is left as it was
    keys = list(model.state_dict())
    wide = randomize(load_transformer("tiny", embed_dim=128, num_heads=2, cond_drop_rate=0.0))
    lora.add_lora(wide, SETTINGS)
    lora.save_lora(wide, tmp_path / "wide")
    with pytest.raises(CheckpointError, match="does not match this transformer: shape mismatches") as err:
        lora.load_lora(model, tmp_path / "wide")
    _one_line(err)
    assert list(model.state_dict()) == keys and not hasattr(model, "peft_config")
    assert torch.equal(run(model), trained["base"])


def test_missing_peft_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'infinity-lightning[lora]'")):
        lora.add_lora(tiny(), SETTINGS)


# ---------------------------------------------------------------------------------------------
# 8-bit base weights
# ---------------------------------------------------------------------------------------------
def test_eight_bit_base_trains_saves_and_merges_on_cpu(trained, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny()
    keys = list(model.state_dict())
    base = run(model)
    torch.manual_seed(0)
    counts = lora.add_lora(model, SETTINGS, quantize_base="8bit")
    assert counts.trainable == 2944 * 4
    layer = model.block_list()[0].ffn.fc1
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt) and layer.base_layer.weight.dtype == torch.int8
    assert type(layer).__module__ == "peft.tuners.lora.bnb"       # PEFT's bitsandbytes LoRA layer
    assert type(model.head) is nn.Linear                            # untargeted layers stay fp32
    start = run(model)
    assert float((start - base).norm() / base.norm()) < 2e-2        # int8 rounding only
    int8 = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.int8}
    assert len(int8) == 14
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in int8:
            assert torch.equal(p, int8[n]), n
    adapted = run(model)
    # On CPU bitsandbytes multiplies by the dequantized weight in training mode, and quantizes the
    # activations to int8 too in eval mode (LLM.int8: about 5e-3 relative per layer).
    model.train()
    adapted_dequantized = run(model)
    model.eval()
    assert float((adapted_dequantized - adapted).norm() / adapted.norm()) < 2e-2
    # the adapter file is the same format as on an fp32 base, and loads there
    lora.save_lora(model, tmp_path / "q")
    fp32 = tiny()
    lora.load_lora(fp32, tmp_path / "q")
    assert float((run(fp32) - adapted).norm() / adapted.norm()) < 2e-2
    # merged: fp32 Linears holding the dequantized weight plus the update, released keys
    lora.merge_lora(model)
    assert list(model.state_dict()) == keys
    fc1 = model.block_list()[0].ffn.fc1
    assert type(fc1) is nn.Linear and fc1.weight.dtype == torch.float32
    merged = run(model)
    torch.testing.assert_close(merged, adapted_dequantized, rtol=0, atol=1e-5 * float(merged.abs().max()))


# ---------------------------------------------------------------------------------------------
# FSDP2 and DDP (one 2-process launch, about 40 s on 2 cores)
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_parallel")
    script = Path(__file__).resolve().parent / "distributed" / "lora_parallel.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out, torch.load(out / "lora_parallel.pt", map_location="cpu", weights_only=False)


def _relative_to_update(run_sd, ref_sd, init_sd) -> float:
    worst = 0.0
    for k, ref in ref_sd.items():
        update = float((ref - init_sd[k]).norm())
        assert update > 0, k
        worst = max(worst, float((run_sd[k] - ref).norm()) / update)
    return worst


def test_fsdp2_and_ddp_train_the_adapter_like_one_process(parallel_run):
    out, r = parallel_run
    assert r["trainable"] == 2 * 2944 * 4                         # 4 blocks
    single = torch.tensor(r["single_losses"])
    assert single[-1] < single[0]
    for name in ("fsdp", "ddp"):
        torch.testing.assert_close(torch.tensor(r[f"{name}_losses"]), single, rtol=1e-5, atol=0)
        assert set(r[f"{name}_lora"]) == set(r["single_lora"])
        # the cross-attention's bf16 roundings differ between a batch of 2 and of 4 (see
        # test_distributed.py); a wrong gradient reduction would be off by O(1)
        assert _relative_to_update(r[f"{name}_lora"], r["single_lora"], r["initial_lora"]) < 5e-3, name
    assert r["fsdp_lora_params_sharded"] and r["fsdp_base_unchanged"]
    # the adapter saved under FSDP2 (gathered, written by rank 0) loads into a plain model
    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
    try:
        import lora_parallel
    finally:
        sys.path.pop(0)
    model = lora_parallel.make_transformer()
    lora.load_lora(model, out / "fsdp_adapter")
    for k, v in lora.lora_state_dict(model).items():
        assert torch.equal(v, r["fsdp_lora"][k]), k


def test_adapters_go_in_before_sharding_or_ddp(parallel_run):
    _, r = parallel_run
    assert "already sharded with FSDP2" in r["after_shard_error"] and "before parallelize()" in r["after_shard_error"]
    assert "not the DDP wrapper" in r["ddp_wrapper_error"]

"""Tokenizer loading and export: released layout, safetensors, plain names, strict errors."""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

import pytest
import torch

from infinity_lightning.checkpoints import (canonical_tokenizer_key, infer_tokenizer_config, load_tokenizer,
                                            save_tokenizer)
from infinity_lightning.io import CheckpointError, StateDictMismatchError
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.presets import TokenizerConfig, tokenizer_config

SMALL = TokenizerConfig(codebook_dim=8, base_ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, patch_size=4, norm_groups=8)
#: Released GroupNorm rule ("auto"): 24 channels -> 24 groups, 48 -> 24.
AUTO = TokenizerConfig(codebook_dim=16, base_ch=24, ch_mult=(1, 2, 1), num_res_blocks=1, patch_size=4)


def _random_vae(cfg, seed=0):
    torch.manual_seed(seed)
    vae = BSQVAE(cfg)
    with torch.no_grad():  # non-trivial norms so that a wrongly loaded norm would show
        for name, p in vae.named_parameters():
            if ".norm." in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


def _outputs(vae, x):
    with torch.no_grad():
        return vae(x, [(1, 1, 1), (1, 2, 2), (1, 4, 4)])


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_released_layout_and_reload(tmp_path):
    vae = _random_vae(SMALL)
    path = save_tokenizer(vae, tmp_path / "tok.pth")
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"vae", "tokenizer_config"}
    assert list(obj["vae"]) == list(vae.state_dict())
    assert "quantizer.lfq.mask" in obj["vae"] and "quantize.lfq.mask" in obj["vae"]
    assert obj["vae"]["encoder.conv_in.conv.weight"].shape == (16, 3, 3, 3)
    loaded = load_tokenizer(path)
    assert loaded.config == SMALL  # norm_groups=8 comes back from the stored config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_model(vae, loaded)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    r1, b1 = _outputs(vae, x)
    r2, b2 = _outputs(loaded, x)
    assert torch.equal(r1, r2) and all(torch.equal(p, q) for p, q in zip(b1, b2))


def test_save_safetensors_and_reload(tmp_path):
    vae = _random_vae(SMALL, seed=1)
    path = save_tokenizer(vae, tmp_path / "tok.safetensors")
    from safetensors.torch import load_file

    flat = load_file(str(path))
    assert set(flat) == set(vae.state_dict())
    loaded = load_tokenizer(path)
    assert loaded.config == SMALL
    _assert_same_model(vae, loaded)


def test_export_format_flag_overrides_suffix(tmp_path):
    vae = _random_vae(AUTO)
    path = save_tokenizer(vae, tmp_path / "tok.bin", format="safetensors")
    from safetensors.torch import load_file

    assert "decoder.conv_out.conv.weight" in load_file(str(path))
    with pytest.raises(ValueError, match="unknown tokenizer export format"):
        save_tokenizer(vae, tmp_path / "x.pth", format="onnx")


def test_architecture_is_inferred_from_a_plain_state_dict(tmp_path):
    vae = _random_vae(AUTO, seed=2)
    torch.save(vae.state_dict(), tmp_path / "plain.pth")  # no {"vae": ...}, no stored config
    loaded = load_tokenizer(tmp_path / "plain.pth")
    assert loaded.config == AUTO
    _assert_same_model(vae, loaded)


def test_plain_ldm_names_without_masks_load(tmp_path):
    vae = _random_vae(AUTO, seed=3)
    plain = OrderedDict()
    for k, v in vae.state_dict().items():
        if k.endswith("lfq.mask"):
            continue
        plain[k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
               .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")] = v
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    assert "decoder.norm_out.weight" in plain
    torch.save({"vae": plain, "step": 10}, tmp_path / "ldm.pth")
    loaded = load_tokenizer(tmp_path / "ldm.pth")
    _assert_same_model(vae, loaded)
    assert loaded.state_dict()["quantize.lfq.mask"][0] == 2 ** 15


def test_key_canonicalisation():
    assert canonical_tokenizer_key("encoder.conv_in.weight") == "encoder.conv_in.conv.weight"
    assert canonical_tokenizer_key("encoder.conv_in.conv.weight") == "encoder.conv_in.conv.weight"
    assert canonical_tokenizer_key("decoder.up.1.upsample.conv.bias") == "decoder.up.1.upsample.conv.conv.bias"
    assert canonical_tokenizer_key("decoder.up.1.upsample.conv.conv.bias") == "decoder.up.1.upsample.conv.conv.bias"
    assert canonical_tokenizer_key("encoder.down.1.block.0.nin_shortcut.weight") == \
        "encoder.down.1.block.0.nin_shortcut.conv.weight"
    assert canonical_tokenizer_key("encoder.mid.block_1.norm2.bias") == "encoder.mid.block_1.norm2.norm.bias"
    assert canonical_tokenizer_key("quantizer.lfq.mask") == "quantizer.lfq.mask"


def test_one_mask_alias_is_enough(tmp_path):
    vae = _random_vae(AUTO, seed=4)
    sd = vae.state_dict()
    del sd["quantize.lfq.mask"]
    torch.save({"vae": sd}, tmp_path / "one_mask.pth")
    _assert_same_model(vae, load_tokenizer(tmp_path / "one_mask.pth"))


def test_missing_key_is_an_error_naming_file_and_key(tmp_path):
    sd = _random_vae(AUTO).state_dict()
    del sd["decoder.mid.block_2.conv1.conv.weight"]
    path = tmp_path / "missing.pth"
    torch.save({"vae": sd}, path)
    with pytest.raises(StateDictMismatchError) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "missing keys (1): decoder.mid.block_2.conv1.conv.weight" in str(e.value)


def test_unexpected_key_is_an_error(tmp_path):
    sd = _random_vae(AUTO).state_dict()
    sd["decoder.mid.attn_1.q.conv.weight"] = torch.zeros(48, 48, 1, 1)
    path = tmp_path / "extra.pth"
    torch.save({"vae": sd}, path)
    with pytest.raises(StateDictMismatchError, match=re.escape("unexpected keys (1): decoder.mid.attn_1.q.conv.weight")):
        load_tokenizer(path)


def test_wrong_shape_from_an_override_is_an_error(tmp_path):
    path = save_tokenizer(_random_vae(AUTO), tmp_path / "tok.pth")
    # the file stores its architecture: the override is refused before any shape is compared
    with pytest.raises(CheckpointError, match=r"the override codebook_dim=32 \(the file has 16\) contradicts it"):
        load_tokenizer(path, codebook_dim=32)
    # without a stored architecture (inferred from the shapes), the shapes disagree
    obj = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({"vae": obj["vae"]}, tmp_path / "bare.pth")
    with pytest.raises(StateDictMismatchError, match=r"encoder.conv_out.conv.weight: file \(16, 24, 3, 3\) vs model \(32, 24, 3, 3\)"):
        load_tokenizer(tmp_path / "bare.pth", codebook_dim=32)


def test_transformer_file_gets_a_pointer_to_load_transformer(tmp_path):
    path = tmp_path / "infinity_2b_reg.pth"
    torch.save(OrderedDict([("cfg_uncond", torch.zeros(4, 8)), ("pos_start", torch.zeros(1, 1, 8)),
                            ("block_chunks.0.module.0.sa.mat_qkv.weight", torch.zeros(24, 8))]), path)
    with pytest.raises(CheckpointError, match="looks like an Infinity transformer") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "load_transformer" in str(e.value)


def test_not_a_tokenizer_and_unknown_name():
    with pytest.raises(CheckpointError, match="neither an existing file nor a known preset"):
        load_tokenizer("no_such_tokenizer")


def test_preset_gives_random_frozen_fp32_model():
    vae = load_tokenizer("d56", base_ch=32, ch_mult=(1, 1, 1, 1))  # alias of d56_f8_14_patchify, shrunk
    assert vae.config == dataclasses.replace(tokenizer_config("d56_f8_14_patchify"), base_ch=32, ch_mult=(1, 1, 1, 1))
    assert not vae.training and all(p.dtype == torch.float32 and not p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("name", ["d32", "d56_f8_14_patchify"])
def test_released_architectures_are_inferred(name):
    cfg = tokenizer_config(name)
    with torch.device("meta"):
        sd = BSQVAE(cfg).state_dict()
    assert infer_tokenizer_config(sd) == cfg  # includes spatial_patchify for the 8B tokenizer


def test_lightning_checkpoint_with_prefix(tmp_path):
    vae = _random_vae(AUTO, seed=5)
    sd = {f"tokenizer.{k}": v for k, v in vae.state_dict().items()}
    sd["discriminator.conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "epoch": 1, "global_step": 3}, tmp_path / "last.ckpt")
    _assert_same_model(vae, load_tokenizer(tmp_path / "last.ckpt"))

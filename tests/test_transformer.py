"""Transformer presets, loading, KV-cached inference, spatial patchify and negative prompts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from infinity_lightning import scales
from infinity_lightning.checkpoints import (infer_transformer_config, load_tokenizer, load_transformer,
                                            save_transformer)
from infinity_lightning.io import CheckpointError, StateDictMismatchError, atomic_save
from infinity_lightning.models.infinity import InfinityTransformer
from infinity_lightning.presets import transformer_config
from infinity_lightning.sampling import ForceBits, generate
from infinity_lightning.self_correction import teacher_forcing_inputs

from .conftest import REPO_ROOT

MANIFESTS = REPO_ROOT.parent / "shared" / "reference" / "manifests"


@pytest.mark.parametrize("preset,manifest", [("2b", "infinity_2b_reg"), ("8b", "infinity_8b"),
                                             ("layer12c4", "infinity_layer12c4"), ("layer24c4", "infinity_layer24c4")])
def test_preset_state_dict_matches_release_manifest(preset, manifest):
    ref = json.loads((MANIFESTS / f"{manifest}.json").read_text())
    with torch.device("meta"):
        model = InfinityTransformer(transformer_config(preset))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in ref["state_dict"]]
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == ref["n_parameters"]
    assert transformer_config(preset).ffn_hidden == ref["derived"]["ffn_hidden"]


def test_ffn_width_uses_half_to_even_rounding():
    assert transformer_config("layer32").ffn_hidden == 8192     # 32.5 -> 32
    assert transformer_config("layer48").ffn_hidden == 13312    # 52.5 -> 52
    assert transformer_config("20b").block_chunks == 1


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Weights with every path active (random init leaves the blocks nearly silent)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(fan_in))
            if name.endswith("scale_mul_1H11"):
                p.copy_(math.log(4) + 0.3 * torch.randn(p.shape, generator=g))
            if name.endswith("ada_gss"):
                p.mul_(0.3)
    return model


def tiny_text(B: int, width: int, lens=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = lens or [3 + 2 * i for i in range(B)]
    kv = 0.5 * torch.randn(sum(lens), width, generator=g)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    return (kv, torch.tensor(lens), cu, max(lens))


def _setup(preset: str, tokenizer_preset: str, size: int, seed: int = 0):
    model = randomize(InfinityTransformer(transformer_config(preset, cond_drop_rate=0.0)), seed).eval()
    vae = load_tokenizer(tokenizer_preset)
    torch.manual_seed(seed)
    images = torch.rand(2, 3, size, size) * 2 - 1
    return model, vae, images


@pytest.mark.parametrize("preset,tok", [("tiny", "tiny"), ("tiny_patchify", "tiny_f8")])
def test_kv_cached_logits_equal_teacher_forced_logits(preset, tok):
    model, vae, images = _setup(preset, tok, 64)
    patchify = model.config.apply_spatial_patchify
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]                 # 64 px images for both tokenizers
    vae_schedule = scales.as_schedule(schedule, patchify).tokenizer_side
    with torch.no_grad():
        raw = vae.encode_raw(images)
    tf = teacher_forcing_inputs(raw, vae_schedule, patchify=patchify)
    text = tiny_text(2, model.config.text_channels)
    with torch.no_grad():
        logits = model(text, tf.inputs, schedule)
    forced = tf.labels_per_scale(schedule)
    out = generate(model, text, schedule, cfg=1.0, tau=1.0, top_k=1, top_p=0.0,
                   hooks=[ForceBits(forced)], return_logits=True, seed=0)
    offsets = scales.as_schedule(schedule).offsets
    for k in range(len(schedule)):
        per_scale = logits[:, offsets[k]:offsets[k + 1]].reshape(2, -1, 2)
        assert torch.allclose(out.logits[k], per_scale, atol=2e-5, rtol=1e-5), k
    assert logits.abs().max() > 0.1  # the comparison is not between near-zero tensors


def test_patchify_bit_order_matches_pixel_unshuffle():
    """Token channel 4c + 2dy + dx holds latent channel c at sub-position (dy, dx) (docs/model.md#the-transformer)."""
    vae = load_tokenizer("tiny_f8")
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    vae_schedule = scales.as_schedule(schedule, True).tokenizer_side
    with torch.no_grad():
        raw = vae.encode_raw(images)
    patch = teacher_forcing_inputs(raw, vae_schedule, patchify=True)
    plain = teacher_forcing_inputs(raw, vae_schedule, patchify=False)   # same VAE-side loop, unpatchified
    d = vae.config.codebook_dim
    for k, ((_, h, w), lab_p, lab_v) in enumerate(zip(schedule, patch.labels_per_scale(schedule),
                                                      plain.labels_per_scale(vae_schedule))):
        grid = lab_v.reshape(2, 2 * h, 2 * w, d)
        for c in (0, d - 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    expect = grid[:, dy::2, dx::2, c].reshape(2, h * w)
                    assert torch.equal(lab_p[:, :, 4 * c + 2 * dy + dx], expect)
    # the next-scale inputs are the same numbers, rearranged
    sizes_p = [h * w for _, h, w in schedule[1:]]
    sizes_v = [h * w for _, h, w in vae_schedule[1:]]
    for (_, h, w), xp, xv in zip(schedule[1:], patch.inputs.split(sizes_p, 1), plain.inputs.split(sizes_v, 1)):
        v = xv.transpose(1, 2).reshape(2, d, 2 * h, 2 * w)
        assert torch.equal(F.pixel_unshuffle(v, 2).reshape(2, 4 * d, h * w).transpose(1, 2), xp)
    assert patch.inputs.shape[-1] == 4 * d


def test_patchify_generation_sums_codes_on_the_doubled_grid():
    model, vae, images = _setup("tiny_patchify", "tiny_f8", 64, seed=3)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    vae_schedule = scales.as_schedule(schedule, True).tokenizer_side
    text = tiny_text(2, model.config.text_channels)
    out = generate(model, text, schedule, tokenizer=vae, cfg=[1.0, 3.0, 2.0], tau=1.0, seed=5)
    assert [tuple(b.shape) for b in out.bit_labels] == [(2, 1, 2, 2, 16), (2, 1, 4, 4, 16), (2, 1, 8, 8, 16)]
    assert torch.allclose(out.summed_codes, vae.codes_from_bits(out.bit_labels, vae_schedule), atol=1e-6)
    assert out.images.shape == (2, 3, 64, 64)
    # the token bits are the pixel-unshuffled labels
    lab = out.bit_labels[-1].squeeze(1).permute(0, 3, 1, 2)
    tok = F.pixel_unshuffle(lab.float(), 2).reshape(2, 64, 16).transpose(1, 2)
    assert torch.equal(tok.to(torch.uint8), out.token_bits[-1])


def test_negative_prompt_packing_and_guidance_modes():
    model, vae, _ = _setup("tiny", "tiny", 64, seed=4)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    text = tiny_text(2, model.config.text_channels, lens=[3, 5])
    kw = dict(cfg=3.0, tau=1.0, top_k=1, top_p=0.0, return_logits=True, seed=0)
    base = generate(model, text, schedule, **kw)
    # the learned null condition passed explicitly as a negative prompt: identical result
    null = model.null_text([3, 5]).detach()
    same = generate(model, text, schedule, negative_text=(null, None, text[2], 5), **kw)
    for a, b in zip(base.logit_diff, same.logit_diff):
        assert torch.equal(a, b)
    # a different negative prompt (with its own lengths) changes the logits
    neg = tiny_text(2, model.config.text_channels, lens=[2, 6], seed=9)
    other = generate(model, text, schedule, negative_text=neg, **kw)
    assert max((a - b).abs().max() for a, b in zip(base.logit_diff, other.logit_diff)) > 1e-3
    # guidance on hidden states after the last layer differs from guidance on logits; cfg 1 = none
    hidden = generate(model, text, schedule, cfg_insertion_layer=-1, **kw)
    assert max((a - b).abs().max() for a, b in zip(base.logit_diff, hidden.logit_diff)) > 1e-4
    plain = generate(model, text, schedule, **{**kw, "cfg": 1.0})
    plain_h = generate(model, text, schedule, cfg_insertion_layer=-1, **{**kw, "cfg": 1.0})
    for a, b in zip(plain.logit_diff, plain_h.logit_diff):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cfg_insertion_layer"):
        generate(model, text, schedule, cfg_insertion_layer=1, **kw)


def test_sampling_is_seeded_and_top_p_forces_confident_bits():
    model, _, _ = _setup("tiny", "tiny", 64, seed=5)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    text = tiny_text(2, model.config.text_channels)
    a = generate(model, text, schedule, cfg=2.0, tau=1.0, top_k=900, top_p=0.97, seed=11, return_logits=True)
    b = generate(model, text, schedule, cfg=2.0, tau=1.0, top_k=900, top_p=0.97, seed=11)
    c = generate(model, text, schedule, cfg=2.0, tau=1.0, top_k=900, top_p=0.97, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a.token_bits, b.token_bits))
    assert any(not torch.equal(x, y) for x, y in zip(a.token_bits, c.token_bits))
    # a bit whose other value has probability <= 0.03 is always the likely one
    for diff, bits in zip(a.logit_diff, a.token_bits):
        confident = diff.abs() > math.log(0.97 / 0.03) + 1e-3
        assert torch.equal(bits[confident].bool(), (diff[confident] > 0))


def test_loader_formats_and_errors(tmp_path):
    model = randomize(InfinityTransformer(transformer_config("tiny")), 1)
    sd = model.state_dict()
    # released flat layout
    save_transformer(model, tmp_path / "flat.pth")
    loaded = load_transformer(tmp_path / "flat.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert loaded.config.depth == 2 and loaded.config.block_chunks == 2
    # safetensors
    save_transformer(model, tmp_path / "m.safetensors", format="safetensors")
    assert torch.equal(load_transformer(tmp_path / "m.safetensors").head.weight, model.head.weight)
    # original training checkpoint, without the zero_k_bias buffers, with a shorter cfg_uncond
    trimmed = {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}
    trimmed["cfg_uncond"] = sd["cfg_uncond"][:10]
    atomic_save({"trainer": {"gpt_fsdp": trimmed}, "epoch": 1}, tmp_path / "ar-ckpt.pth")
    resumed = load_transformer(tmp_path / "ar-ckpt.pth", config="tiny")
    assert torch.equal(resumed.cfg_uncond[:10], sd["cfg_uncond"][:10])
    assert resumed.cfg_uncond.shape == sd["cfg_uncond"].shape
    # blocks.{i} keys load into a chunked model and vice versa
    flat_keys = {k.replace("block_chunks.0.module.0.", "blocks.0.").replace("block_chunks.1.module.0.", "blocks.1."): v
                 for k, v in sd.items()}
    atomic_save(flat_keys, tmp_path / "blocks.pth")
    assert torch.equal(load_transformer(tmp_path / "blocks.pth", config="tiny").block_list()[1].sa.proj.weight,
                       model.block_list()[1].sa.proj.weight)
    # sharded safetensors folder with an index (8B release layout)
    from safetensors.torch import save_file
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = [k for k in sd if not k.endswith("zero_k_bias")]
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(shard_dir / name))
        weight_map.update({k: name for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(load_transformer(shard_dir, config="tiny").word_embed.weight, model.word_embed.weight)
    # strictness: an unexpected key and a missing key are listed with the file name
    bad = dict(sd)
    bad["extra.weight"] = torch.zeros(1)
    del bad["head.bias"]
    atomic_save(bad, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError) as e:
        load_transformer(tmp_path / "bad.pth", config="tiny")
    assert "bad.pth" in str(e.value) and "extra.weight" in str(e.value) and "head.bias" in str(e.value)
    # a tokenizer file is recognised
    from infinity_lightning.checkpoints import save_tokenizer
    save_tokenizer(load_tokenizer("tiny"), tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_transformer(tmp_path / "vae.pth")


def test_architecture_is_inferred_from_shapes():
    with torch.device("meta"):
        sd = InfinityTransformer(transformer_config("layer12c4")).state_dict()
    cfg = infer_transformer_config(sd)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.block_chunks, cfg.tokenizer) == (12, 768, 8, 4, "d32")
    with torch.device("meta"):
        sd8 = InfinityTransformer(transformer_config("8b")).state_dict()
    cfg8 = infer_transformer_config(sd8)
    assert cfg8.apply_spatial_patchify and cfg8.codebook_dim == 14 and cfg8.tokenizer == "d56_f8_14_patchify"


def test_text_dropout_uses_the_null_condition():
    model = randomize(InfinityTransformer(transformer_config("tiny")), 2).eval()
    text = tiny_text(2, model.config.text_channels, lens=[3, 4])
    x = torch.randn(2, 4, model.config.bits_per_token)
    schedule = [(1, 1, 1), (1, 2, 2)]
    with torch.no_grad():
        dropped = model(text, x, schedule, cond_drop_mask=torch.tensor([True, False]))
        null_text = (torch.cat([model.cfg_uncond[:3], text[0][3:]]), text[1], text[2], 4)
        explicit = model(null_text, x, schedule)
        kept = model(text, x, schedule)
    assert torch.equal(dropped, explicit)
    assert torch.equal(dropped[1], kept[1])
    assert (dropped[0] - kept[0]).abs().max() > 1e-4


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(InfinityTransformer(transformer_config("tiny", drop_path_rate=0.0)), 3).train()
    text = tiny_text(2, model.config.text_channels)
    x = torch.randn(2, 4, model.config.bits_per_token)
    schedule = [(1, 1, 1), (1, 2, 2)]
    grads = []
    for mode in (None, "full-block"):
        model.zero_grad()
        model.set_activation_checkpointing(mode)
        model(text, x, schedule).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lightning_checkpoint_with_ema_weights(tmp_path):
    model = randomize(InfinityTransformer(transformer_config("tiny")), 6)
    sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    ema = {k: v + 1.0 for k, v in model.state_dict().items() if not k.endswith("zero_k_bias")}
    ckpt = {"state_dict": {**sd, "__ema__.head.weight": ema["head.weight"]},
            "ema_state": {"weights": ema, "attribute": "transformer", "decay": 0.99}}
    atomic_save(ckpt, tmp_path / "last.ckpt")
    plain = load_transformer(tmp_path / "last.ckpt", config="tiny")
    averaged = load_transformer(tmp_path / "last.ckpt", config="tiny", use_ema=True)
    assert torch.equal(plain.head.weight, model.head.weight)
    assert torch.equal(averaged.head.weight, model.head.weight + 1.0)
    atomic_save({"state_dict": sd}, tmp_path / "no_ema.ckpt")
    with pytest.raises(CheckpointError, match="EMA"):
        load_transformer(tmp_path / "no_ema.ckpt", config="tiny", use_ema=True)


def test_prompt_longer_than_text_maxlen_is_refused():
    model = InfinityTransformer(transformer_config("tiny")).eval()      # text_maxlen 32
    text = tiny_text(2, model.config.text_channels, lens=[5, 40])
    with pytest.raises(ValueError, match="text_maxlen=32"):
        generate(model, text, [(1, 1, 1), (1, 2, 2)], cfg=3.0, seed=0)
    with pytest.raises(ValueError, match="40 text tokens"):
        model(text, torch.zeros(2, 4, 16), [(1, 1, 1), (1, 2, 2)])


def test_bf16_blocks_under_autocast_follow_fp32():
    """The released inference casts the blocks to bf16 and runs under bf16 autocast."""
    model = randomize(InfinityTransformer(transformer_config("tiny")), 7).eval()
    text = tiny_text(2, model.config.text_channels)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    ref = generate(model, text, schedule, cfg=3.0, tau=1.0, top_k=1, top_p=0.0, seed=0, return_logits=True)
    model.cast_blocks(torch.bfloat16)
    assert model.block_list()[0].sa.mat_qkv.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, text, schedule, cfg=3.0, tau=1.0, top_k=1, top_p=0.0, seed=0, return_logits=True)
    first = (out.logit_diff[0] - ref.logit_diff[0]).abs().max()
    assert first < 0.1 * ref.logit_diff[0].abs().max() and torch.isfinite(out.summed_codes).all()


def test_config_file_beside_the_weights_fixes_what_shapes_cannot_tell(tmp_path):
    """Fields the tensors do not show (dropout rates) come from the <name>.json save_transformer writes."""
    model = InfinityTransformer(transformer_config("tiny", cond_drop_rate=0.0, drop_path_rate=0.05))
    save_transformer(model, tmp_path / "m.pth")
    loaded = load_transformer(tmp_path / "m.pth")
    assert (loaded.config.cond_drop_rate, loaded.config.drop_path_rate) == (0.0, 0.05)
    (tmp_path / "m.json").unlink()
    inferred = load_transformer(tmp_path / "m.pth")
    assert inferred.config.cond_drop_rate == transformer_config("tiny").cond_drop_rate == 0.1

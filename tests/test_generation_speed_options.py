"""Generation options that trade exactness for speed: int8 linears (``quantize="int8"``) and
guidance switched off on the last scales (``cfg_schedule="unguided_last:N"`` with
``skip_uncond``).  Their speed and quality on real sizes are measured by
``benchmarks/transformer.py --cases generation`` (benchmarks/README.md)."""

import pytest
import torch

from infinity_lightning.models import fast_attention
from infinity_lightning.sampling import SamplingConfig, generate

from .test_fast_paths import SCHEDULE, _small
from .test_transformer import tiny_text


def _agreement(a, b) -> float:
    same = sum(int((x == y).sum()) for x, y in zip(a.token_bits, b.token_bits))
    return same / sum(x.numel() for x in a.token_bits)


def test_int8_generation_tracks_fp32_and_leaves_the_model_as_it_was():
    model = _small(seed=11).eval()
    text = tiny_text(2, model.config.text_channels, lens=[5, 8])
    blocks = model.block_list()
    kw = dict(cfg=3.0, tau=1.0, top_k=900, top_p=0.97, seed=[1, 2], return_logits=True)
    ref = generate(model, text, SCHEDULE, **kw)
    got = generate(model, text, SCHEDULE, quantize="int8", **kw)
    # the first scale sees the same inputs: its logits move by the int8 rounding only
    scale0 = (got.logit_diff[0] - ref.logit_diff[0]).abs().max() / ref.logit_diff[0].abs().max()
    assert 0 < scale0 < 0.1
    assert _agreement(got, ref) > 0.8
    # the blocks are restored, without KV caches; the quantised copies are kept for the next call
    assert all(a is b for a, b in zip(model.block_list(), blocks))
    assert all(b.sa.kv_cache is None for b in model.block_list())
    copies = model.__dict__["_int8_blocks"][1]
    assert isinstance(copies[0].ffn.fc1, torch.ao.nn.quantized.dynamic.Linear)
    again = generate(model, text, SCHEDULE, quantize="int8", **kw)
    assert model.__dict__["_int8_blocks"][1] is copies
    assert all(torch.equal(a, b) for a, b in zip(again.token_bits, got.token_bits))
    # a weight update rebuilds them
    with torch.no_grad():
        model.block_list()[0].ffn.fc1.weight.mul_(2.0)
    generate(model, text, SCHEDULE, quantize="int8", num_scales=1, **kw)
    assert model.__dict__["_int8_blocks"][1] is not copies


def test_int8_copies_follow_the_attention_switches():
    model = _small(seed=12).eval()
    model.set_attention_backend("fast", kernel="sdpa")
    copies = fast_attention.int8_blocks(model)
    assert copies[0].sa.fast_path and copies[0].sa.kernel == "sdpa"
    model.set_attention_backend("exact", kernel="gemm")
    copies = fast_attention.int8_blocks(model)
    assert not copies[0].sa.fast_path and copies[0].sa.kernel == "gemm"


def test_int8_option_is_validated():
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        SamplingConfig(quantize="int4")
    with pytest.raises(ValueError, match="cannot be combined with dtype"):
        SamplingConfig(quantize="int8", dtype="bf16")
    model = _small(seed=13).eval()
    text = tiny_text(1, model.config.text_channels, lens=[4])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        generate(model, text, SCHEDULE, quantize="int8", seed=0)
    assert model.attention_backend == "exact"


def test_unguided_last_scales_equal_an_explicit_cfg_list_and_skip_the_unconditional_half():
    config = SamplingConfig(cfg=3.0, cfg_schedule="unguided_last:2")
    assert config.per_scale(5)["cfg"] == [3.0, 3.0, 3.0, 1.0, 1.0]
    assert SamplingConfig(cfg=3.0, cfg_schedule="unguided_last:0").per_scale(3)["cfg"] == [3.0] * 3
    with pytest.raises(ValueError, match="unguided_last:N"):
        SamplingConfig(cfg_schedule="unguided_last:two")
    model = _small(seed=14).eval()
    text = tiny_text(2, model.config.text_channels, lens=[4, 7])
    kw = dict(tau=1.0, top_k=900, top_p=0.97, seed=5)
    listed = generate(model, text, SCHEDULE, cfg=[3.0, 3.0, 3.0, 1.0, 1.0], **kw)
    named = generate(model, text, SCHEDULE, cfg=3.0, cfg_schedule="unguided_last:2", **kw)
    skipped = generate(model, text, SCHEDULE, cfg=3.0, cfg_schedule="unguided_last:2", skip_uncond=True, **kw)
    for a, b, c in zip(listed.token_bits, named.token_bits, skipped.token_bits):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_fast_generation_computes_the_text_keys_once_with_the_same_values(monkeypatch):
    model = _small(seed=15).eval()
    text = tiny_text(2, model.config.text_channels, lens=[4, 7])
    kw = dict(cfg=[3.0, 3.0, 3.0, 1.0, 1.0], tau=1.0, top_k=900, top_p=0.97, seed=3, return_logits=True,
              fast=True, skip_uncond=True)
    calls = []
    kv = type(model.block_list()[0].ca).kv
    width = model.config.embed_dim         # the blocks' memory (the text pool reads the raw text once)
    monkeypatch.setattr(type(model.block_list()[0].ca), "kv",
                        lambda self, m: (m.shape[-1] == width and calls.append(m.shape)) or kv(self, m))
    cached = generate(model, text, SCHEDULE, **kw)
    # per block: once for both halves (scales 0-2), once for the conditional half (scales 3-4)
    assert len(calls) == 2 * model.depth
    assert all(b.ca.text_kv is None for b in model.block_list())
    monkeypatch.setattr(type(model), "kv_caching", _kv_caching_without_text_cache)
    calls.clear()
    plain = generate(model, text, SCHEDULE, **kw)
    assert len(calls) == len(SCHEDULE) * model.depth
    for a, b in zip(cached.logit_diff, plain.logit_diff):
        assert torch.equal(a, b)
    # under inference mode (tensors without a version counter) the cache works the same
    monkeypatch.undo()
    with torch.inference_mode():
        inferred = generate(model, text, SCHEDULE, **kw)
    for a, b in zip(cached.logit_diff, inferred.logit_diff):
        assert torch.equal(a, b)


def _kv_caching_without_text_cache(self, enabled, capacity=None):
    for block in self.block_list():
        block.sa.kv_cache = (fast_attention.KVBuffer(capacity) if capacity is not None else []) if enabled else None
        block.ca.text_kv = None

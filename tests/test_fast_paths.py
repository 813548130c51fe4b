"""The fast paths compute what the exact path computes, within stated tolerances.

Tolerances (measured on these configurations, fp32; see benchmarks/README.md):

* parity fixture model (0.06M schedule, L = 521): fast vs exact logits 3.2e-5 with the bf16
  rounding of the cross-attention kept (the default), 2.5e-2 with it dropped (the exact path
  rounds to bf16 there; skipping the casts moves them by 2.5e-2 to 5e-2, models/numerics.py);
* a randomised model with every path active (logits up to 10): 6e-4 logits, 1.5e-5 gradients
  (largest gradient 7).
"""

import pytest
import torch

from infinity_lightning import scales
from infinity_lightning.checkpoints import load_tokenizer, load_transformer
from infinity_lightning.models import fast_attention, numerics
from infinity_lightning.models.infinity import InfinityTransformer
from infinity_lightning.presets import transformer_config
from infinity_lightning.sampling import generate

from .parity.helpers import assert_parity, load, max_err, text_tuple
from .test_transformer import randomize, tiny_text

SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]   # L = 121, padded to 128


def _small(seed: int = 3, drop_path: float = 0.0) -> InfinityTransformer:
    torch.manual_seed(seed)
    return randomize(InfinityTransformer(transformer_config("small", drop_path_rate=drop_path)), seed)


def _run(model, mode, text, x, schedule, bf16_ca=True, backward=True):
    model.set_attention_backend(mode, cross_attention_bf16=bf16_ca)
    model.zero_grad(set_to_none=True)
    logits = model(text, x, schedule)
    grads = None
    if backward:
        logits.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


def test_block_causal_layout_covers_the_mask_exactly():
    schedule = scales.resolve("0.06M", 1.0)
    layout = fast_attention.block_causal_layout(schedule)
    L = schedule.num_tokens
    dense = numerics.block_causal_mask(schedule, L)
    covered = torch.zeros(L, L, dtype=torch.bool)
    for (qs, qe), mask in zip(layout.groups, layout.masks):
        covered[qs:qe, :qe] = True if mask is None else mask
    assert torch.equal(covered, dense)
    assert layout.groups[0][0] == 0 and layout.groups[-1][1] == L
    assert layout.useful_pairs() == int(dense.sum())
    # 186,177 scores instead of 640^2 = 409,600 (the useful pairs are 181,689)
    assert sum((qe - qs) * qe for qs, qe in layout.groups) < 0.46 * 640 ** 2


def test_block_causal_attention_equals_masked_sdpa():
    torch.manual_seed(0)
    layout = fast_attention.block_causal_layout(SCHEDULE)
    q, k, v = (torch.randn(2, 3, 121, 16, dtype=torch.float64) for _ in range(3))
    mask = numerics.block_causal_mask(SCHEDULE, 121)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    assert max_err(layout.attend(q, k, v), ref) < 1e-12


@pytest.mark.parametrize("chunk,save", [(1 << 24, 1 << 25), (2 * 3 * 40, 1 << 25), (2 * 3 * 40, 0)])
def test_gemm_block_causal_attention_equals_masked_sdpa_with_gradients(monkeypatch, chunk, save):
    """The "gemm" kernel, whole groups or cut into query chunks, probabilities kept or recomputed
    in backward: forward and all three gradients equal masked SDPA's (float64)."""
    monkeypatch.setattr(fast_attention, "GEMM_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(fast_attention, "GEMM_SAVE_ELEMENTS", save)
    torch.manual_seed(0)
    layout = fast_attention.block_causal_layout(SCHEDULE, backend="gemm")
    if chunk < 1 << 24:
        assert len(fast_attention._gemm_chunks(layout, 6, torch.device("cpu"))) > len(layout.groups)
    mask = numerics.block_causal_mask(SCHEDULE, 121)
    q, k, v = (torch.randn(2, 3, 121, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 121, 16, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = layout.attend(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert max_err(out, ref) < 1e-12
    for a, b in zip(grads, ref_grads):
        assert max_err(a, b) < 1e-12
    with torch.no_grad():                      # the inference path (no autograd function)
        assert max_err(layout.attend(q, k, v), ref) < 1e-12


def test_gemm_attention_in_bf16_tracks_fp32_like_sdpa():
    """bf16 inputs: scores and softmax in fp32, p v in bf16; as close to the fp32 result as
    SDPA's own bf16 kernel, in forward and backward."""
    torch.manual_seed(1)
    layout = fast_attention.block_causal_layout(SCHEDULE, backend="gemm")
    mask = numerics.block_causal_mask(SCHEDULE, 121)
    q, k, v = (torch.randn(2, 3, 121, 16) for _ in range(3))
    q = torch.nn.functional.normalize(q, dim=-1) * 8     # cosine attention with temperature 8
    k = torch.nn.functional.normalize(k, dim=-1)
    grad = torch.randn(2, 3, 121, 16)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out.float()] + [g.float() for g in torch.autograd.grad(out, leaves, grad.to(dtype))]

    sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask, scale=1.0)  # noqa: E731
    ref = run(sdpa, torch.float32)
    for got, sdpa_bf16 in zip(run(layout.attend, torch.bfloat16), run(sdpa, torch.bfloat16)):
        assert got.dtype == torch.float32
    errors = [max_err(a, r) for a, r in zip(run(layout.attend, torch.bfloat16), ref)]
    sdpa_errors = [max_err(a, r) for a, r in zip(run(sdpa, torch.bfloat16), ref)]
    for e, e_sdpa, r in zip(errors, sdpa_errors, ref):
        assert e < 2 * e_sdpa + 1e-3 * r.abs().max()


@pytest.mark.parametrize("kernel", ["sdpa", "gemm"])
def test_fast_path_kernels_match_exact(kernel):
    model = _small(seed=9).train()
    model.set_attention_backend("fast", kernel=kernel)
    assert model.self_attention_kernel == kernel
    text = tiny_text(2, model.config.text_channels, lens=[5, 9])
    x = torch.randn(2, scales.as_schedule(SCHEDULE).num_tokens - 1, model.config.bits_per_token)
    exact, g_exact = _run(model, "exact", text, x, SCHEDULE)
    fast, g_fast = _run(model, "fast", text, x, SCHEDULE)
    assert model.self_attention_kernel == kernel      # set_attention_backend keeps the kernel
    assert max_err(fast, exact) < 2e-3
    assert max_err(g_fast, g_exact) < 1e-4 * g_exact.abs().max()
    with pytest.raises(ValueError, match="kernel"):
        model.set_attention_backend("fast", kernel="cuda-graphs")
    model.set_attention_backend("exact", kernel="auto")
    assert fast_attention.resolve_kernel("auto", torch.device("cpu")) == "gemm"
    assert fast_attention.resolve_kernel("auto", torch.device("meta")) == "sdpa"


def test_rope_and_normalisation_keep_the_exact_roundings():
    torch.manual_seed(0)
    qk = torch.randn(2, 121, 2, 4, 16)
    cos, sin = numerics.rope_cos_sin(SCHEDULE, 16)
    scale_mul = torch.rand(4) * 4
    fast = fast_attention.apply_rope_fused(fast_attention.cosine_qk(qk, scale_mul), cos, sin)
    q = torch.nn.functional.normalize(qk[:, :, 0].transpose(1, 2), dim=-1).mul(scale_mul[:, None, None])
    k = torch.nn.functional.normalize(qk[:, :, 1].transpose(1, 2), dim=-1)
    assert torch.equal(fast[:, :, 0].transpose(1, 2), numerics.apply_rope(q, cos, sin))
    assert torch.equal(fast[:, :, 1].transpose(1, 2), numerics.apply_rope(k, cos, sin))


def test_fast_training_path_matches_exact_logits_and_gradients():
    model = _small().train()
    text = tiny_text(2, model.config.text_channels, lens=[5, 9])
    x = torch.randn(2, scales.as_schedule(SCHEDULE).num_tokens - 1, model.config.bits_per_token)
    exact, g_exact = _run(model, "exact", text, x, SCHEDULE)
    fast, g_fast = _run(model, "fast", text, x, SCHEDULE)
    fast32, g_fast32 = _run(model, "fast", text, x, SCHEDULE, bf16_ca=False)
    assert exact.abs().max() > 1.0
    assert max_err(fast, exact) < 2e-3
    assert max_err(g_fast, g_exact) < 1e-4 * g_exact.abs().max()
    # dropping the bf16 rounding of the cross-attention is a real numerical change
    assert 2e-3 < max_err(fast32, exact) < 5e-2
    assert model.attention_backend == "fast"
    model.set_fast_path(False)
    assert model.attention_backend == "exact" and not model.fast_path


def test_fast_path_on_parity_fixture(parity_path, single_thread):
    model = load_transformer(parity_path / "infinity.pth")
    inputs, case = load(parity_path, "inputs.pth"), load(parity_path, "b_teacher_forcing.pth")
    model.set_fast_path(True)
    with torch.no_grad():
        logits = model(text_tuple(inputs), case["x_BLC_wo_prefix"], case["scale_schedule"])
    assert_parity(logits, case["logits"], "fast-path logits", tol=2e-4)   # measured 3.2e-5 (AVX-512)
    assert "block_causal_layout" not in model.state_dict()   # the switch is not state


def test_fast_path_under_bf16_autocast_tracks_exact():
    model = _small().train()
    text = tiny_text(2, model.config.text_channels, lens=[5, 9])
    x = torch.randn(2, scales.as_schedule(SCHEDULE).num_tokens - 1, model.config.bits_per_token)
    out = {}
    for mode in ("exact", "fast"):
        model.set_attention_backend(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[mode] = model(text, x, SCHEDULE).detach()
    ref, _ = _run(model, "exact", text, x, SCHEDULE, backward=False)
    # both bf16 runs are equally far from fp32; they agree with each other to bf16 rounding
    assert max_err(out["fast"], out["exact"]) < 0.1 * ref.abs().max()
    assert abs(max_err(out["fast"], ref) - max_err(out["exact"], ref)) < 0.05 * ref.abs().max()


@pytest.mark.parametrize("mode,every", [("self-attn", 1), ("full-block", 2)])
@pytest.mark.parametrize("backend", ["exact", "fast"])
def test_selective_checkpointing_gives_the_same_gradients(mode, every, backend):
    model = _small(seed=4).train()
    text = tiny_text(2, model.config.text_channels, lens=[4, 6])
    x = torch.randn(2, scales.as_schedule(SCHEDULE).num_tokens - 1, model.config.bits_per_token)
    model.set_activation_checkpointing(None)
    _, ref = _run(model, backend, text, x, SCHEDULE)
    model.set_activation_checkpointing(mode, every=every)
    _, got = _run(model, backend, text, x, SCHEDULE)
    assert torch.equal(got, ref)
    model.set_activation_checkpointing(None)
    with pytest.raises(ValueError, match="every"):
        model.set_activation_checkpointing("full-block", every=0)


def test_fast_generation_matches_exact_generation():
    model = _small(seed=5).eval()
    text = tiny_text(1, model.config.text_channels, lens=[6])
    kw = dict(cfg=3.0, tau=1.0, top_k=1, top_p=0.0, seed=0, return_logits=True)
    exact = generate(model, text, SCHEDULE, **kw)
    fast = generate(model, text, SCHEDULE, fast=True, **kw)
    assert model.attention_backend == "exact"       # the per-call switch is restored
    for a, b in zip(exact.logit_diff, fast.logit_diff):
        assert max_err(a, b) < 1e-3 * max(1.0, a.abs().max().item())
    for a, b, diff in zip(exact.token_bits, fast.token_bits, exact.logit_diff):
        decided = diff.abs() > 1e-3              # greedy sampling: only near-ties may differ
        assert torch.equal(a[decided], b[decided])
    bf16 = generate(model, text, SCHEDULE, fast=True, dtype=torch.bfloat16, **kw)
    assert all(torch.isfinite(z).all() for z in bf16.logit_diff)


def test_skip_uncond_gives_identical_bits_where_valid():
    model = _small(seed=6).eval()
    text = tiny_text(2, model.config.text_channels, lens=[4, 7])
    cfg = [3.0, 2.0, 3.0, 1.0, 1.0]                  # guidance only on the first three scales
    kw = dict(cfg=cfg, tau=1.0, top_k=900, top_p=0.97, seed=7, return_logits=True)
    for fast in (False, True):
        full = generate(model, text, SCHEDULE, fast=fast, **kw)
        skipped = generate(model, text, SCHEDULE, fast=fast, skip_uncond=True, **kw)
        for a, b in zip(full.token_bits, skipped.token_bits):
            assert torch.equal(a, b)
        for a, b in zip(full.logit_diff, skipped.logit_diff):
            assert max_err(a, b) < 1e-5
    # constant guidance: nothing may be skipped, the result is bit-identical
    const = dict(kw, cfg=3.0)
    a = generate(model, text, SCHEDULE, **const)
    b = generate(model, text, SCHEDULE, skip_uncond=True, **const)
    assert all(torch.equal(x, y) for x, y in zip(a.logit_diff, b.logit_diff))


def test_preallocated_kv_cache_is_exact_on_the_exact_path():
    model = _small(seed=8).eval()
    text = tiny_text(1, model.config.text_channels, lens=[5])
    cond = model.encode_text(text)
    outs = []
    for capacity in (None, scales.as_schedule(SCHEDULE).num_tokens):
        model.kv_caching(True, capacity=capacity)
        x = model.sos_tokens(cond)
        hs = [model.forward_scale(x, cond, 0, SCHEDULE)]
        g = torch.Generator().manual_seed(0)
        for k in range(1, len(SCHEDULE)):
            _, h, w = SCHEDULE[k]
            x = torch.randn(1, h * w, model.config.embed_dim, generator=g)
            hs.append(model.forward_scale(x, cond, k, SCHEDULE))
        model.kv_caching(False)
        outs.append(hs)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,channels_last,tol", [(None, True, 1e-4), (torch.bfloat16, False, 0.25),
                                                     (torch.bfloat16, True, 0.25)])
def test_tokenizer_fast_paths_track_fp32(dtype, channels_last, tol):
    """bf16 (random tiny tokenizer, images in [-1, 1]): max error ~0.1, mean ~5e-3; channels-last
    alone ~1e-6."""
    vae = load_tokenizer("tiny")
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = vae.encode_raw(images)
        raw_fast = vae.encode_raw(images, dtype=dtype, channels_last=channels_last)
        img = vae.decode(raw)
        img_fast = vae.decode(raw, dtype=dtype, channels_last=channels_last)
    assert raw_fast.dtype == torch.float32 and raw_fast.is_contiguous()
    assert max_err(raw_fast, raw) < tol * max(1.0, raw.abs().max().item())
    assert max_err(img_fast, img) < tol
    assert (img_fast - img).abs().mean() < tol / 10
    # the low-precision copy follows in-place weight updates
    with torch.no_grad():
        vae.decoder.conv_out.conv.bias.add_(0.5)
        moved = vae.decode(raw, dtype=dtype, channels_last=channels_last)
    assert (moved - img_fast).abs().max() > 0.1

"""BSQ-VAE tokenizer: released layouts, shapes, quantizer numerics and gradients (CPU, tiny configs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infinity_lightning.models.bsq_vae import (BSQVAE, area_resize, bilinear_resize, bits_to_codes, bsq_quantize,
                                               group_norm_groups)
from infinity_lightning.presets import TokenizerConfig, tokenizer_config
from infinity_lightning.scales import latent_schedule

REPO_ROOT = Path(__file__).resolve().parents[1]

MANIFESTS = REPO_ROOT.parent / "shared" / "reference" / "manifests"

#: A small tokenizer for fast tests: stride 4, 8 bits, 2 channels per GroupNorm group.
SMALL = TokenizerConfig(codebook_dim=8, base_ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, patch_size=4, norm_groups=8)


@pytest.fixture
def small_vae():
    torch.manual_seed(0)
    return BSQVAE(SMALL).eval()


@pytest.mark.parametrize("name", ["d16", "d24", "d32", "d32_reg", "d64", "d56_f8_14_patchify"])
def test_preset_state_dict_matches_released_manifest(name):
    manifest = json.loads((MANIFESTS / f"vae_{name}.json").read_text())
    with torch.device("meta"):
        vae = BSQVAE(tokenizer_config(name))
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in vae.state_dict().items()]
    theirs = [(e["key"], e["shape"], e["dtype"]) for e in manifest["state_dict"]]
    assert ours == theirs  # keys, order, shapes and dtypes
    assert sum(p.numel() for p in vae.parameters()) == manifest["n_parameters"]
    assert len(ours) == manifest["n_state_dict_entries"]


def test_group_norm_rule():
    assert group_norm_groups(128) == 32 and group_norm_groups(24) == 24 and group_norm_groups(48) == 24
    assert group_norm_groups(16, 8) == 8
    with pytest.raises(ValueError, match="cannot split 16 channels"):
        group_norm_groups(16)  # neither 32 nor 24 divides 16


def test_quantizer_is_registered_twice_with_one_mask(small_vae):
    assert small_vae.quantize is small_vae.quantizer
    sd = small_vae.state_dict()
    assert sd["quantizer.lfq.mask"].tolist() == [128, 64, 32, 16, 8, 4, 2, 1]
    assert torch.equal(sd["quantize.lfq.mask"], sd["quantizer.lfq.mask"])


def test_round_trip_shapes_with_default_schedule(small_vae):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = small_vae.encode_raw(x)
        recon, bit_labels = small_vae(x)
    assert raw.shape == (2, 8, 16, 16) and raw.dtype == torch.float32
    schedule = latent_schedule(16, 16, "dynamic")
    assert [tuple(b.shape) for b in bit_labels] == [(2, 1, h, w, 8) for _, h, w in schedule]
    assert all(b.dtype == torch.uint8 and int(b.max()) <= 1 for b in bit_labels)
    assert recon.shape == x.shape and float(recon.abs().max()) <= 1.0


def test_encoder_decoder_strides_for_non_square_images(small_vae):
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        raw = small_vae.encode_raw(x)
        assert raw.shape == (1, 8, 6, 10)
        summed, bits = small_vae.quantize_multiscale(raw, [(1, 1, 2), (1, 3, 5), (1, 6, 10)])
        assert small_vae.decode(summed).shape == (1, 3, 24, 40)
    with pytest.raises(ValueError, match="not a multiple of the tokenizer stride 4"):
        small_vae.encode_raw(torch.zeros(1, 3, 30, 40))
    with pytest.raises(ValueError, match="must equal the latent grid"):
        small_vae.quantize_multiscale(raw, [(1, 1, 1), (1, 3, 5)])


def test_bsq_quantize_values_signs_and_layout():
    torch.manual_seed(1)
    d = 24
    r = torch.randn(2, d, 1, 3, 5)
    r[0, :, 0, 0, 0] = 0.0  # a zero vector: every bit is 0 (sign convention 0 -> negative)
    q, bits = bsq_quantize(r)
    s = 1 / math.sqrt(d)
    assert q.shape == r.shape and bits.shape == (2, 1, 3, 5, d) and bits.dtype == torch.uint8
    assert torch.allclose(q.abs(), torch.full_like(q, s), atol=1e-7, rtol=0)
    assert torch.equal(bits.permute(0, 4, 1, 2, 3).bool(), r > 0)
    assert int(bits[0, 0, 0, 0].sum()) == 0
    assert q.permute(0, 2, 3, 4, 1).is_contiguous() and not q.is_contiguous()  # d-fastest memory


def test_bsq_straight_through_gradient_is_that_of_the_normalisation():
    torch.manual_seed(2)
    r = torch.randn(1, 16, 1, 2, 2, requires_grad=True)
    w = torch.randn(1, 16, 1, 2, 2)
    (bsq_quantize(r)[0] * w).sum().backward()
    r2 = r.detach().clone().requires_grad_(True)
    (F.normalize(r2, dim=1, eps=1e-12) * w).sum().backward()
    assert torch.allclose(r.grad, r2.grad, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32, torch.bool])
def test_bits_to_codes_formula_and_layout(dtype):
    torch.manual_seed(3)
    d = 24
    bits = torch.randint(0, 2, (2, 1, 3, 4, d))
    codes = bits_to_codes(bits.to(dtype))
    s = 1 / math.sqrt(d)
    expected = F.normalize(bits * s * 2 - s, dim=-1).permute(0, 4, 1, 2, 3)
    assert codes.dtype == torch.float32 and codes.shape == (2, d, 1, 3, 4)
    assert torch.equal(codes, expected)
    assert codes.permute(0, 2, 3, 4, 1).is_contiguous()
    assert torch.equal(codes > 0, bits.permute(0, 4, 1, 2, 3).bool())


def test_bits_to_codes_inverts_the_quantizer():
    torch.manual_seed(4)
    r = torch.randn(2, 16, 1, 4, 4)
    q, bits = bsq_quantize(r)
    assert torch.allclose(bits_to_codes(bits), q, atol=1e-7, rtol=0)


def test_resize_helpers_match_their_definitions():
    x = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).reshape(2, 3, 1, 6, 9)
    down = area_resize(x, (1, 2, 3))
    assert torch.allclose(down, F.avg_pool3d(x, (1, 3, 3)))
    up = bilinear_resize(down, (1, 6, 9))
    assert up.shape == x.shape
    assert torch.allclose(up[:, :, 0], F.interpolate(down[:, :, 0], size=(6, 9), mode="bilinear", align_corners=False))


def test_multiscale_sum_equals_sum_of_label_codes_and_shrinks_the_residual(small_vae):
    torch.manual_seed(5)
    raw = torch.randn(2, 8, 12, 12) * 1.5
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 12, 12)]
    summed, bits = small_vae.quantize_multiscale(raw, schedule)
    assert summed.is_contiguous() and summed.shape == raw.shape
    # The codes rebuilt from the labels alone give the same sum (up to the straight-through rounding).
    assert torch.allclose(small_vae.codes_from_bits(bits, schedule), summed, atol=1e-6)
    # Each added scale is a residual correction: the final error is below the error of one scale.
    one, _ = small_vae.quantize_multiscale(raw, [(1, 12, 12)])
    assert (raw - summed).norm() < (raw - one).norm()


def test_single_scale_quantization_is_plain_bsq(small_vae):
    torch.manual_seed(6)
    raw = torch.randn(1, 8, 4, 4)
    summed, bits = small_vae.quantize_multiscale(raw, [(1, 4, 4)])
    q, b = bsq_quantize(raw.unsqueeze(2))
    assert torch.equal(summed, q.squeeze(2)) and torch.equal(bits[0], b)


def test_quantizer_gradients_and_aux_outputs(small_vae):
    torch.manual_seed(7)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    raw = torch.randn(1, 8, 4, 4, requires_grad=True)
    summed, bits, aux = small_vae.quantize_multiscale(raw, schedule, return_aux=True)
    summed.pow(2).sum().backward()
    assert raw.grad is not None and float(raw.grad.abs().sum()) > 0
    assert [tuple(x.shape) for x in aux["normalized"]] == [(1, 1, h, w, 8) for _, h, w in schedule]
    assert torch.allclose(aux["normalized"][-1].norm(dim=-1), torch.ones(1, 1, 4, 4))
    assert len(aux["quantized"]) == len(aux["residual_norm"]) == 3
    # The residual switch changes gradients, never values.
    raw2 = raw.detach().clone().requires_grad_(True)
    summed2, bits2 = small_vae.quantize_multiscale(raw2, schedule, detach_residual=False)
    summed2.pow(2).sum().backward()
    assert torch.equal(summed2, summed.detach()) and all(torch.equal(a, b) for a, b in zip(bits, bits2))
    assert not torch.allclose(raw2.grad, raw.grad)


def test_decode_from_bits_partial_scales(small_vae):
    torch.manual_seed(8)
    raw = torch.randn(1, 8, 4, 4)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    with torch.no_grad():
        summed, bits = small_vae.quantize_multiscale(raw, schedule)
        full = small_vae.decode_from_bits(bits, schedule)
        first = small_vae.decode_from_bits(bits[:1], schedule)
        direct = small_vae.decode(summed)
    assert full.shape == first.shape == (1, 3, 16, 16)
    assert torch.allclose(full, direct, atol=1e-5)
    # After one scale the latent is constant, so the decoded image differs from the full one.
    assert not torch.allclose(first, full, atol=1e-3)
    codes1 = small_vae.codes_from_bits(bits[:1], schedule)
    assert torch.allclose(codes1, codes1[..., :1, :1].expand_as(codes1))


def test_bf16_autocast_keeps_quantizer_in_fp32(small_vae):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = small_vae.encode_raw(x)
        summed, _ = small_vae.quantize_multiscale(raw, [(1, 1, 1), (1, 4, 4)])
        recon = small_vae.decode(summed)
    assert raw.dtype == summed.dtype == torch.float32
    assert recon.shape == (1, 3, 16, 16)

"""The numerics that make this implementation reproduce the released Infinity code exactly.

Everything whose *rounding* (not only its mathematics) decides whether fp32 outputs match the
original to 1e-5 lives in this file, so that it is reviewed in one place.  The rest of the model
code calls these functions.  Each point below was checked against the parity fixtures in
``tests/parity``; changing any of them moves logits by 1e-5 ... 1e-2.

1. **bf16 inside cross-attention** (:func:`varlen_cross_attention`).  The text pool and every
   block's cross-attention round q, k and v to bfloat16 even in fp32 runs, compute per sample and
   head ``S = (Q @ K^T) * head_dim**-0.5`` (product first, then the Python-float scale),
   ``P = softmax(S)`` and ``O = P @ V`` in fp32 on the rounded values, and round ``O`` to bf16
   before converting back to fp32.  Pre-scaling q, calling fp32 SDPA, or skipping the casts
   change logits by 6e-5, 8e-4 and 5e-2.
2. **Self-attention is PyTorch SDPA with ``scale=1``** (cosine attention: q and k are
   L2-normalised, q multiplied by ``exp(min(scale_mul, log 100))``).  A hand-written softmax is
   mathematically equal but rounds differently.  Boolean and additive masks are interchangeable.
3. **Padding to a multiple of 128** (:func:`padded_length`, :func:`block_causal_mask`) in every
   teacher-forced forward, eval included: the key length changes SDPA's blocking.  Padded query
   rows see key 0 only; the padding is cut before the head.
4. **RoPE-2D table arithmetic** (:func:`rope2d_angles`): ``inv_freq = 1 / 10000**e`` with fp32
   exponents ``e = (0, 2, ..., half-2) / half`` (half = head_dim / 2), the reciprocal of an fp32
   power (not ``10000**-e``, not exp/log, not an fp64 table); angles are fp32 position x fp32
   inv_freq; cos and sin in fp32.  Positions map every scale onto the last grid of the
   template's 1M schedule: ``round(i * H_1M / h)`` with a float32 product and half-to-even
   rounding.  Pairs are adjacent channels (2i, 2i+1); the first head_dim/4 pairs rotate with the
   row, the rest with the column; each output is exactly two products and one sum/difference.
5. **Temperature is a multiplication by the Python float ``1 / tau``**, not a division
   (:func:`apply_temperature`).
6. **Codes from labels** are ``bits * s * 2 - s`` (s = 1/sqrt(d)) evaluated left to right on the
   integer labels, then L2-normalised along d (``BSQVAE.bits_to_codes``); the normalisation is
   not a numerical no-op for d = 24.
7. **Memory layouts** (``bsq_vae.py``, ``self_correction.py``, ``sampling.py``): quantizer codes
   and label codes are channels-last-3d views of d-fastest tensors; the quantizer's running sum
   and the self-correction accumulator are contiguous; the generation sum starts from the scalar
   0 and therefore inherits the channels-last layout, and is decoded as such.  PyTorch's CPU
   trilinear and convolution kernels round differently for the two layouts.
8. **The text path runs once over all packed sequences** (positive and negative/null halves
   together), because the matrix products round differently for a different number of rows.
9. **Negative prompts replace the learned null condition**; they are packed after the positive
   rows with their own lengths (:func:`pack_two`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..scales import as_schedule

#: log(100): the cap on the cosine-attention temperature.
MAX_SCALE_MUL_LOG = math.log(100)


# --------------------------------------------------------------------------------------------
# 1. bf16 varlen cross-attention
# --------------------------------------------------------------------------------------------
def varlen_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_per_seq: int,
                           cu_seqlens_k: Sequence[int]) -> torch.Tensor:
    """Cross-attention of each sequence's queries to that sequence's packed keys/values.

    q: (B * q_per_seq, H, hd); k, v: (N, H, hd) packed over B sequences with boundaries
    ``cu_seqlens_k`` (B + 1 ints).  Returns (B * q_per_seq, H, hd) in q's dtype, computed as the
    original code's flash-attn call rounds it (module docstring, point 1).
    """
    out_dtype = q.dtype
    to_bf16 = q.dtype == torch.float32
    if to_bf16:
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    scale = q.shape[-1] ** -0.5
    cu = [int(c) for c in cu_seqlens_k]
    outs = []
    for i in range(len(cu) - 1):
        qi = q[i * q_per_seq:(i + 1) * q_per_seq].float().transpose(0, 1)   # (H, Lq, hd)
        ki = k[cu[i]:cu[i + 1]].float().transpose(0, 1)                       # (H, Lk, hd)
        vi = v[cu[i]:cu[i + 1]].float().transpose(0, 1)
        scores = torch.matmul(qi, ki.transpose(-1, -2)) * scale
        oi = torch.matmul(scores.softmax(dim=-1), vi)
        outs.append(oi.transpose(0, 1).to(q.dtype))
    out = torch.cat(outs, dim=0)
    return out.to(out_dtype) if to_bf16 else out


def pack_two(kv_a: torch.Tensor, cu_a: torch.Tensor, kv_b: torch.Tensor, cu_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack two varlen batches ``[a; b]``: rows concatenated, b's boundaries shifted by a's rows."""
    kv = torch.cat([kv_a, kv_b], dim=0)
    cu = torch.cat([cu_a, cu_b[1:] + cu_a[-1]]).to(torch.int32)
    return kv, cu


# --------------------------------------------------------------------------------------------
# 3. padding and the block-causal mask
# --------------------------------------------------------------------------------------------
def padded_length(length: int, multiple: int) -> int:
    if multiple <= 1:
        return length
    return (length + multiple - 1) // multiple * multiple


def scale_ids(schedule: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Scale index of every token (length L)."""
    sizes = as_schedule(schedule).sizes
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def block_causal_mask(schedule: Sequence[Sequence[int]], padded_len: int, device=None) -> torch.Tensor:
    """Boolean (Lp, Lp) mask, True = visible: query i sees key j iff scale(i) >= scale(j).

    Padded query rows see key 0 only (which keeps their softmax finite); padded keys are hidden.
    """
    ids = scale_ids(schedule, device)
    L = ids.numel()
    mask = torch.zeros(padded_len, padded_len, dtype=torch.bool, device=device)
    mask[:L, :L] = ids[:, None] >= ids[None, :]
    mask[L:, 0] = True
    return mask


# --------------------------------------------------------------------------------------------
# 4. RoPE-2D
# --------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """fp32 inverse frequencies, head_dim/4 of them (module docstring, point 4)."""
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, dtype=torch.int64).float() / half
    return 1.0 / (theta ** exponents)


@lru_cache(maxsize=64)
def _rope_angles_cached(grids: Tuple[Tuple[int, int], ...], ref_grid: Tuple[int, int], head_dim: int,
                        theta: float) -> torch.Tensor:
    ref_h, ref_w = ref_grid
    inv_freq = rope_inv_freq(head_dim, theta)
    rows = []
    for h, w in grids:
        ys = (torch.arange(h, dtype=torch.float32) * (ref_h / h)).round()
        xs = (torch.arange(w, dtype=torch.float32) * (ref_w / w)).round()
        ang_y = torch.outer(ys, inv_freq)  # (h, hd/4)
        ang_x = torch.outer(xs, inv_freq)  # (w, hd/4)
        grid = torch.cat([ang_y[:, None, :].expand(h, w, -1), ang_x[None, :, :].expand(h, w, -1)], dim=-1)
        rows.append(grid.reshape(h * w, -1))
    return torch.cat(rows, dim=0)  # (L, hd/2)


def rope2d_angles(schedule: Sequence[Sequence[int]], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (L, head_dim/2) of every token of a schedule (row-major within a scale).

    Positions are rescaled onto the schedule's ``rope_reference_grid``: the last grid of the
    template's 1M table, or the schedule's own last grid when it is no template prefix.
    """
    s = as_schedule(schedule)
    return _rope_angles_cached(s.grids, s.rope_reference_grid, int(head_dim), float(theta))


@lru_cache(maxsize=64)
def _rope_cos_sin(grids: Tuple[Tuple[int, int], ...], ref_grid: Tuple[int, int], head_dim: int, theta: float,
                  padded_len: int):
    ang = _rope_angles_cached(grids, ref_grid, head_dim, theta)
    cos, sin = ang.cos(), ang.sin()
    pad = padded_len - cos.shape[0]
    if pad > 0:  # padding rows get no rotation; they are masked and discarded anyway
        cos = F.pad(cos, (0, 0, 0, pad))
        sin = F.pad(sin, (0, 0, 0, pad))
    return cos, sin


def rope_cos_sin(schedule: Sequence[Sequence[int]], head_dim: int, padded_len: Optional[int] = None,
                 theta: float = 10000.0, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (Lp, head_dim/2) fp32, for a schedule, zero-padded to ``padded_len``."""
    s = as_schedule(schedule)
    cos, sin = _rope_cos_sin(s.grids, s.rope_reference_grid, int(head_dim), float(theta),
                             int(padded_len or s.num_tokens))
    if device is not None:
        cos, sin = cos.to(device), sin.to(device)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (..., L, hd) by angles with cos/sin (L, hd/2), in fp32."""
    dtype = x.dtype
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.reshape(x.shape).to(dtype)


# --------------------------------------------------------------------------------------------
# 5. temperature
# --------------------------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``logits * (1 / tau)`` with the Python float 1/tau, as the original sampler does."""
    return logits * (1.0 / float(tau))

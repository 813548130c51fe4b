"""Fast attention and elementwise kernels for the Infinity transformer (the "fast" path).

The default ("exact") path reproduces the released code's rounding (:mod:`.numerics`): it pads
every teacher-forced sequence to a multiple of 128, runs dense SDPA with a block-causal mask over
the padded length, and loops over the samples of the bf16 cross-attention.  That costs time and
memory on work that is thrown away.  This module computes the same mathematics faster; results
agree with the exact path to fp32/bf16 rounding (tolerances in ``tests/test_fast_paths.py``), not
bit for bit.  It is selected with :meth:`InfinityTransformer.set_fast_path` /
:meth:`InfinityTransformer.set_attention_backend`; nothing here runs unless asked for.

* **Block-causal self-attention without padding and without the masked upper triangle**
  (:class:`BlockCausalLayout`).  Query tokens of scale k see exactly the keys of scales <= k, a
  prefix of the sequence.  So the queries are cut into groups of consecutive scales and each
  group attends to the key prefix that ends with the group: a group made of one scale needs no
  mask at all (plain SDPA on a prefix), a group of several small scales gets a small block-causal
  mask.  The skipped work is the upper triangle of the scale-block matrix; for the 0.06M schedule
  (L = 521, padded to 640 on the exact path) it computes 186,177 attention scores per head
  instead of 640^2 = 409,600 (181,689 are visible).  Two kernels compute a group:
  ``"sdpa"`` (one ``scaled_dot_product_attention`` call per group; on CPU its flash kernel runs
  these short, 96-wide heads well below the matmul peak) and ``"gemm"`` (:func:`gemm_attention`
  and :class:`BlockCausalGemmAttention`: the scores of a group as one batched matrix product,
  the mask applied only in the groups that need one, softmax in fp32, backward by matrix
  products too; long groups are cut into query chunks and recomputed in backward from the
  log-sum-exp, as flash attention does).  ``"auto"`` picks ``"gemm"`` on CPU and ``"sdpa"``
  elsewhere (:func:`resolve_kernel`).  ``backend="flex"`` uses FlexAttention (imported lazily,
  compiled) instead.
* **Cross-attention as one padded, key-masked SDPA call** (:func:`padded_cross_attention`)
  instead of a Python loop over samples.  With ``round_bf16`` (the default) q, k, v and the
  output are rounded to bf16 around an fp32 attention, as on the exact path; without it the
  attention runs in fp32 throughout (the logits then move by about 2e-2 from the exact path,
  which rounds to bf16; see tests/test_fast_paths.py).
* **Cheaper elementwise work**: cosine normalisation (:func:`cosine_qk`) and RoPE
  (:func:`apply_rope_fused`, three kernels instead of eight) on the fused q/k tensor of the
  projection, with the exact path's roundings.  AdaLN modulation and gated residuals keep the
  exact path's separate multiply and add: fusing them into ``addcmul`` (an FMA, one rounding
  fewer) moved the parity fixture's logits 40x more (1.3e-3 instead of 3e-5) for about 1% of a
  training step.
* **int8 linears for generation on CPU** (:func:`int8_blocks`): copies of the blocks whose
  linear layers are dynamically quantised to int8 (weights per output channel, activations per
  call), for KV-cached sampling; not equal to fp32 within rounding, the sampler's quality
  measurement is in benchmarks/README.md.

Shapes: B batch, H heads, L tokens, hd head width, N packed text rows, T padded text length.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scales import as_schedule

#: Consecutive scales are merged into one query group until the group holds this many tokens.
#: Small scales are cheap to compute densely but expensive to launch one by one.
DEFAULT_GROUP_TOKENS = 96
#: Self-attention kernels of the fast path (see the module docstring).
KERNELS = ("auto", "sdpa", "gemm")
#: "gemm" kernel: a query chunk's score matrix (batch x heads x rows x keys) holds at most this
#: many elements (64 MB in fp32); longer groups are cut into chunks of query rows.
GEMM_CHUNK_ELEMENTS = 1 << 24
#: "gemm" kernel in training: the probabilities of all groups are kept for backward while they
#: hold at most this many elements in total; beyond, backward recomputes them from q, k and the
#: saved log-sum-exp (one more matrix product per chunk, memory like flash attention).
GEMM_SAVE_ELEMENTS = 1 << 25


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``"sdpa"`` or ``"gemm"`` for ``kernel`` in :data:`KERNELS` on ``device`` ("auto": "gemm" on
    CPU, where SDPA's flash kernel is slow on short sequences; "sdpa" on GPUs, whose fused kernels
    never write the scores to memory)."""
    if kernel not in KERNELS:
        raise ValueError(f"self-attention kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "auto":
        return "gemm" if torch.device(device).type == "cpu" else "sdpa"
    return kernel


# --------------------------------------------------------------------------------------------
# block-causal self-attention
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlockCausalLayout:
    """How the block-causal self-attention of one unpadded teacher-forced sequence is computed.

    ``groups``: (q_start, q_end) token ranges of consecutive scales; group g's queries attend to
    keys ``[0, q_end)``.  ``masks``: per group None (a single scale: every key of the prefix is
    visible) or a bool (q_end - q_start, q_end) mask, True = visible.  ``backend``: "chunked"
    (one SDPA call per group), "gemm" (batched matrix products per group,
    :class:`BlockCausalGemmAttention`) or "flex" (one FlexAttention call with a block mask).
    """

    length: int
    groups: Tuple[Tuple[int, int], ...]
    masks: Tuple[Optional[torch.Tensor], ...]
    scale_ids: torch.Tensor
    backend: str = "chunked"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T) v (scale 1: cosine attention) under the block-causal mask.

        q, k, v: (B, H, L, hd) -> (B, H, L, hd).
        """
        if self.backend == "flex":
            return flex_block_causal_attention(q, k, v, self.scale_ids)
        if self.backend == "gemm":
            return block_causal_gemm_attention(q, k, v, self)
        outs = []
        for (qs, qe), mask in zip(self.groups, self.masks):
            if mask is not None and mask.device != q.device:
                mask = mask.to(q.device)
            outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, :qe], v[:, :, :qe],
                                                       attn_mask=mask, scale=1.0))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def useful_pairs(self) -> int:
        """Visible (query, key) pairs: the FLOPs a block-causal attention cannot avoid."""
        ids = self.scale_ids
        counts = torch.bincount(ids)
        return int((counts * counts.cumsum(0)).sum())


@lru_cache(maxsize=64)
def _layout_cached(sizes: Tuple[int, ...], group_tokens: int, backend: str) -> BlockCausalLayout:
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    groups, masks = [], []
    start, first_scale = 0, 0
    end = 0
    for s, n in enumerate(sizes):
        end += n
        if end - start >= group_tokens or s == len(sizes) - 1:
            groups.append((start, end))
            if s == first_scale:
                masks.append(None)
            else:
                masks.append(ids[start:end, None] >= ids[None, :end])
            start, first_scale = end, s + 1
    return BlockCausalLayout(length=end, groups=tuple(groups), masks=tuple(masks), scale_ids=ids, backend=backend)


def block_causal_layout(schedule: Sequence[Sequence[int]], group_tokens: int = DEFAULT_GROUP_TOKENS,
                        backend: str = "chunked") -> BlockCausalLayout:
    """The (cached) :class:`BlockCausalLayout` of a scale schedule [(1, h, w), ...]."""
    if backend not in ("chunked", "gemm", "flex"):
        raise ValueError(f"block-causal backend {backend!r}; expected 'chunked', 'gemm' or 'flex'")
    return _layout_cached(as_schedule(schedule).sizes, int(group_tokens), backend)


# --------------------------------------------------------------------------------------------
# attention by batched matrix products ("gemm" kernel)
# --------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32, fp64 for fp64: scores, softmax and gradient sums never below fp32."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 scores q k^T (B, H, lq, lk) with masked pairs at -inf.  Low-precision q, k are
    multiplied in fp32 (the products of bf16 values are exact in fp32, as in SDPA's kernels,
    which accumulate the scores in fp32; a bf16 product would round the scores themselves)."""
    acc = _accumulation_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   scale: float = 1.0) -> torch.Tensor:
    """softmax(scale q k^T) v by batched matrix products (inference; autograd through the ops).

    q (B, H, lq, hd), k and v (B, H, lk, hd), ``mask`` None or bool broadcastable to
    (B, H, lq, lk), True = visible.  Scores and softmax in fp32, ``p v`` in v's dtype.
    """
    s = _scores(q if scale == 1.0 else q * scale, k, mask)
    return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)


def _gemm_chunks(layout: "BlockCausalLayout", batch_heads: int, device: torch.device):
    """(q_start, q_end, key_end, mask slice or None) per query chunk of the layout's groups."""
    chunks = []
    for (qs, qe), mask in zip(layout.groups, layout.masks):
        if mask is not None and mask.device != device:
            mask = mask.to(device)
        rows = max(1, GEMM_CHUNK_ELEMENTS // max(1, batch_heads * qe))
        for r0 in range(qs, qe, rows):
            r1 = min(qe, r0 + rows)
            chunks.append((r0, r1, qe, None if mask is None else mask[r0 - qs:r1 - qs]))
    return chunks


class BlockCausalGemmAttention(torch.autograd.Function):
    """Block-causal attention of a :class:`BlockCausalLayout` by batched matrix products, with a
    hand-written backward that is matrix products too.

    Per query chunk (rows r0:r1 of a group ending at key ``e``): ``S = q k[:e]^T`` (fp32),
    ``P = softmax(S)`` (fp32), ``out = P v[:e]`` (v's dtype).  Backward: ``dP = dout v^T``
    (fp32), ``dS = P (dP - rowsum(dout * out))``, ``dq = dS k``, ``dk += dS^T q``,
    ``dv += P^T dout`` (dk, dv accumulated in fp32 over the groups that share keys).  P is kept
    for backward while all chunks hold at most :data:`GEMM_SAVE_ELEMENTS` probabilities, else
    recomputed from the saved log-sum-exp.  q, k, v (B, H, L, hd) of one dtype -> (B, H, L, hd).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: "BlockCausalLayout") -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H = q.shape[:2]
        chunks = _gemm_chunks(layout, B * H, q.device)
        keep = sum(B * H * (r1 - r0) * e for r0, r1, e, _ in chunks) <= GEMM_SAVE_ELEMENTS
        outs, probs, lses = [], [], []
        for r0, r1, e, mask in chunks:
            s = _scores(q[:, :, r0:r1], k[:, :, :e], mask)
            if keep:
                p = s.softmax(dim=-1)
                probs.append(p)
            else:
                lse = torch.logsumexp(s, dim=-1, keepdim=True)
                p = s.sub_(lse).exp_()
                lses.append(lse)
            outs.append(torch.matmul(p.to(v.dtype), v[:, :, :e]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        ctx.layout, ctx.keep = layout, keep
        ctx.save_for_backward(q, k, v, out, *(probs if keep else lses))
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, *saved = ctx.saved_tensors
        dout = dout.contiguous()
        B, H = q.shape[:2]
        chunks = _gemm_chunks(ctx.layout, B * H, q.device)
        acc = _accumulation_dtype(q.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)               # (B, H, L, 1)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for i, (r0, r1, e, mask) in enumerate(chunks):
            if ctx.keep:
                p = saved[i]
            else:
                p = _scores(q[:, :, r0:r1], k[:, :, :e], mask).sub_(saved[i]).exp_()
            g = dout[:, :, r0:r1]
            dp = torch.matmul(g.to(acc), v[:, :, :e].to(acc).transpose(-1, -2))
            ds = dp.sub_(delta[:, :, r0:r1]).mul_(p).to(q.dtype)
            dq[:, :, r0:r1] = torch.matmul(ds, k[:, :, :e])
            dk[:, :, :e] += torch.matmul(ds.transpose(-1, -2), q[:, :, r0:r1])
            dv[:, :, :e] += torch.matmul(p.to(v.dtype).transpose(-1, -2), g)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def block_causal_gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                layout: "BlockCausalLayout") -> torch.Tensor:
    """:class:`BlockCausalGemmAttention` (training) or its forward alone (inference)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockCausalGemmAttention.apply(q, k, v, layout)
    outs = []
    for r0, r1, e, mask in _gemm_chunks(layout, q.shape[0] * q.shape[1], q.device):
        outs.append(gemm_attention(q[:, :, r0:r1], k[:, :, :e], v[:, :, :e], mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


_FLEX: dict = {}


def flex_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal attention with FlexAttention (compiled; skips fully masked blocks).

    FlexAttention is imported here, never at module import, so the package imports on any torch.
    The block mask is built once per (sequence, device) and cached.
    """
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        _FLEX["create_block_mask"] = create_block_mask
        _FLEX["masks"] = {}
    L = q.shape[2]
    key = (tuple(torch.bincount(scale_ids).tolist()), str(q.device))
    block_mask = _FLEX["masks"].get(key)
    if block_mask is None:
        ids = scale_ids.to(q.device)

        def visible(b, h, q_idx, kv_idx):
            return ids[q_idx] >= ids[kv_idx]

        block_mask = _FLEX["create_block_mask"](visible, None, None, L, L, device=q.device)
        _FLEX["masks"][key] = block_mask
    return _FLEX["fn"](q, k, v, block_mask=block_mask, scale=1.0)


# --------------------------------------------------------------------------------------------
# cross-attention to padded text
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PaddedText:
    """Gather plan turning packed text rows (N, D) into a padded batch (B, T, D).

    ``index`` (B, T) long: packed row of each slot, N (a zero row appended) for padding;
    ``key_mask`` (B, 1, 1, T) bool, True on real text rows (the SDPA key-padding mask).
    """

    index: torch.Tensor
    key_mask: torch.Tensor

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, device=None) -> "PaddedText":
        cu = [int(c) for c in cu_seqlens]
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        T = max(max(lens), 1)
        pos = torch.arange(T)
        starts = torch.tensor(cu[:-1])[:, None]
        lens_t = torch.tensor(lens)[:, None]
        real = pos[None, :] < lens_t
        index = torch.where(real, starts + pos[None, :], torch.full_like(starts + pos[None, :], cu[-1]))
        return PaddedText(index=index.to(device), key_mask=real[:, None, None, :].to(device))

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, D) packed rows -> (B, T, D), zeros in the padding slots (differentiable)."""
        rows = torch.cat((packed, packed.new_zeros(1, packed.shape[-1])), dim=0)
        return rows[self.index]

    def select(self, n: int) -> "PaddedText":
        """The plan of the first ``n`` sequences."""
        return PaddedText(index=self.index[:n], key_mask=self.key_mask[:n])


def padded_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                           round_bf16: bool = True) -> torch.Tensor:
    """Each sequence's queries attend to its own (padded) text rows, in one SDPA call.

    q: (B, Lq, H, hd); k, v: (B, T, H, hd); key_mask: (B, 1, 1, T) bool.  Returns (B, Lq, H, hd)
    in q's dtype.  Softmax scale 1/sqrt(hd).  With ``round_bf16`` and fp32 inputs, q, k, v are
    rounded to bf16, the attention runs in fp32 on the rounded values and its output is rounded
    to bf16 (the exact path's arithmetic, :func:`numerics.varlen_cross_attention`, batched);
    without it the attention runs in fp32 throughout.  bf16 inputs (autocast) run a bf16 SDPA.
    """
    out_dtype = q.dtype
    rounded = round_bf16 and q.dtype == torch.float32
    if rounded:
        q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
    elif k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    out = out.transpose(1, 2)
    return out.to(torch.bfloat16).to(out_dtype) if rounded else out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------
def cosine_qk(qk: torch.Tensor, scale_mul: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise q and k over hd and multiply q by its per-head temperature, on the fused
    (B, L, 2, H, hd) tensor of the projection (no permuted copies of q and k).

    scale_mul: (H,) fp32.  Returns fp32 (B, L, 2, H, hd).  The same operations as the exact
    path's ``F.normalize(q) * scale_mul`` (x / max(|x|, eps), then the product; k times 1.0).
    """
    qk = qk.float()
    factor = torch.stack((scale_mul, torch.ones_like(scale_mul)))[:, :, None]      # (2, H, 1)
    return qk.div(qk.norm(dim=-1, keepdim=True).clamp_min(eps)).mul_(factor)


def apply_rope_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of fp32 x (B, L, ..., hd) by the angles of the
    exact path's tables cos, sin (L, hd/2).

    ``x * (c, c) + swap(x) * (-s, s)`` with swap(a, b) = (b, a): the exact path's two products
    and one sum/difference per output (bit-identical results) in three kernels instead of
    eight, on the fused q/k tensor.
    """
    L, half = cos.shape
    view = (L,) + (1,) * (x.dim() - 3) + (2 * half,)
    c = torch.stack((cos, cos), dim=-1).view(view)
    s = torch.stack((-sin, sin), dim=-1).view(view)
    swapped = x.view(*x.shape[:-1], half, 2).flip(-1).reshape(x.shape)
    return x * c + swapped * s


def useful_attention_pairs(schedule: Sequence[Sequence[int]]) -> int:
    """Visible (query, key) pairs of the block-causal self-attention of one sequence."""
    return block_causal_layout(schedule).useful_pairs()


def describe(layout: Any) -> str:
    """Human-readable summary of a layout (for benchmark output)."""
    if not isinstance(layout, BlockCausalLayout):
        return "dense-masked"
    return f"{layout.backend}:" + ",".join(f"{a}-{b}{'m' if m is not None else ''}"
                                           for (a, b), m in zip(layout.groups, layout.masks))


# --------------------------------------------------------------------------------------------
# preallocated KV cache (generation)
# --------------------------------------------------------------------------------------------
class KVBuffer:
    """A self-attention KV cache written in place into buffers of the full sequence length.

    The exact path grows its cache with ``torch.cat`` (a new allocation per scale); this one
    allocates (B, H, capacity, hd) once, on the first append, and hands out prefix views, so the
    shapes a scale sees are fixed by the schedule (friendly to CUDA graphs) and no host sync is
    needed.  ``length`` is a Python int.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, l, hd) after the cached tokens; return the (B, H, length, hd) prefixes."""
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.capacity, hd)
            self.v = v.new_empty(B, H, self.capacity, hd, dtype=v.dtype)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} tokens cannot hold {end}")
        self.k[:, :, self.length:end].copy_(k)
        self.v[:, :, self.length:end].copy_(v)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, n: int) -> None:
        """Keep the first ``n`` sequences of the batch (views, no copy)."""
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]


# --------------------------------------------------------------------------------------------
# int8 linears (generation on CPU)
# --------------------------------------------------------------------------------------------
#: Attributes of the attention modules that the int8 copies take over from the originals at
#: every use (the backend switches are not state and may change between calls).
_SWITCHES = ("fast_path", "kernel", "round_bf16")


def int8_blocks(model: nn.Module) -> List[nn.Module]:
    """Copies of ``model.block_list()`` whose ``nn.Linear`` layers are dynamically quantised to
    int8 (``torch.ao.quantization.quantize_dynamic``: int8 weights per output channel, uint8
    activations quantised per call, int32 accumulation, fp32 output; fbgemm / oneDNN kernels).

    CPU inference only.  The copies are built on first use and rebuilt whenever a parameter of
    the blocks changes (in-place updates included); the attention switches (fast path, kernel,
    cross-attention rounding) are copied from the originals on every call.  Everything outside
    the linears (norms, attention, the residual stream) stays fp32.
    """
    blocks = model.block_list()
    stamp = tuple((p.data_ptr(), p._version, p.device) for b in blocks for p in b.parameters())
    cached = model.__dict__.get("_int8_blocks")
    if cached is None or cached[0] != stamp:
        if any(p.device.type != "cpu" for b in blocks for p in b.parameters()):
            raise ValueError("int8 generation (quantize='int8') runs on CPU only; the model is on "
                             f"{next(blocks[0].parameters()).device}")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao since torch 2.10; its CPU
            # kernels are the ones torch ships (fbgemm / oneDNN)
            warnings.simplefilter("ignore")
            copies = [quantize_dynamic(copy.deepcopy(b).float().eval().requires_grad_(False),
                                       {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
                      for b in blocks]
        cached = (stamp, copies)
        model.__dict__["_int8_blocks"] = cached
    for original, quantised in zip(blocks, cached[1]):
        copies = dict(quantised.named_modules())
        for name, module in original.named_modules():
            for switch in _SWITCHES:
                if hasattr(module, switch) and name in copies:
                    setattr(copies[name], switch, getattr(module, switch))
    return cached[1]

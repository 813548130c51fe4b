"""The Infinity transformer: next-scale prediction with a bitwise head.

Reading order: text path (RMSNorm, attentive pooling, projection for cross-attention), the block
(shared AdaLN, cosine self-attention with 2-D RoPE, cross-attention to packed text, FFN), the
model (SOS token, level embedding, block-causal teacher-forced ``forward``, per-scale
``forward_scale`` with a KV cache for generation, the bitwise head).

Attribute names reproduce the released state-dict keys (``block_chunks.{c}.module.{j}.sa...``),
so released weights load with ``load_state_dict(strict=True)``.  Everything whose rounding
matters for parity with the original is in :mod:`.numerics`.

Two attention backends (:meth:`InfinityTransformer.set_attention_backend`, not part of the state
dict): ``"exact"`` (the default) reproduces the original's rounding; ``"fast"`` (and ``"flex"``)
compute the same mathematics without padding, without the masked upper triangle of the
block-causal attention, without the per-sample cross-attention loop and with fewer elementwise
kernels around RoPE and the cosine normalisation, equal to the exact path within fp32/bf16
rounding (:mod:`.fast_attention`).

Shapes: B batch, L tokens (sum of h*w over the schedule), C width, H heads, hd = C / H,
d_tok bits per token, Ct text-encoder width, N packed text rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import scales
from . import fast_attention, numerics

Schedule = Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformerConfig:
    """Infinity transformer architecture and its switches (docs/model.md#the-transformer)."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    #: groups consecutive blocks; >1 gives ``block_chunks.{c}.module.{j}`` keys, 1 gives ``blocks.{i}``
    block_chunks: int = 8
    text_channels: int = 2048
    text_maxlen: int = 512
    #: bits per latent position of the paired tokenizer (d); tokens carry 4d bits with patchify
    codebook_dim: int = 32
    apply_spatial_patchify: bool = False
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    pad_to_multiplier: int = 128
    #: clamp of the cosine-attention temperature (log 100)
    max_scale_mul_log: float = 4.605170185988092
    num_levels: int = 15  # rows of lvl_embed
    rope_theta: float = 10000.0
    #: tokenizer preset the released weights pair with (for pipeline validation)
    tokenizer: Optional[str] = "d32_reg"

    @property
    def bits_per_token(self) -> int:
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # Python's round is half-to-even, as in the original (layer32: 32.5 -> 32).
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def text_pool_heads(self) -> int:
        head_dim = 64 if self.embed_dim > 4096 else 128
        return max(1, self.text_channels // head_dim)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.ffn_hidden <= 0:
            raise ValueError(f"embed_dim {self.embed_dim} with mlp_ratio {self.mlp_ratio} gives an FFN width of 0")



# --------------------------------------------------------------------------------------------
# text inputs
# --------------------------------------------------------------------------------------------
def unpack_text(text: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kv_compact (N, Ct), cu_seqlens int32 (B+1,)) from a TextFeatures-like object or a tuple.

    Accepts ``(kv_compact, lens, cu_seqlens, max_seqlen)`` as the original code passes it, or any
    object with ``kv_compact`` and ``cu_seqlens`` (or ``lens``) attributes.
    """
    if isinstance(text, (tuple, list)):
        kv = text[0]
        cu = text[2] if len(text) > 2 and text[2] is not None else None
        lens = text[1] if len(text) > 1 else None
    else:
        kv = text.kv_compact
        cu = getattr(text, "cu_seqlens", None)
        lens = getattr(text, "lens", None)
    if cu is None:
        if lens is None:
            raise ValueError("text features need cu_seqlens or lens")
        lens_t = torch.as_tensor(lens, dtype=torch.int32)
        cu = F.pad(lens_t.cumsum(0, dtype=torch.int32), (1, 0))
    cu = torch.as_tensor(cu).to(torch.int32).cpu()
    if int(cu[-1]) != kv.shape[0]:
        raise ValueError(f"packed text has {kv.shape[0]} rows but cu_seqlens ends at {int(cu[-1])}")
    return kv, cu


@dataclass
class TextCondition:
    """The text path's outputs, computed once per forward (or once per generated image)."""

    cond_BD: torch.Tensor          # (B, D) pooled text: SOS embedding and AdaLN condition
    ada_gss: torch.Tensor          # (B, 1, 6, C) shared AdaLN output
    memory: torch.Tensor           # (N, C) cross-attention memory, packed
    cu_seqlens: torch.Tensor       # (B + 1,) int32, on CPU
    #: fast path only: the memory as a padded batch (B, T, C) and its key mask (B, 1, 1, T)
    padded_memory: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.cond_BD.shape[0]

    def select(self, n: int) -> "TextCondition":
        """The condition of the first ``n`` sequences (e.g. the conditional half under CFG)."""
        cu = self.cu_seqlens[:n + 1]
        return TextCondition(cond_BD=self.cond_BD[:n], ada_gss=self.ada_gss[:n], memory=self.memory[:int(cu[-1])],
                             cu_seqlens=cu,
                             padded_memory=None if self.padded_memory is None else self.padded_memory[:n],
                             key_mask=None if self.key_mask is None else self.key_mask[:n])


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` in fp32 (the text features' norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample), identity in eval or at rate 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def linear_with_bias(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, layer.weight, bias)`` for a bias-free Linear with a separately built bias.

    The fused product-plus-bias is what the released code computes (its rounding is part of
    parity).  A layer wrapped by an adapter library (LoRA: a module whose ``base_layer`` is the
    Linear) is called as a module instead, so the adapter's update is applied; the bias is added
    afterwards.
    """
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight, bias)
    return layer(x) + bias.to(x.dtype)


class CrossAttention(nn.Module):
    """Attention from queries to packed variable-length text, or an attentive pool (docs/model.md#text-conditioning).

    With ``for_attn_pool`` the query is the learned ``mat_q`` (1, heads, D/heads), one query row
    per sample; otherwise queries come from ``mat_q`` (a Linear) on the tokens.
    K has no bias (``zero_k_bias`` buffer); V has ``v_bias``.  Softmax scale 1/sqrt(head width).
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.for_attn_pool = for_attn_pool
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        if not for_attn_pool:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        #: fast path: round q, k, v to bf16 as the released flash-attn call (see fast_attention)
        self.round_bf16 = True
        #: fast path, while generating with a KV cache: the text keys/values of the last padded
        #: memory seen, [memory, version, kv]; None when off (see kv_caching)
        self.text_kv: Optional[list] = None

    def kv(self, memory: torch.Tensor) -> torch.Tensor:
        """(N, kv_dim) -> (N, 2, H, hd)."""
        bias = torch.cat((self.zero_k_bias, self.v_bias))
        return linear_with_bias(self.mat_kv, memory, bias).view(-1, 2, self.num_heads, self.head_dim)

    def _text_kv(self, memory: torch.Tensor) -> torch.Tensor:
        """``kv(memory)``, reused while ``text_kv`` is on and the memory is the same tensor (every
        scale of one generation reads the same text: the product is computed once, not per scale)."""
        if self.text_kv is None:
            return self.kv(memory)
        # the cache holds the memory tensor itself, so its storage cannot be reused by another one;
        # inference tensors (torch.inference_mode) have no version counter and cannot be changed
        # in place outside inference mode
        version = -1 if memory.is_inference() else memory._version
        if not self.text_kv or self.text_kv[0] is not memory or self.text_kv[1] != version:
            self.text_kv[:] = [memory, version, self.kv(memory)]
        return self.text_kv[2]

    def forward(self, x: Optional[torch.Tensor], memory: torch.Tensor, cu_seqlens: torch.Tensor,
                batch_size: Optional[int] = None, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, Lq, C) (None for the pool); memory (N, kv_dim) packed with ``cu_seqlens``, or,
        with ``key_mask`` (B, 1, 1, T), a padded batch (B, T, kv_dim) attended in one SDPA call
        (fast path).  Returns (B, Lq, C), or (B, C) for the pool."""
        if key_mask is not None:
            return self._forward_padded(x, memory, key_mask)
        kv = self.kv(memory)
        if self.for_attn_pool:
            B = batch_size if batch_size is not None else cu_seqlens.numel() - 1
            q = self.mat_q.expand(B, -1, -1)                                      # (B, H, hd)
            Lq = 1
        else:
            B, Lq, _ = x.shape
            q = self.mat_q(x).reshape(B * Lq, self.num_heads, self.head_dim)
        out = numerics.varlen_cross_attention(q, kv[:, 0], kv[:, 1], Lq, cu_seqlens)
        out = out.reshape(B, Lq, self.embed_dim) if not self.for_attn_pool else out.reshape(B, self.embed_dim)
        return self.proj(out)

    def _forward_padded(self, x: Optional[torch.Tensor], memory: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = memory.shape
        kv = self._text_kv(memory).view(B, T, 2, self.num_heads, self.head_dim)
        if self.for_attn_pool:
            q = self.mat_q.unsqueeze(0).expand(B, 1, -1, -1)                     # (B, 1, H, hd)
        else:
            q = self.mat_q(x).view(B, x.shape[1], self.num_heads, self.head_dim)
        out = fast_attention.padded_cross_attention(q, kv[:, :, 0], kv[:, :, 1], key_mask, self.round_bf16)
        out = out.reshape(B, self.embed_dim) if self.for_attn_pool else out.reshape(B, -1, self.embed_dim)
        return self.proj(out)


class TextAttentivePool(nn.Module):
    """One-query multi-head attention pool of the normed text into a (B, D) vector."""

    def __init__(self, text_channels: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_channels, num_heads, for_attn_pool=True)

    def forward(self, normed_text: torch.Tensor, cu_seqlens: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.ca(None, normed_text, cu_seqlens, key_mask=key_mask)


class SelfAttention(nn.Module):
    """Cosine self-attention with per-head temperature, 2-D RoPE and an optional KV cache."""

    def __init__(self, embed_dim: int, num_heads: int, max_scale_mul_log: float = numerics.MAX_SCALE_MUL_LOG):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.max_scale_mul_log = max_scale_mul_log
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)
        #: [k, v] while caching is enabled (or a preallocated fast_attention.KVBuffer)
        self.kv_cache: Optional[Any] = None
        #: fast path (set by InfinityTransformer.set_attention_backend)
        self.fast_path = False
        #: fast path: "auto", "sdpa" or "gemm" (fast_attention.KERNELS) for cached and dense calls
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, attn_mask: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C).  ``attn_mask``: None (KV-cached scale: everything cached is
        visible), a bool (L, L) mask, or on the fast path a :class:`fast_attention.BlockCausalLayout`;
        cos, sin (L, hd/2) RoPE tables of the tokens."""
        if self.fast_path:
            return self._forward_fast(x, attn_mask, cos, sin)
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear_with_bias(self.mat_qkv, x, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # (B, H, L, hd)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul_log).exp()
        q = F.normalize(q, dim=-1).mul(scale_mul)
        k = F.normalize(k, dim=-1)
        q = numerics.apply_rope(q, cos, sin)
        k = numerics.apply_rope(k, cos, sin)
        k, v = self._cached(k, v)
        if q.dtype != v.dtype:  # under autocast q/k stay fp32 after RoPE
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def _cached(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's keys/values to the KV cache (when on) and return everything cached."""
        if isinstance(self.kv_cache, fast_attention.KVBuffer):
            return self.kv_cache.append(k, v)
        if self.kv_cache is not None:
            if self.kv_cache:
                k = torch.cat((self.kv_cache[0], k), dim=2)
                v = torch.cat((self.kv_cache[1], v), dim=2)
            self.kv_cache[:] = [k, v]
        return k, v

    def _forward_fast(self, x: torch.Tensor, attn: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear_with_bias(self.mat_qkv, x, bias).view(B, L, 3, self.num_heads, self.head_dim)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul_log).exp().view(-1).float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            qk = fast_attention.cosine_qk(qkv[:, :, :2], scale_mul)
            qk = fast_attention.apply_rope_fused(qk, cos, sin)                 # (B, L, 2, H, hd) fp32
        v = qkv[:, :, 2].transpose(1, 2)                                        # (B, H, L, hd)
        q, k = qk.to(v.dtype).transpose(1, 3).unbind(2)                         # (B, H, L, hd)
        k, v = self._cached(k, v)
        if isinstance(attn, fast_attention.BlockCausalLayout):
            out = attn.attend(q, k, v)
        elif fast_attention.resolve_kernel(self.kernel, x.device) == "gemm":
            out = fast_attention.gemm_attention(q, k, v, attn)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttnBlock(nn.Module):
    """One transformer block (docs/model.md#the-transformer)::

        g1, g2, s1, s2, b1, b2 = ada_gss + shared_adaln(cond)
        x = x + DropPath(SA(LN(x) * (1 + s1) + b1) * g1)
        x = x + CA(ca_norm(x), text)
        x = x + DropPath(FFN(LN(x) * (1 + s2) + b2) * g2)
    """

    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0):
        super().__init__()
        C = cfg.embed_dim
        self.embed_dim, self.eps = C, cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        self.sa = SelfAttention(C, cfg.num_heads, cfg.max_scale_mul_log)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.drop_path = DropPath(drop_path)
        #: recompute the self-attention in backward (selective activation checkpointing)
        self.checkpoint_self_attn = False

    def _ca_norm(self, x: torch.Tensor) -> torch.Tensor:
        # Blocks cast to bf16 (the released inference setting, for memory) keep a bf16 affine
        # LayerNorm; CPU autocast does not upcast its parameters, so cast them to the input's dtype.
        w, b = self.ca_norm.weight, self.ca_norm.bias
        if w.dtype != x.dtype:
            return F.layer_norm(x, (self.embed_dim,), w.to(x.dtype), b.to(x.dtype), self.ca_norm.eps)
        return self.ca_norm(x)

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.embed_dim,), None, None, self.eps)

    def _self_attn(self, h: torch.Tensor, attn_mask: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_self_attn and self.training and torch.is_grad_enabled():
            return checkpoint(self.sa, h, attn_mask, cos, sin, use_reentrant=False)
        return self.sa(h, attn_mask, cos, sin)

    def forward(self, x: torch.Tensor, ada_gss: torch.Tensor, text: TextCondition,
                attn_mask: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + ada_gss).unbind(2)
        x = x + self.drop_path(self._self_attn(self._ln(x).mul(scale1.add(1)).add_(shift1), attn_mask, cos, sin).mul_(gamma1))
        if text.padded_memory is not None:  # fast path: one key-masked SDPA call over padded text
            x = x + self.ca(self._ca_norm(x), text.padded_memory, text.cu_seqlens, key_mask=text.key_mask)
        else:
            x = x + self.ca(self._ca_norm(x), text.memory, text.cu_seqlens)
        x = x + self.drop_path(self.ffn(self._ln(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x


class MultipleLayers(nn.Module):
    """A chunk of consecutive blocks (keeps the released ``block_chunks.{c}.module.{j}`` keys)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)

    def forward(self, x, *args, **kwargs):  # pragma: no cover - the model iterates blocks directly
        for block in self.module:
            x = block(x, *args, **kwargs)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.embed_dim, self.eps = embed_dim, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.embed_dim).unbind(2)
        return F.layer_norm(x.float(), (self.embed_dim,), None, None, self.eps).mul(scale.add(1)).add_(shift)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class InfinityTransformer(nn.Module):
    """The Infinity next-scale bitwise transformer (docs/model.md#the-transformer).

    Teacher forcing: ``forward(text, x_wo_prefix, scale_schedule)`` -> logits (B, L, 2*d_tok),
    where ``logits[..., 2*b + c]`` is the logit of bit b taking value c.  Generation goes through
    :meth:`encode_text`, :meth:`sos_tokens`, :meth:`forward_scale` and :meth:`head_logits` with
    the KV cache switched on by :meth:`kv_caching` (see :mod:`infinity_lightning.sampling`).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        cfg = self.config = config
        C, Ct = cfg.embed_dim, cfg.text_channels
        self.embed_dim, self.depth, self.num_heads = C, cfg.depth, cfg.num_heads
        self.bits_per_token = cfg.bits_per_token
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, Ct) / Ct ** 0.5)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(Ct, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, cfg.text_pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.bits_per_token, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits_per_token)
        rates = [cfg.drop_path_rate * i / (cfg.depth - 1) for i in range(cfg.depth)] if cfg.depth > 1 else [0.0]
        blocks = [CrossAttnBlock(cfg, drop_path=rates[i]) for i in range(cfg.depth)]
        if cfg.block_chunks > 1:
            per = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(MultipleLayers(blocks[c * per:(c + 1) * per]) for c in range(cfg.block_chunks))
        else:
            self.blocks = nn.ModuleList(blocks)
        #: None, "full-block" (recompute each block in backward) or "self-attn"
        self.activation_checkpointing: Optional[str] = None
        #: with "full-block": checkpoint every k-th block only (blocks 0, k, 2k, ...)
        self.checkpoint_every = 1
        #: "exact" (the original's rounding), "fast" or "flex"; see set_attention_backend
        self.attention_backend = "exact"
        #: the fast path's self-attention kernel ("auto", "sdpa", "gemm"); see set_attention_backend
        self.self_attention_kernel = "auto"

    @classmethod
    def from_pretrained(cls, path_or_preset: Any, **kwargs: Any) -> "InfinityTransformer":
        """A transformer from weights (file, sharded folder, training checkpoint) or a preset name
        (random weights), in eval mode.

        Delegates to :func:`infinity_lightning.checkpoints.load_transformer` (``device=``,
        ``dtype=``, ``config=``, ``use_ema=`` and :class:`TransformerConfig` field overrides).
        """
        from ..checkpoints import load_transformer  # the loader (layer 3) builds this class

        return load_transformer(path_or_preset, **kwargs)

    # ---- structure ---------------------------------------------------------------------------
    def block_list(self) -> List[CrossAttnBlock]:
        """All blocks in execution order."""
        if hasattr(self, "block_chunks"):
            return [b for chunk in self.block_chunks for b in chunk.module]
        return list(self.blocks)

    def cast_blocks(self, dtype: torch.dtype) -> "InfinityTransformer":
        """Cast the transformer blocks' weights (not the text path, embeddings or head) to
        ``dtype``, as the released inference code does with bf16 to halve the memory of the
        blocks.  Run the model under ``torch.autocast(dtype=torch.bfloat16)`` afterwards."""
        for block in self.block_list():
            block.to(dtype)
        return self

    def set_activation_checkpointing(self, mode: Optional[str], every: int = 1) -> None:
        """Activation checkpointing in training: None; ``"full-block"`` recomputes whole blocks in
        backward (with ``every=k`` only every k-th block, trading memory for less recompute);
        ``"self-attn"`` recomputes only each block's self-attention (the attention core, RoPE and
        the q/k/v projection), keeping the FFN and cross-attention activations."""
        if mode not in (None, False, "none", "full-block", "self-attn"):
            raise ValueError(f"activation checkpointing mode {mode!r}; expected None, 'full-block' or 'self-attn'")
        if int(every) < 1:
            raise ValueError(f"checkpoint every {every!r} blocks; expected an integer >= 1")
        self.activation_checkpointing = None if mode in (None, False, "none") else mode
        self.checkpoint_every = int(every)
        for block in self.block_list():
            block.checkpoint_self_attn = self.activation_checkpointing == "self-attn"

    def set_attention_backend(self, backend: str = "exact", *, cross_attention_bf16: bool = True,
                              kernel: Optional[str] = None) -> None:
        """Choose how attention and the elementwise work around it are computed.

        ``"exact"`` (default): the original's rounding (padding to a multiple of 128, dense
        masked SDPA, bf16 per-sample cross-attention); parity fixtures match to 1e-5.
        ``"fast"``: no padding; block-causal self-attention per group of scales over key prefixes
        (skips the masked upper triangle); cross-attention as one padded key-masked SDPA call;
        RoPE and the cosine normalisation on the fused q/k tensor in fewer kernels (the same
        roundings).  Equal to the exact path within fp32/bf16 rounding.
        ``"flex"``: as "fast" but the block-causal attention is one compiled FlexAttention call
        (for CUDA; on CPU torch 2.13 has no FlexAttention backward, and the
        forward compiled for ~100 s and ran no faster than "fast", see benchmarks/README.md).
        ``cross_attention_bf16`` (fast/flex): keep the bf16 rounding of the cross-attention and
        the text pool (default; the released models' numerics) or compute them in fp32.
        ``kernel`` (fast): how the self-attention is computed, ``"auto"`` (the default: ``"gemm"``
        on CPU, ``"sdpa"`` elsewhere), ``"sdpa"`` (SDPA per group of scales) or ``"gemm"``
        (batched matrix products per group, fp32 softmax; :mod:`.fast_attention`); None keeps
        the current choice.  The switch is not part of the state dict.
        """
        if backend not in ("exact", "fast", "flex"):
            raise ValueError(f"attention backend {backend!r}; expected 'exact', 'fast' or 'flex'")
        if kernel is not None:
            fast_attention.resolve_kernel(kernel, torch.device("cpu"))  # validates the name
            self.self_attention_kernel = kernel
        self.attention_backend = backend
        fast = backend != "exact"
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fast_path = fast
                module.kernel = self.self_attention_kernel
            elif isinstance(module, CrossAttention):
                module.round_bf16 = bool(cross_attention_bf16)

    def set_fast_path(self, enabled: bool = True, **kwargs: Any) -> None:
        """Shorthand: ``set_attention_backend("fast" if enabled else "exact", **kwargs)``."""
        self.set_attention_backend("fast" if enabled else "exact", **kwargs)

    @property
    def fast_path(self) -> bool:
        """True when a fast attention backend is selected."""
        return self.attention_backend != "exact"

    # ---- text ----------------------------------------------------------------------------------
    def encode_text(self, text: Any, drop_mask: Optional[torch.Tensor] = None) -> TextCondition:
        """Run the text path once over all packed sequences.

        ``drop_mask`` (B,) bool replaces the rows of the marked prompts by the learned null
        condition ``cfg_uncond[:len_i]`` (text dropout for classifier-free guidance training).
        """
        kv, cu = unpack_text(text)
        self.check_text_lengths(cu)
        kv = kv.float()
        if drop_mask is not None and bool(drop_mask.any()):
            kv = self.replace_with_null(kv, cu, drop_mask)
        if self.training and torch.is_grad_enabled():
            # keeps cfg_uncond in the graph on steps without dropout (DDP needs every parameter used)
            kv = kv + self.cfg_uncond[0, 0] * 0
        normed = self.text_norm(kv)
        padded_memory = key_mask = None
        if self.fast_path:
            plan = fast_attention.PaddedText.from_cu_seqlens(cu, normed.device)
            key_mask = plan.key_mask
            cond_BD = self.text_proj_for_sos(plan.pad(normed), cu, key_mask=key_mask)
            memory = self.text_proj_for_ca(normed)
            padded_memory = plan.pad(memory)
        else:
            cond_BD = self.text_proj_for_sos(normed, cu)
            memory = self.text_proj_for_ca(normed)
        ada_gss = self.shared_ada_lin(cond_BD.float()).float().view(-1, 1, 6, self.embed_dim)
        return TextCondition(cond_BD=cond_BD, ada_gss=ada_gss, memory=memory, cu_seqlens=cu,
                             padded_memory=padded_memory, key_mask=key_mask)

    def check_text_lengths(self, cu_seqlens_or_lens: Any) -> None:
        """Prompts may not be longer than ``text_maxlen`` tokens: the learned null condition has
        that many rows, and the released models never saw longer text.  Takes cu_seqlens (a
        tensor) or a list of lengths."""
        if isinstance(cu_seqlens_or_lens, torch.Tensor):
            lens = (cu_seqlens_or_lens[1:] - cu_seqlens_or_lens[:-1]).tolist()
        else:
            lens = [int(n) for n in cu_seqlens_or_lens]
        longest = max(lens, default=0)
        if longest > self.config.text_maxlen:
            raise ValueError(f"a prompt has {longest} text tokens but this transformer takes at most "
                             f"text_maxlen={self.config.text_maxlen}; encode prompts with "
                             f"TextEncoder(max_length={self.config.text_maxlen}) or shorten them")

    def null_text(self, lens: Sequence[int]) -> torch.Tensor:
        """Packed null condition rows ``cfg_uncond[:len_i]`` for the given lengths."""
        self.check_text_lengths(lens)
        return torch.cat([self.cfg_uncond[:int(n)] for n in lens], dim=0)

    def replace_with_null(self, kv: torch.Tensor, cu: torch.Tensor, drop_mask: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(cu.numel() - 1):
            a, b = int(cu[i]), int(cu[i + 1])
            rows.append(self.cfg_uncond[: b - a].to(kv.dtype) if bool(drop_mask[i]) else kv[a:b])
        return torch.cat(rows, dim=0)

    # ---- teacher forcing -------------------------------------------------------------------------
    def forward(self, text: Any, x_wo_prefix: torch.Tensor, scale_schedule: Schedule,
                cond_drop_mask: Optional[torch.Tensor] = None, return_intermediates: bool = False):
        """Teacher-forced logits (B, L, 2 * d_tok).

        ``x_wo_prefix`` (B, L - 1, d_tok) holds the next-scale inputs of scales 1..K-1 (from
        :func:`infinity_lightning.self_correction.teacher_forcing_inputs`).  With
        ``return_intermediates`` also returns a dict with the text condition, the sequence
        entering the first block and every block's output (padded length).
        """
        cond = self.encode_text(text, cond_drop_mask)
        B = x_wo_prefix.shape[0]
        scale_schedule = scales.as_schedule(scale_schedule)
        L = scale_schedule.num_tokens
        if x_wo_prefix.shape[1] != L - 1:
            raise ValueError(f"x_wo_prefix has {x_wo_prefix.shape[1]} tokens; schedule needs L-1 = {L - 1}")
        if len(cond) != B:
            raise ValueError(f"text batch {len(cond)} != image batch {B}")
        sos = cond.cond_BD.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
        x = torch.cat((sos, self.word_embed(x_wo_prefix.float())), dim=1)
        device = x.device
        levels = numerics.scale_ids(scale_schedule, device)
        if self.fast_path:  # no padding; the layout skips the masked blocks
            Lp = L
            x = x + self.lvl_embed(levels).unsqueeze(0)
            if self.attention_backend == "flex":
                backend = "flex"
            else:
                kernel = fast_attention.resolve_kernel(self.self_attention_kernel, device)
                backend = "gemm" if kernel == "gemm" else "chunked"
            mask = fast_attention.block_causal_layout(scale_schedule, backend=backend)
        else:
            Lp = numerics.padded_length(L, self.config.pad_to_multiplier)
            x = torch.cat([x + self.lvl_embed(levels).unsqueeze(0), x.new_zeros(B, Lp - L, x.shape[-1])], dim=1)
            mask = numerics.block_causal_mask(scale_schedule, Lp, device)
        cos, sin = numerics.rope_cos_sin(scale_schedule, self.config.head_dim, Lp, self.config.rope_theta, device)
        inter: Dict[str, Any] = {"cond": cond, "block_input": x, "block_outputs": []} if return_intermediates else {}
        for i, block in enumerate(self.block_list()):
            x = self._run_block(block, x, cond, mask, cos, sin, i)
            if return_intermediates:
                inter["block_outputs"].append(x)
        logits = self.head_logits(x[:, :L], cond.cond_BD)
        return (logits, inter) if return_intermediates else logits

    def _run_block(self, block: CrossAttnBlock, x, cond: TextCondition, mask, cos, sin, index: int = 0):
        if (self.activation_checkpointing == "full-block" and index % self.checkpoint_every == 0
                and self.training and torch.is_grad_enabled()):
            return checkpoint(block, x, cond.ada_gss, cond, mask, cos, sin, use_reentrant=False)
        return block(x, cond.ada_gss, cond, mask, cos, sin)

    def head_logits(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Bitwise head on hidden states (B, l, C) -> logits (B, l, 2 * d_tok), in fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.head(self.head_nm(x.float(), cond_BD.float()))

    # ---- generation ------------------------------------------------------------------------------
    def sos_tokens(self, cond: TextCondition) -> torch.Tensor:
        """First-scale input (B, 1, C): pooled text + ``pos_start``."""
        B = len(cond)
        return cond.cond_BD.unsqueeze(1).expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)

    def kv_caching(self, enabled: bool, capacity: Optional[int] = None) -> None:
        """Switch the self-attention KV cache on (emptied) or off (dropped).

        ``capacity`` (tokens of the whole schedule) preallocates the cache
        (:class:`fast_attention.KVBuffer`, written in place) instead of growing it by
        concatenation; on the exact path a KVBuffer holds the same values.  On the fast path the
        cross-attention's text keys/values are kept too (computed once per generation instead of
        once per scale; the same values).
        """
        for block in self.block_list():
            if not enabled:
                block.sa.kv_cache = None
                block.ca.text_kv = None
            else:
                block.sa.kv_cache = fast_attention.KVBuffer(capacity) if capacity is not None else []
                block.ca.text_kv = [] if self.fast_path else None

    def select_kv_cache(self, n: int) -> None:
        """Keep the first ``n`` sequences of every block's KV cache (drop the others)."""
        for block in self.block_list():
            cache = block.sa.kv_cache
            if isinstance(cache, fast_attention.KVBuffer):
                cache.select(n)
            elif cache:
                cache[:] = [cache[0][:n], cache[1][:n]]

    def forward_scale(self, x: torch.Tensor, cond: TextCondition, scale_index: int, scale_schedule: Schedule,
                      cfg_hidden: Optional[Tuple[int, float, int]] = None) -> torch.Tensor:
        """Run the blocks on one scale's tokens with the KV cache; returns hidden states.

        x: (B', h*w, C) embedded inputs of scale ``scale_index`` (before the level embedding).
        RoPE rows start at the scale's offset in the sequence.  ``cfg_hidden`` = (layer index,
        cfg, B) mixes the conditional and unconditional halves after that layer (guidance on
        hidden states) and continues with the mixed state duplicated.
        """
        offsets = scales.as_schedule(scale_schedule).offsets
        start, end = offsets[scale_index], offsets[scale_index + 1]
        cos, sin = numerics.rope_cos_sin(scale_schedule, self.config.head_dim, None, self.config.rope_theta, x.device)
        cos, sin = cos[start:end], sin[start:end]
        x = x + self.lvl_embed.weight[scale_index]
        for i, block in enumerate(self.block_list()):
            x = block(x, cond.ada_gss, cond, None, cos, sin)
            if cfg_hidden is not None and i == cfg_hidden[0]:
                _, cfg, B = cfg_hidden
                mixed = cfg * x[:B] + (1 - cfg) * x[B:]
                x = torch.cat((mixed, mixed), dim=0)
        return x


def init_weights(model: InfinityTransformer, tini: float = -1.0, aln: float = 1e-3, alng: float = 5e-6,
                 hd0: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
    """Training-from-scratch initialisation (docs/model.md#initialisation).

    Linear weights and ``lvl_embed`` ~ N(0, tini) (tini < 0 means sqrt(1 / (3C))), biases 0,
    LayerNorm affine 1/0; ``cfg_uncond`` ~ truncN(0, 1.2, +-2) / sqrt(Ct); ``pos_start`` and the
    pool query ~ truncN(0, sqrt(1/3C)); temperatures ln 4; then the special init: head AdaLN
    x aln, head x hd0, output projections / sqrt(2 depth), block gammas x alng, scales/shifts x aln.
    """
    cfg = model.config
    C = cfg.embed_dim
    std = (1 / (3 * C)) ** 0.5 if tini < 0 else tini
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, 0.0, std, -2.0, 2.0, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
        nn.init.trunc_normal_(model.cfg_uncond, 0.0, 1.2, -2.0, 2.0, generator=generator)
        model.cfg_uncond.div_(cfg.text_channels ** 0.5)
        nn.init.trunc_normal_(model.pos_start, 0.0, (1 / (3 * C)) ** 0.5, -2.0, 2.0, generator=generator)
        nn.init.trunc_normal_(model.text_proj_for_sos.ca.mat_q, 0.0, (1 / (3 * C)) ** 0.5, -2.0, 2.0, generator=generator)
        model.text_proj_for_sos.ca.v_bias.zero_()
        model.text_norm.weight.fill_(1.0)
        model.head_nm.ada_lin[-1].weight.mul_(aln)
        model.head_nm.ada_lin[-1].bias.zero_()
        model.head.weight.mul_(hd0)
        model.head.bias.zero_()
        for block in model.block_list():
            block.sa.scale_mul_1H11.fill_(math.log(4.0))
            for b in (block.sa.q_bias, block.sa.v_bias, block.ca.v_bias):
                b.zero_()
            for proj in (block.sa.proj, block.ca.proj, block.ffn.fc2):
                proj.weight.mul_(1 / math.sqrt(2 * cfg.depth))
            block.ada_gss.copy_(torch.randn(block.ada_gss.shape, generator=generator) / C ** 0.5)
            block.ada_gss[..., 0:2, :].mul_(alng)
            block.ada_gss[..., 2:6, :].mul_(aln)

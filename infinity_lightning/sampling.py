"""KV-cached autoregressive generation over a scale schedule (spec 5.3, 5.4).

Per scale k: the blocks run on the scale's tokens with the self-attention KV cache; the head
gives 2 logits per bit; the logits are multiplied by ``1/tau_k`` and mixed with classifier-free
guidance ``cfg_k * z_cond + (1 - cfg_k) * z_uncond``; each bit is sampled (top-k, top-p, optional
Gumbel) with a ``torch.Generator``; the bits become codes, the upsampled codes are summed, and the
bilinearly downsampled sum is the next scale's input.  After the last scale the tokenizer
decodes the sum.

The unconditional half is the learned null condition ``cfg_uncond[:len_i]`` (same length as the
prompt) or, when given, the negative prompts.  Both halves run through the text path together
and through every block (the unconditional KV cache is needed by later scales).

Hooks make variants plug-ins: an object with ``on_logits(scale, logits)`` (logits (B, l, d_tok,
2), return the edited tensor) and/or ``on_bits(scale, bits)`` (bits (B, l, d_tok) int64, return
the edited tensor) is called at every scale; :class:`ForceBits` teacher-forces known bits (the
first scales of a reference, or a masked region for inpainting).

Fast options (keywords of :func:`generate`, all off by default; the defaults reproduce the
original's numbers): ``fast`` (the transformer's fast attention backend and a preallocated KV
cache), ``dtype=torch.bfloat16`` (blocks under bf16 autocast, as the released inference scripts
run them; the head and the text path stay fp32), ``skip_uncond`` (drop the unconditional half
once every remaining scale has cfg 1), ``decode_dtype`` / ``decode_channels_last`` (the
tokenizer decoder in bf16 / channels-last), ``compile`` (``torch.compile`` of the blocks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import scales as _scales
from .models import numerics
from .models.bsq_vae import bilinear_resize, bits_to_codes
from .models.infinity import InfinityTransformer, unpack_text

FloatOrList = Union[float, Sequence[float]]

#: Sampling settings of the released models (spec 5.1).
RELEASED_DEFAULTS = {"2b": dict(cfg=3.0, tau=0.5, top_k=900, top_p=0.97),
                     "8b": dict(cfg=3.0, tau=1.0, top_k=900, top_p=0.97)}


@dataclass
class GenerationOutput:
    """``bit_labels``: per scale, uint8 (B, 1, h, w, d) in tokenizer (VAE) layout;
    ``token_bits``: per scale, (B, h*w, d_tok) in token layout; ``summed_codes`` (B, d, H, W)
    (channels-last); ``images`` (B, 3, 16*h, 16*w) in [-1, 1] when a tokenizer was given;
    ``logit_diff``: per scale (B, h*w, d_tok), logit(1) - logit(0) after 1/tau and guidance."""

    bit_labels: List[torch.Tensor]
    token_bits: List[torch.Tensor]
    summed_codes: torch.Tensor
    images: Optional[torch.Tensor] = None
    logit_diff: List[torch.Tensor] = field(default_factory=list)
    logits: List[torch.Tensor] = field(default_factory=list)


class ForceBits:
    """Hook that replaces sampled bits by given ones.

    ``bits``: per scale, token-layout (B, h*w, d_tok) or VAE-layout (B, 1, h, w, d) labels (only
    the first ``len(bits)`` scales are forced, as the original's ``gt_leak``); ``mask``
    (optional): per scale a bool tensor broadcastable to (B, h*w, d_tok) or (B, h*w, 1), True
    where the given bits are kept (inpainting); elsewhere the sampled bits stay.
    """

    def __init__(self, bits: Sequence[torch.Tensor], mask: Optional[Sequence[torch.Tensor]] = None,
                 patchify: bool = False):
        self.bits = [self._tokens(b, patchify) for b in bits]
        self.mask = list(mask) if mask is not None else None

    @staticmethod
    def _tokens(b: torch.Tensor, patchify: bool) -> torch.Tensor:
        if b.dim() == 3:
            return b
        B, _, H, W, d = b.shape
        if not patchify:
            return b.reshape(B, H * W, d)
        t = F.pixel_unshuffle(b.squeeze(1).permute(0, 3, 1, 2), 2)
        return t.reshape(B, t.shape[1], -1).transpose(1, 2)

    def on_bits(self, scale: int, bits: torch.Tensor) -> torch.Tensor:
        if scale >= len(self.bits):
            return bits
        given = self.bits[scale].to(device=bits.device, dtype=bits.dtype)
        if self.mask is None:
            return given
        keep = self.mask[scale].to(bits.device).bool()
        return torch.where(keep, given, bits)


def _per_scale(value: FloatOrList, K: int, name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * K
    values = [float(v) for v in value]
    if len(values) < K:
        raise ValueError(f"{name} has {len(values)} entries for a {K}-scale schedule")
    return values[:K]


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, generator: Optional[torch.Generator] = None,
                gumbel: bool = False) -> torch.Tensor:
    """Sample one value per row of ``logits`` (N, V) (V = 2 for bits) -> (N,) int64.

    top-k keeps the k largest logits (ties kept); top-p removes the smallest values whose
    cumulative probability is <= 1 - top_p, never the largest.  ``gumbel`` samples by
    argmax(logits + Gumbel noise) instead of ``torch.multinomial`` (same distribution).
    """
    logits = logits.float().clone()
    V = logits.shape[-1]
    if top_k > 0 and top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits.masked_fill_(remove, float("-inf"))
    if gumbel:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
        return (logits - torch.log(-torch.log(u))).argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _null_text(model: InfinityTransformer, cu: torch.Tensor) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    return model.null_text(lens)


@torch.no_grad()
def generate(model: InfinityTransformer, text: Any, scale_schedule: Sequence[Sequence[int]], *,
             tokenizer: Optional[torch.nn.Module] = None, negative_text: Any = None,
             cfg: FloatOrList = 3.0, tau: FloatOrList = 1.0, top_k: int = 900, top_p: float = 0.97,
             gumbel: bool = False, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             cfg_insertion_layer: int = 0, hooks: Sequence[Any] = (), num_scales: Optional[int] = None,
             return_logits: bool = False, fast: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
             skip_uncond: bool = False, decode_dtype: Optional[torch.dtype] = None,
             decode_channels_last: bool = False, compile: bool = False) -> GenerationOutput:
    """Generate bit labels (and images, given ``tokenizer``) for a batch of prompts.

    ``text``: packed text features of B prompts (``TextFeatures`` or the original 4-tuple);
    ``scale_schedule``: token-side schedule [(1, h, w), ...] (``scales.get_scale_schedule``);
    ``cfg``/``tau``: a value or one per scale; ``cfg_insertion_layer``: 0 = guidance on logits
    (all released models), n < 0 = mix hidden states after layer depth + n;
    ``generator``/``seed``: the random stream of the sampler (a generator on the model's device);
    ``num_scales``: stop after that many scales (no images then);
    ``hooks``: see the module docstring.

    Fast options (off by default):

    * ``fast``: run with the transformer's fast attention backend (``True``) or the exact one
      (``False``) for this call; ``None`` keeps the model's setting.  On the fast path the KV
      cache is preallocated for the whole schedule and written in place, and the per-scale loop
      has no host synchronisation (fixed shapes per scale; CUDA-graph friendly).
    * ``dtype=torch.bfloat16``: the blocks under bf16 autocast (weights cast once per call by
      autocast's cache), text path and head in fp32.
    * ``skip_uncond``: with guidance, drop the unconditional half (its text rows, SOS and KV
      cache) from the first scale after which every scale has cfg 1.  The original keeps running
      it through all blocks to fill a KV cache that no later scale reads; dropping it earlier
      than that would be wrong (a later guided scale needs the unconditional keys of every
      earlier scale), and recomputing them then costs what it saves.  The conditional half's
      numbers do not depend on the other half up to the row count of the matrix products, so
      the sampled bits are the same; with a constant cfg != 1 nothing is skipped.
    * ``decode_dtype`` / ``decode_channels_last``: decode with a cached copy of the decoder in
      that dtype / with channels-last activations (see :meth:`BSQVAE.decode`).
    * ``compile``: ``torch.compile`` each block (compiles once per scale length; off by default
      because it does not pay for one image on CPU, see benchmarks/README.md).
    """
    device = next(model.parameters()).device
    schedule = [(int(t), int(h), int(w)) for t, h, w in scale_schedule]
    K = len(schedule)
    patchify = model.config.apply_spatial_patchify
    vae_schedule = _scales.tokenizer_schedule(schedule, patchify)
    cfgs, taus = _per_scale(cfg, K, "cfg"), _per_scale(tau, K, "tau")
    if cfg_insertion_layer > 0:
        raise ValueError("cfg_insertion_layer must be 0 (guidance on logits) or negative (on hidden states)")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    previous_backend = model.attention_backend
    if fast is not None and bool(fast) != model.fast_path:
        model.set_attention_backend("fast" if fast else "exact")
    try:
        return _generate(model, text, schedule, vae_schedule, cfgs, taus, tokenizer=tokenizer,
                         negative_text=negative_text, top_k=top_k, top_p=top_p, gumbel=gumbel, generator=generator,
                         cfg_insertion_layer=cfg_insertion_layer, hooks=hooks, num_scales=num_scales,
                         return_logits=return_logits, dtype=dtype, skip_uncond=skip_uncond,
                         decode_dtype=decode_dtype, decode_channels_last=decode_channels_last, compile=compile)
    finally:
        if model.attention_backend != previous_backend:
            model.set_attention_backend(previous_backend)


def _generate(model: InfinityTransformer, text: Any, schedule, vae_schedule, cfgs, taus, *, tokenizer, negative_text,
              top_k, top_p, gumbel, generator, cfg_insertion_layer, hooks, num_scales, return_logits, dtype,
              skip_uncond, decode_dtype, decode_channels_last, compile) -> GenerationOutput:
    device = next(model.parameters()).device
    K = len(schedule)
    patchify = model.config.apply_spatial_patchify
    kv, cu = unpack_text(text)
    kv = kv.to(device)
    B = cu.numel() - 1
    guided = any(c != 1.0 for c in cfgs)
    if guided:
        if negative_text is not None:
            neg_kv, neg_cu = unpack_text(negative_text)
            if neg_cu.numel() - 1 != B:
                raise ValueError(f"{neg_cu.numel() - 1} negative prompts for {B} prompts")
            neg_kv = neg_kv.to(device)
        else:
            neg_kv, neg_cu = _null_text(model, cu).to(kv.dtype), cu
        kv, cu = numerics.pack_two(kv, cu, neg_kv, neg_cu)
    cond = model.encode_text((kv, None, cu, None))
    hidden_layer = model.depth + cfg_insertion_layer if cfg_insertion_layer < 0 else None
    steps = K if num_scales is None else min(int(num_scales), K)

    x = model.sos_tokens(cond)
    summed: Any = 0  # a scalar start: the sum inherits the codes' channels-last layout (numerics, point 7)
    out = GenerationOutput(bit_labels=[], token_bits=[], summed_codes=None)
    model.kv_caching(True, capacity=_scales.num_tokens(schedule) if model.fast_path else None)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype not in (None, torch.float32)
                else contextlib.nullcontext())
    blocks = model.block_list()
    compiled = _compile_blocks(blocks) if compile else None
    try:
        for k in range(steps):
            _, h, w = schedule[k]
            c, t = cfgs[k], taus[k]
            if guided and skip_uncond and all(v == 1.0 for v in cfgs[k:]):
                # no later scale reads the unconditional half (see the docstring)
                guided = False
                cond = cond.select(B)
                model.select_kv_cache(B)
                x = x[:B]
            mix_hidden = (hidden_layer, c, B) if (guided and hidden_layer is not None and c != 1.0) else None
            with autocast:
                hidden = model.forward_scale(x, cond, k, schedule, cfg_hidden=mix_hidden)
            if guided and c != 1.0 and hidden_layer is None:
                z = numerics.apply_temperature(model.head_logits(hidden, cond.cond_BD), t)
                z = c * z[:B] + (1 - c) * z[B:]
            else:
                z = numerics.apply_temperature(model.head_logits(hidden[:B], cond.cond_BD[:B]), t)
            z = z.view(B, h * w, -1, 2)
            for hook in hooks:
                if hasattr(hook, "on_logits"):
                    z = hook.on_logits(k, z)
            if return_logits:
                out.logits.append(z.reshape(B, -1, 2).clone())
                out.logit_diff.append(z[..., 1] - z[..., 0])
            bits = sample_bits(z.reshape(-1, 2), top_k, top_p, generator, gumbel).view(B, h * w, -1)
            for hook in hooks:
                if hasattr(hook, "on_bits"):
                    bits = hook.on_bits(k, bits)
            out.token_bits.append(bits.to(torch.uint8))
            grid = bits.view(B, h, w, -1)
            if patchify:
                # a permuted view (no copy) keeps the labels d-fastest (numerics, point 7)
                vae_grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2)          # (B, d, 2h, 2w)
                labels = vae_grid.permute(0, 2, 3, 1).unsqueeze(1)               # (B, 1, 2h, 2w, d)
            else:
                labels = grid.unsqueeze(1)                                       # (B, 1, h, w, d)
            out.bit_labels.append(labels.to(torch.uint8))
            codes = bits_to_codes(labels)                                        # (B, d, 1, vh, vw)
            if k < K - 1:
                summed = summed + bilinear_resize(codes, vae_schedule[-1])
                if k + 1 < steps:
                    nxt = bilinear_resize(summed, vae_schedule[k + 1]).squeeze(2)
                    if patchify:
                        nxt = F.pixel_unshuffle(nxt, 2)
                    x = model.word_embed(nxt.reshape(B, nxt.shape[1], -1).transpose(1, 2))
                    if guided:
                        x = torch.cat((x, x), dim=0)
            else:
                summed = summed + codes
    finally:
        model.kv_caching(False)
        if compiled is not None:
            _uncompile_blocks(blocks, compiled)
    out.summed_codes = summed.squeeze(2)
    if tokenizer is not None and steps == K:
        out.images = tokenizer.decode(out.summed_codes, dtype=decode_dtype, channels_last=decode_channels_last)
    return out


def _compile_blocks(blocks: Sequence[torch.nn.Module]) -> List[Any]:
    """Replace each block's forward by a compiled one for this call; returns the originals."""
    originals = []
    for block in blocks:
        originals.append(block.forward)
        block.forward = torch.compile(block.forward, dynamic=False)
    return originals


def _uncompile_blocks(blocks: Sequence[torch.nn.Module], originals: Sequence[Any]) -> None:
    for block, forward in zip(blocks, originals):
        block.forward = forward


def images_to_uint8(images: torch.Tensor, bgr: bool = False) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 by truncation (the original's conversion)."""
    x = ((images.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.flip(-1) if bgr else x

"""KV-cached autoregressive generation over a scale schedule (docs/model.md#sampling).

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
tokenizer decoder in bf16 / channels-last), ``compile`` (``torch.compile`` of the blocks),
``quantize="int8"`` (CPU: the blocks' linears dynamically quantised to int8; not bit-identical,
its bit agreement and speed are in benchmarks/README.md).  ``cfg_schedule="unguided_last:N"``
runs the last N scales without guidance; with ``skip_uncond`` their unconditional half is not
computed at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import scales
from .dtypes import parse_dtype
from .models import fast_attention, numerics
from .models.bsq_vae import bilinear_resize, bits_to_codes
from .models.infinity import InfinityTransformer, unpack_text

__all__ = ["SamplingConfig", "GenerationOutput", "ForceBits", "generate", "sample_bits", "images_to_uint8",
           "vae_to_tokens"]

#: A per-scale value: one number for every scale, or one per scale.
PerScale = Union[float, Sequence[float]]
Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def _option(default: Any, help: str, cli: Optional[type] = None, **kw: Any) -> Any:
    """A :class:`SamplingConfig` field; ``cli`` (a type) also makes it a command-line flag."""
    metadata = {"help": help, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _unguided_last(schedule: Any) -> Optional[int]:
    """N of a ``cfg_schedule`` string ``'unguided_last:N'`` (N >= 0), else None."""
    if not isinstance(schedule, str) or not schedule.startswith("unguided_last:"):
        return None
    value = schedule.split(":", 1)[1]
    return int(value) if value.isdigit() else None


def _per_scale(value: Any, K: int, name: str) -> List[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * K
    values = [float(v) for v in value]
    if len(values) < K:
        raise ValueError(f"{name} has {len(values)} entries for a {K}-scale schedule")
    return values[:K]


@dataclass(frozen=True)
class SamplingConfig:
    """Every option of the sampler, carried unchanged from the command line, recipes and the
    pipeline to :func:`generate`.

    Adding an option: a field here (with ``cli=`` to expose it as a flag of ``generate``) and its
    use in :func:`generate`.  :meth:`replace` returns an updated copy; values are validated.
    """

    cfg: PerScale = _option(3.0, "classifier-free guidance scale (one value or one per scale; >= 0)", float)
    tau: PerScale = _option(1.0, "sampling temperature (one value or one per scale; > 0)", float)
    top_k: int = _option(900, "keep the k most likely values per bit (0: off)", int)
    top_p: float = _option(0.97, "nucleus sampling mass in [0, 1] (0 or 1: off)", float)
    gumbel: bool = _option(False, "sample by argmax with Gumbel noise (same distribution)")
    cfg_insertion_layer: int = _option(0, "0: guidance on logits; n < 0: on the hidden states after layer depth+n", int)
    fast: Optional[bool] = _option(None, "fast attention backend (None: the model's setting)")
    dtype: Optional[torch.dtype] = _option(None, "blocks under this autocast dtype (None or fp32: exact)")
    skip_uncond: bool = _option(False, "drop the unconditional half once every later scale has cfg 1")
    decode_dtype: Optional[torch.dtype] = _option(None, "decoder dtype (fast path)")
    decode_channels_last: bool = _option(False, "decoder in channels-last layout (fast path)")
    compile: bool = _option(False, "torch.compile each block for this call")
    cfg_schedule: Any = _option("constant", "guidance over the scales: 'constant', 'linear' (from none at the first "
                                "scale to full cfg at the last), 'unguided_last:N' (cfg 1 on the last N scales), "
                                "or a function (k, K) -> weight in [0, 1]", str)
    quantize: Optional[str] = _option(None, "int8: the blocks' linear layers dynamically quantised to int8 for this "
                                      "call (CPU, fp32 blocks; not bit-identical to fp32)", str)

    def __post_init__(self) -> None:
        for name in ("cfg", "tau"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) and not callable(value):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("dtype", "decode_dtype"):
            object.__setattr__(self, name, parse_dtype(getattr(self, name), what=name))
        self._validate()

    def _validate(self) -> None:
        def values(v: Any) -> List[float]:
            return [] if callable(v) else ([float(v)] if isinstance(v, (int, float)) else list(v))

        if any(not c >= 0 for c in values(self.cfg)):
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {self.cfg!r}")
        if any(not t > 0 for t in values(self.tau)):
            raise ValueError(f"tau (temperature) must be > 0, got {self.tau!r}")
        if int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if int(self.cfg_insertion_layer) > 0:
            raise ValueError("cfg_insertion_layer must be 0 (guidance on logits) or negative (on hidden states), "
                             f"got {self.cfg_insertion_layer!r}")
        if not callable(self.cfg_schedule) and self.cfg_schedule not in ("constant", "linear") \
                and _unguided_last(self.cfg_schedule) is None:
            raise ValueError(f"cfg_schedule must be 'constant', 'linear' or a function (k, K) -> weight, "
                             f"or 'unguided_last:N' (N >= 0), got {self.cfg_schedule!r}")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.quantize is not None and self.dtype not in (None, torch.float32):
            raise ValueError(f"quantize={self.quantize!r} runs fp32 blocks with int8 linears; it cannot be combined "
                             f"with dtype={self.dtype}")

    def replace(self, **changes: Any) -> "SamplingConfig":
        """A copy with ``changes`` applied (``None`` values are ignored); unknown names are an error."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; known: {self.names()}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def names(cls) -> List[str]:
        """The option names."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Optional[Dict[str, Any]], source: str = "sampling settings") -> "SamplingConfig":
        """Build from a mapping (recipes, ``pipeline.json``); unknown keys name ``source``."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"{source}: unknown sampling option(s) {unknown}; known: {cls.names()}")
        return cls(**values)

    def to_dict(self, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-friendly values (dtypes as names); ``only`` selects options."""
        out: Dict[str, Any] = {}
        for name in (only or self.names()):
            value = getattr(self, name)
            if callable(value):
                raise ValueError(f"sampling option {name} is a function and cannot be stored")
            out[name] = (str(value).removeprefix("torch.") if isinstance(value, torch.dtype)
                         else list(value) if isinstance(value, tuple) else value)
        return out

    def per_scale(self, num_scales: int) -> Dict[str, List[float]]:
        """``{"cfg": [...], "tau": [...]}`` with one value per scale; ``cfg_schedule`` weights the
        guidance of scale k as ``1 + (cfg_k - 1) * w(k, K)``."""
        K, schedule = num_scales, self.cfg_schedule
        if schedule == "linear":
            schedule = lambda k, n: k / max(n - 1, 1)  # noqa: E731
        elif schedule == "constant":
            schedule = lambda k, n: 1.0  # noqa: E731
        elif not callable(schedule):
            last = _unguided_last(schedule)
            schedule = lambda k, n: float(k < n - last)  # noqa: E731
        cfgs = [1.0 + (c - 1.0) * float(schedule(k, K)) for k, c in enumerate(_per_scale(self.cfg, K, "cfg"))]
        return {"cfg": cfgs, "tau": _per_scale(self.tau, K, "tau")}


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


def vae_to_tokens(labels: torch.Tensor, patchify: bool = False) -> torch.Tensor:
    """Tokenizer-layout bit labels (B, 1, H, W, d) -> token layout (B, h*w, d_tok), the inverse of
    what the sampler returns as ``bit_labels``.

    Without patchify a token is one latent position (h, w = H, W; d_tok = d).  With 2x2 patchify
    a token is a 2x2 block of positions (h, w = H/2, W/2; d_tok = 4d, ordered as
    ``pixel_unshuffle``: bit-major, then the block's row and column).  Labels already in token
    layout (B, L, d_tok) are returned as they are.
    """
    if labels.dim() == 3:
        return labels
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"bit labels must be (B, 1, H, W, d) or (B, L, d_tok), got shape {tuple(labels.shape)}")
    B, _, H, W, d = labels.shape
    if not patchify:
        return labels.reshape(B, H * W, d)
    t = F.pixel_unshuffle(labels.squeeze(1).permute(0, 3, 1, 2), 2)
    return t.reshape(B, t.shape[1], -1).transpose(1, 2)


class ForceBits:
    """Hook that replaces sampled bits by given ones.

    ``bits``: per scale, token-layout (B, h*w, d_tok) or VAE-layout (B, 1, h, w, d) labels (only
    the first ``len(bits)`` scales are forced, as the original's ``gt_leak``); ``mask``
    (optional): per scale a bool tensor broadcastable to (B, h*w, d_tok) or (B, h*w, 1), True
    where the given bits are kept (inpainting); elsewhere the sampled bits stay.
    """

    def __init__(self, bits: Sequence[torch.Tensor], mask: Optional[Sequence[torch.Tensor]] = None,
                 patchify: bool = False):
        self.bits = [vae_to_tokens(b, patchify) for b in bits]
        self.mask = list(mask) if mask is not None else None

    def on_bits(self, scale: int, bits: torch.Tensor) -> torch.Tensor:
        if scale >= len(self.bits):
            return bits
        given = self.bits[scale].to(device=bits.device, dtype=bits.dtype)
        if self.mask is None:
            return given
        keep = self.mask[scale].to(bits.device).bool()
        return torch.where(keep, given, bits)


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, generator: Generators = None,
                gumbel: bool = False) -> torch.Tensor:
    """Sample one value per row of ``logits`` (N, V) (V = 2 for bits) -> (N,) int64.

    top-k keeps the k largest logits (ties kept); top-p removes the smallest values whose
    cumulative probability is <= 1 - top_p, never the largest.  ``gumbel`` samples by
    argmax(logits + Gumbel noise) instead of ``torch.multinomial`` (same distribution).
    ``generator``: one generator, or one per image for logits (B, N, V) (each image's rows are
    drawn from its own stream, exactly as if the image were sampled alone).
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if logits.dim() != 3 or logits.shape[0] != len(gens):
            raise ValueError(f"{len(gens)} generators for logits of shape {tuple(logits.shape)}; "
                             "per-image generators need logits (B, N, V) with one generator per image")
        return torch.stack([sample_bits(z, top_k, top_p, g, gumbel) for z, g in zip(logits, gens)])
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
    return torch.multinomial(probs.reshape(-1, V), 1, generator=generator).view(probs.shape[:-1])


def _null_text(model: InfinityTransformer, cu: torch.Tensor) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    return model.null_text(lens)


@torch.no_grad()
def generate(model: InfinityTransformer, text: Any, scale_schedule: Sequence[Sequence[int]],
             config: Optional[SamplingConfig] = None, *, tokenizer: Optional[torch.nn.Module] = None,
             negative_text: Any = None, generator: Generators = None, seed: Union[None, int, Sequence[int]] = None,
             hooks: Sequence[Any] = (), num_scales: Optional[int] = None, return_logits: bool = False,
             **options: Any) -> GenerationOutput:
    """Generate bit labels (and images, given ``tokenizer``) for a batch of B prompts.

    Args:
        model: the transformer (eval mode).
        text: packed text features of the B prompts (``TextFeatures`` or the original 4-tuple).
        scale_schedule: a :class:`~infinity_lightning.scales.ScaleSchedule` (or a list of
            ``(1, h, w)`` grids).
        config: the sampler's options (:class:`SamplingConfig`); keyword ``options`` (its field
            names: ``cfg=``, ``tau=``, ``top_k=`` ...) override single fields.
        tokenizer: decodes the generated codes into ``images`` when given.
        negative_text: text features of negative prompts (default: the learned null condition).
        generator / seed: the sampler's random stream: one generator (or seed) for the batch, or
            one per image (a list of B), in which case image i draws exactly what it would draw
            if it were sampled alone with that generator.  Generators live on the model's device.
        hooks: objects with ``on_logits(scale, logits)`` and/or ``on_bits(scale, bits)`` (see the
            module docstring).
        num_scales: stop after that many scales (no images then).
        return_logits: keep the per-scale logits and logit differences.

    The fast options of :class:`SamplingConfig`: ``fast`` runs the transformer's fast attention
    backend for this call (preallocated KV cache written in place; no host synchronisation in
    the per-scale loop); ``dtype=bfloat16`` runs the blocks under bf16 autocast (text path and
    head fp32); ``skip_uncond`` drops the unconditional half (text rows, SOS, KV cache) from the
    first scale after which every scale has cfg 1 (the original keeps running it to fill a KV
    cache no later scale reads; dropping it earlier would be wrong, since a later guided scale
    needs the unconditional keys of every earlier scale; the sampled bits are unchanged);
    ``decode_dtype`` / ``decode_channels_last`` decode with a bf16 / channels-last copy of the
    decoder; ``compile`` compiles each block for this call; ``quantize="int8"`` (CPU, fp32)
    runs int8 copies of the blocks' linears (:func:`fast_attention.int8_blocks`, built once and
    kept while the weights do not change).
    """
    config = (config or SamplingConfig()).replace(**options)
    device = next(model.parameters()).device
    schedule = scales.as_schedule(scale_schedule, model.config.apply_spatial_patchify)
    if generator is None and seed is not None:
        seeds = [seed] if isinstance(seed, int) else list(seed)
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        generator = gens[0] if isinstance(seed, int) else gens
    previous_backend = model.attention_backend
    if config.fast is not None and bool(config.fast) != model.fast_path:
        model.set_attention_backend("fast" if config.fast else "exact")
    try:
        if config.quantize == "int8" and torch.is_autocast_enabled(device.type):
            raise ValueError("quantize='int8' runs fp32 blocks with int8 linears; it cannot run under autocast "
                             "(a pipeline with dtype bf16)")
        blocks = fast_attention.int8_blocks(model) if config.quantize == "int8" else None
        with _blocks_replaced(model, blocks):
            return _generate(model, text, schedule, config, tokenizer=tokenizer, negative_text=negative_text,
                             generator=generator, hooks=hooks, num_scales=num_scales, return_logits=return_logits)
    finally:
        if model.attention_backend != previous_backend:
            model.set_attention_backend(previous_backend)


@contextlib.contextmanager
def _blocks_replaced(model: InfinityTransformer, blocks: Optional[Sequence[torch.nn.Module]]):
    """Run with ``blocks`` (same count and order as ``model.block_list()``) in the model's block
    containers, restoring the originals afterwards; None changes nothing."""
    if blocks is None:
        yield
        return
    containers = [chunk.module for chunk in model.block_chunks] if hasattr(model, "block_chunks") else [model.blocks]
    originals = [list(c) for c in containers]
    replacement = iter(blocks)
    try:
        for c in containers:
            for j in range(len(c)):
                c[j] = next(replacement)
        yield
    finally:
        for c, saved in zip(containers, originals):
            for j, block in enumerate(saved):
                c[j] = block


def _text_condition(model: InfinityTransformer, text: Any, negative_text: Any, guided: bool):
    """The text condition of the B prompts, followed (with guidance) by their unconditional half."""
    device = next(model.parameters()).device
    kv, cu = unpack_text(text)
    kv = kv.to(device)
    B = cu.numel() - 1
    if guided:
        if negative_text is not None:
            neg_kv, neg_cu = unpack_text(negative_text)
            if neg_cu.numel() - 1 != B:
                raise ValueError(f"{neg_cu.numel() - 1} negative prompts for {B} prompts")
            neg_kv = neg_kv.to(device)
        else:
            neg_kv, neg_cu = _null_text(model, cu).to(kv.dtype), cu
        kv, cu = numerics.pack_two(kv, cu, neg_kv, neg_cu)
    return model.encode_text((kv, None, cu, None)), B


def _bits_to_labels(bits: torch.Tensor, B: int, h: int, w: int, patchify: bool) -> torch.Tensor:
    """Token-layout bits (B, h*w, d_tok) -> tokenizer-layout labels uint8 (B, 1, h', w', d)."""
    grid = bits.view(B, h, w, -1)
    if patchify:
        # a permuted view (no copy) keeps the labels d-fastest (numerics, point 7)
        vae_grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2)          # (B, d, 2h, 2w)
        return vae_grid.permute(0, 2, 3, 1).unsqueeze(1).to(torch.uint8)  # (B, 1, 2h, 2w, d)
    return grid.unsqueeze(1).to(torch.uint8)                               # (B, 1, h, w, d)


def _generate(model: InfinityTransformer, text: Any, schedule: scales.ScaleSchedule, config: SamplingConfig, *,
              tokenizer, negative_text, generator, hooks, num_scales, return_logits) -> GenerationOutput:
    device = next(model.parameters()).device
    K = len(schedule)
    vae_schedule = schedule.tokenizer_side
    per_scale = config.per_scale(K)
    cfgs, taus = per_scale["cfg"], per_scale["tau"]
    guided = any(c != 1.0 for c in cfgs)
    cond, B = _text_condition(model, text, negative_text, guided)
    hidden_layer = model.depth + config.cfg_insertion_layer if config.cfg_insertion_layer < 0 else None
    steps = K if num_scales is None else min(int(num_scales), K)
    x = model.sos_tokens(cond)
    summed: Any = 0  # a scalar start: the sum inherits the codes' channels-last layout (numerics, point 7)
    out = GenerationOutput(bit_labels=[], token_bits=[], summed_codes=None)
    model.kv_caching(True, capacity=schedule.num_tokens if model.fast_path else None)
    autocast = (torch.autocast(device_type=device.type, dtype=config.dtype)
                if config.dtype not in (None, torch.float32) else contextlib.nullcontext())
    blocks = model.block_list()
    compiled = _compile_blocks(blocks) if config.compile else None
    try:
        for k in range(steps):
            _, h, w = schedule[k]
            c = cfgs[k]
            if guided and config.skip_uncond and all(v == 1.0 for v in cfgs[k:]):
                # no later scale reads the unconditional half (see the docstring)
                guided, cond, x = False, cond.select(B), x[:B]
                model.select_kv_cache(B)
            mix_hidden = (hidden_layer, c, B) if (guided and hidden_layer is not None and c != 1.0) else None
            with autocast:
                hidden = model.forward_scale(x, cond, k, schedule, cfg_hidden=mix_hidden)
            if guided and c != 1.0 and hidden_layer is None:
                z = numerics.apply_temperature(model.head_logits(hidden, cond.cond_BD), taus[k])
                z = c * z[:B] + (1 - c) * z[B:]
            else:
                z = numerics.apply_temperature(model.head_logits(hidden[:B], cond.cond_BD[:B]), taus[k])
            z = z.view(B, h * w, -1, 2)
            for hook in hooks:
                if hasattr(hook, "on_logits"):
                    z = hook.on_logits(k, z)
            if return_logits:
                out.logits.append(z.reshape(B, -1, 2).clone())
                out.logit_diff.append(z[..., 1] - z[..., 0])
            bits = sample_bits(z.reshape(B, -1, 2) if isinstance(generator, (list, tuple)) else z.reshape(-1, 2),
                               int(config.top_k), float(config.top_p), generator, config.gumbel).view(B, h * w, -1)
            for hook in hooks:
                if hasattr(hook, "on_bits"):
                    bits = hook.on_bits(k, bits)
            out.token_bits.append(bits.to(torch.uint8))
            labels = _bits_to_labels(bits, B, h, w, schedule.patchify)
            out.bit_labels.append(labels)
            codes = bits_to_codes(labels)                                        # (B, d, 1, vh, vw)
            if k == K - 1:
                summed = summed + codes
                continue
            summed = summed + bilinear_resize(codes, vae_schedule[-1])
            if k + 1 < steps:
                x = _next_input(model, summed, vae_schedule[k + 1], B, schedule.patchify, guided)
    finally:
        model.kv_caching(False)
        if compiled is not None:
            _uncompile_blocks(blocks, compiled)
    out.summed_codes = summed.squeeze(2)
    if tokenizer is not None and steps == K:
        out.images = tokenizer.decode(out.summed_codes, dtype=config.decode_dtype,
                                      channels_last=config.decode_channels_last)
    return out


def _next_input(model: InfinityTransformer, summed: torch.Tensor, grid: Sequence[int], B: int, patchify: bool,
                guided: bool) -> torch.Tensor:
    """The next scale's word embeddings: the code sum downsampled to the next grid."""
    nxt = bilinear_resize(summed, grid).squeeze(2)
    if patchify:
        nxt = F.pixel_unshuffle(nxt, 2)
    x = model.word_embed(nxt.reshape(B, nxt.shape[1], -1).transpose(1, 2))
    return torch.cat((x, x), dim=0) if guided else x


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

"""BSQ-VAE image tokenizer (docs/model.md#the-tokenizer-bsq-vae): convolutional encoder and decoder around a
multi-scale Binary Spherical Quantizer.

Data flow for an image batch ``x`` (B, 3, H, W) in [-1, 1] and a stride-``p`` tokenizer::

    raw = encoder(x)                                   # (B, d, H/p, W/p), fp32
    summed, bit_labels = quantize_multiscale(raw, S)   # S = [(1, h_1, w_1), ..., (1, H/p, W/p)]
    image = decoder(summed).clamp(-1, 1)

At scale k the residual (``raw`` minus everything quantised so far) is area-downsampled to
(h_k, w_k); every d-vector is projected onto the unit sphere and replaced by the nearest corner of
the hypercube ``{-1/sqrt(d), +1/sqrt(d)}^d``, whose sign pattern is the k-th scale's bit labels
(B, 1, h_k, w_k, d); the codes are upsampled back (trilinear) and accumulated.

Module attribute names reproduce the released state-dict keys exactly (convolutions wrapped as
``.conv``, group norms as ``.norm``, the quantizer registered twice as ``quantizer`` and
``quantize``), so the released ``infinity_vae_*.pth`` files load strictly.  Memory layouts are
chosen on purpose: on CPU, convolutions and interpolations pick different kernels for contiguous
and channels-last tensors, and the released numbers depend on which one ran (docs/model.md#numerics).

This module imports torch and the scale schedules only; :class:`TokenizerConfig` describes the architecture.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from infinity_lightning import scales

Grid = Tuple[int, int, int]

__all__ = [
    "TokenizerConfig", "BSQVAE", "BSQ", "MultiScaleBSQ", "Encoder", "Decoder", "ResnetBlock",
    "area_resize", "bilinear_resize", "bsq_quantize", "bits_to_codes", "group_norm_groups",
]


@dataclass(frozen=True)
class TokenizerConfig:
    """BSQ-VAE architecture (docs/model.md#the-tokenizer-bsq-vae)."""

    codebook_dim: int = 32
    base_ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16  # total stride; log2(patch_size) down/up-sampling levels
    in_channels: int = 3
    #: GroupNorm groups: 32 if channels % 32 == 0 else 24 (the released rule, "auto"), or a number
    norm_groups: Any = "auto"
    #: The 8B tokenizer feeds the transformer 2x2 pixel-unshuffled tokens (4 * codebook_dim bits)
    spatial_patchify: bool = False

    @property
    def stride(self) -> int:
        return self.patch_size

    @property
    def bits_per_token(self) -> int:
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def image_stride(self) -> int:
        """Pixels per transformer token side (16 for every released tokenizer)."""
        return self.patch_size * (2 if self.spatial_patchify else 1)



# --------------------------------------------------------------------------------------------
# Resampling helpers on (B, d, 1, h, w) latents
# --------------------------------------------------------------------------------------------

def _size3(size: Sequence[int]) -> Tuple[int, int, int]:
    if len(size) == 2:
        return (1, int(size[0]), int(size[1]))
    t, h, w = size
    return (int(t), int(h), int(w))


def area_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Area (adaptive average pooling) resize of ``x`` (B, d, 1, h, w) to ``size`` (1, h', w').

    For non-divisible sizes the windows overlap: output i averages input rows
    ``floor(i*in/out) .. ceil((i+1)*in/out) - 1``.
    """
    return F.interpolate(x, size=_size3(size), mode="area")


def bilinear_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear (bilinear in h, w; the size-1 t axis passes through) resize of ``x``
    (B, d, 1, h, w) to ``size`` (1, h', w') with ``align_corners=False`` and no antialiasing."""
    return F.interpolate(x, size=_size3(size), mode="trilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# Binary Spherical Quantization
# --------------------------------------------------------------------------------------------

def bsq_quantize(r: torch.Tensor, eps: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """Binary spherical quantization of every d-vector of ``r`` (B, d, T, h, w).

    ``x = r / max(||r||_2, eps)`` along d; ``zhat = +1/sqrt(d)`` where ``x > 0``, else
    ``-1/sqrt(d)``; the straight-through value ``q = x + (zhat - x).detach()`` is returned, which
    equals ``zhat`` up to the rounding of the two fp32 operations (the released numbers carry that
    rounding) and passes the gradient of ``x`` through unchanged.

    Returns ``(q, bits)``: ``q`` (B, d, T, h, w) fp32 as a permuted (channels-last-3d) view of a
    d-fastest tensor, and ``bits`` uint8 (B, T, h, w, d) with 1 for the positive sign.
    """
    d = r.shape[1]
    # d-fastest copy: the normalisation reduces along contiguous memory, and q comes back as a
    # channels-last view, the layout the released code upsamples (it changes trilinear results).
    x = r.float().permute(0, 2, 3, 4, 1).contiguous()
    x = F.normalize(x, p=2.0, dim=-1, eps=eps)
    scale = 1.0 / math.sqrt(d)
    zhat = torch.where(x > 0, torch.full_like(x, scale), torch.full_like(x, -scale))
    q = x + (zhat - x).detach()
    bits = (q > 0).to(torch.uint8)
    return q.permute(0, 4, 1, 2, 3), bits


def bits_to_codes(bits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Codes of bit labels ``bits`` (B, T, h, w, d) (int, uint8 or bool) -> (B, d, T, h, w) fp32.

    ``codes = normalize_d(bits * s * 2 - s)`` with ``s = 1/sqrt(d)``, evaluated left to right on
    the integer tensor (docs/model.md#numerics).  The normalisation is mathematically a no-op but moves values by
    one ulp for some d (24), which the released generation numbers include.  For d-fastest labels
    (what the quantizer and the sampler produce) the result is a permuted (channels-last-3d) view
    of a d-fastest tensor.
    """
    if bits.dtype == torch.bool:
        bits = bits.to(torch.uint8)
    if bits.is_floating_point():
        raise TypeError(f"bit labels must be an integer or bool tensor, got {bits.dtype}")
    d = bits.shape[-1]
    s = 1.0 / math.sqrt(d)
    # Element-wise on the labels as they are laid out (d-fastest for every label tensor the
    # quantizer or the sampler produces); no copy, so the codes inherit that layout.
    codes = bits * s * 2 - s
    codes = F.normalize(codes.float(), p=2.0, dim=-1, eps=eps)
    return codes.permute(0, 4, 1, 2, 3)


class BSQ(nn.Module):
    """Binary Spherical Quantizer for ``codebook_dim`` bits (the ``lfq`` submodule).

    Holds the int64 buffer ``mask = 2 ** (d-1, ..., 0)`` of the released files (used only for
    integer indices; it wraps around for d = 64 exactly as in the released d64 file).
    """

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook_dim = int(codebook_dim)
        self.register_buffer("mask", self.make_mask(self.codebook_dim), persistent=True)

    @staticmethod
    def make_mask(codebook_dim: int) -> torch.Tensor:
        # Built from Python ints (a tensor power under the meta-device context is slow to set up);
        # 2**63 wraps to -2**63 as the int64 tensor arithmetic of the released d64 file does.
        values = [2 ** i for i in range(codebook_dim - 1, -1, -1)]
        return torch.tensor([v - 2 ** 64 if v >= 2 ** 63 else v for v in values], dtype=torch.long)

    def forward(self, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``r`` (B, d, T, h, w) -> ``(q, bits)`` as :func:`bsq_quantize`."""
        return bsq_quantize(r)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bit labels (B, T, h, w, d) -> codes (B, d, T, h, w); see :func:`bits_to_codes`."""
        return bits_to_codes(bits)

    def bits_to_indices(self, bits: torch.Tensor) -> torch.Tensor:
        """Integer indices (B, T, h, w) of bit labels (B, T, h, w, d), most significant bit first."""
        return (bits.long() * self.mask.to(bits.device)).sum(-1)

    def extra_repr(self) -> str:
        return f"codebook_dim={self.codebook_dim}"


class MultiScaleBSQ(nn.Module):
    """Multi-scale residual BSQ (docs/model.md#multi-scale-residual-quantization).  Its only state is the ``lfq`` quantizer's mask."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook_dim = int(codebook_dim)
        self.lfq = BSQ(codebook_dim)

    def forward(self, raw: torch.Tensor, vae_schedule: Sequence[Sequence[int]], *,
                detach_residual: bool = True, return_aux: bool = False):
        """Quantize ``raw`` (B, d, h, w) over ``vae_schedule`` (list of (1, h_k, w_k), the last one
        equal to (1, h, w)).

        Returns ``(summed_codes, bit_labels)``: ``summed_codes`` (B, d, h, w) contiguous fp32, the
        sum of every scale's codes upsampled to (h, w); ``bit_labels`` a list of uint8
        (B, 1, h_k, w_k, d).  With ``return_aux=True`` a third element is a dict:

        * ``"normalized"``: per scale, the unit-norm inputs ``x_k`` (B, 1, h_k, w_k, d) that were
          quantized (what an entropy or commitment loss needs);
        * ``"quantized"``: per scale, the straight-through codes ``q_k`` (B, d, 1, h_k, w_k);
        * ``"residual_norm"``: per scale, the mean L2 norm of the residual before quantization.

        Gradients reach ``raw`` through the straight-through estimator of every scale and, with
        ``detach_residual=False``, also through the residual chain.  The forward values do not
        depend on either switch.
        """
        if raw.dim() != 4:
            raise ValueError(f"raw features must be (B, d, h, w), got shape {tuple(raw.shape)}")
        B, d, H, W = raw.shape
        if d != self.codebook_dim:
            raise ValueError(f"raw features have {d} channels, the quantizer expects {self.codebook_dim}")
        schedule = [_size3(s) for s in vae_schedule]
        if not schedule:
            raise ValueError("empty scale schedule")
        full = (1, H, W)
        if schedule[-1] != full:
            raise ValueError(f"the last scale {schedule[-1]} must equal the latent grid {full}")
        device_type = raw.device.type
        # The quantizer always runs in fp32, also under an outer autocast.
        with torch.autocast(device_type=device_type, enabled=False):
            residual = raw.float().unsqueeze(2)
            out = torch.zeros_like(residual, memory_format=torch.contiguous_format)
            bit_labels: List[torch.Tensor] = []
            aux: Dict[str, list] = {"normalized": [], "quantized": [], "residual_norm": []}
            last = len(schedule) - 1
            for k, size in enumerate(schedule):
                r_k = residual if (k == last or size == full) else area_resize(residual, size)
                q_k, bits_k = bsq_quantize(r_k)
                if return_aux:
                    aux["normalized"].append(_normalized_view(r_k))
                    aux["quantized"].append(q_k)
                    aux["residual_norm"].append(r_k.norm(dim=1).mean().detach())
                # q_k stays a channels-last view when upsampled (docs/model.md#numerics: a contiguous copy
                # changes the result by ~2e-7 for d = 24).
                q_full = q_k if (k == last or size == full) else bilinear_resize(q_k, full)
                residual = residual - (q_full.detach() if detach_residual else q_full)
                out = out + q_full
                bit_labels.append(bits_k)
            summed = out.squeeze(2).contiguous()
        if return_aux:
            return summed, bit_labels, aux
        return summed, bit_labels


def _normalized_view(r: torch.Tensor) -> torch.Tensor:
    # Same normalisation as bsq_quantize, recomputed so the straight-through graph stays simple.
    return F.normalize(r.float().permute(0, 2, 3, 4, 1).contiguous(), p=2.0, dim=-1, eps=1e-12)


# --------------------------------------------------------------------------------------------
# Convolutional building blocks (key names follow the released files)
# --------------------------------------------------------------------------------------------

def group_norm_groups(channels: int, norm_groups: Union[str, int] = "auto") -> int:
    """GroupNorm group count: the released rule (``"auto"``: 32 if ``channels % 32 == 0`` else 24)
    or a fixed number."""
    if norm_groups == "auto":
        groups = 32 if channels % 32 == 0 else 24
    else:
        groups = int(norm_groups)
    if groups <= 0 or channels % groups:
        raise ValueError(f"GroupNorm with {groups} groups cannot split {channels} channels "
                         f"(norm_groups={norm_groups!r}); choose channel widths or norm_groups that divide")
    return groups


class Conv(nn.Module):
    """A ``nn.Conv2d`` under the attribute ``conv`` (keys ``<name>.conv.weight``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    """A ``nn.GroupNorm`` (eps 1e-6, affine) under the attribute ``norm``."""

    def __init__(self, channels: int, norm_groups: Union[str, int] = "auto"):
        super().__init__()
        self.norm = nn.GroupNorm(group_norm_groups(channels, norm_groups), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written as x * sigmoid(x), not F.silu: the two kernels round differently.
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 ``nin_shortcut`` when the
    channel count changes.  (B, in_ch, h, w) -> (B, out_ch, h, w)."""

    def __init__(self, in_ch: int, out_ch: int, norm_groups: Union[str, int] = "auto"):
        super().__init__()
        self.in_channels, self.out_channels = in_ch, out_ch
        self.norm1 = Normalize(in_ch, norm_groups)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, norm_groups)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = Conv(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding: (h, w) -> (h/2, w/2)
    (rounded down for odd sizes, ``floor((h - 2) / 2) + 1``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (h, w) -> (2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and optionally ``downsample``/``upsample``."""

    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int, norm_groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


def _num_resamples(config: TokenizerConfig) -> int:
    n = int(round(math.log2(config.patch_size)))
    if 2 ** n != config.patch_size:
        raise ValueError(f"patch_size must be a power of two, got {config.patch_size}")
    if n > len(config.ch_mult) - 1:
        raise ValueError(f"patch_size {config.patch_size} needs {n} downsampling levels but ch_mult "
                         f"{tuple(config.ch_mult)} has only {len(config.ch_mult)} levels")
    return n


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> raw latent (B, codebook_dim, H/p, W/p) (docs/model.md#the-tokenizer-bsq-vae).

    Level i has ``num_res_blocks`` ResnetBlocks at ``base_ch * ch_mult[i]`` channels followed by
    a :class:`Downsample` for ``i < log2(patch_size)``; then two mid blocks, GN, swish, conv_out.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        base, mult, groups = config.base_ch, tuple(config.ch_mult), config.norm_groups
        n_down = _num_resamples(config)
        self.conv_in = Conv(config.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        ch = base
        for i, m in enumerate(mult):
            out = base * m
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(ch, out, groups))
                ch = out
            level = _Level(blocks)
            if i < n_down:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = _Mid(ch, groups)
        self.norm_out = Normalize(ch, groups)
        self.conv_out = Conv(ch, config.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Codes (B, codebook_dim, h, w) -> image (B, in_channels, p*h, p*w), unclamped (docs/model.md#the-tokenizer-bsq-vae).

    conv_in to ``base_ch * ch_mult[-1]``, two mid blocks, then levels L-1 .. 0 (``up`` is indexed
    by level, executed in reverse) with ``num_res_blocks + 1`` ResnetBlocks each and an
    :class:`Upsample` for ``1 <= i <= log2(patch_size)``; GN, swish, conv_out.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        base, mult, groups = config.base_ch, tuple(config.ch_mult), config.norm_groups
        n_up = _num_resamples(config)
        ch = base * mult[-1]
        self.conv_in = Conv(config.codebook_dim, ch, 3, padding=1)
        self.mid = _Mid(ch, groups)
        levels: List[nn.Module] = []
        for i in reversed(range(len(mult))):
            out = base * mult[i]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, out, groups))
                ch = out
            level = _Level(blocks)
            if 1 <= i <= n_up:
                level.upsample = Upsample(ch)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch, groups)
        self.conv_out = Conv(ch, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

class BSQVAE(nn.Module):
    """The BSQ-VAE tokenizer: encoder, multi-scale BSQ quantizer and decoder.

    ``quantizer`` and ``quantize`` are the same :class:`MultiScaleBSQ` module (the released files
    list its mask buffer under both names).  Inputs are images in [-1, 1]; H and W must be
    multiples of ``config.patch_size``.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.codebook_dim = int(config.codebook_dim)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = MultiScaleBSQ(self.codebook_dim)
        self.quantize = self.quantizer

    @classmethod
    def from_pretrained(cls, path_or_preset: Any, **kwargs: Any) -> "BSQVAE":
        """A tokenizer from a weights file or a preset name (random weights), in eval mode.

        Delegates to :func:`infinity_lightning.checkpoints.load_tokenizer` (``device=``, ``dtype=``,
        ``config=``, ``preset=`` and :class:`TokenizerConfig` field overrides as keywords).
        """
        from ..checkpoints import load_tokenizer  # the loader (layer 3) builds this class

        return load_tokenizer(path_or_preset, **kwargs)

    @property
    def stride(self) -> int:
        """Pixels per latent position."""
        return int(self.config.patch_size)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.stride
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the tokenizer stride {p}; "
                             "crop or resize it first (see infinity_lightning.images)")

    def encode_raw(self, images: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                   channels_last: bool = False) -> torch.Tensor:
        """Encoder features before quantisation: (B, 3, H, W) -> (B, d, H/p, W/p) fp32.

        ``dtype`` (e.g. ``torch.bfloat16``) and ``channels_last`` select the fast inference path
        (:meth:`_run_fast`); the default is the exact fp32 path.
        """
        self._check_images(images)
        if dtype is None and not channels_last:
            return self.encoder(images).float()
        return self._run_fast("encoder", images, dtype, channels_last)

    def _run_fast(self, name: str, x: torch.Tensor, dtype: Optional[torch.dtype], channels_last: bool) -> torch.Tensor:
        """Run ``self.<name>`` on a low-precision and/or channels-last copy (inference only).

        The copy (weights in ``dtype``, convolution weights channels-last) is built on first use
        and rebuilt whenever a parameter of the original changes (in-place updates included), so
        training the tokenizer never meets stale weights.  Group norms run natively in bf16 with
        fp32 statistics.  Not bit-identical to fp32: decoded images differ by about 1e-2 in bf16
        (benchmarks/tokenizer.py reports the error); channels-last alone by about 1e-5.
        Returns an fp32 contiguous tensor.
        """
        module = getattr(self, name)
        dtype = dtype or torch.float32
        stamp = tuple((p.data_ptr(), p._version, p.device) for p in module.parameters())
        cache = self.__dict__.setdefault("_fast_copies", {})
        key = (name, dtype, bool(channels_last))
        entry = cache.get(key)
        if entry is None or entry[0] != stamp:
            fast = copy.deepcopy(module).requires_grad_(False).eval().to(dtype)
            if channels_last:
                fast = fast.to(memory_format=torch.channels_last)
            entry = cache[key] = (stamp, fast)
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            out = entry[1](x)
        return out.float().contiguous()

    def quantize_multiscale(self, raw: torch.Tensor, vae_schedule: Sequence[Sequence[int]], **kwargs):
        """Multi-scale residual quantization of ``raw`` (B, d, h, w).

        Returns ``(summed_codes (B, d, h, w) contiguous, bit_labels [uint8 (B, 1, h_k, w_k, d)])``;
        keyword arguments (``detach_residual``, ``return_aux``) as :meth:`MultiScaleBSQ.forward`.
        """
        return self.quantizer(raw, vae_schedule, **kwargs)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bit labels (B, 1, h, w, d) -> codes (B, d, 1, h, w) fp32 (channels-last-3d view)."""
        if bits.shape[-1] != self.codebook_dim:
            raise ValueError(f"bit labels have {bits.shape[-1]} bits, the tokenizer uses {self.codebook_dim}")
        return bits_to_codes(bits)

    def decode(self, codes: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
               channels_last: bool = False) -> torch.Tensor:
        """Codes (B, d, h, w) -> images (B, 3, p*h, p*w) clamped to [-1, 1].

        The input's memory layout is kept: the convolutions' CPU results depend on it in the last
        bits, and the released numbers decode the quantizer sum contiguously and the generation
        sum channels-last.  ``dtype`` (e.g. ``torch.bfloat16``) and ``channels_last`` select the
        fast inference path (:meth:`_run_fast`; no gradients); the default is the exact path.
        """
        if codes.dim() == 5:
            codes = codes.squeeze(2)
        if dtype is None and not channels_last:
            return self.decoder(codes).clamp(-1.0, 1.0)
        return self._run_fast("decoder", codes, dtype, channels_last).clamp(-1.0, 1.0)

    def codes_from_bits(self, bit_labels: Sequence[torch.Tensor], vae_schedule: Sequence[Sequence[int]]
                        ) -> torch.Tensor:
        """Sum of the trilinearly upsampled codes of ``bit_labels`` (the first ``len(bit_labels)``
        scales of ``vae_schedule``) at the grid of ``vae_schedule[-1]``: (B, d, h, w).

        The sum starts from the scalar 0, so it is channels-last like the generation sum.
        """
        if not bit_labels:
            raise ValueError("no bit labels given")
        if len(bit_labels) > len(vae_schedule):
            raise ValueError(f"{len(bit_labels)} bit-label scales for a {len(vae_schedule)}-scale schedule")
        full = _size3(vae_schedule[-1])
        total = 0
        for k, bits in enumerate(bit_labels):
            size = _size3(vae_schedule[k])
            if tuple(bits.shape[1:4]) != size:
                raise ValueError(f"bit labels of scale {k} have grid {tuple(bits.shape[1:4])}, schedule says {size}")
            codes = self.bits_to_codes(bits)
            total = total + (codes if size == full else bilinear_resize(codes, full))
        return total.squeeze(2)

    def decode_from_bits(self, bit_labels: Sequence[torch.Tensor], vae_schedule: Sequence[Sequence[int]]
                         ) -> torch.Tensor:
        """Decode bit labels: :meth:`codes_from_bits` then :meth:`decode` -> (B, 3, H, W) in [-1, 1].

        Passing only the first k scales' labels gives the image after k scales.
        """
        return self.decode(self.codes_from_bits(bit_labels, vae_schedule))

    def default_schedule(self, latent_h: int, latent_w: int) -> scales.ScaleSchedule:
        """The Infinity ("dynamic") schedule ending at the latent grid, tokenizer side; with
        spatial patchify, the token schedule of the half grid, doubled."""
        if self.config.spatial_patchify and latent_h % 2 == 0 and latent_w % 2 == 0:
            try:
                return scales.latent_schedule(latent_h, latent_w, "dynamic", patchify=True).tokenizer_side
            except ValueError:
                pass
        return scales.latent_schedule(latent_h, latent_w, "dynamic")

    def forward(self, images: torch.Tensor, vae_schedule: Optional[Sequence[Sequence[int]]] = None
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Round trip: (B, 3, H, W) in [-1, 1] -> ``(recon (B, 3, H, W) clamped, bit_labels)``.

        Without a schedule, the dynamic schedule of the latent grid is used (see
        :meth:`default_schedule`).
        """
        raw = self.encode_raw(images)
        if vae_schedule is None:
            vae_schedule = self.default_schedule(raw.shape[-2], raw.shape[-1])
        summed, bit_labels = self.quantize_multiscale(raw, vae_schedule)
        return self.decode(summed), bit_labels

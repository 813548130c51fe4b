"""Bitwise Self-Correction (BSC) and the teacher-forced transformer inputs (docs/model.md#bitwise-self-correction).

A pure function: raw tokenizer features and a scale schedule in, next-scale inputs and bit
labels out.  Flips are drawn from a ``torch.Generator`` (reproducible on any device) or given as
explicit masks.  With no flips the labels are the tokenizer's own multi-scale bits.

For each scale k (VAE-side grids g_k; the last one is the latent grid)::

    r = raw - cum, area-downsampled to g_k (not for the last scale)
    q, bits_k = BSQ(r)                          # labels of scale k (never flipped)
    if k < flip_layers:                         # corrupt the prediction the model would have made
        p ~ U{0, 0.01, ..., strength}           # one draw per scale and step
        pred = bits_k XOR Bernoulli(p)          # i.i.d. per bit
        q = codes(pred)                         # re-quantise from the flipped labels
    cum += bilinear_up(q, g_last)
    input_{k+1} = bilinear_down(cum, g_{k+1})   # what the transformer sees for scale k+1

so the labels of later scales correct the injected mistakes.  With spatial patchify (the 8B
model) the loop runs on the doubled VAE grids and only the outputs are pixel-unshuffled by 2
into tokens of 4d bits (token channel 4c + 2dy + dx).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .models.bsq_vae import area_resize, bilinear_resize, bits_to_codes, bsq_quantize
from .scales import as_schedule


@dataclass
class SelfCorrectionOutput:
    """Teacher-forced inputs and labels.

    ``inputs`` (B, L - 1, d_tok) fp32: next-scale inputs of scales 1..K-1, token layout;
    ``labels`` (B, L, d_tok) uint8: bit labels of all scales, token layout;
    ``flip_masks``: per flipped scale, the bool mask (B, 1, h_k, w_k, d) in VAE layout;
    ``flipped_labels``: per flipped scale, the corrupted labels (B, h*w, d_tok) in token layout.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    flip_masks: List[torch.Tensor]
    flipped_labels: List[torch.Tensor]

    def labels_per_scale(self, schedule: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        return list(self.labels.split(list(as_schedule(schedule).sizes), dim=1))


def _to_tokens(x_vae: torch.Tensor, patchify: bool) -> torch.Tensor:
    """(B, d, H, W) VAE layout -> (B, h*w, d_tok) tokens (pixel-unshuffled by 2 with patchify)."""
    if patchify:
        x_vae = F.pixel_unshuffle(x_vae, 2)
    B, C = x_vae.shape[:2]
    return x_vae.reshape(B, C, -1).transpose(1, 2)


def _labels_to_tokens(bits: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Labels (B, 1, H, W, d) -> (B, h*w, d_tok)."""
    if not patchify:
        B, _, H, W, d = bits.shape
        return bits.reshape(B, H * W, d)
    return _to_tokens(bits.squeeze(1).permute(0, 3, 1, 2), True)


def flip_probability(strength: float, generator: Optional[torch.Generator] = None, device=None) -> float:
    """One draw of p ~ U{0, 0.01, ..., strength} (the original's per-scale strength draw)."""
    top = int(round(100 * float(strength)))
    if top <= 0:
        return 0.0
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, top + 1, (1,), generator=generator, device=device).item()) * 0.01


@torch.no_grad()
def teacher_forcing_inputs(raw: torch.Tensor, vae_schedule: Sequence[Sequence[int]], *, patchify: bool = False,
                           flip_layers: int = 0, strength: float = 0.0,
                           generator: Optional[torch.Generator] = None,
                           flip_masks: Optional[Sequence[torch.Tensor]] = None,
                           requantize: bool = True) -> SelfCorrectionOutput:
    """Bitwise Self-Correction: next-scale inputs and labels from raw tokenizer features.

    raw: (B, d, H, W) fp32 encoder features (``BSQVAE.encode_raw``); ``vae_schedule``: list of
    (1, h_k, w_k) ending at (1, H, W) (``ScaleSchedule.tokenizer_side``); ``flip_layers``: scales
    0..flip_layers-1 get flips with probability ~ U{0, .01, ..., strength}, drawn from
    ``generator`` (mask shape (B, 1, h_k, w_k, d), VAE layout); or ``flip_masks`` gives the masks
    explicitly (True = flip; scale k < len(flip_masks)).  ``requantize=False`` keeps the
    straight-through codes (flips then only change the reported labels).
    """
    schedule = [(int(t), int(h), int(w)) for t, h, w in vae_schedule]
    K = len(schedule)
    B, d, H, W = raw.shape
    if schedule[-1][1:] != (H, W):
        raise ValueError(f"the last scale {schedule[-1]} must equal the latent grid (1, {H}, {W})")
    if flip_masks is not None:
        flip_layers = len(flip_masks)
    with torch.autocast(device_type=raw.device.type, enabled=False):
        feats = raw.float().unsqueeze(2)                                   # (B, d, 1, H, W)
        cum = torch.zeros_like(feats, memory_format=torch.contiguous_format)
        inputs, labels, masks, flipped = [], [], [], []
        for k, size in enumerate(schedule):
            residual = feats - cum
            if k < K - 1:
                residual = area_resize(residual, size)
            q, bits = bsq_quantize(residual)
            labels.append(_labels_to_tokens(bits, patchify))
            if k < flip_layers:
                if flip_masks is not None:
                    mask = flip_masks[k].to(device=bits.device, dtype=torch.bool)
                    if mask.shape != bits.shape:
                        raise ValueError(f"flip mask of scale {k} has shape {tuple(mask.shape)}, labels {tuple(bits.shape)}")
                else:
                    p = flip_probability(strength, generator, bits.device)
                    mask = torch.rand(bits.shape, generator=generator, device=bits.device) < p
                pred = bits ^ mask.to(bits.dtype)
                masks.append(mask)
                flipped.append(_labels_to_tokens(pred, patchify))
                if requantize:
                    q = bits_to_codes(pred)
            cum = cum + bilinear_resize(q, schedule[-1])
            if k < K - 1:
                nxt = bilinear_resize(cum, schedule[k + 1]).squeeze(2)
                inputs.append(_to_tokens(nxt, patchify))
        x = torch.cat(inputs, dim=1) if inputs else feats.new_zeros(B, 0, d * (4 if patchify else 1))
    return SelfCorrectionOutput(inputs=x, labels=torch.cat(labels, dim=1), flip_masks=masks, flipped_labels=flipped)


def draw_flip_masks(vae_schedule: Sequence[Sequence[int]], batch_size: int, bits: int, layers: int,
                    strength: float, p_generator: torch.Generator, mask_generator: torch.Generator,
                    device: Union[str, torch.device]) -> List[torch.Tensor]:
    """Bitwise Self-Correction flip masks for scales ``0 .. layers-1`` (docs/model.md#bitwise-self-correction).

    Per scale one probability ``p ~ U{0, 0.01, ..., strength}`` (from ``p_generator``, CPU),
    then i.i.d. Bernoulli(p) bits of shape (B, 1, h_k, w_k, d) in VAE layout (from
    ``mask_generator`` on ``device``).  Passing the masks to ``teacher_forcing_inputs`` works
    on every device, whatever device the generator lives on.
    """
    masks = []
    for k in range(min(int(layers), len(vae_schedule))):
        _, h, w = vae_schedule[k]
        p = flip_probability(strength, p_generator)
        shape = (batch_size, 1, int(h), int(w), bits)
        masks.append(torch.rand(shape, generator=mask_generator, device=device) < p)
    return masks

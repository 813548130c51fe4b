"""The bitwise VAR loss: per-bit cross entropy, per-scale token weights and bit accuracies."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import scales as _scales

__all__ = ["bitwise_cross_entropy", "bit_accuracies", "scale_token_weights"]


def scale_token_weights(schedule: Sequence[Sequence[int]], reweight: bool, device=None) -> torch.Tensor:
    """Per-token loss weights (L,), summing to 1 (docs/model.md#loss).

    ``reweight=False``: 1/L each.  ``reweight=True``: tokens of scale k weigh
    ``1 / sqrt(h_k w_k)`` before normalisation, so scale k's total weight is
    ``sqrt(h_k w_k) / sum_j sqrt(h_j w_j)`` (coarse scales count more than their token share).
    """
    sizes = _scales.as_schedule(schedule).sizes
    L = sum(sizes)
    if not reweight:
        return torch.full((L,), 1.0 / L, dtype=torch.float32, device=device)
    total = sum(math.sqrt(n) for n in sizes)
    per_scale = [1.0 / (math.sqrt(n) * total) for n in sizes]
    return torch.cat([torch.full((n,), w, dtype=torch.float32) for n, w in zip(sizes, per_scale)]).to(device)


def bitwise_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                          label_smoothing: float = 0.0, bitloss_type: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """Bitwise CE (docs/model.md#loss): a 2-way softmax per bit.

    logits (B, L, 2 d) with ``logits[..., 2b + c]`` = logit of bit b == c; labels (B, L, d) in
    {0, 1}; token_weights (L,).  Returns ``(loss scalar, per-token loss (B, L))``: per token the
    mean (or sum) over bits, then ``sum_t w_t * loss_t`` per sample, then the batch mean.
    Computed in fp32.
    """
    B, L, d = labels.shape
    z = logits.float().reshape(B * L * d, 2)
    ce = F.cross_entropy(z, labels.reshape(-1).long(), label_smoothing=label_smoothing, reduction="none")
    ce = ce.view(B, L, d)
    if bitloss_type == "mean":
        per_token = ce.mean(-1)
    elif bitloss_type == "sum":
        per_token = ce.sum(-1)
    else:
        raise ValueError(f"bitloss_type {bitloss_type!r}; expected 'mean' or 'sum'")
    loss = (per_token * token_weights.to(per_token)).sum(1).mean(0)
    return loss, per_token


@torch.no_grad()
def bit_accuracies(logits: torch.Tensor, labels: torch.Tensor, schedule: Sequence[Sequence[int]]
                   ) -> Dict[str, Any]:
    """``{"acc": bit accuracy, "token_acc": all bits of a token right, "acc_scale": [per scale]}``."""
    B, L, d = labels.shape
    z = logits.detach().float().view(B, L, d, 2)
    correct = (z[..., 1] > z[..., 0]).to(labels.dtype) == labels
    sizes = list(_scales.as_schedule(schedule).sizes)
    return {
        "acc": correct.float().mean(),
        "token_acc": correct.all(-1).float().mean(),
        "acc_scale": [c.float().mean() for c in correct.split(sizes, dim=1)],
    }

"""Losses for training the BSQ-VAE tokenizer (layer 1: torch only).

The Infinity release ships no tokenizer training code (docs/model.md#tokenizer-training); this file provides the usual
ingredients of a VQGAN-style tokenizer objective, written from their published formulations:

* :class:`PerceptualLoss` -- an LPIPS-style distance (Zhang et al. 2018): frozen VGG16 features at
  relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalised along channels, squared
  differences weighted by learned non-negative 1x1 "linear" layers, averaged over space and summed
  over layers.  A cheap ``"tiny"`` backbone serves the CPU recipes.
* :class:`PatchDiscriminator` -- the pix2pix / VQGAN PatchGAN.
* :func:`hinge_d_loss`, :func:`non_saturating_d_loss`, :func:`generator_adv_loss` and the LeCam
  regulariser (Tseng et al. 2021, :class:`LeCamEMA`).
* :func:`adaptive_gan_weight` -- the VQGAN balance ``|grad rec| / |grad gan|`` at the last decoder
  layer.
* :func:`bsq_entropy_terms` and :func:`commitment_loss` -- the Binary Spherical Quantization
  regularisers (Zhao et al. 2024), computed bit by bit without enumerating the 2^d codes.

Loading weights from files is not done here (layer rule): :meth:`PerceptualLoss.load_weights`
takes a state dict that the caller read with ``infinity_lightning.io.safe_load``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PerceptualLoss", "PatchDiscriminator", "hinge_d_loss", "non_saturating_d_loss", "generator_adv_loss",
    "discriminator_loss", "LeCamEMA", "lecam_regularizer", "adaptive_gan_weight", "BSQEntropy",
    "bsq_bit_probabilities", "bsq_entropy_terms", "binary_entropy", "commitment_loss",
]


# ---------------------------------------------------------------------------------------------
# Perceptual (LPIPS-style) loss
# ---------------------------------------------------------------------------------------------

#: torchvision's VGG16 ``features`` layout: conv widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
#: Indices in ``features`` of the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3.
_VGG16_TAPS = (3, 8, 15, 22, 29)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)
#: A small backbone for CPU runs: three stages of two convolutions each.
_TINY_LAYOUT = [16, 16, "M", 32, 32, "M", 64, 64]
_TINY_TAPS = (3, 8, 13)
_TINY_CHANNELS = (16, 32, 64)


def _make_features(layout: Sequence) -> nn.Sequential:
    layers: List[nn.Module] = []
    c_in = 3
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(item)
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance between two image batches in [-1, 1].

    ``d(x, y) = sum_l mean_hw sum_c w_lc (f_l(x)_c / |f_l(x)| - f_l(y)_c / |f_l(y)|)^2`` with
    ``f_l`` the backbone's activation at tap ``l`` and ``|.|`` the channel-wise L2 norm.

    Args:
        arch: ``"vgg16"`` (the LPIPS-VGG layout: torchvision's ``vgg16().features`` module indices,
            taps relu1_2 ... relu5_3) or ``"tiny"`` (3 cheap stages, for CPU recipes and tests).
        state_dict: optional weights, see :meth:`load_weights`.  Without them the network keeps its
            random initialisation and a warning says that the loss is then not a perceptual metric.

    Forward: ``(x, y)`` each (B, 3, H, W) -> (B,) distances.  All parameters are frozen and the
    module always stays in eval mode.
    """

    def __init__(self, arch: str = "vgg16", state_dict: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        if arch == "vgg16":
            layout, taps, channels = _VGG16_LAYOUT, _VGG16_TAPS, _VGG16_CHANNELS
        elif arch == "tiny":
            layout, taps, channels = _TINY_LAYOUT, _TINY_TAPS, _TINY_CHANNELS
        else:
            raise ValueError(f"unknown perceptual_arch {arch!r}; expected 'vgg16' or 'tiny'")
        self.arch = arch
        self.taps = tuple(taps)
        self.features = _make_features(layout)[: max(taps) + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        # The ImageNet input normalisation LPIPS uses, expressed for inputs in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        for lin in self.lins:
            nn.init.constant_(lin.weight, 1.0 / lin.in_channels)
        self.pretrained = False
        if state_dict is not None:
            self.load_weights(state_dict)
        else:
            warnings.warn(
                f"PerceptualLoss({arch!r}) has RANDOM weights: the perceptual term is not a meaningful "
                "perceptual metric. Pass perceptual_weights=<file> (VGG16 features + LPIPS linear layers) "
                "for real training.", UserWarning, stacklevel=2)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Always eval: the frozen network has no training behaviour."""
        return super().train(False)

    @staticmethod
    def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map common weight layouts to this module's keys.

        Accepts this module's own keys (``features.N.weight``, ``lins.K.weight``), torchvision's
        VGG16 state dict (``features.N.*``; ``classifier.*`` is dropped) and the LPIPS linear-layer
        file layout (``linK.model.1.weight``), so a torchvision VGG16 file and an LPIPS ``vgg.pth``
        merged into one dict load directly.
        """
        out: Dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("classifier."):
                continue
            if key.startswith("lin") and ".model." in key and not key.startswith("lins."):
                idx = key[3:key.index(".")]
                out[f"lins.{idx}.weight"] = value
            elif key.startswith("net.slice"):
                raise ValueError("LPIPS 'net.sliceN' keys are not supported; pass torchvision VGG16 'features.N' keys")
            else:
                out[key] = value
        return out

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights (see :meth:`convert_state_dict`) strictly, ignoring VGG layers past relu5_3."""
        converted = self.convert_state_dict(state_dict)
        own = self.state_dict()
        converted = {k: v for k, v in converted.items() if k in own or not k.startswith("features.")}
        missing = sorted(set(own) - set(converted))
        unexpected = sorted(set(converted) - set(own))
        if missing or unexpected:
            raise ValueError(f"perceptual weights do not match the {self.arch!r} network: "
                             f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                             f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
        self.load_state_dict(converted, strict=True)
        self.pretrained = True

    def _taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        both = (torch.cat([x, y]) - self.shift) / self.scale
        total = torch.zeros(n, device=x.device, dtype=torch.float32)
        for feat, lin in zip(self._taps(both), self.lins):
            feat = feat.float()
            # eps inside the root: sqrt has an infinite derivative at 0, and all-zero ReLU
            # feature vectors are common, so eps outside gives NaN gradients.
            feat = feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + 1e-10)
            diff = (feat[:n] - feat[n:]).pow(2)
            # Clamping to >= 0 keeps the distance a (weighted) squared norm, as LPIPS does.
            total = total + F.conv2d(diff, lin.weight.float().clamp_min(0)).mean(dim=(1, 2, 3))
        return total


# ---------------------------------------------------------------------------------------------
# Discriminator and adversarial losses
# ---------------------------------------------------------------------------------------------

def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; expected 'batch', 'group', 'instance' or 'none'")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): (B, 3, H, W) -> (B, 1, H', W') logits.

    ``n_layers`` stride-2 4x4 convolutions (channels ``channels * min(2^i, 8)``), one stride-1
    convolution and a 1-channel stride-1 output convolution.  ``norm="group"`` by default because
    batch statistics couple real and fake batches and behave differently across processes.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=norm == "none"),
                       _norm_layer(norm, channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 (E relu(1 - D(x)) + E relu(1 + D(G(z))))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss ``0.5 (E softplus(-D(x)) + E softplus(D(G(z))))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Dispatch on ``kind`` = ``"hinge"`` | ``"non_saturating"``."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "non_saturating":
        return non_saturating_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown disc_loss {kind!r}; expected 'hinge' or 'non_saturating'")


def generator_adv_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side: ``-E D(G(z))`` for hinge, ``E softplus(-D(G(z)))`` for non-saturating."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown disc_loss {kind!r}; expected 'hinge' or 'non_saturating'")


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                      anchor_real: torch.Tensor, anchor_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regulariser ``E relu(D(x) - a_fake)^2 + E relu(a_real - D(G(z)))^2``.

    It keeps the discriminator's predictions close to the anchors (EMAs of its own past outputs,
    or zero), which bounds how far real and fake logits drift apart with little data.
    """
    return (F.relu(logits_real - anchor_fake).pow(2).mean()
            + F.relu(anchor_real - logits_fake).pow(2).mean())


class LeCamEMA(nn.Module):
    """Anchors for :func:`lecam_regularizer`: EMAs of the mean real / fake logits.

    ``decay=None`` keeps both anchors at zero ("LeCam-zero").  The anchors are buffers, so they are
    saved with the LightningModule's checkpoint.
    """

    def __init__(self, decay: Optional[float] = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("anchor_real", torch.zeros(()))
        self.register_buffer("anchor_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        if self.decay is None:
            return
        self.anchor_real.mul_(self.decay).add_((1 - self.decay) * logits_real.float().mean())
        self.anchor_fake.mul_(self.decay).add_((1 - self.decay) * logits_fake.float().mean())

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Regulariser value against the current anchors, then update the anchors."""
        reg = lecam_regularizer(logits_real.float(), logits_fake.float(), self.anchor_real, self.anchor_fake)
        self.update(logits_real, logits_fake)
        return reg


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's adaptive GAN weight ``|dL_rec/dW| / (|dL_gan/dW| + eps)``, clamped to [0, max_weight].

    ``W`` is the last decoder layer's weight.  Scaling the GAN term by this ratio makes its
    gradient at the decoder output as large as the reconstruction gradient, whatever the losses'
    absolute sizes.  Returned detached.  Both losses must still have their graphs.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------
# Binary Spherical Quantization regularisers
# ---------------------------------------------------------------------------------------------

def binary_entropy(p: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(p), elementwise, with 0 log 0 = 0 and finite gradients at 0 and 1."""
    p = p.clamp(0.0, 1.0)
    q = 1.0 - p
    # Clamping only inside the logs keeps the value exact at 0 and 1 while the derivative
    # (log p - log(1 - p)) stays finite there; saturated sigmoids hit exactly 0 or 1 in fp32.
    return -(p * p.clamp_min(eps).log() + q * q.clamp_min(eps).log())


def _binary_entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    # H(sigmoid(z)) = p * softplus(-z) + (1 - p) * softplus(z): smooth for any z.
    p = torch.sigmoid(z)
    return p * F.softplus(-z) + (1 - p) * F.softplus(z)


def bsq_bit_probabilities(u: torch.Tensor, inv_temperature: float = 100.0, dim: int = 1) -> torch.Tensor:
    """Per-bit probability ``P(c_j = +1/sqrt(d) | u)`` of BSQ's soft code assignment.

    BSQ softly assigns a unit vector ``u`` to the 2^d codes ``c in {-1/sqrt(d), +1/sqrt(d)}^d`` with
    ``q(c|u) = softmax_c(tau * <c, u>)``.  Because ``<c, u> = sum_j c_j u_j``, the softmax
    factorises into independent bits, ``q(c|u) = prod_j q(c_j|u_j)``, and for one bit
    ``q(c_j = +s | u_j) = sigmoid(2 tau s u_j)`` with ``s = 1/sqrt(d)``.

    Args:
        u: unit-normalised latents, the code dimension at ``dim``.
        inv_temperature: ``tau``; larger values give sharper assignments.
    Returns:
        probabilities with the shape of ``u``.
    """
    return torch.sigmoid(_bit_logits(u, inv_temperature, dim))


def _bit_logits(u: torch.Tensor, inv_temperature: float, dim: int) -> torch.Tensor:
    return 2.0 * inv_temperature / math.sqrt(u.shape[dim]) * u.float()


@dataclass
class BSQEntropy:
    """The entropy terms of one batch (nats, summed over the d bits)."""

    per_sample: torch.Tensor   # E_u H(q(c|u))  (exact for the factorised q)
    codebook: torch.Tensor     # sum_j H(E_u q(c_j|u)) (upper bound of H(E_u q(c|u)))
    loss: torch.Tensor         # per_sample - gamma * codebook


def bsq_entropy_terms(u: torch.Tensor, inv_temperature: float = 100.0, gamma: float = 1.0,
                      dim: int = 1) -> BSQEntropy:
    """BSQ entropy regulariser without enumerating the 2^d codes.

    ``loss = E_u[H(q(c|u))] - gamma * H(E_u[q(c|u)])`` (Zhao et al. 2024): the first term makes each
    latent commit to one code, the second spreads the batch over the whole codebook.

    * per-sample entropy: for the factorised ``q`` (:func:`bsq_bit_probabilities`) the entropy of a
      product distribution is the sum of its bits' entropies, so
      ``H(q(c|u)) = sum_j h(p_j(u))`` **exactly**, ``h`` the binary entropy.
    * codebook entropy: the batch mean of product distributions is a mixture that no longer
      factorises.  As the BSQ paper does, we use the sum of the entropies of its per-bit marginals,
      ``sum_j h(E_u p_j(u))``.  By sub-additivity of entropy this is an **upper bound** of the
      exact ``H(E_u q(c|u))``, equal to it when the bits of the mean distribution are independent
      (e.g. a batch of one latent); maximising it spreads every bit to 50 % usage but does not by
      itself decorrelate the bits.

    Args:
        u: unit-normalised latents with the d code bits at ``dim``; every other position is a sample
            (the expectation runs over batch and space).
        inv_temperature: ``tau`` of the soft assignment.
        gamma: weight of the codebook entropy in ``loss``.
    """
    z = _bit_logits(u, inv_temperature, dim).movedim(dim, -1).reshape(-1, u.shape[dim])  # (samples, d)
    p = torch.sigmoid(z)
    per_sample = _binary_entropy_from_logits(z).sum(dim=-1).mean()
    codebook = binary_entropy(p.mean(dim=0)).sum()
    return BSQEntropy(per_sample=per_sample, codebook=codebook, loss=per_sample - gamma * codebook)


def commitment_loss(u: torch.Tensor, q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``E ||u - sg(q)||^2``: squared distance of each latent to its (detached) code, summed over the
    code dimension ``dim`` and averaged over all other positions.  Pulls the encoder's normalised
    outputs towards the corners of the hypercube that BSQ rounds them to."""
    return (u.float() - q.detach().float()).pow(2).sum(dim=dim).mean()

"""Tokenizer loss terms: exact values on hand-made cases."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from infinity_lightning.models.tokenizer_losses import (
    LeCamEMA, PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, binary_entropy, bsq_bit_probabilities,
    bsq_entropy_terms, commitment_loss, discriminator_loss, generator_adv_loss, hinge_d_loss, lecam_regularizer,
    non_saturating_d_loss)


def _all_codes(d: int) -> torch.Tensor:
    """The 2^d BSQ codes, (2^d, d), entries +-1/sqrt(d)."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)
    return signs / math.sqrt(d)


def _exact_soft_assignment(u: torch.Tensor, tau: float) -> torch.Tensor:
    """q(c|u) = softmax_c(tau <c, u>) over all 2^d codes: (N, d) -> (N, 2^d)."""
    codes = _all_codes(u.shape[1])
    return torch.softmax(tau * u.double() @ codes.T, dim=1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(torch.xlogy(p, p)).sum(dim=-1)


@pytest.mark.parametrize("d", [2, 3])
def test_per_sample_entropy_matches_enumerated_codes(d):
    torch.manual_seed(0)
    u = F.normalize(torch.randn(5, d, dtype=torch.float64), dim=1)
    tau = 2.5
    exact = _entropy(_exact_soft_assignment(u, tau)).mean()
    # The module takes (B, d, h, w); put the 5 samples on a 1x5 grid.
    terms = bsq_entropy_terms(u.T.reshape(1, d, 1, 5).float(), inv_temperature=tau, gamma=1.0)
    assert terms.per_sample.item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-6)
    # The factorised per-bit probabilities are the marginals of the exact softmax.
    probs = _exact_soft_assignment(u, tau)
    plus = (_all_codes(d) > 0).double()
    marginals = probs @ plus
    ours = bsq_bit_probabilities(u.float(), tau, dim=1)
    torch.testing.assert_close(ours.double(), marginals, rtol=1e-5, atol=1e-6)


def test_codebook_entropy_is_factorised_upper_bound():
    torch.manual_seed(1)
    d, tau = 3, 4.0
    u = F.normalize(torch.randn(7, d, dtype=torch.float64), dim=1)
    exact_codebook = _entropy(_exact_soft_assignment(u, tau).mean(dim=0))
    terms = bsq_entropy_terms(u.float(), inv_temperature=tau, gamma=0.5, dim=1)
    p = bsq_bit_probabilities(u, tau, dim=1).mean(dim=0)
    by_hand = -(p * p.log() + (1 - p) * (1 - p).log()).sum()
    assert terms.codebook.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Sub-additivity: sum of marginal entropies >= joint entropy, strictly for correlated bits.
    assert terms.codebook.item() >= exact_codebook.item() - 1e-6
    assert terms.loss.item() == pytest.approx(terms.per_sample.item() - 0.5 * terms.codebook.item(), rel=1e-6)
    # A single latent's distribution factorises, so the bound is then exact.
    one = bsq_entropy_terms(u[:1].float(), inv_temperature=tau, dim=1)
    exact_one = _entropy(_exact_soft_assignment(u[:1], tau)[0])
    assert one.codebook.item() == pytest.approx(exact_one.item(), rel=1e-5)
    assert one.per_sample.item() == pytest.approx(exact_one.item(), rel=1e-5)


def test_entropy_limits():
    d = 4
    # Latents exactly on codes with a sharp temperature: per-sample entropy ~ 0.
    codes = _all_codes(d).float()
    sharp = bsq_entropy_terms(codes, inv_temperature=1e4, dim=1)
    assert sharp.per_sample.item() < 1e-6
    # All 16 codes used equally: codebook entropy = d ln 2 (its maximum).
    assert sharp.codebook.item() == pytest.approx(d * math.log(2), rel=1e-5)
    # One code only: codebook entropy 0, so the loss rewards spreading.
    collapsed = bsq_entropy_terms(codes[:1].repeat(8, 1), inv_temperature=1e4, dim=1)
    assert collapsed.codebook.item() < 1e-6
    assert binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([0.0, math.log(2), 0.0])


def test_entropy_gradient_pushes_towards_corners():
    u = F.normalize(torch.tensor([[0.2, -0.1, 0.05, 0.3]]), dim=1).requires_grad_(True)
    terms = bsq_entropy_terms(u, inv_temperature=5.0, gamma=0.0, dim=1)
    terms.loss.backward()
    # Lowering per-sample entropy moves each coordinate away from 0, i.e. along its own sign.
    assert torch.all(torch.sign(-u.grad) == torch.sign(u.detach()))


def test_entropy_gradients_finite_when_saturated():
    # A sharp temperature saturates the sigmoids to exactly 0 / 1 in fp32; gradients must stay finite.
    u = F.normalize(torch.tensor([[0.9, -0.4, 0.1, 0.2], [0.8, -0.5, 0.3, 0.1]]), dim=1).requires_grad_(True)
    terms = bsq_entropy_terms(u, inv_temperature=1e4, gamma=1.0, dim=1)
    assert bsq_bit_probabilities(u, 1e4, dim=1).detach().eq(1.0).any()
    terms.loss.backward()
    assert torch.isfinite(u.grad).all()
    p = torch.tensor([0.0, 1.0, 0.3], requires_grad=True)
    binary_entropy(p).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_commitment_loss_value_and_stop_gradient():
    u = torch.tensor([[[[0.6]], [[-0.8]]]], requires_grad=True)  # (1, 2, 1, 1)
    q = torch.tensor([[[[1.0]], [[-1.0]]]]) / math.sqrt(2)
    q.requires_grad_(True)
    loss = commitment_loss(u, q)
    expected = (0.6 - 1 / math.sqrt(2)) ** 2 + (-0.8 + 1 / math.sqrt(2)) ** 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert q.grad is None
    torch.testing.assert_close(u.grad, 2 * (u.detach() - q.detach()))


def test_gan_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1-real) = [0, .5, 2] -> mean 5/6 ; relu(1+fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    ns = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(ns.item())
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge_d_loss(real, fake).item())
    assert generator_adv_loss("hinge", fake).item() == pytest.approx(1 / 3 * 1.0)
    assert generator_adv_loss("non_saturating", fake).item() == pytest.approx(F.softplus(-fake).mean().item())
    with pytest.raises(ValueError, match="disc_loss"):
        discriminator_loss("wgan", real, fake)


def test_lecam_regularizer_and_anchors():
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 0.5])
    # anchors 0: relu(real)^2 mean = 5 ; relu(-fake)^2 mean = 0.5
    assert lecam_regularizer(real, fake, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(5.5)
    ema = LeCamEMA(decay=0.5)
    first = ema(real, fake)
    assert first.item() == pytest.approx(5.5)
    assert ema.anchor_real.item() == pytest.approx(1.0) and ema.anchor_fake.item() == pytest.approx(-0.125)
    zero = LeCamEMA(decay=None)
    zero(real, fake)
    assert zero.anchor_real.item() == 0.0 and zero.anchor_fake.item() == 0.0


def test_adaptive_weight_on_tiny_graph():
    w = torch.tensor([[1.0, 2.0]], requires_grad=True)
    x = torch.tensor([[3.0], [4.0]])
    out = w @ x  # 11
    rec = (out - 1.0).pow(2).sum()  # d/dw = 2 * 10 * x^T = [60, 80] -> norm 100
    gan = -0.5 * out.sum()          # d/dw = -0.5 * x^T -> norm 2.5
    weight = adaptive_gan_weight(rec, gan, w, max_weight=1e4, eps=0.0)
    assert weight.item() == pytest.approx(40.0)
    assert not weight.requires_grad
    assert adaptive_gan_weight(rec, gan, w, max_weight=10.0).item() == pytest.approx(10.0)


def test_patch_discriminator_shapes_and_grads():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, n_layers=2)
    out = disc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 6, 6)
    out.mean().backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_perceptual_loss_properties_and_weight_loading():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        lp = PerceptualLoss("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max().item() < 1e-6
    d_xy = lp(x, y)
    assert d_xy.shape == (2,) and torch.all(d_xy > 0)
    torch.testing.assert_close(lp(x, y), lp(y, x))
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training
    # Gradients reach the input (the loss trains the decoder through it).
    xr = x.clone().requires_grad_(True)
    lp(xr, y).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    # LPIPS-layout lin keys and torchvision-style feature keys load; the loaded weights are used.
    sd = {k: torch.randn_like(v) for k, v in lp.state_dict().items() if k.startswith("features.")}
    sd.update({f"lin{i}.model.1.weight": torch.full_like(lin.weight, 2.0) for i, lin in enumerate(lp.lins)})
    sd["classifier.0.weight"] = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PerceptualLoss("tiny", state_dict=sd)
    assert loaded.pretrained
    assert torch.equal(loaded.lins[1].weight, torch.full_like(loaded.lins[1].weight, 2.0))
    with pytest.raises(ValueError, match="missing"):
        PerceptualLoss("tiny", state_dict={"lins.0.weight": torch.zeros(1, 16, 1, 1)})
    with pytest.raises(ValueError, match="perceptual_arch"):
        PerceptualLoss("alexnet")


def test_vgg16_perceptual_layout_matches_torchvision_indices():
    with pytest.warns(UserWarning):
        lp = PerceptualLoss("vgg16")
    keys = lp.state_dict().keys()
    # torchvision vgg16.features conv indices up to conv5_3 (index 28).
    convs = sorted({int(k.split(".")[1]) for k in keys if k.startswith("features.")})
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [lin.in_channels for lin in lp.lins] == [64, 128, 256, 512, 512]

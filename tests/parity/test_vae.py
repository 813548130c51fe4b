"""Parity of the BSQ-VAE tokenizer with the original code's numbers (fixture case (a)).

The fixture directory comes from ``$INFINITY_PARITY_DIR`` (default: the ``main`` variant); the
tokenizer architecture is read from the fixture's weight file, so any variant of the same layout
works.  Float tensors must match to 1e-5 (single-threaded they are bit-identical), bit labels exactly.
"""
from __future__ import annotations

import pytest
import torch

from infinity_lightning.checkpoints import load_tokenizer

ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def case(parity_path):
    vae = load_tokenizer(parity_path / "vae.pth")
    image = torch.load(parity_path / "inputs.pth", map_location="cpu", weights_only=True)["image"]
    expected = torch.load(parity_path / "a_vae.pth", map_location="cpu", weights_only=True)
    return vae, image, expected


def _max_err(a, b):
    return float((a - b).abs().max())


def test_fixture_architecture_loads_strictly(case):
    vae, image, expected = case
    assert vae.codebook_dim == expected["raw_features"].shape[1]
    assert image.shape[-1] // expected["raw_features"].shape[-1] == vae.stride


def test_raw_features(case, single_thread):
    vae, image, expected = case
    with torch.no_grad():
        raw = vae.encode_raw(image)
    assert raw.shape == expected["raw_features"].shape
    torch.testing.assert_close(raw, expected["raw_features"], atol=ATOL, rtol=RTOL)


def test_multiscale_quantization(case, single_thread):
    vae, _, expected = case
    schedule = [tuple(s) for s in expected["scale_schedule"]]
    with torch.no_grad():
        summed, bit_labels = vae.quantize_multiscale(expected["raw_features"], schedule)
    assert len(bit_labels) == len(expected["bit_labels"]) == len(schedule)
    for k, (ours, ref) in enumerate(zip(bit_labels, expected["bit_labels"])):
        assert ours.shape == ref.shape, f"scale {k}"
        assert torch.equal(ours, ref.to(ours.dtype)), f"bit labels differ at scale {k}: {int((ours != ref).sum())} bits"
    torch.testing.assert_close(summed, expected["summed_codes"], atol=ATOL, rtol=RTOL)
    # The quantizer has no convolutions: it should agree to the last bits.  Tighter than 1e-5 so
    # that the memory-layout rule of models/numerics.py is checked (a contiguous copy of each scale's codes
    # before upsampling moves the d=24 sum by 2.4e-7).
    torch.testing.assert_close(summed, expected["summed_codes"], atol=1e-7, rtol=0)


def test_decode(case, single_thread):
    vae, _, expected = case
    with torch.no_grad():
        recon = vae.decode(expected["summed_codes"])
    torch.testing.assert_close(recon, expected["recon"], atol=ATOL, rtol=RTOL)


def test_end_to_end_from_the_image(case, single_thread):
    vae, image, expected = case
    schedule = [tuple(s) for s in expected["scale_schedule"]]
    with torch.no_grad():
        recon, bit_labels = vae(image, schedule)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(bit_labels, expected["bit_labels"]))
    torch.testing.assert_close(recon, expected["recon"], atol=ATOL, rtol=RTOL)

"""Case (d): Bitwise Self-Correction with given flip masks."""
import torch

from infinity_lightning.self_correction import teacher_forcing_inputs

from .helpers import load, max_err


def test_self_correction_with_given_masks(parity_path, single_thread):
    raw = load(parity_path, "a_vae.pth")["raw_features"]
    case = load(parity_path, "d_bsc.pth")
    assert case["noise_apply_requant"] == 1
    out = teacher_forcing_inputs(raw, case["scale_schedule"], flip_masks=case["flip_masks"])
    assert max_err(out.inputs, case["x_BLC_wo_prefix"]) <= 1e-5
    labels = out.labels_per_scale(case["scale_schedule"])
    assert len(labels) == len(case["gt_bit_labels"])
    for ours, ref in zip(labels, case["gt_bit_labels"]):
        assert torch.equal(ours, ref)
    assert len(out.flipped_labels) == case["noise_apply_layers"]
    for ours, ref in zip(out.flipped_labels, case["pred_bit_labels"]):
        assert torch.equal(ours, ref)


def test_flips_change_later_labels_but_not_flipped_scale_labels(parity_path, single_thread):
    """The labels of a flipped scale stay the true bits; later scales' labels correct the flips."""
    raw = load(parity_path, "a_vae.pth")["raw_features"]
    case = load(parity_path, "d_bsc.pth")
    clean = teacher_forcing_inputs(raw, case["scale_schedule"]).labels_per_scale(case["scale_schedule"])
    flipped = teacher_forcing_inputs(raw, case["scale_schedule"], flip_masks=case["flip_masks"])
    per_scale = flipped.labels_per_scale(case["scale_schedule"])
    assert torch.equal(per_scale[0], clean[0])
    K = case["noise_apply_layers"]
    assert any(bool(m.any()) for m in case["flip_masks"][: K - 1])  # the fixture flips early bits
    assert any(not torch.equal(a, b) for a, b in zip(per_scale[1:], clean[1:]))

"""Case (b): the teacher-forced forward reproduces the original's text path, blocks and logits."""
import torch

from infinity_lightning.checkpoints import load_transformer
from infinity_lightning.self_correction import teacher_forcing_inputs

from .helpers import TOL, assert_parity, load, max_err, text_tuple


def test_teacher_forcing_matches_original(parity_path, single_thread):
    model = load_transformer(parity_path / "infinity.pth")
    inputs, case = load(parity_path, "inputs.pth"), load(parity_path, "b_teacher_forcing.pth")
    with torch.no_grad():
        logits, inter = model(text_tuple(inputs), case["x_BLC_wo_prefix"], case["scale_schedule"],
                              return_intermediates=True)
    cond = inter["cond"]
    assert max_err(cond.cond_BD, case["cond_BD"]) <= TOL
    assert max_err(cond.ada_gss, case["cond_BD_or_gss"]) <= TOL
    assert max_err(cond.memory, case["ca_kv_compact"]) <= TOL
    n = case.get("intermediate_prefix_tokens")
    if n is not None:
        assert max_err(inter["block_input"][:, :n], case["x_BLC_block_input_prefix"]) <= TOL
        for i, out in enumerate(inter["block_outputs"]):
            assert_parity(out[:, :n], case[f"block_out_{i}_prefix"], f"block {i} output")
    assert logits.shape == case["logits"].shape
    assert_parity(logits, case["logits"], "logits")


def test_teacher_forcing_inputs_from_tokenizer_features(parity_path, single_thread):
    """The fixture's inputs and labels come from the tokenizer's raw features (no flips)."""
    case_a, case_b = load(parity_path, "a_vae.pth"), load(parity_path, "b_teacher_forcing.pth")
    out = teacher_forcing_inputs(case_a["raw_features"], case_b["scale_schedule"])
    assert max_err(out.inputs, case_b["x_BLC_wo_prefix"]) <= TOL
    assert torch.equal(out.labels, case_b["gt_bit_labels"])

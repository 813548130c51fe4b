"""Optimizer groups, LR / WD schedules (docs/model.md#optimiser-and-learning-rate), 8-bit AdamW, LR scaling."""
from __future__ import annotations


import pytest
import torch

from infinity_lightning.lit import optim
from tests.test_var_module import make_module, tiny_transformer


def test_param_groups_follow_the_nowd_rules():
    model = tiny_transformer()
    groups = {g["group"]: g for g in optim.param_groups(model, 0.005)}
    nd, d = set(groups["ND"]["names"]), set(groups["D"]["names"])
    assert groups["D"]["weight_decay"] == 0.005 and groups["ND"]["weight_decay"] == 0.0
    assert groups["D"]["wd_scale"] == 1.0 and groups["ND"]["wd_scale"] == 0.0
    named = dict(model.named_parameters())
    assert nd | d == set(named) and not nd & d
    # multi-dimensional parameters that are ND by name
    for name in ("cfg_uncond", "pos_start", "lvl_embed.weight", "text_proj_for_sos.ca.mat_q"):
        assert name in nd and named[name].ndim >= 2, name
    assert any("ada_gss" in n for n in nd) and any("scale_mul_1H11" in n for n in nd)
    # ND by dimension or by the bias suffix
    assert "text_norm.weight" in nd and "head.bias" in nd and "word_embed.bias" in nd
    # everything in D is a >= 2-D weight without a listed substring
    assert {"head.weight", "word_embed.weight", "text_proj_for_ca.0.weight"} <= d
    for name in d:
        assert named[name].ndim >= 2 and not name.endswith("bias")
        assert not any(k in name for k in optim.NO_WEIGHT_DECAY_KEYS)
    sizes = optim.describe_groups(groups.values())
    assert sizes["D"]["params"] + sizes["ND"]["params"] == sum(p.numel() for p in model.parameters())


def test_lr_schedule_values():
    f = optim.lr_factor
    # constant (train.sh: lin0 with wpe = 1) with warm-up
    assert f(0, schedule="constant", warmup_steps=10, warmup_start_factor=0.005) == pytest.approx(0.005)
    assert f(5, schedule="constant", warmup_steps=10, warmup_start_factor=0.005) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(10, schedule="constant", warmup_steps=10) == 1.0 and f(10 ** 6, schedule="constant") == 1.0
    # lin0 over 101 steps, no warm-up: flat for the first 5 %, then linear down to wpe
    kw = dict(schedule="lin0", final_factor=0.3, max_steps=101)
    assert f(4, **kw) == 1.0
    assert f(50, **kw) == pytest.approx(0.3 + 0.7 * 0.5 / 0.95)
    assert f(100, **kw) == pytest.approx(0.3)
    # cosine with warm-up 10 over 111 steps
    kw = dict(schedule="cosine", final_factor=0.1, max_steps=111, warmup_steps=10)
    assert f(10, **kw) == pytest.approx(1.0)
    assert f(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="max_steps"):
        f(3, schedule="cosine")
    with pytest.raises(ValueError, match="lr_schedule"):
        f(3, schedule="exp")


def test_weight_decay_schedule_and_lr_scaling():
    assert optim.weight_decay_at(500, 0.005) == 0.005
    assert optim.weight_decay_at(0, 0.05, 0.01, 101) == pytest.approx(0.05)
    assert optim.weight_decay_at(50, 0.05, 0.01, 101) == pytest.approx(0.03)
    assert optim.weight_decay_at(100, 0.05, 0.01, 101) == pytest.approx(0.01)
    assert optim.scaled_lr(6e-3, 32) == pytest.approx(7.5e-4)  # 8 GPUs x 4 (docs/model.md#optimiser-and-learning-rate)
    m = make_module(lr=None, tblr=6e-3, global_batch_size=32)
    assert m.learning_rate() == pytest.approx(7.5e-4)
    with pytest.raises(ValueError, match="exactly one of lr"):
        make_module(lr=1e-3, tblr=6e-3)
    with pytest.raises(ValueError, match="global batch size"):
        make_module(lr=None, tblr=6e-3).learning_rate()              # no DataModule to read it from


def test_module_scheduler_steps_per_optimizer_step():
    m = make_module(lr=1e-2, lr_schedule="cosine", warmup_steps=2, warmup_start_factor=0.1, final_lr_factor=0.0,
                    max_steps=6)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert {g["group"] for g in opt.param_groups} == {"D", "ND"}
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-2 * optim.lr_factor(i, schedule="cosine", warmup_steps=2, warmup_start_factor=0.1,
                                       final_factor=0.0, max_steps=6) for i in range(6)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(1e-3) and seen[2] == pytest.approx(1e-2) and seen[5] == pytest.approx(0.0, abs=1e-12)
    assert m.param_group_sizes["ND"]["tensors"] > 0


def test_adamw8bit_is_selectable_and_steps_on_cpu():
    m = make_module(optimizer="adamw8bit")
    opt = m.configure_optimizers()["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    w = m.transformer.head_nm.ada_lin[-1].weight  # large enough for 8-bit states
    before = w.detach().clone()
    for p in m.transformer.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(before, w.detach())
    state = opt.state[w]
    assert "state1" in state and state["state1"].dtype == torch.uint8
    assert opt.param_groups[0]["weight_decay"] in (0.005, 0.0)
    with pytest.raises(ValueError, match="optimizer"):
        make_module(optimizer="sgd")

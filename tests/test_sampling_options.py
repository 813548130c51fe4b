"""A per-scale guidance schedule (``cfg_schedule``): through the Python API, the pipeline and the
generate command's flags, with no other change than the option itself."""
from __future__ import annotations

import pytest
import torch

from infinity_lightning.commands.generate import add_sampling_arguments, sampling_overrides
from infinity_lightning.sampling import SamplingConfig, generate
from infinity_lightning.scales import resolve
from tests.test_var_module import HashTextEncoder, tiny_transformer


def test_schedules_give_the_expected_per_scale_guidance():
    assert SamplingConfig(cfg=3.0).per_scale(5)["cfg"] == [3.0] * 5
    assert SamplingConfig(cfg=3.0, cfg_schedule="linear").per_scale(5)["cfg"] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    late = SamplingConfig(cfg=4.0, cfg_schedule=lambda k, n: float(k >= n - 2))   # guidance on the last two only
    assert late.per_scale(4)["cfg"] == [1.0, 1.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="cfg_schedule must be 'constant', 'linear' or a function"):
        SamplingConfig(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="function and cannot be stored"):
        late.to_dict()


def test_a_schedule_equals_the_explicit_per_scale_list():
    model = tiny_transformer().eval()
    text = HashTextEncoder().encode(["a red circle", "a blue square"])
    schedule = resolve(64, 1.0, token_stride=16)                    # 1, 2, 4: three scales
    ramp = generate(model, text, schedule, SamplingConfig(cfg=3.0, cfg_schedule="linear"), seed=[1, 2],
                    return_logits=True)
    listed = generate(model, text, schedule, SamplingConfig(cfg=[1.0, 2.0, 3.0]), seed=[1, 2], return_logits=True)
    constant = generate(model, text, schedule, SamplingConfig(cfg=3.0), seed=[1, 2], return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(ramp.logit_diff, listed.logit_diff))
    assert not torch.equal(ramp.logit_diff[0], constant.logit_diff[0])      # scale 0 unguided under the ramp


def test_the_generate_command_exposes_it():
    import argparse

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args(["--cfg", "4", "--cfg-schedule", "linear"])
    assert sampling_overrides(args) == {"cfg": 4.0, "cfg_schedule": "linear"}


def test_the_pipeline_passes_it_through(tmp_path):
    from infinity_lightning.pipeline import InfinityPipeline
    from infinity_lightning.tiny import make_tiny_pipeline

    pipe = InfinityPipeline.from_pretrained(make_tiny_pipeline(tmp_path, layout="generic"), device="cpu")
    ramp = pipe("a red circle", seed=3, resolution=64, output_type="pt", cfg=3.0, cfg_schedule="linear")
    listed = pipe("a red circle", seed=3, resolution=64, output_type="pt", cfg=[1.0, 2.0, 3.0])
    assert ramp.sampling.cfg_schedule == "linear" and torch.equal(ramp.images, listed.images)

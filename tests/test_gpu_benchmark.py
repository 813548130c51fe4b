"""benchmarks/gpu.sh and gpu.py, the parts that can be checked without a GPU: arguments, the plan
of what would run, and a fast, clear refusal without CUDA."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402


def test_arguments():
    args = gpu.parse_args([])
    assert args.parts == ["latency", "train"] and args.train_cases == [("layer12", 8), ("2b", 2)]
    assert args.train_modes == ["exact", "fast", "flex"] and args.budget_minutes < 8
    assert gpu.parse_args(["--train-cases", "2b:4", "--parts", "train"]).train_cases == [("2b", 4)]
    for bad in (["--parts", "latency,inference"], ["--train-cases", "2b"], ["--train-modes", "sdpa"],
                ["--device", "cpu"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_plan_describes_the_released_shapes(capsys):
    assert gpu.main(["--plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    latency = plan["latency"]
    assert (latency["preset"], latency["depth"], latency["width"]) == ("2b", 32, 2048)
    assert latency["pixels"] == [1024, 1024] and latency["tokens"] == 10521 and latency["scales"] == 13
    assert latency["text_encoder"]["d_model"] == 2048 and latency["text_encoder"]["num_layers"] == 24
    assert plan["train"]["tokens_per_sample"] == 2521


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_fast_and_clearly():
    start = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: no CUDA device") and "benchmarks/gpu.py needs one GPU" in done.stderr
    assert time.perf_counter() - start < 60
    plan = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--plan", "--parts", "train"],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert plan.returncode == 0 and json.loads(plan.stdout)["parts"] == ["train"]


def test_the_measuring_code_runs_on_tiny_models(capsys):
    """The CUDA code path with tiny presets on CPU, in fp32 (checks the script, measures nothing)."""
    status = gpu.main(["--cpu-smoke", "--device", "cuda"])
    out = json.loads(capsys.readouterr().out)
    assert status in (0, 3)
    latency = out["latency"]
    for key in ("cold_seconds_without_text", "cold_seconds_with_text", "warm_seconds_without_text",
                "warm_seconds_with_text"):
        assert latency[key] > 0
    assert latency["memory"]["peak_rss_gb"] > 0
    modes = [r for r in out["train"] if "mode" in r]
    assert [r["mode"] for r in modes] == ["exact", "fast"]
    assert all(r["mfu_model"] > 0 and r["attention_share"] > 0 and "valid" in r for r in modes)
    assert out["train"][-1]["matmul_peak"]["dtype"] == "float32"        # bf16 on a GPU

"""Helpers shared by the benchmark scripts: device setup, timing, matmul peak, peak memory.

Timings on a shared machine are noisy: every script runs the modes it compares interleaved in
one process (exact, fast, exact, fast, ...) and reports medians; compare the ratios of one run,
never absolute seconds across runs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup(device: str, threads: Optional[int] = None) -> torch.device:
    """Flush denormals (fp32 CPU steps otherwise jump 3-4x at random), set threads."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of an n x n x n matrix product (the machine's practical peak), median of ``reps``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    times = [timed(lambda: a @ b, device) for _ in range(reps)]
    return 2 * n ** 3 / median(times)


def rss_bytes() -> Dict[str, int]:
    """Current and peak resident set size of this process (Linux), in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def memory_probe(script: str, args: List[str]) -> Dict[str, Any]:
    """Run ``script --memory-probe ...`` in a fresh process and return its JSON answer.

    On CPU the peak of a step is the process's peak RSS, which never goes down inside one
    process; a fresh process per measured case keeps the cases apart.
    """
    cmd = [sys.executable, script, "--memory-probe", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory_start(device: torch.device) -> Dict[str, int]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return {"allocated": torch.cuda.memory_allocated(device)}
    return rss_bytes()


def peak_memory_end(device: torch.device, start: Dict[str, int]) -> Dict[str, float]:
    """Peak memory since :func:`peak_memory_start`, in GB (CUDA: allocated; CPU: RSS)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_gb": peak / 1e9, "step_peak_gb": (peak - start["allocated"]) / 1e9}
    now = rss_bytes()
    return {"peak_rss_gb": now.get("VmHWM", 0) / 1e9,
            "step_peak_gb": (now.get("VmHWM", 0) - start.get("VmRSS", 0)) / 1e9}


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> str:
    """torch.profiler table of the top ops (self time) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)

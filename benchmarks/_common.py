"""Helpers shared by the benchmark scripts: device setup, the machine's capabilities, timing, the
matmul peak, model-FLOP utilisation and its validity, peak memory.

Timings on a shared machine are noisy: every script runs the modes it compares interleaved in
one process (exact, fast, exact, fast, ...) and reports medians; compare the ratios of one run,
never absolute seconds across runs.

Definitions used by every script (benchmarks/README.md, "Definitions"):

* **Matmul peak** (:class:`PeakMeter`): the *best* FLOP/s of many long square GEMMs (each at
  least ``min_seconds``; the side grows from 1024 until it is) at the dtype and thread count of the
  measured step, sampled between the steps of the same process; the spread (min, median, best)
  is reported beside it.
* **MFU** (:func:`model_flops`): the usual definition, ``6 N B L + 3 depth sum_b (4 L^2 C + 4 L
  Lt_b C)`` model FLOPs per training step over the step time and the peak, with N the block
  parameters that act on image tokens (:func:`block_params`), L the unpadded tokens per image,
  Lt_b the text tokens of sample b, dense (not block-causal) attention.  The scripts also report
  the *useful*-FLOP utilisation (the FLOPs no implementation can avoid: block-causal pairs only,
  each projection on the rows it really touches); both are labelled in the JSON.
* **Validity** (:func:`check_utilisation`): a utilisation above 1 cannot happen; it means the peak
  was measured too low or the step was timed wrongly.  Such a row is marked ``"valid": false``
  with the reason, and the script exits with status 3 (:data:`INVALID_EXIT`) after printing.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Exit status of a script that printed a row with a utilisation above 1.
INVALID_EXIT = 3


def setup(device: str, threads: Optional[int] = None) -> torch.device:
    """Flush denormals (fp32 CPU steps otherwise jump 3-4x at random), set threads."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.device(device)


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the timings depend on: CPU model and vector capability, whether bf16 runs natively
    (oneDNN bf16: AVX-512 BF16 or AMX), threads, torch version; the GPU's name on CUDA.

    Without native bf16 a bf16 matmul is emulated and runs far below fp32 (an AVX2-only CPU:
    ~1% of the fp32 rate), so bf16 timings there say nothing about bf16 elsewhere.
    """
    info: Dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()}
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_model"] = model
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    info["mkldnn_bf16_supported"] = bf16
    try:
        info["amx_tile_supported"] = bool(torch._C._cpu._is_amx_tile_supported())
    except AttributeError:
        info["amx_tile_supported"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = list(torch.cuda.get_device_capability(device))
        info["bf16_native"] = bool(torch.cuda.is_bf16_supported())
    else:
        info["bf16_native"] = bf16
    if not info["bf16_native"]:
        info["bf16_note"] = ("no native bf16 on this device (oneDNN reports no bf16 support): bf16 is emulated, "
                             "bf16 timings are not meaningful here; measure bf16 on a CPU with AVX-512 BF16 / AMX "
                             "or on a GPU")
    return info


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


# --------------------------------------------------------------------------------------------
# matmul peak
# --------------------------------------------------------------------------------------------
class PeakMeter:
    """The matmul peak of one dtype on this device and thread count, sampled during a run.

    :meth:`sample` times ``reps`` products of two n x n matrices, with n the smallest of 1024,
    2048, 4096 for which one product takes at least ``min_seconds`` (chosen on the first call;
    at most ``max_n``).  :meth:`summary` gives the best FLOP/s of all samples (the peak used for
    utilisation) and the spread.  Call :meth:`sample` between the measured steps so drift shows.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, *, reps: int = 5, min_seconds: float = 0.2,
                 start_n: int = 1024, max_n: int = 4096):
        self.dtype, self.device, self.reps, self.min_seconds = dtype, device, int(reps), float(min_seconds)
        self.start_n, self.max_n = int(start_n), int(max_n)
        self.n: Optional[int] = None
        self.flops: List[float] = []

    def _operands(self, n: int):
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(self.device, self.dtype)
        b = torch.randn(n, n, generator=g).to(self.device, self.dtype)
        return a, b

    def _choose_n(self) -> int:
        n = self.start_n
        while True:
            a, b = self._operands(n)
            a @ b                                           # first call: allocation, kernel choice
            if timed(lambda: a @ b, self.device) >= self.min_seconds or 2 * n > self.max_n:
                return n
            n *= 2

    def sample(self, reps: Optional[int] = None) -> None:
        """Time ``reps`` long products and keep their FLOP/s."""
        if self.n is None:
            self.n = self._choose_n()
        a, b = self._operands(self.n)
        a @ b
        for _ in range(reps or self.reps):
            self.flops.append(2 * self.n ** 3 / timed(lambda: a @ b, self.device))

    @property
    def best(self) -> float:
        """The peak FLOP/s (best sample); samples once if nothing was measured yet."""
        if not self.flops:
            self.sample()
        return max(self.flops)

    def summary(self) -> Dict[str, Any]:
        best = self.best
        med, low = median(self.flops), min(self.flops)
        return {"dtype": str(self.dtype).removeprefix("torch."), "n": self.n, "products": len(self.flops),
                "threads": torch.get_num_threads(), "best_gflop_per_s": best / 1e9,
                "median_gflop_per_s": med / 1e9, "min_gflop_per_s": low / 1e9,
                "spread_best_over_min": best / low, "spread_relative": (best - low) / med}


def matmul_flops(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """The matmul peak (best of ``reps`` long GEMMs, :class:`PeakMeter`), in FLOP/s."""
    meter = PeakMeter(dtype, device, reps=reps)
    meter.sample()
    return meter.best


# --------------------------------------------------------------------------------------------
# FLOPs and utilisation
# --------------------------------------------------------------------------------------------
#: Block parameters left out of N in :func:`model_flops`: the cross-attention's key/value
#: projection multiplies the text rows, not the image tokens (counting it on the L image tokens
#: would add 2C^2 of 16C^2 per block that is never computed on them).
TEXT_SIDE_PARAMS = ("ca.mat_kv.",)


def block_params(model: torch.nn.Module, exclude: Sequence[str] = TEXT_SIDE_PARAMS) -> int:
    """N of the usual MFU definition: every parameter of the transformer blocks (matrices, biases,
    AdaLN tables, norms) except those named by ``exclude`` (by default the cross-attention's
    key/value projection, which acts on the text rows).  Embeddings, the text path and the head
    are not block parameters."""
    total = 0
    for block in model.block_list():
        for name, p in block.named_parameters():
            if not any(name.startswith(e) for e in exclude):
                total += p.numel()
    return total


def model_flops(n_block_params: int, depth: int, width: int, tokens: int, text_lens: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward + backward), the usual definition::

        6 N B L  +  3 depth sum_b (4 L^2 C + 4 L Lt_b C)

    N block parameters (:func:`block_params`), B = len(text_lens) samples of L unpadded tokens,
    width C, Lt_b text tokens of sample b; self-attention counted dense (all L^2 pairs: q k^T and
    p v, 2 FLOPs per multiply-add each), cross-attention over each sample's own text.  Forward
    only: divide by 3.
    """
    L, C = int(tokens), int(width)
    dense = sum(4 * L * L * C + 4 * L * int(lt) * C for lt in text_lens)
    return 6.0 * n_block_params * len(text_lens) * L + 3.0 * depth * dense


def check_utilisation(row: Dict[str, Any], keys: Iterable[str]) -> Dict[str, Any]:
    """Mark ``row`` valid or not: every utilisation named by ``keys`` must be at most 1.

    A utilisation above 1 is a measurement error (the peak measured too low, a timing that missed
    work); the row gets ``"valid": false`` and ``"invalid_reason"``.  Returns the row.
    """
    bad = {k: row[k] for k in keys if row.get(k) is not None and row[k] > 1.0}
    row["valid"] = not bad
    if bad:
        row["invalid_reason"] = ("utilisation above 1 (" + ", ".join(f"{k}={v:.3f}" for k, v in bad.items())
                                 + "): a measurement error, the matmul peak or the step time is wrong")
    return row


def invalid_rows(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if r.get("valid") is False]


def finish(result: Dict[str, Any], rows: Iterable[Dict[str, Any]]) -> int:
    """Print ``result`` as JSON (with ``invalid_rows`` counted) and return the exit status:
    :data:`INVALID_EXIT` when a row is invalid, else 0."""
    bad = invalid_rows(rows)
    result["invalid_rows"] = len(bad)
    print(json.dumps(result, indent=1))
    if bad:
        print(f"error: {len(bad)} row(s) with a utilisation above 1 (a measurement error); see 'invalid_reason'",
              file=sys.stderr)
        return INVALID_EXIT
    return 0


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
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

"""The GPU benchmark: one short run on one CUDA device that prints one JSON document.

    bash benchmarks/gpu.sh                      # everything, under 8 minutes on one H100
    python benchmarks/gpu.py --parts train --out gpu.json
    python benchmarks/gpu.py --plan             # what would run (no GPU needed)

Random weights of the released architectures (the presets; speed does not depend on values):

* ``latency``: the 2B transformer (``2b``) with its d32 tokenizer at 1024 px (the 1M schedule,
  13 scales, 10,521 tokens), bf16 blocks, KV cache, cfg 3, tau 0.5, top-k 900, top-p 0.97, fast
  path, decoding included; *cold* (the first call of the process: CUDA context, cuBLAS handles,
  kernel selection) and *warm* (median of the next calls); text encoding excluded
  (``prompt_embeds``) and included, with a random T5 encoder of flan-t5-xl's shape built from a
  ``T5Config`` (d_model 2048, 24 layers, 32 heads of 64, d_ff 5120 gated-GELU, bf16).
* ``train``: the training step (forward + loss + backward, bf16 autocast) of ``layer12`` and
  ``2b`` at 0.25M (L = 2,521): exact (padded dense masked SDPA), fast (block-causal groups with
  SDPA) and flex (FlexAttention with a block mask, compiled once; its first step is reported
  apart), with MFU by the usual definition and by useful FLOPs against the best bf16 GEMM of the
  same process (benchmarks/_common.py), the self-attention core's share of the step, and
  ``torch.cuda.max_memory_allocated`` per mode.

A time budget (``--budget-minutes``, default 7.5) skips what would not fit and says so in the
JSON.  Without CUDA the script stops at once with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

PARTS = ("latency", "train")
#: flan-t5-xl's encoder (the released models' text encoder), from its public config
FLAN_T5_XL = dict(d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, feed_forward_proj="gated-gelu",
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                  pad_token_id=0, eos_token_id=1)
#: (preset, batch) of the training part at 0.25M
TRAIN_CASES = (("layer12", 8), ("2b", 2))
TRAIN_MODES = ("exact", "fast", "flex")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:1, ...)")
    p.add_argument("--resolution", default="1M", help="latency part: pixel budget (1M = 1024 px)")
    p.add_argument("--latency-preset", default="2b")
    p.add_argument("--warm-repeats", type=int, default=3)
    p.add_argument("--train-pn", default="0.25M")
    p.add_argument("--train-cases", default=",".join(f"{p}:{b}" for p, b in TRAIN_CASES),
                   help="comma list of preset:batch for the training part")
    p.add_argument("--train-modes", default=",".join(TRAIN_MODES), help="comma list of exact, fast, flex")
    p.add_argument("--repeats", type=int, default=3, help="timed training steps per mode")
    p.add_argument("--budget-minutes", type=float, default=7.5, help="skip what would start after this")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plan", action="store_true", help="print what would run and exit (no GPU needed)")
    # tests: the same code path on CPU with tiny presets (checks the script, measures nothing)
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    bad = [s for s in args.parts if s not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; expected {', '.join(PARTS)}")
    try:
        args.train_cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.train_cases.split(",") if c]
    except (IndexError, ValueError):
        p.error(f"--train-cases {args.train_cases!r}: expected preset:batch[,preset:batch]")
    args.train_modes = [m for m in args.train_modes.split(",") if m]
    bad = [m for m in args.train_modes if m not in TRAIN_MODES]
    if bad:
        p.error(f"unknown training mode(s) {bad}; expected {', '.join(TRAIN_MODES)}")
    if not args.device.startswith("cuda"):
        p.error(f"--device {args.device!r}: this benchmark is for CUDA devices (cuda, cuda:N)")
    if args.cpu_smoke:
        args.device, args.latency_preset, args.resolution, args.train_pn = "cpu", "tiny", "0.06M", "0.06M"
        args.train_cases, args.warm_repeats, args.repeats = [("tiny", 2)], 1, 1
        args.train_modes = [m for m in args.train_modes if m != "flex"]   # no FlexAttention backward on CPU
    return args


def text_encoder_config(args, text_channels: int) -> Dict[str, Any]:
    """flan-t5-xl's shape (the smoke run: a 2-layer encoder as wide as the tiny transformer's text)."""
    if args.cpu_smoke:
        return dict(FLAN_T5_XL, d_model=text_channels, num_layers=2, num_heads=2, d_kv=text_channels // 2, d_ff=128)
    return dict(FLAN_T5_XL)


def plan(args) -> Dict[str, Any]:
    """What the run measures, from the presets and schedules alone (no GPU)."""
    from infinity_lightning import scales
    from infinity_lightning.presets import transformer_config

    cfg = transformer_config(args.latency_preset)
    schedule = scales.resolve(args.resolution, 1.0)
    out: Dict[str, Any] = {"parts": args.parts, "budget_minutes": args.budget_minutes}
    if "latency" in args.parts:
        out["latency"] = {"preset": args.latency_preset, "depth": cfg.depth, "width": cfg.embed_dim,
                          "tokenizer": cfg.tokenizer, "resolution": args.resolution,
                          "pixels": [16 * schedule[-1][1], 16 * schedule[-1][2]], "scales": len(schedule),
                          "tokens": schedule.num_tokens, "text_encoder": text_encoder_config(args, cfg.text_channels),
                          "warm_repeats": args.warm_repeats}
    if "train" in args.parts:
        train_schedule = scales.resolve(args.train_pn, 1.0)
        out["train"] = {"pn": args.train_pn, "tokens_per_sample": train_schedule.num_tokens,
                        "cases": [{"preset": p, "batch": b} for p, b in args.train_cases],
                        "modes": args.train_modes, "repeats": args.repeats, "dtype": "bf16 autocast"}
    return out


def require_cuda(device: str) -> Optional[str]:
    """None when ``device`` is a usable CUDA device, else why not."""
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "benchmarks/gpu.py needs one GPU. CPU benchmarks: benchmarks/transformer.py")
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
    return None


def _dtype_name(args) -> str:
    """bf16 (the smoke run on CPU: fp32, where bf16 may be emulated and slow)."""
    return "fp32" if args.cpu_smoke else "bf16"


class Budget:
    def __init__(self, minutes: float):
        self.start, self.seconds = time.perf_counter(), 60.0 * minutes

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def build_text_encoder(device, folder: str, shape: Dict[str, Any]):
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from infinity_lightning.models.text_encoder import TextEncoder
    from infinity_lightning.tiny import DEFAULT_TINY_TEXTS, build_sentencepiece_vocab

    build_sentencepiece_vocab(list(DEFAULT_TINY_TEXTS), folder, vocab_size=256)
    tokenizer = T5Tokenizer.from_pretrained(folder)
    # flan-t5-xl's shapes with a small vocabulary: the embedding lookup costs nothing either way
    config = T5Config(vocab_size=len(tokenizer), is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False, decoder_start_token_id=0, **shape)
    with torch.device(device):
        encoder = T5EncoderModel(config).to(torch.bfloat16)
    return TextEncoder(tokenizer, encoder)


def bench_latency(args, device, budget: Budget) -> Dict[str, Any]:
    import tempfile

    import torch

    from infinity_lightning.checkpoints import load_tokenizer
    from infinity_lightning.models.infinity import InfinityTransformer, init_weights
    from infinity_lightning.pipeline import InfinityPipeline
    from infinity_lightning.presets import transformer_config

    import _common as C

    t0 = time.perf_counter()
    cfg = transformer_config(args.latency_preset)
    with torch.device(device):
        transformer = InfinityTransformer(cfg)
        init_weights(transformer)
    transformer.eval().requires_grad_(False)
    tokenizer = load_tokenizer(cfg.tokenizer or "d32", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build_text_encoder(device, tmp, text_encoder_config(args, cfg.text_channels))
    pipe = InfinityPipeline(transformer, tokenizer, encoder, device=device, dtype=_dtype_name(args),
                            sampling={"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97, "fast": True})
    build_s = time.perf_counter() - t0
    prompts = ["a red apple on a wooden table"]
    kw = dict(seed=0, resolution=args.resolution, output_type="pt", progress=False)
    out: Dict[str, Any] = {"preset": args.latency_preset, "resolution": args.resolution, "dtype": _dtype_name(args),
                           "options": "fast=True, KV cache, cfg 3, tau 0.5, top-k 900, top-p 0.97, decode included",
                           "build_seconds": build_s}
    memory = C.peak_memory_start(device)

    def encode():
        return pipe.encode_prompt(prompts)

    with torch.inference_mode():
        # cold: the first call of the process (nothing ran on the GPU before, apart from building)
        t_text_cold = C.timed(encode, device)
        feats = encode()
        t_cold = C.timed(lambda: pipe(prompt_embeds=feats, **kw), device)
        out["cold_seconds_without_text"] = t_cold
        out["cold_seconds_text_encoding"] = t_text_cold
        out["cold_seconds_with_text"] = t_cold + t_text_cold
        warm, warm_text = [], []
        for _ in range(args.warm_repeats):
            if budget.left() < 3 * t_cold:
                out["warm_note"] = "stopped early: time budget"
                break
            warm.append(C.timed(lambda: pipe(prompt_embeds=feats, **kw), device))
            warm_text.append(C.timed(lambda: pipe(prompts, **kw), device))
    out["warm_seconds_without_text"] = C.median(warm)
    out["warm_seconds_with_text"] = C.median(warm_text)
    out["warm_seconds_all"] = {"without_text": warm, "with_text": warm_text}
    out["memory"] = C.peak_memory_end(device, memory)
    del pipe, transformer, tokenizer, encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def bench_train(args, device, budget: Budget) -> List[Dict[str, Any]]:
    import torch

    import _common as C
    import transformer as T
    from infinity_lightning.models.infinity import InfinityTransformer, init_weights
    from infinity_lightning.presets import transformer_config

    n = 64 if args.cpu_smoke else 8192
    dtype = C.DTYPES[_dtype_name(args)]
    meter = C.PeakMeter(dtype, device, reps=20 if device.type == "cuda" else 1, start_n=n, max_n=n)
    rows: List[Dict[str, Any]] = []
    for preset, batch in args.train_cases:
        if budget.left() < 60:
            rows.append({"preset": preset, "skipped": "time budget"})
            continue
        with torch.device(device):
            model = InfinityTransformer(transformer_config(preset, cond_drop_rate=0.0))
            init_weights(model)
        ns = SimpleNamespace(batch=batch, text_len=8 if args.cpu_smoke else 48)
        case = T.TrainCase(preset, args.train_pn, ns, device, model=model)
        times: Dict[str, List[float]] = {m: [] for m in args.train_modes}
        first: Dict[str, float] = {}
        memory: Dict[str, float] = {}
        for m in args.train_modes:                 # warm-up; flex compiles here
            start = C.peak_memory_start(device)
            first[m] = C.timed(lambda: case.step(m, dtype), device)
            memory[m] = C.peak_memory_end(device, start)["step_peak_gb"]
        meter.sample()
        for _ in range(args.repeats):
            if budget.left() < 30:
                break
            for m in args.train_modes:
                times[m].append(C.timed(lambda: case.step(m, dtype), device))
        meter.sample()
        peak = meter.best
        for m in args.train_modes:
            sec = C.median(times[m]) if times[m] else first[m]
            row = {"preset": preset, "pn": args.train_pn, "batch": batch, "mode": m, "dtype": f"{_dtype_name(args)} autocast",
                   "tokens_per_sample": case.schedule.num_tokens, "seconds_per_step": sec, "seconds_all": times[m],
                   "first_step_seconds": first[m], "tokens_per_s": case.tokens / sec,
                   "model_gflop": case.flops["model_flops"] / 1e9, "useful_gflop": case.flops["useful_flops"] / 1e9,
                   "n_block_params": case.flops["n_block_params"], "mfu_model": case.flops["model_flops"] / sec / peak,
                   "mfu_useful": case.flops["useful_flops"] / sec / peak,
                   "step_peak_memory_gb": memory[m],
                   f"speedup_vs_{args.train_modes[0]}": (C.median(times[args.train_modes[0]]) / sec
                                                         if times[args.train_modes[0]] and times[m] else None)}
            if budget.left() > 20:
                row["attention_core_seconds"] = case.attention_core_seconds(m, dtype, 3)
                row["attention_share"] = row["attention_core_seconds"] / sec
            rows.append(C.check_utilisation(row, ("mfu_model", "mfu_useful")))
        del case, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append({"matmul_peak": meter.summary()})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        print(json.dumps(plan(args), indent=1))
        return 0
    why = None if args.cpu_smoke else require_cuda(args.device)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.dirname(here))
    import _common as C

    device = C.setup(args.device)
    budget = Budget(args.budget_minutes)
    result: Dict[str, Any] = {"benchmark": "gpu", "machine": C.machine_info(device), "plan": plan(args),
                              "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows: List[Dict[str, Any]] = []
    if "latency" in args.parts:
        result["latency"] = bench_latency(args, device, budget)
    if "train" in args.parts:
        result["train"] = bench_train(args, device, budget)
        rows += [r for r in result["train"] if "mode" in r]
    result["seconds"] = budget.seconds - budget.left()
    status = C.finish(result, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())

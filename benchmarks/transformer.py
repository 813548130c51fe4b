"""Transformer speed: training step and generation, exact vs fast path, in one process.

Training step (forward + bitwise cross-entropy + backward, no optimizer step) for each preset,
dtype (fp32, bf16 autocast) and attention backend (``exact`` = the original's numerics: padded to
a multiple of 128, dense masked attention; ``fast`` = unpadded, block-causal without the masked
blocks, batched cross-attention): seconds per step, tokens/s, useful FLOPs (real tokens,
block-causal attention pairs only) and model-FLOP utilisation against the matmul peak measured
in the same run, and peak memory (CPU: peak RSS of a fresh process running one step; CUDA:
``max_memory_allocated``).

Generation (B images, cfg 3, the 0.06M schedule by default): seconds per image with the KV cache
for the exact path and the fast options (fast attention, bf16 blocks, bf16 channels-last decode),
with and without decoding by a d32 tokenizer, and without KV cache (the teacher-forced forward
re-run over the growing prefix at every scale).

Modes are interleaved (exact, fast, exact, fast, ...) and medians reported; the machine is
shared, compare ratios within one run.  Prints one JSON document.

    python benchmarks/transformer.py                        # layer12 + tiny, fp32 + bf16, ~5 min on 2 CPU cores
    python benchmarks/transformer.py --presets layer12 --dtypes fp32 --repeats 5 --cases train
    python benchmarks/transformer.py --device cuda --presets 2b --batch 8
    python benchmarks/transformer.py --cases train --profile   # + torch.profiler top ops
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

from infinity_lightning import scales  # noqa: E402
from infinity_lightning.models.bsq_vae import bilinear_resize, bits_to_codes  # noqa: E402
from infinity_lightning.models.fast_attention import useful_attention_pairs  # noqa: E402
from infinity_lightning.models.infinity import InfinityTransformer, init_weights  # noqa: E402
from infinity_lightning.models import numerics  # noqa: E402
from infinity_lightning.presets import transformer_config  # noqa: E402
from infinity_lightning.sampling import generate, sample_bits  # noqa: E402


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def build_model(preset: str, device: torch.device, checkpointing: str = "none") -> InfinityTransformer:
    model = InfinityTransformer(transformer_config(preset, cond_drop_rate=0.0))
    init_weights(model, generator=torch.Generator().manual_seed(0))
    if checkpointing.startswith("every-"):
        model.set_activation_checkpointing("full-block", every=int(checkpointing.split("-")[1]))
    else:
        model.set_activation_checkpointing(None if checkpointing == "none" else checkpointing)
    return model.to(device)


def make_text(batch: int, text_len: int, channels: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [max(1, text_len - 3 * i) for i in range(batch)]   # different lengths: varlen matters
    kv = torch.randn(sum(lens), channels, generator=g).to(device)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    return (kv, torch.tensor(lens), cu, max(lens))


def useful_forward_flops(model: InfinityTransformer, schedule, text_lens: Sequence[int]) -> float:
    """Matmul FLOPs of one forward that no implementation can avoid: real tokens only, the
    block-causal pairs of the self-attention, each sample's own text in the cross-attention."""
    cfg = model.config
    Cd, Ff, H, hd, d, Ct = cfg.embed_dim, cfg.ffn_hidden, cfg.num_heads, cfg.head_dim, cfg.bits_per_token, cfg.text_channels
    B, L, Nt = len(text_lens), scales.as_schedule(schedule).num_tokens, sum(text_lens)
    tokens = B * L
    per_block = (2 * tokens * (6 * Cd * Cd + 2 * Cd * Ff)         # qkv, sa.proj, ca.q, ca.proj, fc1, fc2
                 + 2 * Nt * 2 * Cd * Cd                              # ca.mat_kv on the text rows
                 + 4 * hd * H * B * useful_attention_pairs(schedule)  # q k^T and p v
                 + 4 * hd * H * L * Nt)                              # cross-attention
    text = 2 * Nt * (Ct * Cd + Cd * Cd + 2 * Ct * Cd) + 2 * B * 8 * Cd * Cd
    io = 2 * tokens * (d * Cd + 2 * d * Cd)
    return cfg.depth * per_block + text + io


# --------------------------------------------------------------------------------------------
# training step
# --------------------------------------------------------------------------------------------
class TrainCase:
    def __init__(self, preset: str, args, device: torch.device):
        self.device = device
        self.model = build_model(preset, device, args.checkpointing).train()
        cfg = self.model.config
        self.schedule = scales.resolve(args.pn, 1.0)
        L = self.schedule.num_tokens
        g = torch.Generator().manual_seed(1)
        self.text = make_text(args.batch, args.text_len, cfg.text_channels, device)
        self.x = (0.3 * torch.randn(args.batch, L - 1, cfg.bits_per_token, generator=g)).to(device)
        self.labels = torch.randint(0, 2, (args.batch, L, cfg.bits_per_token), generator=g).to(device)
        self.tokens = args.batch * L
        self.flops = 3 * useful_forward_flops(self.model, self.schedule, self.text[1].tolist())

    def step(self, mode: str, dtype: torch.dtype) -> None:
        model = self.model
        model.set_attention_backend(mode)
        model.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(self.text, self.x, self.schedule)
        loss = F.cross_entropy(logits.float().view(-1, 2), self.labels.view(-1).long())
        loss.backward()


def bench_train(args, device: torch.device) -> List[Dict[str, Any]]:
    results = []
    for preset in args.presets:
        case = TrainCase(preset, args, device)
        for dname in args.dtypes:
            dtype = C.DTYPES[dname]
            times: Dict[str, List[float]] = {m: [] for m in args.modes}
            peaks: List[float] = []
            for m in args.modes:                          # warm-up (allocator, one-time caches)
                case.step(m, dtype)
            for _ in range(args.repeats):
                peaks.append(C.matmul_flops(dtype, device))
                for m in args.modes:
                    times[m].append(C.timed(lambda: case.step(m, dtype), device))
            peak = C.median(peaks)
            base = C.median(times[args.modes[0]])
            for m in args.modes:
                sec = C.median(times[m])
                row = {"case": "train_step", "preset": preset, "dtype": dname, "mode": m, "batch": args.batch,
                       "pn": args.pn, "tokens": case.tokens, "checkpointing": args.checkpointing,
                       "seconds_per_step": sec, "seconds_all": times[m], "tokens_per_s": case.tokens / sec,
                       "useful_gflop": case.flops / 1e9, "useful_gflop_per_s": case.flops / sec / 1e9,
                       f"matmul_peak_gflop_per_s_{dname}": peak / 1e9, "mfu": case.flops / sec / peak,
                       f"speedup_vs_{args.modes[0]}": base / sec}
                if args.memory:
                    row["memory"] = train_memory(preset, m, dname, args, device)
                results.append(row)
            if args.profile:
                for m in args.modes:
                    print(f"== profile train {preset} {dname} {m} ==", file=sys.stderr)
                    print(C.profile_table(lambda: case.step(m, dtype), device), file=sys.stderr)

    return results


def train_memory(preset: str, mode: str, dname: str, args, device: torch.device) -> Dict[str, Any]:
    probe = ["--presets", preset, "--modes", mode, "--dtypes", dname, "--batch", str(args.batch),
             "--pn", args.pn, "--text-len", str(args.text_len), "--checkpointing", args.checkpointing,
             "--device", str(device)]
    if device.type == "cuda":
        return run_memory_probe(probe)
    return C.memory_probe(os.path.abspath(__file__), probe)


def run_memory_probe(argv: List[str]) -> Dict[str, Any]:
    args = parse_args(argv[1:])
    device = C.setup(args.device, args.threads)
    case = TrainCase(args.presets[0], args, device)
    start = C.peak_memory_start(device)
    case.step(args.modes[0], C.DTYPES[args.dtypes[0]])
    return C.peak_memory_end(device, start)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_without_cache(model: InfinityTransformer, text, schedule, cfg: float, seed: int) -> torch.Tensor:
    """Generation by re-running the teacher-forced forward over the growing prefix at every scale
    (no KV cache): guidance on logits, tau 1, top-k 900, top-p 0.97.  Returns the code sum."""
    kv, _, cu, _ = text
    B = cu.numel() - 1
    null = model.null_text((cu[1:] - cu[:-1]).tolist()).to(kv.dtype)
    kv2, cu2 = numerics.pack_two(kv, cu, null, cu)
    text2 = (kv2, None, cu2, None)
    generator = torch.Generator(device=kv.device).manual_seed(seed)
    d = model.config.bits_per_token
    inputs = kv.new_zeros(2 * B, 0, d)
    summed: Any = 0
    offsets = scales.as_schedule(schedule).offsets
    for k, (_, h, w) in enumerate(schedule):
        logits = model(text2, inputs, schedule[:k + 1])[:, offsets[k]:offsets[k + 1]]
        z = cfg * logits[:B] + (1 - cfg) * logits[B:]
        bits = sample_bits(z.reshape(-1, 2), 900, 0.97, generator).view(B, h, w, d)
        codes = bits_to_codes(bits.unsqueeze(1))
        summed = summed + (bilinear_resize(codes, schedule[-1]) if k < len(schedule) - 1 else codes)
        if k + 1 < len(schedule):
            nxt = bilinear_resize(summed, schedule[k + 1]).squeeze(2)
            nxt = nxt.reshape(B, d, -1).transpose(1, 2)
            inputs = torch.cat((inputs, torch.cat((nxt, nxt), 0)), dim=1)
    return summed.squeeze(2)


GEN_OPTIONS = {
    "exact": dict(fast=False),
    "fast-fp32": dict(fast=True),
    "fast": dict(fast=True, dtype=torch.bfloat16),
}
DECODE_OPTIONS = {"exact": {}, "fast-fp32": dict(channels_last=True),
                  "fast": dict(dtype=torch.bfloat16, channels_last=True)}


def bench_generation(args, device: torch.device) -> List[Dict[str, Any]]:
    from infinity_lightning.checkpoints import load_tokenizer

    model = build_model(args.gen_preset, device).eval()
    schedule = scales.resolve(args.pn, 1.0)
    text = make_text(args.gen_batch, args.text_len, model.config.text_channels, device, seed=3)
    vae = load_tokenizer(args.tokenizer).to(device) if args.decode else None
    options = [o for o in GEN_OPTIONS if o == "exact" or "fast" in args.modes]
    kw = dict(cfg=args.cfg, tau=1.0, top_k=900, top_p=0.97, seed=0)
    times: Dict[str, Dict[str, List[float]]] = {o: {"kv": [], "decode": [], "no_cache": []} for o in options}
    outs: Dict[str, Any] = {}

    def gen(o):
        outs[o] = generate(model, text, schedule, **kw, **GEN_OPTIONS[o])

    def dec(o):
        outs[o + "_img"] = vae.decode(outs[o].summed_codes, **DECODE_OPTIONS[o])

    def no_cache(o):
        model.set_attention_backend("fast" if o.startswith("fast") else "exact")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=o == "fast"):
            generate_without_cache(model, text, schedule, args.cfg, 0)
        model.set_attention_backend("exact")

    for o in options:
        gen(o)
        if vae is not None:
            dec(o)
    for _ in range(args.repeats):
        for o in options:
            times[o]["kv"].append(C.timed(lambda: gen(o), device) / args.gen_batch)
            if vae is not None:
                times[o]["decode"].append(C.timed(lambda: dec(o), device) / args.gen_batch)
            if args.no_cache:
                times[o]["no_cache"].append(C.timed(lambda: no_cache(o), device) / args.gen_batch)
    results = []
    base = times["exact"]
    for o in options:
        t = times[o]
        row = {"case": "generation", "preset": args.gen_preset, "option": o, "options": {k: str(v) for k, v in GEN_OPTIONS[o].items()},
               "batch": args.gen_batch, "cfg": args.cfg, "pn": args.pn,
               "seconds_per_image_kv_cache": C.median(t["kv"]), "seconds_all": t["kv"]}
        row["speedup_kv_cache"] = C.median(base["kv"]) / row["seconds_per_image_kv_cache"]
        if vae is not None:
            row["decode_options"] = {k: str(v) for k, v in DECODE_OPTIONS[o].items()}
            row["seconds_per_image_decode"] = C.median(t["decode"])
            row["seconds_per_image_with_decode"] = row["seconds_per_image_kv_cache"] + row["seconds_per_image_decode"]
            row["speedup_with_decode"] = (C.median(base["kv"]) + C.median(base["decode"])) / row["seconds_per_image_with_decode"]
            if o != "exact":
                row["decoded_max_abs_diff_vs_exact_decode_of_same_codes"] = (
                    vae.decode(outs[o].summed_codes) - outs[o + "_img"]).abs().max().item()
        if args.no_cache:
            row["seconds_per_image_without_kv_cache"] = C.median(t["no_cache"])
        if o != "exact":
            row["bits_equal_to_exact"] = all(torch.equal(a, b) for a, b in zip(outs[o].token_bits, outs["exact"].token_bits))
        results.append(row)
    if args.profile:
        for o in options:
            print(f"== profile generation {o} ==", file=sys.stderr)
            print(C.profile_table(lambda: gen(o), device), file=sys.stderr)
    return results


# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cases", default="train,generation", help="comma list: train, generation")
    p.add_argument("--presets", default="layer12,tiny", type=lambda s: s.split(","), help="training-step presets")
    p.add_argument("--dtypes", default="fp32,bf16", type=lambda s: s.split(","))
    p.add_argument("--modes", default="exact,fast", type=lambda s: s.split(","),
                   help="attention backends to compare: exact, fast, flex (the first is the baseline)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pn", default="0.06M", help="pixel budget of the 1:1 schedule (0.06M: 256 px, L=521)")
    p.add_argument("--text-len", type=int, default=48, help="text tokens of the first prompt (others 3 fewer each)")
    p.add_argument("--checkpointing", default="none", help="none, full-block, self-attn or every-<k>")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops to stderr")
    p.add_argument("--gen-preset", default="layer12")
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--tokenizer", default="d32", help="tokenizer preset used for decoding (random weights)")
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--skip-no-cache", dest="no_cache", action="store_false",
                   help="skip generation without KV cache (teacher-forced forward per scale)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-probe":
        print(json.dumps(run_memory_probe(argv)))
        return
    args = parse_args(argv)
    device = C.setup(args.device, args.threads)
    result: Dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "command": "python benchmarks/transformer.py " + " ".join(argv)}
    cases = args.cases.split(",")
    if "train" in cases:
        result["train"] = bench_train(args, device)
    if "generation" in cases:
        result["generation"] = bench_generation(args, device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

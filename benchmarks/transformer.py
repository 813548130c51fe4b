"""Transformer speed: training step and generation, exact vs fast paths, in one process.

Training step (forward + bitwise cross-entropy + backward, no optimizer step) per preset, pixel
budget, dtype (fp32, bf16 autocast), attention mode and activation checkpointing:

* modes: ``exact`` (the original's numerics: padded to a multiple of 128, dense masked
  attention), ``fast`` (unpadded, block-causal without the masked blocks, batched
  cross-attention; self-attention kernel "auto"), ``fast-sdpa`` / ``fast-gemm`` (the fast path
  with that kernel), ``fast-compile`` (``fast`` with every block ``torch.compile``d; the first,
  compiling step is reported apart), ``flex`` (FlexAttention);
* per row: seconds per step, tokens/s, *model* FLOPs by the usual definition and *useful* FLOPs
  (both below), the matmul peak of the same dtype and thread count measured in the same process
  with its spread, the two utilisations, the speed-up over the first mode at the *same* dtype and
  checkpointing, the time cost of checkpointing against the same mode without it, the share of the
  step spent in the self-attention core (timed alone, forward + backward, times the depth), and
  peak memory (CPU: peak RSS of a fresh process running one step; CUDA: ``max_memory_allocated``).

FLOPs (benchmarks/_common.py): model FLOPs = ``6 N B L + 3 depth sum_b (4 L^2 C + 4 L Lt_b C)``
(N the block parameters acting on image tokens, L unpadded, dense attention); useful FLOPs = real
tokens only, the visible block-causal pairs, each projection on the rows it touches, backward
twice the forward.  A utilisation above 1 marks the row invalid and the script exits with 3.

Generation (B images, cfg 3, tau 1, top-k 900, top-p 0.97): seconds per image with the KV cache
for each option (``exact`` = the original's numerics; ``fast-fp32``; ``int8`` linears;
guidance off on the last scale with the unconditional half skipped; a compiled per-scale step;
``bf16`` blocks where bf16 is native), with and without decoding by a d32 tokenizer (random
weights), peak memory of a fresh process, and quality: the fraction of sampled bits equal to the
exact fp32 run's at the same seeds (``--quality-seeds``), per scale and overall.

Modes are interleaved (exact, fast, exact, fast, ...) and medians reported; compare ratios within
one run.  Prints one JSON document with the machine's capabilities (bf16 is only meaningful where
it is native: AVX-512 BF16 / AMX or a GPU).

    python benchmarks/transformer.py --cases train --presets layer12 --threads 2
    python benchmarks/transformer.py --cases train --checkpointing none,self-attn,every-2,full-block
    python benchmarks/transformer.py --cases generation --gen-options exact,fast-fp32,int8
    python benchmarks/transformer.py --pn 0.06M,0.25M,0.60M,1M --batch 1 --repeats 1   # scaling
    python benchmarks/transformer.py --device cuda --presets 2b --batch 8 --dtypes bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

from infinity_lightning import scales  # noqa: E402
from infinity_lightning.models import fast_attention, numerics  # noqa: E402
from infinity_lightning.models.bsq_vae import bilinear_resize, bits_to_codes  # noqa: E402
from infinity_lightning.models.fast_attention import useful_attention_pairs  # noqa: E402
from infinity_lightning.models.infinity import InfinityTransformer, init_weights  # noqa: E402
from infinity_lightning.presets import transformer_config  # noqa: E402
from infinity_lightning.sampling import generate, sample_bits  # noqa: E402

#: attention mode -> (backend, kernel) of InfinityTransformer.set_attention_backend
MODES = {"exact": ("exact", "auto"), "fast": ("fast", "auto"), "fast-sdpa": ("fast", "sdpa"),
         "fast-gemm": ("fast", "gemm"), "fast-compile": ("fast", "auto"), "flex": ("flex", "auto")}


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def set_checkpointing(model: InfinityTransformer, checkpointing: str) -> None:
    if checkpointing.startswith("every-"):
        model.set_activation_checkpointing("full-block", every=int(checkpointing.split("-")[1]))
    else:
        model.set_activation_checkpointing(None if checkpointing == "none" else checkpointing)


def build_model(preset: str, device: torch.device, checkpointing: str = "none") -> InfinityTransformer:
    model = InfinityTransformer(transformer_config(preset, cond_drop_rate=0.0))
    init_weights(model, generator=torch.Generator().manual_seed(0))
    set_checkpointing(model, checkpointing)
    return model.to(device)


def make_text(batch: int, text_len: int, channels: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [max(1, text_len - 3 * i) for i in range(batch)]   # different lengths: varlen matters
    kv = torch.randn(sum(lens), channels, generator=g).to(device)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    return (kv, torch.tensor(lens), cu, max(lens))


def useful_forward_flops(model: InfinityTransformer, schedule, text_lens: Sequence[int]) -> float:
    """Matmul FLOPs of one forward that no implementation can avoid: real tokens only, the
    block-causal pairs of the self-attention, each sample's own text in the cross-attention, the
    cross-attention's key/value projection on the text rows."""
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


def step_flops(model: InfinityTransformer, schedule, text_lens: Sequence[int]) -> Dict[str, Any]:
    """Model FLOPs (usual definition) and useful FLOPs of one training step."""
    cfg = model.config
    n_blocks = C.block_params(model)
    L = scales.as_schedule(schedule).num_tokens
    return {"model_flops": C.model_flops(n_blocks, cfg.depth, cfg.embed_dim, L, text_lens),
            "useful_flops": 3 * useful_forward_flops(model, schedule, text_lens),
            "n_block_params": n_blocks,
            "n_block_params_is": "all parameters of the blocks except ca.mat_kv (it multiplies the text rows)"}


# --------------------------------------------------------------------------------------------
# training step
# --------------------------------------------------------------------------------------------
class TrainCase:
    def __init__(self, preset: str, pn: str, args, device: torch.device, model: InfinityTransformer = None):
        self.device = device
        self.model = (model if model is not None else build_model(preset, device)).train()
        cfg = self.model.config
        self.schedule = scales.resolve(pn, 1.0)
        L = self.schedule.num_tokens
        g = torch.Generator().manual_seed(1)
        self.text = make_text(args.batch, args.text_len, cfg.text_channels, device)
        self.x = (0.3 * torch.randn(args.batch, L - 1, cfg.bits_per_token, generator=g)).to(device)
        self.labels = torch.randint(0, 2, (args.batch, L, cfg.bits_per_token), generator=g).to(device)
        self.tokens = args.batch * L
        self.flops = step_flops(self.model, self.schedule, self.text[1].tolist())
        self.compiled = False
        self.compile_seconds = None

    def _compile(self) -> None:
        t0 = time.perf_counter()
        for block in self.model.block_list():
            block.compile(dynamic=False)
        self.compiled = True
        self.compile_seconds = time.perf_counter() - t0   # torch.compile is lazy: the first step compiles

    def _uncompile(self) -> None:
        for block in self.model.block_list():
            block._compiled_call_impl = None
        self.compiled = False

    def step(self, mode: str, dtype: torch.dtype, checkpointing: str = "none") -> None:
        model = self.model
        backend, kernel = MODES[mode]
        model.set_attention_backend(backend, kernel=kernel)
        if (mode == "fast-compile") != self.compiled:
            self._compile() if mode == "fast-compile" else self._uncompile()
        set_checkpointing(model, checkpointing)
        model.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(self.text, self.x, self.schedule)
        loss = F.cross_entropy(logits.float().view(-1, 2), self.labels.view(-1).long())
        loss.backward()

    def attention_core_seconds(self, mode: str, dtype: torch.dtype, repeats: int) -> float:
        """Seconds of the self-attention core (forward + backward, all blocks) of one step on this
        mode, timed alone on random q, k, v of the step's shapes (median of ``repeats``)."""
        cfg, B = self.model.config, self.x.shape[0]
        backend, kernel = MODES[mode]
        L = self.schedule.num_tokens
        if backend == "exact":
            Lp = numerics.padded_length(L, cfg.pad_to_multiplier)
            mask = numerics.block_causal_mask(self.schedule, Lp, self.device)
            attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # noqa: E731
        else:
            Lp = L
            resolved = fast_attention.resolve_kernel(kernel, self.device)
            layout = fast_attention.block_causal_layout(
                self.schedule, backend="flex" if backend == "flex" else ("gemm" if resolved == "gemm" else "chunked"))
            attend = layout.attend
        g = torch.Generator().manual_seed(2)
        qkv = [F.normalize(torch.randn(B, cfg.num_heads, Lp, cfg.head_dim, generator=g), dim=-1).to(self.device, dtype)
               .requires_grad_() for _ in range(3)]
        grad = torch.randn(B, cfg.num_heads, Lp, cfg.head_dim, generator=g).to(self.device, dtype)

        def run():
            torch.autograd.grad(attend(*qkv), qkv, grad)

        run()
        return cfg.depth * C.median([C.timed(run, self.device) for _ in range(repeats)])


def bench_train(args, device: torch.device) -> List[Dict[str, Any]]:
    results = []
    for preset in args.presets:
        for pn in args.pn:
            case = TrainCase(preset, pn, args, device)
            for dname in args.dtypes:
                results += bench_train_dtype(case, preset, pn, dname, args, device)
            del case
    return results


def bench_train_dtype(case: TrainCase, preset: str, pn: str, dname: str, args, device: torch.device):
    dtype = C.DTYPES[dname]
    cases = [(m, ck) for ck in args.checkpointing for m in args.modes]
    times: Dict[Any, List[float]] = {c: [] for c in cases}
    meter = C.PeakMeter(dtype, device, reps=args.peak_reps, start_n=args.peak_n or 1024, max_n=args.peak_n or 4096)
    first_step: Dict[Any, float] = {}
    for c in cases:                                         # warm-up (allocator, caches, compilation)
        for w in range(args.warmup):
            t = C.timed(lambda: case.step(c[0], dtype, c[1]), device)
            if w == 0:
                first_step[c] = t
    for _ in range(args.repeats):
        meter.sample()
        for c in cases:
            times[c].append(C.timed(lambda: case.step(c[0], dtype, c[1]), device))
    meter.sample()
    peak = meter.best
    attention = {}
    if args.attention_share:
        for m in args.modes:
            attention[m] = case.attention_core_seconds(m, dtype, max(1, args.repeats))
    base_mode = args.modes[0]
    rows = []
    for mode, ck in cases:
        sec = C.median(times[(mode, ck)])
        base = C.median(times[(base_mode, ck)])
        no_ckpt = C.median(times[(mode, "none")]) if (mode, "none") in times else None
        flops = case.flops
        row = {"case": "train_step", "preset": preset, "pn": pn, "dtype": dname, "mode": mode,
               "kernel": MODES[mode][1], "batch": args.batch, "tokens_per_sample": case.schedule.num_tokens,
               "tokens": case.tokens, "checkpointing": ck,
               "seconds_per_step": sec, "seconds_all": times[(mode, ck)], "tokens_per_s": case.tokens / sec,
               "model_gflop": flops["model_flops"] / 1e9, "useful_gflop": flops["useful_flops"] / 1e9,
               "n_block_params": flops["n_block_params"], "n_block_params_is": flops["n_block_params_is"],
               "matmul_peak": meter.summary(),
               "mfu_model": flops["model_flops"] / sec / peak,
               "mfu_useful": flops["useful_flops"] / sec / peak,
               "mfu_is": "model FLOPs (usual definition) / step seconds / best matmul peak of this dtype and threads",
               f"speedup_vs_{base_mode}_same_dtype_and_checkpointing": base / sec}
        if no_ckpt is not None and ck != "none":
            row["time_cost_of_checkpointing_vs_none_same_mode"] = sec / no_ckpt
        if mode in attention:
            row["attention_core_seconds"] = attention[mode]
            row["attention_share"] = attention[mode] / sec
        if mode == "fast-compile":
            row["first_step_seconds_with_compilation"] = first_step.get((mode, ck))
        if not C.machine_info(device)["bf16_native"] and dname == "bf16":
            row["meaningful"] = False
            row["note"] = "bf16 is emulated on this device (no native bf16): not a bf16 measurement"
        if args.memory:
            row["memory"] = train_memory(preset, pn, mode, ck, dname, args, device)
        rows.append(C.check_utilisation(row, ("mfu_model", "mfu_useful")))
    memory_ratios(rows, base_mode)
    if args.profile:
        for mode, ck in cases:
            print(f"== profile train {preset} {pn} {dname} {mode} {ck} ==", file=sys.stderr)
            print(C.profile_table(lambda: case.step(mode, dtype, ck), device, rows=args.profile_rows), file=sys.stderr)
    return rows


def memory_ratios(rows: List[Dict[str, Any]], base_mode: str) -> None:
    """Peak memory against the first mode at the same checkpointing, and against the same mode
    without checkpointing (with the time that costs beside it)."""
    key = "peak_gb" if any("peak_gb" in r.get("memory", {}) for r in rows) else "peak_rss_gb"
    by = {(r["mode"], r["checkpointing"]): r.get("memory", {}) for r in rows}
    for r in rows:
        mem = r.get("memory", {})
        if key not in mem:
            continue
        base = by.get((base_mode, r["checkpointing"]), {})
        if base.get(key):
            mem[f"{key}_vs_{base_mode}_same_checkpointing"] = mem[key] / base[key]
            mem[f"step_peak_gb_vs_{base_mode}_same_checkpointing"] = mem["step_peak_gb"] / base["step_peak_gb"]
        none = by.get((r["mode"], "none"), {})
        if r["checkpointing"] != "none" and none.get(key):
            mem[f"{key}_vs_none_same_mode"] = mem[key] / none[key]
            mem["step_peak_gb_vs_none_same_mode"] = mem["step_peak_gb"] / none["step_peak_gb"]


def train_memory(preset: str, pn: str, mode: str, checkpointing: str, dname: str, args, device) -> Dict[str, Any]:
    probe = ["--presets", preset, "--pn", pn, "--modes", mode, "--dtypes", dname, "--batch", str(args.batch),
             "--text-len", str(args.text_len), "--checkpointing", checkpointing, "--device", str(device)]
    if args.threads:
        probe += ["--threads", str(args.threads)]
    if device.type == "cuda":
        return run_memory_probe(["--memory-probe"] + probe)
    return C.memory_probe(os.path.abspath(__file__), probe)


def run_memory_probe(argv: List[str]) -> Dict[str, Any]:
    args = parse_args(argv[1:])
    device = C.setup(args.device, args.threads)
    if args.cases == "generation":
        return generation_memory_probe(args, device)
    case = TrainCase(args.presets[0], args.pn[0], args, device)
    start = C.peak_memory_start(device)
    case.step(args.modes[0], C.DTYPES[args.dtypes[0]], args.checkpointing[0])
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


#: generation option -> keywords of ``generate`` (SamplingConfig fields)
GEN_OPTIONS: Dict[str, Dict[str, Any]] = {
    "exact": dict(fast=False),
    "fast-fp32": dict(fast=True),
    "int8": dict(fast=True, quantize="int8"),
    "fast-unguided-last1": dict(fast=True, cfg_schedule="unguided_last:1", skip_uncond=True),
    "int8-unguided-last1": dict(fast=True, quantize="int8", cfg_schedule="unguided_last:1", skip_uncond=True),
    "fast-compile": dict(fast=True, compile=True),
    "bf16": dict(fast=True, dtype=torch.bfloat16),
    "bf16-unguided-last1": dict(fast=True, dtype=torch.bfloat16, cfg_schedule="unguided_last:1", skip_uncond=True),
}
#: decoder keywords per option: channels-last everywhere but exact, bf16 with the bf16 options
DECODE_OPTIONS = {o: ({} if o == "exact" else dict(dtype=torch.bfloat16, channels_last=True) if o.startswith("bf16")
                      else dict(channels_last=True)) for o in GEN_OPTIONS}


def _gen_setup(args, device: torch.device, pn: str):
    model = build_model(args.gen_preset, device).eval()
    schedule = scales.resolve(pn, 1.0)
    text = make_text(args.gen_batch, args.text_len, model.config.text_channels, device, seed=3)
    return model, schedule, text


def _gen_kwargs(args) -> Dict[str, Any]:
    return dict(cfg=args.cfg, tau=1.0, top_k=900, top_p=0.97)


def bit_agreement(a, b) -> Dict[str, Any]:
    """Fraction of sampled bits of ``a`` equal to ``b``'s, per scale and overall."""
    per = [float((x == y).float().mean()) for x, y in zip(a.token_bits, b.token_bits)]
    n = [x.numel() for x in a.token_bits]
    return {"overall": sum(p * k for p, k in zip(per, n)) / sum(n), "per_scale": per}


def bench_generation(args, device: torch.device) -> List[Dict[str, Any]]:
    rows = []
    for pn in args.pn:
        rows += bench_generation_pn(args, device, pn)
    return rows


def bench_generation_pn(args, device: torch.device, pn: str) -> List[Dict[str, Any]]:
    from infinity_lightning.checkpoints import load_tokenizer

    model, schedule, text = _gen_setup(args, device, pn)
    vae = load_tokenizer(args.tokenizer).to(device) if args.decode else None
    options = list(args.gen_options)
    kw = _gen_kwargs(args)
    times: Dict[str, Dict[str, List[float]]] = {o: {"kv": [], "decode": [], "no_cache": []} for o in options}
    outs: Dict[str, Any] = {}
    cold: Dict[str, float] = {}

    def gen(o, seed=0):
        outs[o] = generate(model, text, schedule, seed=seed, **kw, **GEN_OPTIONS[o])

    def dec(o):
        outs[o + "_img"] = vae.decode(outs[o].summed_codes, **DECODE_OPTIONS[o])

    def no_cache(o):
        model.set_attention_backend("fast" if GEN_OPTIONS[o].get("fast") else "exact")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=o.startswith("bf16")):
            generate_without_cache(model, text, schedule, args.cfg, 0)
        model.set_attention_backend("exact")

    # quality: bits of every option against exact fp32 at the same seeds (untimed)
    quality: Dict[str, List[Dict[str, Any]]] = {o: [] for o in options}
    for seed in range(args.quality_seeds):
        ref = generate(model, text, schedule, seed=1000 + seed, **kw, **GEN_OPTIONS["exact"])
        for o in options:
            quality[o].append(bit_agreement(generate(model, text, schedule, seed=1000 + seed, **kw, **GEN_OPTIONS[o]),
                                            ref))
    for o in options:                                       # warm-up; the first call of a compiled option compiles
        if args.gen_warmup:
            cold[o] = C.timed(lambda: gen(o), device)
            if vae is not None:
                dec(o)
    for _ in range(args.repeats):
        for o in options:
            times[o]["kv"].append(C.timed(lambda: gen(o), device) / args.gen_batch)
            if vae is not None:
                times[o]["decode"].append(C.timed(lambda: dec(o), device) / args.gen_batch)
            if args.no_cache and not o.endswith("unguided-last1") and "int8" not in o and o != "fast-compile":
                times[o]["no_cache"].append(C.timed(lambda: no_cache(o), device) / args.gen_batch)
    results = []
    base = times[options[0]]
    bf16_native = C.machine_info(device)["bf16_native"]
    for o in options:
        t = times[o]
        row = {"case": "generation", "preset": args.gen_preset, "pn": pn, "tokens_per_image": schedule.num_tokens,
               "option": o, "options": {k: str(v) for k, v in GEN_OPTIONS[o].items()},
               "batch": args.gen_batch, "cfg": args.cfg,
               "seconds_per_image_kv_cache": C.median(t["kv"]), "seconds_all": t["kv"],
               "first_call_seconds_per_image": cold[o] / args.gen_batch if o in cold else t["kv"][0]}
        row[f"speedup_kv_cache_vs_{options[0]}"] = C.median(base["kv"]) / row["seconds_per_image_kv_cache"]
        if vae is not None:
            row["decode_options"] = {k: str(v) for k, v in DECODE_OPTIONS[o].items()}
            row["seconds_per_image_decode"] = C.median(t["decode"])
            row["seconds_per_image_with_decode"] = row["seconds_per_image_kv_cache"] + row["seconds_per_image_decode"]
            row["images_per_s_with_decode"] = 1.0 / row["seconds_per_image_with_decode"]
            row[f"speedup_with_decode_vs_{options[0]}"] = (
                (C.median(base["kv"]) + C.median(base["decode"])) / row["seconds_per_image_with_decode"])
            if o != "exact":
                row["decoded_max_abs_diff_vs_exact_decode_of_same_codes"] = (
                    vae.decode(outs[o].summed_codes) - outs[o + "_img"]).abs().max().item()
        if t["no_cache"]:
            row["seconds_per_image_without_kv_cache"] = C.median(t["no_cache"])
        agree = quality[o]
        if agree:
            row["bit_agreement_with_exact_fp32"] = {
                "seeds": [1000 + s for s in range(args.quality_seeds)],
                "overall_mean": sum(a["overall"] for a in agree) / len(agree),
                "overall_min": min(a["overall"] for a in agree),
                "per_scale_mean": [sum(a["per_scale"][k] for a in agree) / len(agree)
                                   for k in range(len(agree[0]["per_scale"]))]}
        if o.startswith("bf16") and not bf16_native:
            row["meaningful"] = False
            row["note"] = "bf16 is emulated on this device (no native bf16): not a bf16 measurement"
        if args.memory:
            row["memory"] = generation_memory(o, pn, args, device)
        results.append(row)
    if args.profile:
        for o in options:
            print(f"== profile generation {pn} {o} ==", file=sys.stderr)
            print(C.profile_table(lambda: gen(o), device, rows=args.profile_rows), file=sys.stderr)
    return results


def generation_memory(option: str, pn: str, args, device: torch.device) -> Dict[str, Any]:
    probe = ["--cases", "generation", "--gen-preset", args.gen_preset, "--gen-options", option, "--pn", pn,
             "--gen-batch", str(args.gen_batch), "--text-len", str(args.text_len), "--cfg", str(args.cfg),
             "--tokenizer", args.tokenizer, "--device", str(device)]
    if not args.decode:
        probe.append("--no-decode")
    if args.threads:
        probe += ["--threads", str(args.threads)]
    if device.type == "cuda":
        return run_memory_probe(["--memory-probe"] + probe)
    return C.memory_probe(os.path.abspath(__file__), probe)


def generation_memory_probe(args, device: torch.device) -> Dict[str, Any]:
    from infinity_lightning.checkpoints import load_tokenizer

    model, schedule, text = _gen_setup(args, device, args.pn[0])
    vae = load_tokenizer(args.tokenizer).to(device) if args.decode else None
    option = args.gen_options[0]
    start = C.peak_memory_start(device)
    out = generate(model, text, schedule, seed=0, **_gen_kwargs(args), **GEN_OPTIONS[option])
    if vae is not None:
        vae.decode(out.summed_codes, **DECODE_OPTIONS[option])
    return C.peak_memory_end(device, start)


# --------------------------------------------------------------------------------------------
def _list(text: str) -> List[str]:
    return [s for s in text.split(",") if s]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cases", default="train,generation", help="comma list: train, generation")
    p.add_argument("--presets", default="layer12", type=_list, help="training-step presets")
    p.add_argument("--pn", default="0.06M", type=_list,
                   help="pixel budgets of the 1:1 schedule, comma list (0.06M: 256 px, L=521; 0.25M, 0.60M, 1M)")
    p.add_argument("--dtypes", default=None, type=_list,
                   help="fp32, bf16 (default: fp32, plus bf16 where the device runs it natively)")
    p.add_argument("--modes", default="exact,fast", type=_list,
                   help=f"training attention modes to compare, the first is the baseline: {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-len", type=int, default=48, help="text tokens of the first prompt (others 3 fewer each)")
    p.add_argument("--checkpointing", default="none", type=_list,
                   help="comma list of none, full-block, self-attn, every-<k> (each timed and probed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case first")
    p.add_argument("--peak-reps", type=int, default=5, help="long GEMMs per matmul-peak sample (sampled every repeat)")
    p.add_argument("--peak-n", type=int, default=None, help="fix the side of the peak GEMMs (default: grown from 1024 "
                   "until one product takes 0.2 s)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    p.add_argument("--no-attention-share", dest="attention_share", action="store_false",
                   help="skip timing the self-attention core alone")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops to stderr")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--gen-preset", default="layer12")
    p.add_argument("--gen-options", default=None, type=_list,
                   help=f"generation options, the first is the baseline: {', '.join(GEN_OPTIONS)} "
                        "(default: exact, fast-fp32, int8, fast-unguided-last1, int8-unguided-last1; plus bf16 and "
                        "bf16-unguided-last1 where bf16 is native)")
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--gen-warmup", type=int, default=1, choices=(0, 1),
                   help="one untimed call per option first (0: the first timed call is the cold one)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--quality-seeds", type=int, default=4, help="seeds of the bit-agreement measurement")
    p.add_argument("--tokenizer", default="d32", help="tokenizer preset used for decoding (random weights)")
    p.add_argument("--no-decode", dest="decode", action="store_false")
    p.add_argument("--no-cache", dest="no_cache", action="store_true",
                   help="also time generation without KV cache (the teacher-forced forward per scale)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    for ck in args.checkpointing:
        if ck not in ("none", "full-block", "self-attn") and not (ck.startswith("every-") and ck[6:].isdigit()):
            p.error(f"unknown checkpointing {ck!r}; expected none, full-block, self-attn or every-<k>")
    for o in args.gen_options or ():
        if o not in GEN_OPTIONS:
            p.error(f"unknown generation option {o!r}; expected one of {', '.join(GEN_OPTIONS)}")
    return args


def _defaults(args, info: Dict[str, Any]) -> None:
    native = info["bf16_native"]
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if native else ["fp32"]
    if args.gen_options is None:
        args.gen_options = ["exact", "fast-fp32"]
        if info["device"].startswith("cpu"):
            args.gen_options += ["int8", "fast-unguided-last1", "int8-unguided-last1"]
        if native:
            args.gen_options += ["bf16", "bf16-unguided-last1"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-probe":
        print(json.dumps(run_memory_probe(argv)))
        return 0
    args = parse_args(argv)
    device = C.setup(args.device, args.threads)
    info = C.machine_info(device)
    _defaults(args, info)
    result: Dict[str, Any] = {"machine": info, "command": "python benchmarks/transformer.py " + " ".join(argv)}
    if "bf16" in args.dtypes and not info["bf16_native"]:
        result["warning"] = info["bf16_note"]
    cases = args.cases.split(",")
    rows: List[Dict[str, Any]] = []
    if "train" in cases:
        result["train"] = bench_train(args, device)
        rows += result["train"]
    if "generation" in cases:
        result["generation"] = bench_generation(args, device)
    return C.finish(result, rows)


if __name__ == "__main__":
    sys.exit(main())

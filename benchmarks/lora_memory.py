"""LoRA vs full fine-tuning: trainable parameters, optimizer state and peak memory.

Two parts, one JSON document:

1. **Measured** on the ``small`` preset (4 blocks, width 192), CPU fp32, the 5-scale 8x8
   schedule (1,1) (2,2) (4,4) (6,6) (8,8) (121 tokens), batch 8, AdamW, a few training steps
   (forward + bitwise cross-entropy + backward + step): ``full`` (every parameter trains),
   ``lora`` (``add_lora``, default targets, ``--rank``) and ``lora-8bit`` (the targeted base
   Linears in bitsandbytes int8).  Each mode runs in a fresh process (peak RSS never goes down
   inside one) and imports the same packages (torch, peft, bitsandbytes).  Reported:
   ``weight_bytes``, ``gradient_bytes`` and ``optimizer_state_bytes`` (the AdamW moments actually
   allocated); ``tensor_peak_mb``, the peak of the live tensor bytes over one more step, counted
   exactly by a dispatch mode that follows every storage (weights, gradients, optimizer states,
   inputs, activations, temporaries), and ``tensors_at_rest_mb`` after it; ``step_peak_mb``, the
   growth of the peak RSS over the timed steps (``/proc/self/clear_refs`` resets the peak after
   the model and the inputs are built; it also holds the allocator's caches, so differences of a
   few tens of MB are noise) and ``peak_rss_mb``, the process's peak.

2. **Estimated** per GPU for LoRA on the 2B model at 1024 px (``scales.resolve("1M")``: 13
   scales up to 64 x 64, 10521 tokens padded to 10624; 128 text tokens), batch 1 per GPU, 8 GPUs, bf16 autocast,
   full-block activation checkpointing, reusing ``memory_table.py``'s counts and activation
   model.  With P_r the parameters outside the blocks (text path, embeddings, head; kept fp32:
   the head and the text pool run fp32 regions), P_b those of the blocks, P_t the targeted
   Linear weights (part of P_b), P_L the LoRA parameters, G = P_b / block_chunks one FSDP group::

       DDP, bf16 base     weights  4 P_r + 2 P_b + 4 P_L (fp32 adapters)
                                   + 2 (P_r + P_L) bf16 copies made by autocast
       DDP, 8-bit base    as above with P_t at 1 byte + one fp32 scale per output row
       FSDP2 x N          weights  (4 P_r + 2 P_b + 4 P_L) / N sharded
                                   + gathered working set 4 P_r + 2 x 2 (G + G_L) (two groups in bf16)
                          8-bit bases cannot be FSDP2 shards (no DTensor int8 parameters)
       gradients          DDP 4 P_L; FSDP2 4 P_L / N + one group's unsharded 6 G_L
       AdamW              8 P_L (DDP), 8 P_L / N (FSDP2)
       frozen             flan-t5-xl in bf16 + the BSQ-VAE in fp32 (as memory_table.py)
       activations        memory_table.activation_bytes(...)["full-block"]: a frozen Linear saves
                          no input for its weight gradient, but its adapter's A saves the same
                          bf16 input, so the per-token model holds; plus the r-wide A x saved
                          for B in the one recomputed block: b (L_pad 6 + T) 2 r bytes

   The full fine-tune rows of ``memory_table.py`` (fp32 master weights, AdamW fp32) are printed
   beside them.

Usage: ``python benchmarks/lora_memory.py [--rank 16] [--steps 3] [--threads 1] [--ranks 16 64]
[--estimate-only]``; prints JSON, then markdown tables (``--json-only`` / ``--markdown-only``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
import weakref
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402
import memory_table as MT  # noqa: E402

from infinity_lightning import scales  # noqa: E402
from infinity_lightning.lora import DEFAULT_TARGETS  # noqa: E402
from infinity_lightning.models.infinity import CrossAttnBlock  # noqa: E402

MODES = ("full", "lora", "lora-8bit")
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
MB = 1024 ** 2
GB = 1024 ** 3


# --------------------------------------------------------------------------------------------
# measured (one process per mode)
# --------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class LiveTensorBytes(TorchDispatchMode):
    """The bytes of every live tensor storage, and their peak, while the mode is active.

    Storages of the tensors in ``held`` count from the start; every storage an operator returns
    (forward, backward and optimizer ops all dispatch here) counts until it is freed.
    """

    def __init__(self, held: Sequence[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes = WeakIdKeyDictionary()
        for t in held:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._sizes or t.device.type == "meta":
            return
        n = storage.nbytes()
        self._sizes[storage] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, n)

    def _release(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _inputs(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [8 + (3 * i) % 9 for i in range(batch)]
    kv = 0.5 * torch.randn(sum(lens), cfg.text_channels, generator=g)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    L = sum(h * w for _, h, w in SCHEDULE)
    d = cfg.bits_per_token
    x = torch.randint(0, 2, (batch, L - 1, d), generator=g).float() * 2 - 1
    labels = torch.randint(0, 2, (batch, L, d), generator=g)
    return (kv, torch.tensor(lens), cu, max(lens)), x, labels


def run_probe(mode: str, rank: int, steps: int, batch: int, threads: int) -> Dict[str, Any]:
    """One mode's training steps in this process; returns the JSON-able measurements."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    C.setup("cpu", threads)
    import bitsandbytes  # noqa: F401  (the same imports in every mode)
    import peft.functional  # noqa: F401

    from infinity_lightning import lora
    from infinity_lightning.checkpoints import load_transformer

    model = load_transformer("small", cond_drop_rate=0.0).train()
    text, x, labels = _inputs(model.config, batch)
    out: Dict[str, Any] = {"mode": mode, "params": sum(p.numel() for p in model.parameters())}
    if mode != "full":
        counts = lora.add_lora(model, lora.LoraSettings(rank=rank, alpha=rank),
                               quantize_base="8bit" if mode == "lora-8bit" else None)
        out["lora_layers"] = counts.layers
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in params)
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    gc.collect()
    out["peak_reset"] = _reset_peak_rss()
    start = C.rss_bytes()
    times, losses = [], []

    def step() -> None:
        logits = model(text, x, SCHEDULE)
        loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    end = C.rss_bytes()
    # live tensor bytes over one more step, counted exactly (RSS also holds allocator caches)
    held = list(model.parameters()) + list(model.buffers()) + [text[0], x, labels] + \
        [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    with LiveTensorBytes(held) as live:
        step()
    out["tensor_peak_mb"] = live.peak / MB
    out["tensors_at_rest_mb"] = live.live / MB     # weights, gradients, optimizer states, inputs
    out["optimizer_state_bytes"] = sum(t.numel() * t.element_size() for s in opt.state.values()
                                       for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    out["adamw_expected_bytes"] = 2 * 4 * out["trainable_params"]
    out["gradient_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    out["rss_before_steps_mb"] = start.get("VmRSS", 0) / MB
    out["peak_rss_mb"] = end.get("VmHWM", 0) / MB
    out["step_peak_mb"] = (end.get("VmHWM", 0) - start.get("VmRSS", 0)) / MB
    out["seconds_per_step"] = statistics.median(times[1:] or times)
    out["losses"] = losses
    return out


def measured(modes: Sequence[str], rank: int, steps: int, batch: int, threads: int) -> Dict[str, Any]:
    script = os.path.abspath(__file__)
    rows = {}
    for mode in modes:
        rows[mode] = C.memory_probe(script, [mode, "--rank", str(rank), "--steps", str(steps), "--batch", str(batch),
                                             "--threads", str(threads)])
    full = rows.get("full", {})
    for mode, r in rows.items():
        if mode != "full" and "error" not in r and "error" not in full:
            r["trainable_vs_full"] = r["trainable_params"] / full["trainable_params"]
            r["optimizer_state_vs_full"] = r["optimizer_state_bytes"] / full["optimizer_state_bytes"]
            r["tensor_peak_vs_full"] = r["tensor_peak_mb"] / full["tensor_peak_mb"]
    return {"preset": "small", "schedule": [list(s) for s in SCHEDULE], "tokens": sum(h * w for _, h, w in SCHEDULE),
            "batch": batch, "steps": steps, "rank": rank, "alpha": rank, "targets": list(DEFAULT_TARGETS),
            "dtype": "fp32", "device": "cpu", "modes": rows}


# --------------------------------------------------------------------------------------------
# estimated (2B, 1024 px, 8 GPUs)
# --------------------------------------------------------------------------------------------
def target_shapes(cfg, targets: Sequence[str] = DEFAULT_TARGETS) -> Dict[str, tuple]:
    """``{target: (in, out)}`` of one block's targeted Linears (meta device)."""
    with torch.device("meta"):
        block = CrossAttnBlock(cfg)
    return {t: (block.get_submodule(t).in_features, block.get_submodule(t).out_features) for t in targets}


def lora_estimate(preset: str = "2b", pn: str = "1M", ranks: Sequence[int] = (16, 64), gpus: int = 8, batch: int = 1,
                  text_tokens: int = 128) -> Dict[str, Any]:
    """Per-GPU memory rows of LoRA fine-tuning (see the module docstring), and the full fine-tune rows."""
    counts = MT.preset_counts(preset)
    cfg = counts["config"]
    schedule = scales.resolve(pn, 1.0)
    L = schedule.num_tokens
    Lp = int(math.ceil(L / cfg.pad_to_multiplier) * cfg.pad_to_multiplier)
    shapes = target_shapes(cfg)
    P = counts["params"]
    P_r = counts["root_params"]
    P_b = P - P_r
    P_t = cfg.depth * sum(i * o for i, o in shapes.values())
    rows_t = cfg.depth * sum(o for _, o in shapes.values())
    t5 = MT.text_encoder_params()
    frozen = 2 * t5 + 4 * counts["vae_params"]
    act = MT.activation_bytes(cfg, Lp, batch, text_tokens)["full-block"]
    rows = []
    for r in ranks:
        P_L = cfg.depth * sum(r * (i + o) for i, o in shapes.values())
        G, G_L = P_b / cfg.block_chunks, P_L / cfg.block_chunks
        image_targets = sum(1 for t in shapes if t != "ca.mat_kv")
        lora_act = batch * (Lp * image_targets + text_tokens * (len(shapes) - image_targets)) * 2 * r
        autocast_copies = 2 * (P_r + P_L)
        configs = {
            "DDP, bf16 base": {"weights": 4 * P_r + 2 * P_b + 4 * P_L + autocast_copies,
                               "gradients": 4 * P_L, "adamw": 8 * P_L},
            "DDP, 8-bit base": {"weights": 4 * P_r + 2 * (P_b - P_t) + P_t + 4 * rows_t + 4 * P_L + autocast_copies,
                                "gradients": 4 * P_L, "adamw": 8 * P_L},
            f"FSDP2 x{gpus}, bf16 base": {"weights": (4 * P_r + 2 * P_b + 4 * P_L) / gpus + 4 * P_r + 2 * 2 * (G + G_L),
                                          "gradients": 4 * P_L / gpus + 6 * G_L, "adamw": 8 * P_L / gpus},
        }
        for name, m in configs.items():
            total = m["weights"] + m["gradients"] + m["adamw"] + frozen + act + lora_act
            rows.append({"config": name, "rank": r, "lora_params": P_L, "trainable_fraction": P_L / P,
                         "weights_gb": m["weights"] / GB, "gradients_gb": m["gradients"] / GB,
                         "adamw_gb": m["adamw"] / GB, "frozen_gb": frozen / GB,
                         "activations_full_block_gb": (act + lora_act) / GB, "total_gb": total / GB})
    full_rows = [{"config": f"full fine-tune, {row['strategy']}", "trainable_params": row["params"],
                  "weights_gb": row["weights_gb"], "gradients_gb": row["gradients_gb"],
                  "adamw_gb": row["adamw_fp32_gb"],
                  "frozen_gb": row["frozen_gb"], "activations_full_block_gb": row["activations_full_block_gb"],
                  "total_gb": row["total_adamw_full_block_gb"]}
                 for row in MT.memory_rows(pn, batch, gpus, text_tokens)["rows"] if row["preset"] == preset]
    return {"preset": preset, "pn": pn, "tokens": L, "padded_tokens": Lp, "batch_per_gpu": batch, "gpus": gpus,
            "text_tokens": text_tokens, "params": P, "root_params": P_r, "block_params": P_b,
            "targeted_weights": P_t, "target_shapes": {t: list(s) for t, s in shapes.items()},
            "text_encoder_params": t5, "vae_params": counts["vae_params"], "lora_rows": rows, "full_rows": full_rows}


def markdown(result: Dict[str, Any]) -> str:
    m = result["measured"] or {"modes": {}, "batch": "-", "tokens": "-", "steps": "-", "rank": "-"}
    lines = [f"Measured: preset small, batch {m['batch']}, {m['tokens']} tokens, {m['steps']} AdamW steps, "
             f"CPU fp32, LoRA rank {m['rank']}.\n",
             "| mode | trainable params | weights | gradients | optimizer state | tensor peak | tensors at rest "
             "| step peak (RSS growth) | peak RSS | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in m["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | error: {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {mode} | {r['trainable_params']:,} | {r['weight_bytes'] / MB:.2f} MB | "
                     f"{r['gradient_bytes'] / MB:.2f} MB | {r['optimizer_state_bytes'] / MB:.2f} MB | "
                     f"{r['tensor_peak_mb']:.1f} MB | {r['tensors_at_rest_mb']:.1f} MB | "
                     f"{r['step_peak_mb']:.1f} MB | {r['peak_rss_mb']:.0f} MB | {r['seconds_per_step']:.2f} |")
    e = result["estimated"]
    lines += ["", f"Estimated per GPU: {e['preset']} at {e['pn']} ({e['tokens']} tokens), batch {e['batch_per_gpu']} "
              f"per GPU, {e['gpus']} GPUs, bf16 autocast, full-block checkpointing. GB = 2^30 bytes.\n",
              "| configuration | rank | trainable | weights | grads | AdamW | frozen (T5 + VAE) | activations "
              "| total |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in e["lora_rows"]:
        lines.append(f"| LoRA, {r['config']} | {r['rank']} | {r['lora_params'] / 1e6:.1f} M | {r['weights_gb']:.2f} | "
                     f"{r['gradients_gb']:.2f} | {r['adamw_gb']:.2f} | {r['frozen_gb']:.2f} | "
                     f"{r['activations_full_block_gb']:.2f} | {r['total_gb']:.1f} |")
    for r in e["full_rows"]:
        lines.append(f"| {r['config']} | - | {r['trainable_params'] / 1e9:.2f} B | {r['weights_gb']:.2f} | "
                     f"{r['gradients_gb']:.2f} | {r['adamw_gb']:.2f} | {r['frozen_gb']:.2f} | "
                     f"{r['activations_full_block_gb']:.2f} | {r['total_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    probe = argv and argv[0] == "--memory-probe"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if probe:
        parser.add_argument("mode", choices=MODES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the measured runs (alpha = rank)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks of the 2B estimate")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--estimate-only", action="store_true", help="only the 2B estimate (no measured runs)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-only", action="store_true")
    group.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args(argv[1:] if probe else argv)
    if probe:
        print(json.dumps(run_probe(args.mode, args.rank, args.steps, args.batch, args.threads)))
        return
    result = {"measured": None if args.estimate_only else measured(args.modes, args.rank, args.steps, args.batch,
                                                                     args.threads),
              "estimated": lora_estimate("2b", "1M", args.ranks, args.gpus, 1, 128)}
    if not args.markdown_only:
        print(json.dumps(result, indent=1))
    if not args.json_only:
        print(markdown(result))


if __name__ == "__main__":
    main()

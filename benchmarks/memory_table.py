"""Training memory per GPU for the Infinity presets under DDP and FSDP2: a model, not a measurement.

Every preset is built on the meta device, so parameter counts are exact (including the frozen
flan-t5-xl encoder and the BSQ-VAE).  Bytes per GPU, with P trainable parameters, N GPUs sharding
(FSDP2), bf16 autocast training (``precision="bf16-mixed"``):

    weights      DDP: 4P fp32 + 2P bf16 copies made by autocast (kept from forward to backward)
                 FSDP2 (mixed_precision="bf16"): 4P/N sharded fp32 + gathered working set
                 = root fp32 + 2 block groups in bf16 (the one computing and the one prefetched)
    gradients    DDP: 4P (gradient_as_bucket_view=True, make_strategy's default; else 8P)
                 FSDP2: 4P/N + one group's unsharded gradient (bf16 + its fp32 copy for the reduce)
    optimizer    AdamW fp32: 8P (exp_avg, exp_avg_sq), /N with FSDP2
                 AdamW8bit: 2P + block-wise scales (2 x 4 bytes per 256 values); DDP only
    frozen       flan-t5-xl encoder in bf16 + BSQ-VAE in fp32, replicated on every GPU

Activations saved for backward, per image token and block (L_pad tokens per sample, C width,
F FFN width; from the block's code path, bf16 matmul inputs, fp32 residual stream and norms)::

    a_block = 52 C + 4 F bytes                               (F = 4C: 68 C)
      fp32 (4 bytes x C): LN1 input, modulated LN1 output, ca_norm input, LN2 input, modulated
      LN2 output = 20 C; bf16 (2 bytes x C): qkv input, q and k before normalisation, scaled q,
      SDPA q/k/v/out, proj input and output, cross-attention q input / q / out / proj input,
      fc2 output = 32 C; bf16 F-wide: GELU input and fc2 input = 4 F
    + the SDPA mask bias: the boolean block-causal mask becomes a bf16 (L_pad, L_pad) bias that
      the memory-efficient kernel saves for backward: 2 L_pad^2 bytes per block, per call
    + text: per text token and block, mat_kv input and k, v in bf16 = 6 C bytes

    no checkpointing:   b * depth * (L_pad a_block + 2 L_pad^2 + T 6C)
    full-block:         b * depth * L_pad * 4C  (each block's fp32 input)
                        + one block recomputed in backward: b * (L_pad a_block + 2 L_pad^2 + T 6C)
    self-attn:          the self-attention internals (18 C) and the mask bias are recomputed,
                        its fp32 input (4 C) is kept: a_block - 14 C, no 2 L_pad^2 term

with b samples per GPU and T text tokens per sample.  Activations do not depend on the strategy.
Not counted: the CUDA context and allocator fragmentation (budget 1-3 GB), logits and loss (small),
communication buffers, temporary workspaces.  On a CPU the attention falls back to the math kernel,
which stores (heads x L_pad^2) probabilities per block: the table is for GPUs (flash / efficient
SDPA kernels).

Usage: ``python benchmarks/memory_table.py [--pn 0.25M] [--batch 4] [--gpus 8] [--text-tokens 128]``;
prints JSON, then a markdown table (``--markdown-only`` / ``--json-only``).
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Dict

import torch

from infinity_lightning import scales
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.models.infinity import InfinityTransformer
from infinity_lightning.presets import tokenizer_config, transformer_config

PRESETS = ("layer12", "layer24", "2b", "8b")
GB = 1024 ** 3


def _numel(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def text_encoder_params() -> int:
    """flan-t5-xl encoder parameters (meta device), 0 when transformers is missing."""
    try:
        from transformers import T5EncoderModel

        from infinity_lightning.models.text_encoder import flan_t5_xl_config
    except ImportError:  # pragma: no cover
        return 0
    with torch.device("meta"):
        return _numel(T5EncoderModel(flan_t5_xl_config()), trainable_only=False)


def preset_counts(name: str) -> Dict[str, Any]:
    """Exact parameter counts of a preset: total, root (outside the blocks), per block group."""
    cfg = transformer_config(name)
    with torch.device("meta"):
        model = InfinityTransformer(cfg)
        vae = BSQVAE(tokenizer_config(cfg.tokenizer)) if cfg.tokenizer else None
    total = _numel(model)
    blocks = [_numel(b) for b in model.block_list()]
    per_group = sum(blocks) // cfg.block_chunks
    return {"config": cfg, "params": total, "root_params": total - sum(blocks), "block_params": blocks[0],
            "group_params": per_group, "groups": cfg.block_chunks,
            "vae_params": _numel(vae, trainable_only=False) if vae is not None else 0}


def activation_bytes(cfg, padded_len: int, batch: int, text_tokens: int) -> Dict[str, float]:
    """Saved-activation bytes per GPU (see the module docstring)."""
    C, F, depth = cfg.embed_dim, cfg.ffn_hidden, cfg.depth
    a_block = 52 * C + 4 * F
    mask = 2 * padded_len ** 2
    text = text_tokens * 6 * C
    per_block = padded_len * a_block + mask + text
    none = batch * depth * per_block
    full = batch * depth * padded_len * 4 * C + batch * per_block
    self_attn = batch * depth * (padded_len * (a_block - 14 * C) + text)
    return {"per_token_per_block": a_block, "none": none, "full-block": full, "self-attn": self_attn}


def memory_rows(pn: str = "0.25M", batch: int = 4, gpus: int = 8, text_tokens: int = 128) -> Dict[str, Any]:
    schedule = scales.resolve(pn, 1.0)
    L = schedule.num_tokens
    t5 = text_encoder_params()
    rows = []
    for name in PRESETS:
        c = preset_counts(name)
        cfg, P = c["config"], c["params"]
        Lp = int(math.ceil(L / cfg.pad_to_multiplier) * cfg.pad_to_multiplier)
        act = activation_bytes(cfg, Lp, batch, text_tokens)
        frozen = 2 * t5 + 4 * c["vae_params"]
        q8 = 2 * P + 2 * 4 * P / 256
        ddp = {"weights": 4 * P + 2 * P, "gradients": 4 * P, "adamw": 8 * P, "adamw8bit": q8}
        working = 4 * c["root_params"] + 2 * 2 * c["group_params"]
        fsdp = {"weights": 4 * P / gpus + working, "gradients": 4 * P / gpus + 6 * c["group_params"],
                "adamw": 8 * P / gpus, "adamw8bit": None}
        for strategy, m in (("DDP", ddp), (f"FSDP2 x{gpus}", fsdp)):
            states = m["weights"] + m["gradients"] + m["adamw"] + frozen
            rows.append({
                "preset": name, "strategy": strategy, "params": P, "depth": cfg.depth, "width": cfg.embed_dim,
                "block_chunks": cfg.block_chunks, "frozen_params": t5 + c["vae_params"],
                "weights_gb": m["weights"] / GB, "gradients_gb": m["gradients"] / GB,
                "adamw_fp32_gb": m["adamw"] / GB,
                "adamw8bit_gb": None if m["adamw8bit"] is None else m["adamw8bit"] / GB,
                "frozen_gb": frozen / GB,
                "activations_none_gb": act["none"] / GB, "activations_full_block_gb": act["full-block"] / GB,
                "activations_self_attn_gb": act["self-attn"] / GB,
                "activation_bytes_per_token_per_block": act["per_token_per_block"],
                "total_adamw_full_block_gb": (states + act["full-block"]) / GB,
                "total_adamw_no_ckpt_gb": (states + act["none"]) / GB,
            })
    return {"pn": pn, "tokens": L, "batch_per_gpu": batch, "gpus": gpus, "text_tokens": text_tokens,
            "text_encoder_params": t5, "rows": rows}


def markdown(table: Dict[str, Any]) -> str:
    head = (f"Per GPU, local batch {table['batch_per_gpu']} at {table['pn']} (1:1, {table['tokens']} tokens, "
            f"padded to a multiple of 128), {table['text_tokens']} text tokens per prompt, bf16 autocast. GB = 2^30 bytes.\n\n"
            "| preset | params | strategy | weights | grads | AdamW fp32 | AdamW8bit | frozen (T5 + VAE) | "
            "act. none | act. full-block | total (AdamW, full-block) | total (AdamW, none) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in table["rows"]:
        q8 = "n/a" if r["adamw8bit_gb"] is None else f"{r['adamw8bit_gb']:.2f}"
        lines.append(f"| {r['preset']} | {r['params'] / 1e9:.3f} B | {r['strategy']} | {r['weights_gb']:.2f} | "
                     f"{r['gradients_gb']:.2f} | {r['adamw_fp32_gb']:.2f} | {q8} | {r['frozen_gb']:.2f} | "
                     f"{r['activations_none_gb']:.1f} | {r['activations_full_block_gb']:.1f} | "
                     f"{r['total_adamw_full_block_gb']:.1f} | {r['total_adamw_no_ckpt_gb']:.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pn", default="0.25M", choices=["0.06M", "0.25M", "0.60M", "1M"])
    parser.add_argument("--batch", type=int, default=4, help="samples per GPU")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards over")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens per prompt")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json-only", action="store_true")
    group.add_argument("--markdown-only", action="store_true")
    args = parser.parse_args(argv)
    table = memory_rows(args.pn, args.batch, args.gpus, args.text_tokens)
    if not args.markdown_only:
        print(json.dumps(table, indent=1))
    if not args.json_only:
        print(markdown(table))


if __name__ == "__main__":
    main()

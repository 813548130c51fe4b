"""Shared pieces of the distributed test scripts: a tiny BitwiseVARModule on fixed random data.

The data are pre-encoded latents and text features (no tokenizer or text encoder), drawn from a
fixed seed, so every process sees the same global batches.  A global batch of ``GLOBAL_BATCH``
samples is split into contiguous per-rank slices: the mean of the per-rank losses (equal slice
sizes) is the loss of the global batch, and the averaged gradients are its gradients, so a
distributed run must reproduce a single-process run on the whole batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from infinity_lightning.lit.var_module import BitwiseVARModule
from infinity_lightning.models.infinity import InfinityTransformer, init_weights
from infinity_lightning.presets import transformer_config

GLOBAL_BATCH = 4
BATCHES_PER_EPOCH = 2
EPOCHS = 2
LATENT_HW = 4          # token grid 4 x 4: schedule (1,1), (2,2), (4,4), 21 tokens
BITS = 16
TEXT_DIM = 64
EMA_DECAY = 0.8
LR = 3e-3
CLIP = 0.05            # small enough to clip every step: the global norm over shards matters


def rank_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_transformer() -> InfinityTransformer:
    """4 blocks in 2 chunks (2 blocks per FSDP group), identical on every process."""
    torch.manual_seed(1234)
    cfg = transformer_config("tiny", depth=4, block_chunks=2, cond_drop_rate=0.0)
    model = InfinityTransformer(cfg)
    init_weights(model, generator=torch.Generator().manual_seed(1234))
    # Training from the special init's near-zero AdaLN gains barely moves the loss in 4 steps.
    with torch.no_grad():
        for block in model.block_list():
            block.ada_gss.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))
        model.head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(8))
    return model


def global_batches() -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(99)
    out = []
    for b in range(BATCHES_PER_EPOCH):
        latents = torch.randn(GLOBAL_BATCH, BITS, LATENT_HW, LATENT_HW, generator=g)
        lens = [3 + (5 * i + b) % 6 for i in range(GLOBAL_BATCH)]
        text = [torch.randn(n, TEXT_DIM, generator=g) for n in lens]
        out.append({"latents": latents, "text_features": text, "captions": [f"sample {b}.{i}" for i in range(GLOBAL_BATCH)],
                    "h_div_w_template": 1.0})
    return out


def local_slice(batch: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    per = GLOBAL_BATCH // world
    s = slice(rank * per, (rank + 1) * per)
    return {"latents": batch["latents"][s], "text_features": batch["text_features"][s],
            "captions": batch["captions"][s], "h_div_w_template": batch["h_div_w_template"]}


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: List[Dict[str, Any]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.batches[i]


class SlicedData(pl.LightningDataModule):
    """The fixed global batches, each rank taking its slice (resolved when the loader is built)."""

    def train_dataloader(self):
        rank, world = rank_world()
        data = [local_slice(b, rank, world) for b in global_batches()]
        return torch.utils.data.DataLoader(_Batches(data), batch_size=None, shuffle=False)


def make_module(parallelize_fn=None, activation_checkpointing=None, optimizer="adamw") -> BitwiseVARModule:
    transformer = make_transformer()
    transformer.set_activation_checkpointing(activation_checkpointing)
    optim = {"lr": LR, "weight_decay": 0.01, "betas": (0.9, 0.95), "optimizer": optimizer}
    return BitwiseVARModule(transformer, None, None, resolution=None, optim=optim, cond_drop_rate=0.0,
                            log_per_scale=False, parallelize_fn=parallelize_fn)


class LossRecorder(pl.Callback):
    """Records the global-batch loss of every step (the mean of the ranks' losses) on rank 0."""

    def __init__(self):
        self.losses: List[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().float().clone() if isinstance(outputs, dict) else outputs.detach().float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))


def full_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full (gathered) fp32 CPU copies of a module's parameters and buffers, sharded or not."""
    out = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.cpu().float().clone()
    return out


def full_ema(ema) -> Dict[str, torch.Tensor]:
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().float().clone()
            for n, t in ema.ema_state_dict().items()}


def write_json(path: Path, obj: Any) -> None:
    if rank_world()[0] == 0:
        Path(path).write_text(json.dumps(obj, indent=1))


def trainer_kwargs(out_dir: Path, **kw) -> Dict[str, Any]:
    base = dict(accelerator="cpu", max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
                enable_model_summary=False, gradient_clip_val=CLIP, num_sanity_val_steps=0,
                default_root_dir=str(out_dir), use_distributed_sampler=False, deterministic=False)
    base.update(kw)
    return base


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")

"""Training runs compared by tests/test_distributed.py.

``python train_and_compare.py OUT single``: the single-process reference (global batch on one
process): losses, final weights and EMA averages -> ``OUT/single.pt``.

``python -m torch.distributed.run --nproc_per_node=2 --standalone train_and_compare.py OUT distributed``:

1. FSDP2 (``trainer.strategy=fsdp2``, fp32, full-block activation checkpointing), EMA, a sharded
   checkpoint after every epoch -> ``OUT/fsdp.pt``;
2. FSDP2 resumed from the first epoch's sharded checkpoint (self-attention checkpointing, which
   must not change the numbers) -> ``OUT/fsdp_resume.pt``;
3. rank 0: consolidation of the last sharded checkpoint, ``load_transformer`` on the file, export
   to safetensors and (EMA) to the released layout -> ``OUT/consolidated.pt``;
4. DDP with EMA -> ``OUT/ddp.pt``.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_setup as ts  # noqa: E402

ts.quiet()

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from infinity_lightning.callbacks import EMA  # noqa: E402
from infinity_lightning.parallel import (consolidate_checkpoint, export_transformer, make_parallelize_fn,  # noqa: E402
                                         make_strategy)


def sharding(module: torch.nn.Module, ema: EMA) -> dict:
    """How the parameters and the EMA averages are held: DTensor shards, and their sizes."""
    params = list(module.parameters())
    local = torch.tensor(float(sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)))
    if dist.is_initialized():
        dist.all_reduce(local)
    averages = list(ema.ema_state_dict().values())
    return {"param_dtensor": all(hasattr(p, "to_local") for p in params),
            "ema_dtensor": all(hasattr(t, "to_local") for t in averages),
            "param_dtypes": sorted({str(p.dtype) for p in params}),
            "summed_local_numel": int(local), "full_numel": sum(p.numel() for p in params)}


def run(out: Path, strategy, parallelize_fn=None, activation_checkpointing=None, ckpt_dir=None, ckpt_path=None,
        precision="32-true", epochs=ts.EPOCHS, optimizer="adamw"):
    module = ts.make_module(parallelize_fn, activation_checkpointing, optimizer=optimizer)
    ema = EMA(decay=ts.EMA_DECAY, attribute="transformer")
    losses = ts.LossRecorder()
    callbacks = [ema, losses]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", every_n_epochs=1, save_top_k=-1))
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # the process group does not exist yet
    trainer = pl.Trainer(**ts.trainer_kwargs(out, strategy=strategy, devices=devices, callbacks=callbacks,
                                             enable_checkpointing=ckpt_dir is not None, precision=precision,
                                             max_epochs=epochs))
    trainer.fit(module, datamodule=ts.SlicedData(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return {"losses": losses.losses, "weights": ts.full_state(module.transformer), "ema": ts.full_ema(ema),
            "global_step": trainer.global_step, "sharding": sharding(module.transformer, ema)}


def save(obj, path: Path) -> None:
    if ts.rank_world()[0] == 0:
        torch.save(obj, path)


def main() -> None:
    out = Path(sys.argv[1])
    mode = sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    if mode == "single":
        t = time.time()
        save(run(out, "auto"), out / "single.pt")
        print(f"single: {time.time() - t:.1f}s")
        return

    t = time.time()
    ckpt_dir = out / "ckpt_fsdp"
    fsdp = run(out, make_strategy("fsdp2"),
               make_parallelize_fn(mixed_precision="fp32", activation_checkpointing="full-block"), ckpt_dir=ckpt_dir)
    save(fsdp, out / "fsdp.pt")
    timings["fsdp2"] = time.time() - t

    t = time.time()
    resumed = run(out, make_strategy("fsdp2"),
                  make_parallelize_fn(mixed_precision="fp32", activation_checkpointing="self-attn"),
                  ckpt_path=ckpt_dir / "epoch=0.ckpt")
    save(resumed, out / "fsdp_resume.pt")
    timings["fsdp2_resume"] = time.time() - t

    t = time.time()
    if dist.get_rank() == 0:
        from infinity_lightning.checkpoints import load_transformer

        sharded = ckpt_dir / "epoch=1.ckpt"
        files = {"is_dir": sharded.is_dir(), "shards": sorted(p.name for p in sharded.iterdir())}
        consolidated = consolidate_checkpoint(sharded, out / "consolidated.ckpt")
        raw = torch.load(consolidated, map_location="cpu", weights_only=True)
        model = load_transformer(consolidated)
        exported = export_transformer(sharded, out / "exported.safetensors")
        ema_export = export_transformer(sharded, out / "ema.pth", use_ema=True)
        torch.save({
            "files": files,
            "top_level": sorted(raw),
            "state_dict_keys": sorted(raw["state_dict"]),
            "ema_weight_keys": sorted(raw["ema_state"]["weights"]),
            "global_step": raw.get("global_step"),
            "loaded": {k: v.float() for k, v in model.state_dict().items()},
            "loaded_config": model.config,
            "exported": {k: v.float() for k, v in load_transformer(exported).state_dict().items()},
            "ema_exported": {k: v.float() for k, v in load_transformer(ema_export).state_dict().items()},
        }, out / "consolidated.pt")
    dist.barrier()
    timings["consolidate"] = time.time() - t

    t = time.time()
    save(run(out, make_strategy("ddp")), out / "ddp.pt")
    timings["ddp"] = time.time() - t

    # The default precision setup (bf16 block weights, fp32 root, autocast) with CPU offloading.
    t = time.time()
    save(run(out, make_strategy("fsdp2"), make_parallelize_fn(mixed_precision="bf16", cpu_offload=True),
             precision="bf16-mixed", epochs=1), out / "fsdp_bf16.pt")
    timings["fsdp2_bf16"] = time.time() - t

    # 8-bit optimizers cannot hold DTensor states: a clear error before the first step.
    try:
        run(out, make_strategy("fsdp2"), make_parallelize_fn(mixed_precision="fp32"), epochs=1, optimizer="adamw8bit")
        message = None
    except ValueError as e:
        message = str(e)
    ts.write_json(out / "eight_bit.json", {"error": message})
    ts.write_json(out / "timings.json", timings)


if __name__ == "__main__":
    try:
        main()
    finally:
        # Tear the process group down before exit: gloo's threads still running while the
        # interpreter shuts down abort the process ("terminate called without an active exception").
        import torch.distributed as _dist

        if _dist.is_available() and _dist.is_initialized():
            _dist.destroy_process_group()

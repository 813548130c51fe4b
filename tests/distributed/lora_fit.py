"""LoRA training through Lightning under FSDP2 with adapter-only sharded checkpoints, compared by
tests/test_lora_training.py.

``python -m torch.distributed.run --nproc_per_node=2 --standalone lora_fit.py OUT``

The tiny module of ``tiny_setup`` with LoRA adapters (``add_lora`` before the module exists, so
before ``fully_shard``) and the checkpoint filter the recipe layer sets (adapters only), EMA on:

1. two epochs, a sharded checkpoint after each -> ``OUT/uninterrupted.pt``;
2. the second epoch again, resumed from the first epoch's adapter-only checkpoint ->
   ``OUT/resumed.pt``; then ``module.export`` (shards gathered, rank 0 writes ``OUT/export/lora``);
3. the same checkpoint resumed by a module without adapters: refused, the message -> ``OUT/refused.json``;
4. a module without adapters, one epoch, ``module.export`` -> ``OUT/full/transformer.safetensors``
   beside its gathered weights in ``OUT/full.pt``.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_setup as ts  # noqa: E402

ts.quiet()

import lightning.pytorch as pl  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from infinity_lightning import lora  # noqa: E402
from infinity_lightning.callbacks import EMA  # noqa: E402
from infinity_lightning.parallel import make_parallelize_fn, make_strategy  # noqa: E402

SETTINGS = lora.LoraSettings(rank=4, alpha=8, init="gaussian")


def make_module(adapters: bool = True):
    module = ts.make_module(make_parallelize_fn(mixed_precision="fp32", activation_checkpointing="full-block"))
    if adapters:
        torch.manual_seed(55)  # the adapters' A matrices, the same on every rank and in every run
        lora.add_lora(module.transformer, SETTINGS)
        module.trainable_filter = functools.partial(lora.lora_checkpoint_filter, keep=())
    return module


def adapters_of(module) -> dict:
    return {k: v for k, v in ts.full_state(module.transformer).items() if lora.is_lora_key(k)}


def fit(out: Path, module, epochs: int, ckpt_dir=None, ckpt_path=None):
    ema = EMA(decay=ts.EMA_DECAY, attribute="transformer")
    callbacks = [ema]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="{epoch}", every_n_epochs=1, save_top_k=-1))
    trainer = pl.Trainer(**ts.trainer_kwargs(out, strategy=make_strategy("fsdp2"), devices=2, callbacks=callbacks,
                                             enable_checkpointing=ckpt_dir is not None, max_epochs=epochs))
    trainer.fit(module, datamodule=ts.SlicedData(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, ema


def save(obj, path: Path) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "ckpt"

    base = {k: v.clone() for k, v in ts.make_transformer().state_dict().items()}
    module = make_module()
    trainer, ema = fit(out, module, ts.EPOCHS, ckpt_dir=ckpt_dir)
    full = ts.full_state(module.transformer)
    save({"adapters": adapters_of(module), "ema": ts.full_ema(ema), "global_step": trainer.global_step,
          "base_unchanged": all(torch.equal(full[k if k in full else k.rsplit(".", 1)[0] + ".base_layer."
                                               + k.rsplit(".", 1)[1]], v.float()) for k, v in base.items()),
          "trainable": sorted(n for n, p in module.transformer.named_parameters() if p.requires_grad)},
         out / "uninterrupted.pt")

    module = make_module()
    trainer, ema = fit(out, module, ts.EPOCHS, ckpt_path=ckpt_dir / "epoch=0.ckpt")
    save({"adapters": adapters_of(module), "ema": ts.full_ema(ema), "global_step": trainer.global_step},
         out / "resumed.pt")
    module.export(out / "export")

    try:
        fit(out, make_module(adapters=False), ts.EPOCHS, ckpt_path=ckpt_dir / "epoch=0.ckpt")
        message = None
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        message = f"{type(e).__name__}: {e}"
    ts.write_json(out / "refused.json", {"error": message})

    module = make_module(adapters=False)
    fit(out, module, 1)
    weights = ts.full_state(module.transformer)
    module.export(out / "full")
    save(weights, out / "full.pt")


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

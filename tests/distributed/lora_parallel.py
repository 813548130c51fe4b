"""LoRA under FSDP2 and DDP against one process, compared by tests/test_lora.py.

``python -m torch.distributed.run --nproc_per_node=2 --standalone lora_parallel.py OUT``

Every rank first trains the reference in-process (no process group: the whole global batch on one
process), then the same adapter, initialised from the same seed, with the global batch split over
the two ranks:

1. FSDP2: ``add_lora`` then ``parallel.parallelize`` (fp32, full-block checkpointing); the
   adapter is saved with ``save_lora`` (shards gathered, rank 0 writes);
2. DDP (gloo) over the adapted transformer;
3. ``add_lora`` on a model that is already sharded must be refused.

Plain PyTorch loops (AdamW, three steps, the bitwise cross-entropy on fixed random labels), no
Lightning, to keep the launch short.  Rank 0 writes ``OUT/lora_parallel.pt``.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from infinity_lightning import lora
from infinity_lightning.models.infinity import InfinityTransformer, init_weights
from infinity_lightning.presets import transformer_config

warnings.filterwarnings("ignore")

GLOBAL_BATCH = 4
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
TOKENS = 21
BITS = 16
STEPS = 3
LR = 1e-2
SETTINGS = lora.LoraSettings(rank=4, alpha=8)


def make_transformer() -> InfinityTransformer:
    """4 blocks in 2 chunks (2 blocks per FSDP group), identical on every process."""
    cfg = transformer_config("tiny", depth=4, block_chunks=2, cond_drop_rate=0.0)
    torch.manual_seed(1234)
    model = InfinityTransformer(cfg)
    init_weights(model, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():  # active AdaLN gains so that the blocks matter
        for block in model.block_list():
            block.ada_gss.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))
        model.head.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(8))
    return model


def adapted() -> InfinityTransformer:
    model = make_transformer()
    torch.manual_seed(55)  # the adapters' A matrices
    lora.add_lora(model, SETTINGS)
    return model


def global_batch() -> Dict[str, Any]:
    g = torch.Generator().manual_seed(99)
    lens = [3, 5, 7, 4]
    text = 0.5 * torch.randn(sum(lens), 64, generator=g)
    x = torch.randint(0, 2, (GLOBAL_BATCH, TOKENS - 1, BITS), generator=g).float() * 2 - 1
    labels = torch.randint(0, 2, (GLOBAL_BATCH, TOKENS, BITS), generator=g)
    return {"lens": lens, "text": text, "x": x, "labels": labels}


def local(batch: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    per = GLOBAL_BATCH // world
    lens = batch["lens"][rank * per:(rank + 1) * per]
    start = sum(batch["lens"][:rank * per])
    return {"lens": lens, "text": batch["text"][start:start + sum(lens)], "x": batch["x"][rank * per:(rank + 1) * per],
            "labels": batch["labels"][rank * per:(rank + 1) * per]}


def loss_of(model, batch: Dict[str, Any]) -> torch.Tensor:
    lens = torch.tensor(batch["lens"])
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    logits = model((batch["text"], lens, cu, int(lens.max())), batch["x"], SCHEDULE)
    return F.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1))


def train(model, batch: Dict[str, Any], reduce: bool) -> List[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def adapted_key(key: str, state: Dict[str, Any]) -> str:
    """The key of a released weight in the adapted model (``sa.proj.weight`` -> ``sa.proj.base_layer.weight``)."""
    if key in state:
        return key
    head, _, leaf = key.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().float().clone()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    batch = global_batch()
    base = {k: v.clone() for k, v in make_transformer().state_dict().items()}

    reference = adapted()
    result: Dict[str, Any] = {"trainable": lora.count_parameters(reference)[0],
                              "initial_lora": lora.lora_state_dict(reference)}
    result["single_losses"] = train(reference, batch, reduce=False)
    result["single_lora"] = lora.lora_state_dict(reference)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    from infinity_lightning.parallel import parallelize

    mesh = init_device_mesh("cpu", (world,))
    mine = local(batch, rank, world)

    fsdp = adapted()
    parallelize(fsdp, mesh, activation_checkpointing="full-block", mixed_precision="fp32")
    result["fsdp_lora_params_sharded"] = all(hasattr(p, "to_local") for n, p in fsdp.named_parameters()
                                             if lora.is_lora_key(n))
    result["fsdp_losses"] = train(fsdp, mine, reduce=True)
    result["fsdp_lora"] = lora.lora_state_dict(fsdp)  # gathers the shards on every rank
    sd = fsdp.state_dict()
    result["fsdp_base_unchanged"] = all(torch.equal(full(sd[adapted_key(k, sd)]), v.float()) for k, v in base.items())
    lora.save_lora(fsdp, out / "fsdp_adapter")

    ddp_model = adapted()
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_model, broadcast_buffers=False)
    result["ddp_losses"] = train(ddp, mine, reduce=True)
    result["ddp_lora"] = lora.lora_state_dict(ddp_model)

    sharded = make_transformer()
    parallelize(sharded, mesh, mixed_precision="fp32")
    try:
        lora.add_lora(sharded, SETTINGS)
        result["after_shard_error"] = None
    except RuntimeError as e:
        result["after_shard_error"] = str(e)
    try:
        lora.add_lora(ddp, SETTINGS, adapter_name="second")
        result["ddp_wrapper_error"] = None
    except TypeError as e:
        result["ddp_wrapper_error"] = str(e)

    dist.barrier()
    if rank == 0:
        torch.save(result, out / "lora_parallel.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))

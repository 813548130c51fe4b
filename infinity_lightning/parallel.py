"""Multi-device training: FSDP2 sharding of the Infinity transformer, Lightning strategies, and
sharded-checkpoint consolidation.

One function applies the parallelism (torchtitan style), called from
``BitwiseVARModule.configure_model`` when the strategy provides a device mesh::

    parallelize(transformer, device_mesh, activation_checkpointing="full-block", mixed_precision="bf16")

It applies, in this order,

1. activation checkpointing per block (``"full-block"``: the model's own non-reentrant
   recomputation of every block; ``"self-attn"``: only each block's self-attention, through
   ``torch.distributed._composable.checkpoint``, which adds hooks and keeps parameter names);
2. ``fully_shard`` per block chunk: the blocks of one ``block_chunks.{c}`` group share one
   all-gather / reduce-scatter (the original wrapped ``MultipleLayers`` with FSDP1); one group per
   block when ``block_chunks == 1`` (and on torch < 2.6, which cannot group modules);
3. ``fully_shard`` on the transformer itself (the text path, embeddings and the head).

Parameter names and state-dict keys are unchanged (FSDP2 does not wrap modules), so the released
key layout survives sharding, checkpoints and consolidation.  The frozen tokenizer and text encoder
are left alone: every rank holds a replica, and the optimizer never sees them.

Strategies (:func:`make_strategy`): ``"auto"``, ``"ddp"``, ``"fsdp2"`` (:class:`FSDP2Strategy`, a
``ModelParallelStrategy`` that shards over all ranks and refuses 8-bit optimizers) and
``"model_parallel"`` (Lightning's own, for explicit mesh sizes).  FSDP1 (``"fsdp"``) is refused.

Checkpoints: ``FSDP2Strategy`` saves distributed checkpoints (a folder with one shard file per rank
and ``meta.pt``) and resumes from them; :func:`consolidate_checkpoint` merges such a folder into
one ``torch.save`` file laid out like a single-device Lightning checkpoint, which
:func:`infinity_lightning.load_transformer` reads; :func:`export_transformer` goes on to the
released ``.pth`` layout or safetensors.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .io import PathLike

__all__ = [
    "METADATA_FILENAME",
    "export_trained",
    "is_dtensor",
    "ACTIVATION_CHECKPOINTING",
    "MIXED_PRECISION",
    "STRATEGIES",
    "parallelize",
    "apply_activation_checkpointing",
    "make_parallelize_fn",
    "fsdp_mesh",
    "make_strategy",
    "FSDP2Strategy",
    "check_optimizer_strategy",
    "is_sharded",
    "consolidate_checkpoint",
    "export_transformer",
]


ACTIVATION_CHECKPOINTING = (None, "none", "full-block", "self-attn")
MIXED_PRECISION = ("bf16", "fp32", None)
STRATEGIES = ("auto", "ddp", "fsdp2", "model_parallel")
#: optimizers whose states cannot live on DTensor parameters
EIGHT_BIT_OPTIMIZERS = ("adamw8bit",)


# --------------------------------------------------------------------------------------------
# torch compatibility (FSDP2 is public from torch 2.6, under _composable in 2.4 and 2.5)
# --------------------------------------------------------------------------------------------
def _fsdp():
    """``(fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, FSDPModule)``."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import (CPUOffloadPolicy, FSDPModule,  # type: ignore
                                                        MixedPrecisionPolicy, fully_shard)
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, FSDPModule


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _can_group_modules() -> bool:
    # fully_shard([m1, m2, ...]) (one communication group for several modules) exists from 2.6.
    return _torch_version() >= (2, 6)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter or state sharded by FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        from torch.distributed._tensor import DTensor  # type: ignore
    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or one of its submodules."""
    FSDPModule = _fsdp()[3]
    return any(isinstance(m, FSDPModule) for m in module.modules())


# --------------------------------------------------------------------------------------------
# parallelize
# --------------------------------------------------------------------------------------------
def fsdp_mesh(device_mesh):
    """The mesh FSDP shards over.

    A Lightning ``ModelParallelStrategy`` mesh has the dimensions ``("data_parallel",
    "tensor_parallel")``: parameters are sharded over ``data_parallel``; a ``tensor_parallel``
    dimension larger than 1 is an error (the Infinity transformer has no tensor-parallel plan).
    Any other mesh is used as given (1-D: FSDP; 2-D: HSDP, replicated over dim 0, sharded over
    dim 1).
    """
    names = tuple(getattr(device_mesh, "mesh_dim_names", None) or ())
    if "data_parallel" in names:
        if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"the device mesh has a tensor_parallel dimension of size {device_mesh['tensor_parallel'].size()}, "
                "but tensor parallelism is not implemented for the Infinity transformer; shard with FSDP2 over all "
                "ranks: trainer.strategy=fsdp2 (make_strategy('fsdp2')), or "
                "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)")
        return device_mesh["data_parallel"]
    return device_mesh


def _policies(mixed_precision: Optional[str]):
    """``(block policy, root policy)`` for a mixed-precision name."""
    MixedPrecisionPolicy = _fsdp()[1]
    if mixed_precision == "bf16":
        # Blocks compute with bf16 weights (half the all-gather traffic and unsharded memory);
        # gradients are reduced in fp32 and the sharded master weights stay fp32.  Inputs are not
        # cast, so the residual stream stays fp32 as in the original (docs/model.md#memory-and-precision); the blocks'
        # fp32 LayerNorm outputs meet bf16 weights under autocast (precision="bf16-mixed").
        block = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
        # The root (text path, AdaLN, embeddings, head) runs explicit fp32 regions: fp32 weights.
        root = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        return block, root
    if mixed_precision == "fp32":
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        return policy, policy
    if mixed_precision is None:
        policy = MixedPrecisionPolicy()
        return policy, policy
    raise ValueError(f"mixed_precision {mixed_precision!r}; expected one of {MIXED_PRECISION}")


def _check_options(activation_checkpointing: Optional[str], mixed_precision: Optional[str]) -> None:
    if activation_checkpointing in (False, "none"):
        activation_checkpointing = None
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing {activation_checkpointing!r}; expected one of "
                         f"{ACTIVATION_CHECKPOINTING}")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {mixed_precision!r}; expected one of {MIXED_PRECISION}")


def apply_activation_checkpointing(model: nn.Module, mode: Optional[str]) -> None:
    """Activation checkpointing per block: ``"full-block"`` or ``"self-attn"`` (docs/model.md#memory-and-precision), or off.

    The model recomputes in backward itself (``InfinityTransformer.set_activation_checkpointing``:
    non-reentrant ``torch.utils.checkpoint`` around each block, or around each block's
    self-attention), so parameter names stay those of the released weights and the same code
    runs under FSDP2, DDP and on one device.
    """
    if mode not in (None, False, "none", "full-block", "self-attn"):
        raise ValueError(f"activation_checkpointing {mode!r}; expected one of {ACTIVATION_CHECKPOINTING}")
    model.set_activation_checkpointing(None if mode in (False, "none") else mode)


def parallelize(model: nn.Module, device_mesh, *, activation_checkpointing: Optional[str] = None,
                mixed_precision: Optional[str] = "bf16", cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply activation checkpointing and FSDP2 to an :class:`InfinityTransformer`, in place.

    Args:
        model: the transformer (``block_list()``, ``block_chunks`` or ``blocks``).
        device_mesh: the mesh to shard over (see :func:`fsdp_mesh`; in a LightningModule,
            ``self.device_mesh``).
        activation_checkpointing: ``"full-block"``, ``"self-attn"``, ``"none"`` (off), or ``None``:
            keep the mode already set on the model (``set_activation_checkpointing``).
        mixed_precision: ``"bf16"``: blocks compute with bf16 weights, gradients reduced in fp32,
            fp32 master weights, the root (text path, head) in fp32; use it with
            ``precision="bf16-mixed"``.  ``"fp32"``: fp32 weights everywhere (with
            ``bf16-mixed`` this is exactly the original's FSDP setup: fp32 parameters, autocast
            compute).  ``None``: no policy, parameters keep their dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory
            (``CPUOffloadPolicy``; the optimizer step then runs on the CPU).
        reshard_after_forward: free each group's gathered parameters after its forward and
            gather again in backward (ZeRO-3); ``False`` keeps them until backward (ZeRO-2-like,
            the original's ``SHARD_GRAD_OP``), more memory, less communication.

    Returns the same module, whose parameters are now ``DTensor`` shards.
    """
    _check_options(activation_checkpointing, mixed_precision)
    if not hasattr(model, "block_list"):
        raise TypeError(f"parallelize expects an InfinityTransformer, got {type(model).__name__}")
    if is_sharded(model):
        raise RuntimeError("parallelize: the model is already sharded (fully_shard was applied before)")
    fully_shard, _, CPUOffloadPolicy, _ = _fsdp()
    mesh = fsdp_mesh(device_mesh)
    block_policy, root_policy = _policies(mixed_precision)
    extra: Dict[str, Any] = {}
    if cpu_offload:
        # Pinned host memory speeds up the copies to an accelerator; without one it cannot be had.
        extra["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")

    # None keeps the model's own setting (BitwiseVARModule(activation_checkpointing=...) sets it).
    if activation_checkpointing is not None:
        apply_activation_checkpointing(model, activation_checkpointing)

    groups = [list(chunk.module) for chunk in model.block_chunks] if hasattr(model, "block_chunks") \
        else [[b] for b in model.blocks]
    if not _can_group_modules():
        groups = [[b] for g in groups for b in g]
    for group in groups:
        if mixed_precision == "bf16":
            # ca_norm is a LayerNorm on the fp32 residual stream; a bf16 weight there fails on CPU
            # (layer_norm wants one dtype outside CUDA autocast) and loses precision elsewhere.
            # Its own fp32 group costs one small extra all-gather per group.
            norms = [b.ca_norm for b in group]
            fully_shard(norms if len(norms) > 1 else norms[0], mesh=mesh, mp_policy=root_policy,
                        reshard_after_forward=reshard_after_forward, **extra)
        # The model calls the blocks one by one (never MultipleLayers.forward), so the group is
        # the list of blocks: its parameters are gathered when the first block runs.
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh, mp_policy=block_policy,
                    reshard_after_forward=reshard_after_forward, **extra)
    # The root's parameters are needed again right at the start of backward (the head): keep them.
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False, **extra)
    return model


def make_parallelize_fn(**options: Any) -> Callable[[nn.Module, Any], nn.Module]:
    """``fn(transformer, device_mesh)`` applying :func:`parallelize` with ``options`` (checked now).

    This is what ``BitwiseVARModule(parallelize_fn=...)`` takes; recipes build it from the
    ``module.parallelize`` keys (``activation_checkpointing``, ``mixed_precision``,
    ``cpu_offload``, ``reshard_after_forward``).
    """
    unknown = set(options) - {"activation_checkpointing", "mixed_precision", "cpu_offload", "reshard_after_forward"}
    if unknown:
        raise TypeError(f"unknown parallelize option(s) {sorted(unknown)}; expected activation_checkpointing, "
                        "mixed_precision, cpu_offload, reshard_after_forward")
    _check_options(options.get("activation_checkpointing"), options.get("mixed_precision", "bf16"))
    return functools.partial(parallelize, **options)


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------
def check_optimizer_strategy(optimizer: str, strategy: Any) -> None:
    """Raise a clear error for an optimizer the strategy cannot run (8-bit with FSDP2)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    name = strategy if isinstance(strategy, str) else None
    sharded = name in ("fsdp2", "model_parallel") or isinstance(strategy, ModelParallelStrategy)
    if sharded and str(optimizer).lower() in EIGHT_BIT_OPTIMIZERS:
        raise ValueError(
            f"optimizer {optimizer!r} cannot be used with the {name or type(strategy).__name__} strategy: "
            "bitsandbytes 8-bit optimizers do not support FSDP2's DTensor parameters; use optimizer 'adamw' "
            "(FSDP2 already shards its states over the ranks), or trainer.strategy=ddp with 'adamw8bit'")


def _lightning_model_parallel():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_lightning_model_parallel()):  # type: ignore[misc]
    """Lightning's ``ModelParallelStrategy`` set up for FSDP2 over all ranks.

    ``data_parallel_size="auto"`` means every rank of every node (the parameters are sharded over
    the whole job) and ``tensor_parallel_size`` is 1, where Lightning's own ``"auto"`` would shard
    within a node only and leave a tensor-parallel dimension the model cannot use.  Distributed
    (sharded) checkpoints are the default.  An optimizer from bitsandbytes is refused with a clear
    error when the optimizers are set up.

    Resuming from a sharded checkpoint that holds only what trains (LoRA adapters, see
    ``BitwiseVARModule(trainable_filter=...)``; frozen tokenizer and text encoder left out) loads
    the tensors it has and leaves every other weight as the module holds it: Lightning's own loader
    asks the checkpoint for the whole model.  A trainable parameter missing from the checkpoint is
    an error that names it.  The LightningModule applies the sharding in
    ``configure_model`` (``BitwiseVARModule(parallelize_fn=make_parallelize_fn(...))``).
    """

    def __init__(self, data_parallel_size: Union[str, int] = "auto", save_distributed_checkpoint: bool = True,
                 **kwargs: Any) -> None:
        if "tensor_parallel_size" in kwargs and kwargs["tensor_parallel_size"] not in ("auto", 1):
            raise ValueError("FSDP2Strategy shards over all ranks: tensor_parallel_size must be 1")
        kwargs.pop("tensor_parallel_size", None)
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self._fsdp_size = data_parallel_size

    def setup_environment(self) -> None:
        if self._fsdp_size == "auto":
            # num_nodes and the processes per node are known once the trainer configured us.
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / METADATA_FILENAME).is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        from .io import CheckpointError, format_key_list

        saved = {k[len("state_dict."):] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if k.startswith("state_dict.")}
        current = get_model_state_dict(self.model)
        absent = [k for k in current if k not in saved]
        if not absent:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        trainable = sorted(n for n, p in self.model.named_parameters() if p.requires_grad and n in absent)
        if trainable:
            raise CheckpointError(f"checkpoint {path} lacks {len(trainable)} trained parameter(s) of the module "
                                  f"({format_key_list(trainable, 3)}); was it written by a run with other trainable "
                                  "parameters (LoRA settings, model.lora)?")
        state = {"state_dict": {k: v for k, v in current.items() if k in saved}}
        dcp.load(state, checkpoint_id=str(path))
        self.model.load_state_dict(state["state_dict"], strict=False)  # the frozen rest stays as it is
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=True)

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        for opt in self.optimizers:
            inner = getattr(opt, "_optimizer", opt)
            if type(inner).__module__.split(".")[0] == "bitsandbytes":
                raise ValueError(
                    f"optimizer {type(inner).__name__} (bitsandbytes) cannot run with FSDP2: bitsandbytes does not "
                    "support DTensor parameters; use optimizer 'adamw' (FSDP2 shards its states over the ranks), "
                    "or trainer.strategy=ddp for 8-bit optimizers")


def make_strategy(name: str = "auto", **kwargs: Any):
    """The Lightning strategy for a recipe's ``trainer.strategy`` name.

    * ``"auto"``: Lightning's choice (returns the string ``"auto"``).
    * ``"ddp"``: ``DDPStrategy(**kwargs)``; unless given, ``broadcast_buffers=False`` (the
      transformer's only buffers are constant zeros, as in the original) and
      ``gradient_as_bucket_view=True`` (no second copy of the gradients).
    * ``"fsdp2"``: :class:`FSDP2Strategy` (``data_parallel_size``, ``save_distributed_checkpoint``,
      ``process_group_backend``, ``timeout``); the module shards itself in ``configure_model``.
    * ``"model_parallel"``: Lightning's ``ModelParallelStrategy(**kwargs)`` with explicit mesh sizes.
    * ``"fsdp"`` (FSDP1) is refused: use ``"fsdp2"``.
    """
    key = str(name).lower().replace("-", "_")
    if key == "auto":
        if kwargs:
            raise TypeError(f"strategy 'auto' takes no options, got {sorted(kwargs)}")
        return "auto"
    if key == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        kwargs.setdefault("broadcast_buffers", False)
        # Gradients live in the communication buckets instead of beside them: 4 bytes/param less.
        kwargs.setdefault("gradient_as_bucket_view", True)
        return DDPStrategy(**kwargs)
    if key == "fsdp2":
        return FSDP2Strategy(**kwargs)
    if key == "model_parallel":
        return _lightning_model_parallel()(**kwargs)
    if key in ("fsdp", "fsdp1"):
        where = "on CPU (torch and Lightning refuse FSDP1 there)" if not torch.cuda.is_available() else ""
        raise ValueError(
            f"strategy {name!r} (FSDP1) is not supported {where}; use trainer.strategy=fsdp2: FSDP2 "
            "(torch.distributed.fsdp.fully_shard through ModelParallelStrategy) shards parameters, gradients and "
            "optimizer states the same way, works on CPU and GPU, and keeps the released parameter names".replace("  ", " "))
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
METADATA_FILENAME = "meta.pt"


def _read_distributed_checkpoint(folder: Path) -> Dict[str, Any]:
    """All tensors of a distributed checkpoint as full CPU tensors, plus ``meta.pt``, in one dict."""
    try:
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
    except ImportError:  # pragma: no cover - a Lightning without the helper
        _load_distributed_checkpoint = None
    if _load_distributed_checkpoint is not None:
        return _load_distributed_checkpoint(folder)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # pragma: no cover

    with tempfile.TemporaryDirectory() as tmp:  # pragma: no cover
        dcp_to_torch_save(str(folder), os.path.join(tmp, "full.pt"))
        checkpoint = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)
    meta = folder / METADATA_FILENAME  # pragma: no cover
    if meta.is_file():  # pragma: no cover
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    return checkpoint  # pragma: no cover


def _move_sharded_ema(checkpoint: Dict[str, Any]) -> None:
    """Averages saved inside ``state_dict`` (``__ema__.*``) -> ``ema_state["weights"]``, the layout
    of a full (single-file) checkpoint of the EMA callback."""
    ema = checkpoint.get("ema_state")
    sd = checkpoint.get("state_dict")
    if not isinstance(ema, dict) or not isinstance(sd, dict) or not ema.get("sharded_prefix"):
        return
    prefix = ema["sharded_prefix"]
    weights = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
    ema["weights"] = weights
    ema["sharded_prefix"] = None


def consolidate_checkpoint(folder: PathLike, out_file: PathLike, *, keep_optimizer: bool = True) -> Path:
    """Merge a distributed (sharded) Lightning checkpoint folder into one file.

    ``folder`` is what ``FSDP2Strategy`` / ``ModelParallelStrategy(save_distributed_checkpoint=True)``
    writes (``__0_0.distcp`` ... and ``meta.pt``).  The output, written atomically with
    ``torch.save``, holds ``state_dict`` with full tensors and the module's key names
    (``transformer.block_chunks.0.module.0.sa.mat_qkv.weight``), the optimizer states as
    ``optimizer_0`` ... (dropped with ``keep_optimizer=False``), and everything from ``meta.pt``
    (``epoch``, ``global_step``, callback states, ``hyper_parameters``).  EMA averages saved in
    the shards (``state_dict["__ema__.*"]``) move to ``ema_state["weights"]``, as in a
    single-file checkpoint, so the ``state_dict`` holds the module only.
    ``load_transformer(out_file)`` loads the transformer from it.  Returns ``out_file``.

    The whole model and optimizer state must fit in CPU memory.
    """
    from .io import CheckpointError, atomic_save

    folder, out_file = Path(folder), Path(out_file)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a distributed checkpoint is a folder of shard files "
                              f"(a single-file checkpoint needs no consolidation)")
    if not (folder / METADATA_FILENAME).is_file() or not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder} is not a distributed Lightning checkpoint: it needs {METADATA_FILENAME} "
                              "and .metadata (written by ModelParallelStrategy(save_distributed_checkpoint=True))")
    if out_file.resolve() == folder.resolve():
        raise ValueError("consolidate_checkpoint: out_file must differ from the checkpoint folder")
    checkpoint = _read_distributed_checkpoint(folder)
    _move_sharded_ema(checkpoint)
    if not keep_optimizer:
        for k in [k for k in checkpoint if k.startswith("optimizer_") or k == "optimizer_states"]:
            del checkpoint[k]
    return atomic_save(checkpoint, out_file)


def export_transformer(checkpoint: PathLike, out: PathLike, *, format: Optional[str] = None, use_ema: bool = False,
                       dtype: Optional[torch.dtype] = None, **config: Any) -> Path:
    """Export the transformer of a training checkpoint to the released layout or safetensors.

    ``checkpoint``: a distributed checkpoint folder (consolidated on the way, in a temporary
    file beside ``out``) or a single-file Lightning checkpoint.  ``use_ema`` exports the EMA
    averages (``ema_state["weights"]``) over the training weights.  ``format``: ``"released"``
    (flat ``.pth``) or ``"safetensors"`` (default from ``out``'s suffix).  ``config`` fields go to
    :func:`load_transformer` (where the architecture is ambiguous from the shapes).  The weights
    pass through ``load_transformer`` (strict) and :func:`save_transformer`.  Returns ``out``.
    """
    from .io import CheckpointError, safe_load
    from .transformer_checkpoints import load_transformer, save_transformer

    checkpoint, out = Path(checkpoint), Path(out)
    if format is None:
        format = "safetensors" if out.suffix == ".safetensors" else "released"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(out.parent)) as tmp:
        source = checkpoint
        if checkpoint.is_dir():
            source = consolidate_checkpoint(checkpoint, Path(tmp) / "consolidated.ckpt", keep_optimizer=False)
        if use_ema:
            # The consolidated file carries the user's shards and meta.pt: loaded as untrusted too.
            obj = safe_load(source, what="checkpoint")
            ema = obj.get("ema_state") if isinstance(obj, dict) else None
            weights = ema.get("weights") if isinstance(ema, dict) else None
            if not weights:
                raise CheckpointError(f"{checkpoint} holds no EMA averages (ema_state['weights']); export without "
                                      "use_ema or train with the EMA callback")
            prefix = (ema.get("attribute") or "transformer") + "."
            sd = dict(obj["state_dict"])
            sd.update({prefix + k: v for k, v in weights.items()})
            source = Path(tmp) / "ema.ckpt"
            torch.save({"state_dict": sd}, source)
        model = load_transformer(source, **config)
        return save_transformer(model, out, format=format, dtype=dtype)


def export_trained(transformer: nn.Module, out_dir: PathLike) -> List[Path]:
    """Write a trained transformer for inference into ``out_dir``; returns the paths written.

    With LoRA adapters: the trained adapter as ``<out_dir>/lora/`` in PEFT format
    (``adapter_config.json`` + ``adapter_model.safetensors``, what ``pipe.load_lora`` and
    ``InfinityPipeline.from_pretrained(..., lora=...)`` read; several trained adapters go to
    ``<out_dir>/lora/<name>/``).  Otherwise the whole transformer as
    ``<out_dir>/transformer.safetensors`` (+ ``transformer.json``).  These are the training
    weights; EMA averages export with :func:`export_transformer`.  Under torch.distributed every
    rank must call it (FSDP2 shards are gathered); rank 0 writes, the other ranks return [].
    """
    from .lora import lora_adapters, lora_configs, save_lora

    out = Path(out_dir)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0
    if lora_configs(transformer):
        adapters = lora_adapters(transformer)
        names = [n for n, a in adapters.items() if a["trainable"]] or list(adapters)
        paths = [save_lora(transformer, out / "lora" if len(names) == 1 else out / "lora" / n, n) for n in names]
        return paths if rank0 else []
    return _export_full(transformer, out / "transformer.safetensors", rank0)


def _export_full(transformer: nn.Module, path: Path, rank0: bool) -> List[Path]:
    """Save ``transformer`` as safetensors; FSDP2 shards are gathered to rank 0 first (a collective)."""
    from .checkpoints import save_transformer

    if not any(hasattr(p, "full_tensor") for p in transformer.parameters()):
        return [save_transformer(transformer, path, format="safetensors")] if rank0 else []
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .models.infinity import InfinityTransformer

    full = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rank0:
        return []
    with torch.device("meta"):
        plain = InfinityTransformer(transformer.config)
    plain.load_state_dict(full, strict=True, assign=True)
    return [save_transformer(plain, path, format="safetensors")]

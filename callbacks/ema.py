"""Exponential moving average of trainable weights, for plain, DDP and FSDP2 (DTensor) modules.

After every ``every_n_steps``-th optimizer step the average moves towards the current weights::

    d = decay                                   (or min(decay, (1 + n) / (10 + n)) with warm-up,
    ema = d * ema + (1 - d) * param              n = number of updates done so far)

implemented as ``lerp_(ema, param, 1 - d)``.  The average is swapped into the module for
validation, test and predict and swapped back afterwards, so checkpoints and the optimizer always
see the training weights.  The original code defines (but its recipes never enable) an EMA with
decay 0.9999 updated after every step (docs/model.md#ema); ``EMA(decay=0.9999)`` is that.

Only the parameters that require gradients when the averages are made are averaged, swapped and
saved.  With LoRA adapters (``model.lora``) those are the adapter weights: the frozen base is
never copied, so the averages, the swap and ``ema_state`` cost what the adapters cost (190 MB in
fp32 for the 2B at rank 32, instead of 8.8 GB), and ``ema_state["weights"]`` holds the adapter
keys (``...lora_A.default.weight``) beside the adapter-only ``state_dict``.

Sharded parameters.  Each average is made with ``param.detach().clone()``, so for an FSDP2
``DTensor`` parameter it is a DTensor with the same mesh and placements: every rank averages only
its own shard, and ``torch._foreach_lerp_`` / ``copy_`` run shard-locally without communication.
Checkpoints (``checkpoint["ema_state"]``):

* plain tensors: ``weights`` is a dict ``name -> tensor`` (CPU), names relative to the averaged
  module; a released-format export can take it as is.
* DTensors, full checkpoint (``ModelParallelStrategy(save_distributed_checkpoint=False)``): every
  rank calls ``full_tensor()`` and ``weights`` holds the gathered CPU tensors.
* DTensors, distributed checkpoint (the ``ModelParallelStrategy`` default): Lightning writes only
  ``checkpoint["state_dict"]`` and the optimizer states as shards and pickles the rest on rank 0,
  so the averages travel inside ``state_dict`` under the key prefix ``__ema__.`` (sharded like
  the weights) and ``ema_state`` keeps only the counters.  On resume they are read back with
  ``torch.distributed.checkpoint.load`` from ``trainer.ckpt_path`` into the DTensor averages.
  A checkpoint consolidated with ``lightning.fabric.utilities.consolidate_checkpoint`` therefore
  carries ``__ema__.*`` keys in its ``state_dict``; drop them before a strict model load.

Loading a full checkpoint into DTensor averages distributes each tensor with the parameter's mesh
and placements.  Before touching parameters the callback calls ``reshard()`` on FSDP2 modules,
because a forward without backward (validation) can leave them unsharded, as plain tensors.
Both checkpoint layouts were checked with two CPU processes under ``ModelParallelStrategy``
(``fully_shard`` in ``configure_model``): the averages after resume equal those saved.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from infinity_lightning.parallel import is_dtensor

__all__ = ["EMA"]

EMA_KEY = "ema_state"
#: key prefix of the averages inside ``checkpoint["state_dict"]`` for distributed checkpoints
SHARDED_PREFIX = "__ema__."


def _reshard_fsdp(module: nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state (a no-op for everything else).

    After a forward without backward (validation) FSDP2 may leave a module's parameters
    unsharded, and ``named_parameters()`` then returns plain full tensors instead of the DTensor
    shards the averages mirror.  ``reshard()`` frees the unsharded copies; the next forward
    gathers them again.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class EMA(Callback):
    """Keep an exponential moving average of a module's trainable parameters.

    Args:
        decay: EMA decay (0.9999 in the original).
        attribute: dotted attribute of the LightningModule to average (``"transformer"``);
            ``None`` averages every trainable parameter of the LightningModule itself.
        every_n_steps: update after every n-th optimizer step.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by
            the initial weights.
        ema_dtype: dtype of the averages (float32; ``None`` keeps each parameter's dtype).  A
            bf16 average with decay 0.9999 would round every update away.
        swap_for: stages that run with the average swapped in, out of ``"validate"``,
            ``"test"``, ``"predict"``.

    Use :meth:`average_weights` to export (``with ema.average_weights(module): save(...)``)
    and :meth:`ema_state_dict` for the averaged parameters alone.
    """

    def __init__(self, decay: float = 0.9999, attribute: Optional[str] = "transformer", every_n_steps: int = 1,
                 warmup: bool = False, ema_dtype: Optional[torch.dtype] = torch.float32,
                 swap_for: Tuple[str, ...] = ("validate", "test", "predict")) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"EMA every_n_steps must be >= 1, got {every_n_steps}")
        unknown = set(swap_for) - {"validate", "test", "predict"}
        if unknown:
            raise ValueError(f"EMA swap_for has unknown stages {sorted(unknown)}; use validate, test, predict")
        self.decay = float(decay)
        self.attribute = attribute
        self.every_n_steps = int(every_n_steps)
        self.warmup = bool(warmup)
        self.ema_dtype = ema_dtype
        self.swap_for = tuple(swap_for)
        self.num_updates = 0
        #: global_step of the last update: the guard against updating twice in one optimizer step
        #: under gradient accumulation, and against updating again right after a resume
        self.last_step = 0
        self._ema: Optional[Dict[str, torch.Tensor]] = None
        self._backup: Optional[Dict[str, torch.Tensor]] = None
        self._pending: Optional[dict] = None

    # -- parameters ---------------------------------------------------------------------------
    def _target(self, pl_module: LightningModule) -> nn.Module:
        if self.attribute is None:
            return pl_module
        module = pl_module
        for part in self.attribute.split("."):
            if not hasattr(module, part):
                raise AttributeError(f"EMA(attribute={self.attribute!r}): {type(pl_module).__name__} has no "
                                     f"attribute {self.attribute!r}; use attribute=None to average the whole module")
            module = getattr(module, part)
        if not isinstance(module, nn.Module):
            raise TypeError(f"EMA(attribute={self.attribute!r}) is a {type(module).__name__}, not an nn.Module")
        return module

    def _params(self, pl_module: LightningModule) -> Dict[str, torch.Tensor]:
        target = self._target(pl_module)
        _reshard_fsdp(target)
        params = dict(target.named_parameters())
        if self._ema is None:
            return {n: p for n, p in params.items() if p.requires_grad}
        missing = [n for n in self._ema if n not in params]
        if missing:
            raise KeyError(f"EMA: parameters {missing[:5]} are averaged but no longer in the module")
        return {n: params[n] for n in self._ema}

    @property
    def initialized(self) -> bool:
        """Whether the averages exist (after the first fit start or a checkpoint load)."""
        return self._ema is not None

    def _ensure_initialized(self, pl_module: LightningModule) -> None:
        if self._ema is None:
            params = self._params(pl_module)
            if not params:
                raise ValueError(f"EMA: {type(self._target(pl_module)).__name__} has no trainable parameters")
            # detach().clone() of a DTensor is a DTensor with the same mesh and placements.
            self._ema = {n: p.detach().clone().to(self.ema_dtype or p.dtype) for n, p in params.items()}
        else:
            # A checkpoint may have been restored before the strategy moved the model to its device.
            for n, p in self._params(pl_module).items():
                if not is_dtensor(p) and self._ema[n].device != p.device:
                    self._ema[n] = self._ema[n].to(p.device)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load_weights(pending)

    # -- update -------------------------------------------------------------------------------
    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, pl_module: LightningModule) -> None:
        """Move the averages one step towards the current parameters."""
        self._ensure_initialized(pl_module)
        params = self._params(pl_module)
        names = list(self._ema)
        emas = [self._ema[n] for n in names]
        # .to() returns the parameter itself when the dtypes already agree: no copy.
        srcs = [params[n].detach().to(self._ema[n].dtype) for n in names]
        weight = 1.0 - self.current_decay()
        try:
            torch._foreach_lerp_(emas, srcs, weight)
        except (RuntimeError, NotImplementedError, TypeError):
            # Mixed devices or a tensor subclass without a foreach kernel: one tensor at a time.
            for e, s in zip(emas, srcs):
                e.lerp_(s, weight)
        self.num_updates += 1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_initialized(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self.last_step:
            return  # no optimizer step since the last call (gradient accumulation)
        if step % self.every_n_steps == 0:
            self.update(pl_module)
        self.last_step = step

    # -- swapping -----------------------------------------------------------------------------
    @torch.no_grad()
    def swap_in(self, pl_module: LightningModule) -> bool:
        """Copy the averages into the module, keeping the training weights aside.

        Returns False (and does nothing) when there are no averages yet or they are already in.
        Copies rather than rebinding ``.data``, which keeps DTensor parameters intact; this holds
        one extra copy of the averaged parameters while swapped.
        """
        if self._backup is not None:
            return False
        if self._ema is None:
            if self._pending is None:
                return False
            self._ensure_initialized(pl_module)
        params = self._params(pl_module)
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(self._ema[n])
        return True

    @torch.no_grad()
    def swap_out(self, pl_module: LightningModule) -> None:
        """Put the training weights back after :meth:`swap_in`."""
        if self._backup is None:
            return
        for n, p in self._params(pl_module).items():
            p.copy_(self._backup[n])
        self._backup = None

    @contextlib.contextmanager
    def average_weights(self, pl_module: LightningModule) -> Iterator[nn.Module]:
        """Context manager: the module holds the averaged weights inside the block.

        Yields the averaged module (``pl_module.<attribute>``), e.g. to save it for export.
        """
        if self._ema is None and self._pending is None:
            raise RuntimeError("EMA.average_weights: no averages yet (train first or load a checkpoint)")
        swapped = self.swap_in(pl_module)
        try:
            yield self._target(pl_module)
        finally:
            if swapped:
                self.swap_out(pl_module)

    def ema_state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged parameters, ``name -> tensor``, names relative to the averaged module.

        Buffers and frozen parameters are not included (load with ``strict=False`` over the
        module's own state dict, or export inside :meth:`average_weights`).  DTensors stay
        DTensors; call ``.full_tensor()`` on them to gather.
        """
        if self._ema is None:
            raise RuntimeError("EMA.ema_state_dict: no averages yet (train first or load a checkpoint)")
        return {n: t.detach() for n, t in self._ema.items()}

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validate" in self.swap_for:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.swap_out(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test" in self.swap_for:
            self.swap_in(pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.swap_out(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "predict" in self.swap_for:
            self.swap_in(pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.swap_out(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.swap_out(pl_module)

    # -- checkpoints --------------------------------------------------------------------------
    def _state_dict_prefix(self) -> str:
        return "" if self.attribute is None else self.attribute + "."

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._ema is None:
            return
        state = {"decay": self.decay, "num_updates": self.num_updates, "last_step": self.last_step,
                 "attribute": self.attribute, "weights": None, "sharded_prefix": None}
        model_sd = checkpoint.get("state_dict")
        if self._backup is not None and isinstance(model_sd, dict):
            # Saved while the averages are swapped in: store the training weights as the model.
            prefix = self._state_dict_prefix()
            for n, t in self._backup.items():
                if prefix + n in model_sd:
                    model_sd[prefix + n] = t
        sharded = any(is_dtensor(t) for t in self._ema.values())
        if sharded and getattr(trainer.strategy, "_save_distributed_checkpoint", False) and isinstance(model_sd, dict):
            for n, t in self._ema.items():
                model_sd[SHARDED_PREFIX + n] = t
            state["sharded_prefix"] = SHARDED_PREFIX
        elif sharded:
            # full_tensor() is a collective: every rank runs on_save_checkpoint, so all take part.
            state["weights"] = {n: (t.full_tensor() if is_dtensor(t) else t).detach().cpu()
                                for n, t in self._ema.items()}
        else:
            state["weights"] = {n: t.detach().cpu() for n, t in self._ema.items()}
        checkpoint[EMA_KEY] = state

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(EMA_KEY)
        if state is None:
            return  # a checkpoint from a run without EMA: the averages start from the weights
        if state.get("attribute", self.attribute) != self.attribute:
            raise ValueError(f"checkpoint EMA averages {state.get('attribute')!r} but this EMA callback "
                             f"averages {self.attribute!r}")
        self.num_updates = int(state["num_updates"])
        self.last_step = int(state["last_step"])
        if state.get("sharded_prefix"):
            # The sharded averages can only be read into existing DTensors: initialize now (the
            # model is already sharded when a distributed checkpoint is restored).
            self._ensure_initialized(pl_module)
            self._load_sharded(trainer, state["sharded_prefix"])
        elif self._ema is not None:
            self._load_weights(state["weights"])
        else:
            # Single-device and DDP runs restore before the averages exist (before fit start):
            # keep the weights until the averages are created from the parameters.
            self._pending = state["weights"]

    @torch.no_grad()
    def _load_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        assert self._ema is not None
        missing = sorted(set(self._ema) - set(weights))
        unexpected = sorted(set(weights) - set(self._ema))
        if missing or unexpected:
            raise KeyError(f"checkpoint EMA weights do not match the averaged parameters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        for n, dst in self._ema.items():
            src = weights[n]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"checkpoint EMA weight {n} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            if is_dtensor(dst) and not is_dtensor(src):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(device=dst.device_mesh.device_type, dtype=dst.dtype),
                                        dst.device_mesh, dst.placements)
            dst.copy_(src)

    def _load_sharded(self, trainer: Trainer, prefix: str) -> None:
        import torch.distributed.checkpoint as dcp

        path = trainer.ckpt_path
        if path is None:
            raise RuntimeError("EMA: the checkpoint stores sharded averages but trainer.ckpt_path is not set")
        # Same nesting as Lightning's distributed save ({"state_dict": {...}}): DCP loads in place.
        target = {"state_dict": {prefix + n: t for n, t in self._ema.items()}}
        dcp.load(target, checkpoint_id=str(path))

    def state_dict(self) -> dict:
        # Everything lives in checkpoint["ema_state"] (see on_save_checkpoint).
        return {}

"""Bitwise visual autoregressive training: :class:`BitwiseVARModule`.

One training step::

    images (B, 3, H, W) in [-1, 1]          or batch["latents"] (B, d, h, w) pre-encoded
      -> tokenizer.encode_raw (frozen, fp32, no grad)
      -> the ScaleSchedule of the batch's aspect-ratio template (resolved once per template)
      -> Bitwise Self-Correction: teacher-forced inputs (B, L-1, d_tok), bit labels (B, L, d_tok)
      -> text features: batch["text_features"] (cached by the DataModule) or text_encoder(captions)
      -> transformer(text, inputs, schedule, cond_drop_mask) -> logits (B, L, 2 d_tok)
      -> bitwise cross entropy, token weights, sum over tokens, mean over the batch

Randomness (text dropout, flip probabilities and masks, and the global RNG used by drop-path)
comes from generators seeded by ``(seed, global_step, micro-batch, rank)``, so a run resumed from
a checkpoint draws exactly what the uninterrupted run would have drawn.

The module receives its networks ready-made and holds the step, the metrics and the optimiser
wiring; the recipe layer (:mod:`infinity_lightning.recipes`) builds everything from a recipe.
Bitwise Self-Correction is set by the :class:`~infinity_lightning.callbacks.SelfCorrectionSchedule`
callback (the attributes ``bsc_strength``, ``bsc_layers``, ``val_bsc_strength``, ``val_bsc_layers``;
all off by default).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from .. import scales as _scales
from ..errors import UserError
from ..models.text_encoder import TextFeatures
from ..sampling import SamplingConfig, generate
from ..self_correction import draw_flip_masks, teacher_forcing_inputs
from .losses import bit_accuracies, bitwise_cross_entropy, scale_token_weights
from .optim import OptimConfig, describe_groups, param_groups, trainer_max_steps

log = logging.getLogger(__name__)

__all__ = ["BitwiseVARModule", "derive_seed", "NonFiniteLossError"]

# random streams of a step (part of the derived seed)
_STREAM_GLOBAL, _STREAM_FLIP_P, _STREAM_FLIP_MASK, _STREAM_DROP = 0, 1, 2, 3
_VAL_STEP = -1  # stands for the step in validation seeds
#: Sampling settings of :meth:`BitwiseVARModule.log_images` unless given.
_LOG_SAMPLING = SamplingConfig(cfg=3.0, tau=0.5, top_k=900, top_p=0.97)


class NonFiniteLossError(UserError, RuntimeError):
    """Raised when more than ``max_nonfinite_steps`` steps had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``: well mixed, no collisions
    between nearby tuples such as (seed, step) and (seed, step + 1))."""
    words = [int(p) % (2 ** 32) for p in parts] + [len(parts)]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2 ** 32], dtype=np.uint64)) & np.uint64(2 ** 63 - 1))


def _as_template(value: Any, fallback_hw: Tuple[int, int]) -> float:
    if value is None:
        return _scales.nearest_template(fallback_hw[0] / fallback_hw[1])
    if torch.is_tensor(value):
        value = value.flatten()
        if value.numel() > 1 and not bool((value == value[0]).all()):
            raise ValueError("a batch mixes aspect-ratio templates; every batch must hold one template")
        value = value[0].item()
    elif isinstance(value, (list, tuple)):
        if len(set(float(v) for v in value)) > 1:
            raise ValueError("a batch mixes aspect-ratio templates; every batch must hold one template")
        value = value[0]
    return float(value)



# --------------------------------------------------------------------------------------------
# the LightningModule
# --------------------------------------------------------------------------------------------
class BitwiseVARModule(pl.LightningModule):
    """Training and validation of an Infinity transformer (bitwise VAR).

    Args:
        transformer: the :class:`~infinity_lightning.models.infinity.InfinityTransformer` to train
            (activation checkpointing, adapters etc. are applied to it beforehand).
        tokenizer: the frozen BSQ-VAE (kept in eval mode, no gradients); may be ``None`` when
            batches carry ``"latents"`` and no images are generated.
        text_encoder: frozen ``TextEncoder`` or any callable ``list[str] -> TextFeatures`` (or a
            list of (len_i, C) tensors); may be ``None`` when batches carry ``"text_features"``.
        resolution: the scale schedule, stated once: a pixel budget (``"0.06M"`` ... ``"1M"``), a
            pixel size, explicit grids or a :class:`~infinity_lightning.scales.ScaleSchedule`
            (see :func:`~infinity_lightning.scales.resolve`); each batch's aspect-ratio template
            picks its table.  ``None``: the template table up to each batch's latent grid.
        optim: the optimiser and LR schedule (:class:`~infinity_lightning.lit.optim.OptimConfig`).
        cond_drop_rate: probability of replacing a caption by the learned null condition in
            training (default: the transformer config's); never applied in validation.
        reweight_loss_by_scale: per-scale loss reweighting (see :func:`scale_token_weights`).
        label_smoothing, bitloss_type: see :func:`bitwise_cross_entropy`.
        seed: base of every per-step random stream.
        reseed_global_rng: seed torch's global RNG from (seed, step, rank) before every step, so
            drop-path and anything else using it repeats exactly after a resume.
        max_nonfinite_steps: raise :class:`NonFiniteLossError` once more steps than this had a
            non-finite loss or gradient (``None``: never).
        sampling: sampler settings of :meth:`log_images` (a :class:`SamplingConfig`).
        log_per_scale: log the bit accuracy of every scale.
        save_frozen_modules: keep the tokenizer and text encoder weights in checkpoints.
        parallelize_fn: ``fn(transformer, device_mesh)`` applied in :meth:`configure_model` when
            the strategy provides a device mesh (FSDP2 / tensor parallel).
        trainable_filter: ``fn(state_dict) -> state_dict`` applied to the transformer's entries of
            checkpoints (``transformer.*`` keys), to keep only what trains: with LoRA adapters
            ``functools.partial(lora.lora_checkpoint_filter, keep=<trained biases>)`` (the recipe
            layer sets it).  Loading fills the left-out weights from the live module
            (:func:`~infinity_lightning.lora.lora_checkpoint_restore`, which requires the same
            adapters on both sides).  ``None`` keeps the whole transformer.

    Gradient clipping is the Trainer's (``gradient_clip_val``).  Non-finite losses skip the step
    (``training_step`` returns ``None``, so the optimizer finds no gradients); non-finite
    gradients (finite loss) are dropped in :meth:`on_before_optimizer_step`.  Both are counted in
    ``nonfinite_steps`` (saved in checkpoints).  Under DDP every rank must skip together, which
    holds only when the non-finite value appears on all ranks; use ``max_nonfinite_steps`` to
    fail fast.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Optional[nn.Module] = None,
                 text_encoder: Optional[Callable[[List[str]], Any]] = None, *,
                 resolution: Optional[_scales.Resolution] = "0.06M", optim: Union[OptimConfig, Mapping, None] = None,
                 cond_drop_rate: Optional[float] = None, reweight_loss_by_scale: bool = False,
                 label_smoothing: float = 0.0, bitloss_type: str = "mean", seed: int = 0,
                 reseed_global_rng: bool = True, max_nonfinite_steps: Optional[int] = None,
                 sampling: Optional[SamplingConfig] = None, log_per_scale: bool = True,
                 save_frozen_modules: bool = False, parallelize_fn: Optional[Callable[[nn.Module, Any], None]] = None,
                 trainable_filter: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> None:
        super().__init__()
        self.optim = OptimConfig.from_dict(optim if optim is not None else {"lr": 1e-4})
        self.save_hyperparameters(ignore=["transformer", "tokenizer", "text_encoder", "parallelize_fn", "optim",
                                          "sampling", "trainable_filter"])
        if bitloss_type not in ("mean", "sum"):
            raise ValueError(f"bitloss_type {bitloss_type!r}; expected 'mean' or 'sum'")
        self.transformer = transformer
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()
        if isinstance(text_encoder, nn.Module):
            text_encoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder
        self.resolution = resolution if resolution is None or isinstance(resolution, (str, int, float)) else \
            _scales.resolve(resolution, patchify=self.patchify)
        if isinstance(resolution, (int, float)) and not isinstance(resolution, bool) and tokenizer is None:
            raise ValueError("a pixel-size resolution needs the tokenizer (its stride turns pixels into tokens); "
                             "give a pixel budget such as '0.06M' or explicit grids instead")
        self.cond_drop_rate = float(transformer.config.cond_drop_rate if cond_drop_rate is None else cond_drop_rate)
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        self.sampling = sampling or _LOG_SAMPLING
        self.trainable_filter = trainable_filter
        #: Bitwise Self-Correction (set by the SelfCorrectionSchedule callback)
        self.bsc_strength, self.bsc_layers = 0.0, 0
        self.val_bsc_strength, self.val_bsc_layers = 0.0, 0
        self.nonfinite_steps = 0
        self.parallelize_fn = parallelize_fn
        self._parallelized = False
        self._weights_cache: Dict[Tuple[_scales.ScaleSchedule, str], torch.Tensor] = {}
        self._last_schedule: Dict[float, _scales.ScaleSchedule] = {}

    # -- structure ---------------------------------------------------------------------------
    @property
    def patchify(self) -> bool:
        return bool(self.transformer.config.apply_spatial_patchify)

    def train(self, mode: bool = True) -> "BitwiseVARModule":
        """Switch the transformer's mode; the frozen tokenizer and text encoder stay in eval."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        if isinstance(self.text_encoder, nn.Module):
            self.text_encoder.eval()
        return self

    def configure_model(self) -> None:
        """Apply ``parallelize_fn(transformer, device_mesh)`` once when the strategy has a mesh."""
        if self.parallelize_fn is None or self._parallelized:
            return
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        self.parallelize_fn(self.transformer, mesh)
        self._parallelized = True

    # -- schedules ---------------------------------------------------------------------------
    def schedule_for(self, template: float, latent_grid: Optional[Tuple[int, int]] = None) -> _scales.ScaleSchedule:
        """The :class:`ScaleSchedule` of an aspect-ratio template (from ``resolution``; with
        ``resolution=None`` the template table up to ``latent_grid``, the tokenizer-side grid)."""
        if self.resolution is None:
            if latent_grid is None:
                t = _scales.nearest_template(template)
                if t in self._last_schedule:
                    return self._last_schedule[t]
                raise ValueError("no scale schedule: set the module's resolution (a pixel budget, a pixel size "
                                 "or explicit grids)")
            return _scales.latent_schedule(latent_grid[0], latent_grid[1], "template", self.patchify)
        stride = self.tokenizer.config.image_stride if self.tokenizer is not None else 16
        return _scales.resolve(self.resolution, template, token_stride=stride, patchify=self.patchify)

    def token_weights(self, schedule: _scales.ScaleSchedule) -> torch.Tensor:
        key = (schedule, str(self.device))
        w = self._weights_cache.get(key)
        if w is None:
            w = scale_token_weights(schedule, bool(self.hparams.reweight_loss_by_scale), self.device)
            self._weights_cache[key] = w
        return w

    # -- inputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw tokenizer features (B, d, h, w) fp32 of images in [-1, 1] (frozen, no autocast)."""
        if self.tokenizer is None:
            raise ValueError("batches carry images but the module has no tokenizer; pass one, or pre-encode "
                             "the images (infinity_lightning.datamodules.precompute_latents) and train on 'latents'")
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.tokenizer.encode_raw(images.float())

    def text_features(self, batch: Mapping[str, Any]) -> TextFeatures:
        """Packed text features of the batch: its ``text_features`` or the text encoder's."""
        feats = batch.get("text_features")
        if feats is None:
            if self.text_encoder is None:
                raise ValueError("the batch has no 'text_features' and the module has no text_encoder")
            encode = getattr(self.text_encoder, "encode", self.text_encoder)
            feats = encode(list(batch["captions"]))
        if not isinstance(feats, TextFeatures):
            feats = TextFeatures.pack([t.float() for t in feats])
        want = int(self.transformer.config.text_channels)
        if feats.width != want:
            raise ValueError(f"text features have width {feats.width} but the transformer expects {want} "
                             "(model.text_encoder does not match the transformer's text_channels)")
        return feats.to(self.device, torch.float32)

    def _generator(self, device: Union[str, torch.device], *parts: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(int(self.hparams.seed), *parts))
        return g

    def _step_parts(self, stage: str, batch_idx: int) -> Tuple[int, ...]:
        if stage == "train":
            accumulate = max(int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1), 1) if self._trainer else 1
            return (self.global_step, batch_idx % accumulate, self.global_rank)
        return (_VAL_STEP, batch_idx, self.global_rank)

    # -- the step ----------------------------------------------------------------------------
    def _batch_schedule(self, batch: Mapping[str, Any], raw: torch.Tensor) -> _scales.ScaleSchedule:
        h, w = raw.shape[-2:]
        template = _as_template(batch.get("h_div_w_template"), (h, w))
        schedule = self.schedule_for(template, (h, w))
        if tuple(schedule.tokenizer_side.last_grid) != (h, w):
            raise ValueError(f"the latent grid is {h}x{w} but the scale schedule ends at "
                             f"{schedule.tokenizer_side.last_grid} (template {template}); the data's image size must "
                             "come from the same resolution as the module's")
        self._last_schedule[_scales.nearest_template(template)] = schedule
        return schedule

    def compute_loss(self, batch: Mapping[str, Any], stage: str = "train", batch_idx: int = 0) -> Dict[str, Any]:
        """Loss and metrics of one batch (``stage``: ``"train"`` draws flips and text dropout,
        anything else uses the validation flips and no dropout)."""
        training = stage == "train"
        latents = batch.get("latents")
        raw = latents.to(self.device, torch.float32) if latents is not None else self.encode_images(batch["images"])
        B, d = raw.shape[:2]
        schedule = self._batch_schedule(batch, raw)
        parts = self._step_parts(stage, batch_idx)
        strength = self.bsc_strength if training else float(self.val_bsc_strength)
        layers = self.bsc_layers if training else int(self.val_bsc_layers)
        masks = None
        if layers > 0 and strength > 0:
            masks = draw_flip_masks(schedule.tokenizer_side, B, d, layers, strength,
                                    self._generator("cpu", *parts, _STREAM_FLIP_P),
                                    self._generator(raw.device, *parts, _STREAM_FLIP_MASK), raw.device)
        tf = teacher_forcing_inputs(raw, schedule.tokenizer_side, patchify=self.patchify, flip_masks=masks)
        text = self.text_features(batch)
        drop = None
        if training and self.cond_drop_rate > 0:
            g = self._generator("cpu", *parts, _STREAM_DROP)
            drop = (torch.rand(B, generator=g) < self.cond_drop_rate).to(self.device)
        logits = self.transformer(text, tf.inputs, schedule, cond_drop_mask=drop)
        loss, _ = bitwise_cross_entropy(logits, tf.labels, self.token_weights(schedule),
                                        float(self.hparams.label_smoothing), self.hparams.bitloss_type)
        out = {"loss": loss, "schedule": schedule, "batch_size": B, "dropped": 0 if drop is None else int(drop.sum())}
        out.update(bit_accuracies(logits, tf.labels, schedule))
        return out

    def _log_metrics(self, out: Dict[str, Any], stage: str) -> None:
        on_step, on_epoch = (True, False) if stage == "train" else (False, True)
        kw = dict(on_step=on_step, on_epoch=on_epoch, batch_size=out["batch_size"], sync_dist=stage != "train")
        self.log(f"{stage}/loss", out["loss"].detach(), prog_bar=True, **kw)
        self.log(f"{stage}/acc", out["acc"], prog_bar=True, **kw)
        self.log(f"{stage}/token_acc", out["token_acc"], **kw)
        if self.hparams.log_per_scale:
            for k, a in enumerate(out["acc_scale"]):
                self.log(f"{stage}/acc_scale{k}", a, **kw)

    def _sync_data_epoch(self) -> None:
        # The data order of an epoch is a function of the epoch number, so a resumed run sees the
        # same batches as the uninterrupted one (DataModules with set_epoch).  A checkpoint taken
        # at the end of an epoch resumes into the next epoch without on_train_epoch_start, hence
        # the call from on_train_start too.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "set_epoch", None)):
            dm.set_epoch(self.trainer.current_epoch)

    def on_train_start(self) -> None:
        self._sync_data_epoch()

    def on_train_epoch_start(self) -> None:
        self._sync_data_epoch()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.reseed_global_rng:
            torch.manual_seed(derive_seed(int(self.hparams.seed), *self._step_parts("train", batch_idx), _STREAM_GLOBAL))
        if self.optim.weight_decay_end is not None and self._trainer is not None:
            wd = self.optim.weight_decay_at(self.global_step, trainer_max_steps(self._trainer))
            for opt in self.trainer.optimizers:
                for g in opt.param_groups:
                    g["weight_decay"] = wd * float(g.get("wd_scale", 1.0))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Optional[torch.Tensor]:
        out = self.compute_loss(batch, "train", batch_idx)
        if not bool(torch.isfinite(out["loss"])):
            self._count_nonfinite("loss", float(out["loss"].detach()))
            return None
        self._log_metrics(out, "train")
        self.log("train/text_dropped", float(out["dropped"]), on_step=True, batch_size=out["batch_size"])
        return out["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch, "val", batch_idx)
        self._log_metrics(out, "val")
        return out["loss"]

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch, "test", batch_idx)
        self._log_metrics(out, "test")
        return out["loss"]

    # -- non-finite values -------------------------------------------------------------------
    def _count_nonfinite(self, what: str, value: float) -> None:
        self.nonfinite_steps += 1
        log.warning("step %d: non-finite %s (%s); the step is skipped (%d so far)", self.global_step, what, value,
                    self.nonfinite_steps)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, batch_size=1)
        limit = self.hparams.max_nonfinite_steps
        if limit is not None and self.nonfinite_steps > int(limit):
            raise NonFiniteLossError(
                f"{self.nonfinite_steps} steps had a non-finite {what} (limit module.max_nonfinite_steps={limit}); "
                "lower the learning rate, check the data, or use precision='bf16-mixed' instead of '16-mixed'")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.transformer.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if not bool(torch.isfinite(norm)):
            for p in self.transformer.parameters():
                p.grad = None  # AdamW skips parameters without gradients: no update this step
            self._count_nonfinite("gradient norm", float(norm))
            return
        self.log("train/grad_norm", norm, on_step=True, batch_size=1)

    # -- optimizer ---------------------------------------------------------------------------
    def global_batch_size(self) -> Optional[int]:
        """Samples per optimizer step over all ranks (for the ``tblr`` rule), when known."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        local = getattr(dm, "batch_size", None)
        if local is None:
            return None
        world = int(getattr(self._trainer, "world_size", 1) or 1)
        accumulate = int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1)
        return int(local) * world * accumulate

    def learning_rate(self) -> float:
        """The base LR: ``optim.lr``, or ``optim.tblr * global_batch / 256``."""
        return self.optim.base_lr(self.global_batch_size())

    def configure_optimizers(self):
        groups = param_groups(self.transformer, float(self.optim.weight_decay))
        self.param_group_sizes = describe_groups(groups)
        lr = self.learning_rate()
        log.info("optimizer %s, lr %.3g, parameter groups %s", self.optim.optimizer, lr, self.param_group_sizes)
        opt, sched = self.optim.build(groups, lr, trainer_max_steps(self._trainer))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1,
                                                   "name": "lr"}}

    # -- checkpoints -------------------------------------------------------------------------
    _FROZEN = ("tokenizer.", "text_encoder.")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        self._fix_data_epoch(checkpoint)
        sd = checkpoint.get("state_dict")
        if not isinstance(sd, dict):
            return
        if not self.hparams.save_frozen_modules:
            for k in [k for k in sd if k.startswith(self._FROZEN)]:
                del sd[k]
        if self.trainable_filter is not None:
            kept = self.trainable_filter({k: v for k, v in sd.items() if k.startswith("transformer.")})
            checkpoint["state_dict"] = {**{k: v for k, v in sd.items() if not k.startswith("transformer.")}, **kept}

    def _fix_data_epoch(self, checkpoint: Dict[str, Any]) -> None:
        # A checkpoint written after the last batch of an epoch resumes into the next epoch, and
        # Lightning creates that epoch's data iterator before any epoch hook runs; so the
        # DataModule state saved here must already name the next epoch.
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        state = checkpoint.get(type(dm).__qualname__) if dm is not None else None
        if not isinstance(state, dict) or "epoch" not in state:
            return
        try:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
        except (AttributeError, TypeError):
            return
        state["epoch"] = int(trainer.current_epoch) + (1 if done else 0)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        sd = checkpoint.get("state_dict")
        if not isinstance(sd, dict):
            return  # sharded (FSDP2) checkpoints were loaded by the strategy already
        # Checkpoints may hold only what is trained: everything else keeps the weights it has.
        current = super().state_dict()
        for k, v in current.items():
            if k.startswith(self._FROZEN) and k not in sd:
                sd[k] = v
        if self.trainable_filter is not None:
            from ..lora import lora_checkpoint_restore

            prefix = "transformer."
            saved = {k: v for k, v in sd.items() if k.startswith(prefix)}
            live = {k: v for k, v in current.items() if k.startswith(prefix)}
            sd.update(lora_checkpoint_restore(saved, live))

    # -- export ------------------------------------------------------------------------------
    def export(self, out_dir: Union[str, os.PathLike]) -> List[Path]:
        """Write the trained weights for inference into ``out_dir`` (the LoRA adapter as
        ``lora/``, else ``transformer.safetensors``); see :func:`infinity_lightning.parallel.export_trained`."""
        from ..parallel import export_trained

        return export_trained(self.transformer, out_dir)

    # -- sample images -----------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, prompts: Sequence[str] = (), seeds: Optional[Sequence[int]] = None,
                   aspect_ratio: float = 1.0, **sampling: Any) -> Dict[str, torch.Tensor]:
        """``{"samples": (B, 3, H, W) in [0, 1]}``: one image per prompt, each from its own seed
        (for :class:`~infinity_lightning.callbacks.SampleLogger`); ``sampling`` overrides fields
        of the module's :class:`SamplingConfig`."""
        if self.tokenizer is None:
            raise ValueError("generating images needs a tokenizer")
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        schedule = self.schedule_for(aspect_ratio)
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            text = self.text_features({"captions": prompts})
            out = generate(self.transformer, text, schedule, self.sampling.replace(**sampling),
                           tokenizer=self.tokenizer, seed=seeds)
        finally:
            self.transformer.train(was_training)
        return {"samples": ((out.images.float() + 1) / 2).clamp(0, 1)}

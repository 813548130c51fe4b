"""Bitwise visual autoregressive training: :class:`BitwiseVARModule` (spec 3, 4.1, 4.2).

One training step::

    images (B, 3, H, W) in [-1, 1]          or batch["latents"] (B, d, h, w) pre-encoded
      -> tokenizer.encode_raw (frozen, fp32, no grad)
      -> scale schedule of the batch's aspect-ratio template
      -> Bitwise Self-Correction: teacher-forced inputs (B, L-1, d_tok), bit labels (B, L, d_tok)
      -> text features: text_encoder(captions) or batch["text_features"] (cached)
      -> transformer(text, inputs, schedule, cond_drop_mask) -> logits (B, L, 2 d_tok)
      -> bitwise cross entropy, token weights, sum over tokens, mean over the batch

Randomness (text dropout, flip probabilities and masks, and the global RNG used by drop-path)
comes from generators seeded by ``(seed, global_step, micro-batch, rank)``, so a run resumed from
a checkpoint draws exactly what the uninterrupted run would have drawn.

The module receives its networks ready-made (``transformer``, ``tokenizer``, ``text_encoder``);
:func:`infinity_lightning.lit.build.build_var_training` makes them from a recipe.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import scales as _scales
from ..models.text_encoder import TextFeatures
from ..self_correction import flip_probability, teacher_forcing_inputs
from . import optim as _optim

log = logging.getLogger(__name__)

Schedule = List[Tuple[int, int, int]]

__all__ = [
    "BitwiseVARModule",
    "bitwise_cross_entropy",
    "bit_accuracies",
    "scale_token_weights",
    "schedule_to_grid",
    "draw_flip_masks",
    "derive_seed",
    "precompute_latents",
    "LatentsDataModule",
    "NonFiniteLossError",
]

# random streams of a step (part of the derived seed)
_STREAM_GLOBAL, _STREAM_FLIP_P, _STREAM_FLIP_MASK, _STREAM_DROP = 0, 1, 2, 3
_VAL_STEP = -1  # stands for the step in validation seeds


class NonFiniteLossError(RuntimeError):
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


def schedule_to_grid(template: float, h: int, w: int) -> Schedule:
    """The template's scale table up to the token grid ``(h, w)``: ``[(1, h_k, w_k), ...]``.

    Used when no pixel budget is configured (small images such as the 64 px quick start give a
    schedule that is a prefix of a template table but ends at no budget's last step).
    """
    t = _scales.nearest_template(float(template))
    table = _scales.TEMPLATES[t]
    for i, grid in enumerate(table):
        if grid == (int(h), int(w)):
            return [(1, gh, gw) for gh, gw in table[: i + 1]]
    for ratio, table in _scales.TEMPLATES.items():  # e.g. a square grid bucketed under another template
        for i, grid in enumerate(table):
            if grid == (int(h), int(w)):
                return [(1, gh, gw) for gh, gw in table[: i + 1]]
    raise ValueError(f"no aspect-ratio template has the token grid {h}x{w}; choose an image size whose token "
                     f"grid is in a template table (template {t}: {table}) or set module.scale_schedule")


def scale_token_weights(schedule: Sequence[Sequence[int]], reweight: bool, device=None) -> torch.Tensor:
    """Per-token loss weights (L,), summing to 1 (spec 4.2).

    ``reweight=False``: 1/L each.  ``reweight=True``: tokens of scale k weigh
    ``1 / sqrt(h_k w_k)`` before normalisation, so scale k's total weight is
    ``sqrt(h_k w_k) / sum_j sqrt(h_j w_j)`` (coarse scales count more than their token share).
    """
    sizes = [int(h) * int(w) for _, h, w in schedule]
    L = sum(sizes)
    if not reweight:
        return torch.full((L,), 1.0 / L, dtype=torch.float32, device=device)
    total = sum(math.sqrt(n) for n in sizes)
    per_scale = [1.0 / (math.sqrt(n) * total) for n in sizes]
    return torch.cat([torch.full((n,), w, dtype=torch.float32) for n, w in zip(sizes, per_scale)]).to(device)


def bitwise_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
                          label_smoothing: float = 0.0, bitloss_type: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """Bitwise CE of spec 4.2: a 2-way softmax per bit.

    logits (B, L, 2 d) with ``logits[..., 2b + c]`` = logit of bit b == c; labels (B, L, d) in
    {0, 1}; token_weights (L,).  Returns ``(loss scalar, per-token loss (B, L))``: per token the
    mean (or sum) over bits, then ``sum_t w_t * loss_t`` per sample, then the batch mean.
    Computed in fp32.
    """
    B, L, d = labels.shape
    z = logits.float().reshape(B * L * d, 2)
    ce = F.cross_entropy(z, labels.reshape(-1).long(), label_smoothing=label_smoothing, reduction="none")
    ce = ce.view(B, L, d)
    if bitloss_type == "mean":
        per_token = ce.mean(-1)
    elif bitloss_type == "sum":
        per_token = ce.sum(-1)
    else:
        raise ValueError(f"bitloss_type {bitloss_type!r}; expected 'mean' or 'sum'")
    loss = (per_token * token_weights.to(per_token)).sum(1).mean(0)
    return loss, per_token


@torch.no_grad()
def bit_accuracies(logits: torch.Tensor, labels: torch.Tensor, schedule: Sequence[Sequence[int]]
                   ) -> Dict[str, Any]:
    """``{"acc": bit accuracy, "token_acc": all bits of a token right, "acc_scale": [per scale]}``."""
    B, L, d = labels.shape
    z = logits.detach().float().view(B, L, d, 2)
    correct = (z[..., 1] > z[..., 0]).to(labels.dtype) == labels
    sizes = [int(h) * int(w) for _, h, w in schedule]
    return {
        "acc": correct.float().mean(),
        "token_acc": correct.all(-1).float().mean(),
        "acc_scale": [c.float().mean() for c in correct.split(sizes, dim=1)],
    }


def draw_flip_masks(vae_schedule: Sequence[Sequence[int]], batch_size: int, bits: int, layers: int,
                    strength: float, p_generator: torch.Generator, mask_generator: torch.Generator,
                    device: Union[str, torch.device]) -> List[torch.Tensor]:
    """Bitwise Self-Correction flip masks for scales ``0 .. layers-1`` (spec 3).

    Per scale one probability ``p ~ U{0, 0.01, ..., strength}`` (from ``p_generator``, CPU),
    then i.i.d. Bernoulli(p) bits of shape (B, 1, h_k, w_k, d) in VAE layout (from
    ``mask_generator`` on ``device``).  Passing the masks to ``teacher_forcing_inputs`` works
    on every device, whatever device the generator lives on.
    """
    masks = []
    for k in range(min(int(layers), len(vae_schedule))):
        _, h, w = vae_schedule[k]
        p = flip_probability(strength, p_generator)
        shape = (batch_size, 1, int(h), int(w), bits)
        masks.append(torch.rand(shape, generator=mask_generator, device=device) < p)
    return masks


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


def _normalise_schedules(value: Any) -> Optional[Dict[Optional[float], Schedule]]:
    """``scale_schedule`` hyper-parameter -> {template or None (all templates): schedule}."""
    if value is None:
        return None

    def one(s: Any) -> Schedule:
        out = []
        for g in s:
            g = [int(x) for x in g]
            if len(g) == 2:
                g = [1] + g
            if len(g) != 3:
                raise ValueError(f"scale_schedule entries are (h, w) or (1, h, w), got {g}")
            out.append((g[0], g[1], g[2]))
        _scales.resolve(out)  # RoPE positions exist only for table schedules
        return out

    if isinstance(value, Mapping):
        return {float(k): one(v) for k, v in value.items()}
    return {None: one(value)}


# --------------------------------------------------------------------------------------------
# the LightningModule
# --------------------------------------------------------------------------------------------
class BitwiseVARModule(pl.LightningModule):
    """Training, validation and prediction of an Infinity transformer (bitwise VAR).

    Args:
        transformer: the :class:`~infinity_lightning.models.infinity.InfinityTransformer` to train.
        tokenizer: the frozen BSQ-VAE (kept in eval mode, no gradients); may be ``None`` when
            batches carry ``"latents"`` and no images are generated.
        text_encoder: frozen ``TextEncoder`` or any callable ``list[str] -> TextFeatures`` (or a
            list of (len_i, C) tensors); may be ``None`` when batches carry ``"text_features"``.
        pn: pixel budget of the scale schedules (``"0.06M"`` ... ``"1M"``); ``None`` takes the
            template table up to the latent grid of the batch (small images).
        scale_schedule: explicit schedule ``[(1, h, w), ...]`` for every batch, or a dict
            ``{template: schedule}``; wins over ``pn``.
        image_size: square pixel size for generation when ``pn`` is ``None`` and no explicit
            schedule is given.
        lr: learning rate; or ``tblr`` (LR per 256 samples, the original's rule
            ``lr = tblr * global_batch / 256``; ``global_batch_size`` defaults to
            batch size x world size x gradient accumulation).
        betas, eps, weight_decay, weight_decay_end: AdamW settings; the D group decays with
            ``weight_decay`` (cosine to ``weight_decay_end`` when given), the ND group not at
            all (:mod:`infinity_lightning.lit.optim`).
        optimizer: ``"adamw"`` or ``"adamw8bit"`` (bitsandbytes); ``fused``: torch AdamW flag.
        lr_schedule, warmup_steps, warmup_start_factor, final_lr_factor, max_steps: LR schedule
            (``"constant"``, ``"lin0"``, ``"cosine"``), stepped once per optimizer step;
            ``max_steps`` defaults to the trainer's.
        cond_drop_rate: probability of replacing a caption by the learned null condition in
            training (default: the transformer config's); never applied in validation.
        bsc_strength, bsc_layers: Bitwise Self-Correction in training (the
            :class:`~infinity_lightning.callbacks.SelfCorrectionSchedule` callback overwrites the
            attributes of the same names every step); ``val_bsc_strength``, ``val_bsc_layers``
            the same in validation (default off; the original's validation script used 0.2).
        reweight_loss_by_scale: per-scale loss reweighting (see :func:`scale_token_weights`).
        label_smoothing, bitloss_type: see :func:`bitwise_cross_entropy`.
        activation_checkpointing: ``None``, ``"full-block"`` or ``"self-attn"``.
        seed: base of every per-step random stream.
        reseed_global_rng: seed torch's global RNG from (seed, step, rank) before every step, so
            drop-path and anything else using it repeats exactly after a resume.
        max_nonfinite_steps: raise :class:`NonFiniteLossError` once more steps than this had a
            non-finite loss or gradient (``None``: never).
        cache_text_features: memoise the text encoder's features per caption (see
            :meth:`text_features`).
        sample_kwargs: defaults for :meth:`generate_images` (``cfg``, ``tau``, ``top_k``,
            ``top_p``, ``h_div_w``).
        save_frozen_modules: keep the tokenizer and text encoder weights in checkpoints (off:
            checkpoints hold the transformer only and loading takes the frozen weights from the
            module).
        parallelize_fn: ``fn(transformer, device_mesh)`` applied in :meth:`configure_model` when
            the strategy provides a device mesh (FSDP2 / tensor parallel).

    Gradient clipping is the Trainer's (``gradient_clip_val=5``, norm), as the original's
    ``tclip``.  Non-finite losses skip the step: ``training_step`` returns ``None``, which makes
    Lightning's automatic optimization skip the backward; the optimizer then finds no
    gradients and changes nothing.  Non-finite gradients (finite loss) are dropped in
    :meth:`on_before_optimizer_step`.  Both are counted in ``nonfinite_steps`` (saved in
    checkpoints).  Under DDP every rank must skip together, which holds only when the
    non-finite value appears on all ranks; use ``max_nonfinite_steps`` to fail fast.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Optional[nn.Module] = None,
                 text_encoder: Optional[Callable[[List[str]], Any]] = None, *,
                 pn: Optional[str] = "0.06M", scale_schedule: Any = None, image_size: Optional[int] = None,
                 lr: Optional[float] = None, tblr: Optional[float] = None, global_batch_size: Optional[int] = None,
                 betas: Sequence[float] = (0.9, 0.97), eps: float = 1e-8, weight_decay: float = 0.005,
                 weight_decay_end: Optional[float] = None, optimizer: str = "adamw", fused: Optional[bool] = None,
                 lr_schedule: str = "constant", warmup_steps: int = 0, warmup_start_factor: float = 0.005,
                 final_lr_factor: float = 0.3, max_steps: Optional[int] = None,
                 cond_drop_rate: Optional[float] = None, bsc_strength: float = 0.0, bsc_layers: int = 0,
                 val_bsc_strength: float = 0.0, val_bsc_layers: int = 0, reweight_loss_by_scale: bool = False,
                 label_smoothing: float = 0.0, bitloss_type: str = "mean",
                 activation_checkpointing: Optional[str] = None, seed: int = 0, reseed_global_rng: bool = True,
                 max_nonfinite_steps: Optional[int] = None, sample_kwargs: Optional[Mapping[str, Any]] = None,
                 log_per_scale: bool = True, cache_text_features: bool = False, save_frozen_modules: bool = False,
                 parallelize_fn: Optional[Callable[[nn.Module, Any], None]] = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["transformer", "tokenizer", "text_encoder", "parallelize_fn"])
        if (lr is None) == (tblr is None):
            raise ValueError("BitwiseVARModule needs exactly one of lr (absolute) or tblr (per 256 samples)")
        if optimizer not in _optim.OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r}; expected one of {_optim.OPTIMIZERS}")
        if lr_schedule not in _optim.LR_SCHEDULES:
            raise ValueError(f"lr_schedule {lr_schedule!r}; expected one of {_optim.LR_SCHEDULES}")
        if bitloss_type not in ("mean", "sum"):
            raise ValueError(f"bitloss_type {bitloss_type!r}; expected 'mean' or 'sum'")
        if pn is not None:
            _scales.check_budget(pn)
        self.transformer = transformer
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()
        if isinstance(text_encoder, nn.Module):
            text_encoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder
        self.schedules = _normalise_schedules(scale_schedule)
        self.cond_drop_rate = float(transformer.config.cond_drop_rate if cond_drop_rate is None else cond_drop_rate)
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        self.bsc_strength = float(bsc_strength)
        self.bsc_layers = int(bsc_layers)
        self.nonfinite_steps = 0
        self.parallelize_fn = parallelize_fn
        self._parallelized = False
        self._weights_cache: Dict[Tuple[Tuple[int, int, int], ...], torch.Tensor] = {}
        self._last_schedule: Dict[float, Schedule] = {}
        self._text_cache: Dict[str, torch.Tensor] = {}
        transformer.set_activation_checkpointing(activation_checkpointing)
        defaults = {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97, "h_div_w": 1.0}
        unknown = set(sample_kwargs or {}) - set(defaults) - {"gumbel", "cfg_insertion_layer"}
        if unknown:
            raise ValueError(f"sample_kwargs has unknown key(s) {sorted(unknown)}; known: {sorted(defaults)}")
        self.sample_kwargs = {**defaults, **dict(sample_kwargs or {})}

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
    def scale_schedule_for(self, template: float, token_hw: Optional[Tuple[int, int]] = None) -> Schedule:
        """Token-side schedule of a template: explicit > pixel budget > table up to ``token_hw``."""
        if self.schedules is not None:
            if None in self.schedules:
                return list(self.schedules[None])
            t = _scales.nearest_template(template)
            for k, v in self.schedules.items():
                if abs(k - t) < 1e-6:
                    return list(v)
            raise ValueError(f"module.scale_schedule has no schedule for template {t} (has {sorted(self.schedules)})")
        if self.hparams.pn is not None:
            return _scales.resolve(self.hparams.pn, template)
        if token_hw is None:
            size = self.hparams.image_size
            t = _scales.nearest_template(template)
            if size is None:
                if t in self._last_schedule:
                    return list(self._last_schedule[t])
                raise ValueError("no scale schedule: set module.pn, module.scale_schedule or module.image_size")
            stride = self._token_stride()
            token_hw = (int(size) // stride, int(size) // stride)
        return schedule_to_grid(template, *token_hw)

    def _token_stride(self) -> int:
        if self.tokenizer is None:
            raise ValueError("generation needs a tokenizer")
        return int(self.tokenizer.config.patch_size) * (2 if self.patchify else 1)

    def token_weights(self, schedule: Schedule) -> torch.Tensor:
        key = tuple(tuple(int(x) for x in g) for g in schedule)
        w = self._weights_cache.get(key)
        if w is None or w.device != self.device:
            w = scale_token_weights(schedule, bool(self.hparams.reweight_loss_by_scale), self.device)
            self._weights_cache[key] = w
        return w

    # -- inputs ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw tokenizer features (B, d, h, w) fp32 of images in [-1, 1] (frozen, no autocast)."""
        if self.tokenizer is None:
            raise ValueError("batches carry images but the module has no tokenizer; pass one, or pre-encode "
                             "the images with precompute_latents and train on 'latents'")
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.tokenizer.encode_raw(images.float())

    def text_features(self, batch: Mapping[str, Any]) -> TextFeatures:
        """Packed text features of the batch: cached ``text_features`` or the text encoder's.

        With ``cache_text_features`` the encoder's output is memoised per caption (in memory,
        CPU): worth it for small caption sets such as the shapes grammar.
        """
        if batch.get("text_features") is not None:
            feats = batch["text_features"]
            feats = feats if isinstance(feats, TextFeatures) else TextFeatures.pack([t.float() for t in feats])
        else:
            if self.text_encoder is None:
                raise ValueError("the batch has no 'text_features' and the module has no text_encoder")
            captions = list(batch["captions"])
            if self.hparams.cache_text_features:
                todo = sorted({c for c in captions if c not in self._text_cache})
                if todo:
                    for c, rows in zip(todo, self._encode(todo).split()):
                        self._text_cache[c] = rows.detach().float().cpu().clone()
                feats = TextFeatures.pack([self._text_cache[c] for c in captions])
            else:
                feats = self._encode(captions)
        want = int(self.transformer.config.text_channels)
        if feats.width != want:
            raise ValueError(f"text features have width {feats.width} but the transformer expects {want} "
                             "(model.text_encoder does not match the transformer's text_channels)")
        return feats.to(self.device, torch.float32)

    def _encode(self, captions: List[str]) -> TextFeatures:
        encode = getattr(self.text_encoder, "encode", self.text_encoder)
        feats = encode(captions)
        return feats if isinstance(feats, TextFeatures) else TextFeatures.pack(list(feats))

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
    def compute_loss(self, batch: Mapping[str, Any], stage: str = "train", batch_idx: int = 0) -> Dict[str, Any]:
        """Loss and metrics of one batch (``stage``: ``"train"`` draws flips and text dropout,
        anything else uses the validation flips and no dropout)."""
        training = stage == "train"
        if batch.get("latents") is not None:
            raw = batch["latents"].to(self.device, torch.float32)
        else:
            raw = self.encode_images(batch["images"])
        B, d, h, w = raw.shape
        template = _as_template(batch.get("h_div_w_template"), (h, w))
        token_hw = (h // 2, w // 2) if self.patchify else (h, w)
        schedule = self.scale_schedule_for(template, token_hw)
        vae_schedule = _scales.as_schedule(schedule, self.patchify).tokenizer_side
        if tuple(vae_schedule[-1][1:]) != (h, w):
            raise ValueError(f"the latent grid is {h}x{w} but the scale schedule ends at {vae_schedule[-1][1:]} "
                             f"(template {template}); make data.image_size / module.pn / module.scale_schedule agree")
        self._last_schedule[_scales.nearest_template(template)] = schedule
        parts = self._step_parts(stage, batch_idx)
        strength = self.bsc_strength if training else float(self.hparams.val_bsc_strength)
        layers = self.bsc_layers if training else int(self.hparams.val_bsc_layers)
        masks = None
        if layers > 0 and strength > 0:
            masks = draw_flip_masks(vae_schedule, B, d, layers, strength,
                                    self._generator("cpu", *parts, _STREAM_FLIP_P),
                                    self._generator(raw.device, *parts, _STREAM_FLIP_MASK), raw.device)
        tf = teacher_forcing_inputs(raw, vae_schedule, patchify=self.patchify, flip_masks=masks)
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
        # the call from on_train_start too.  (A checkpoint taken in the middle of an epoch
        # restarts that epoch's data from its first batch unless the DataModule's loader is
        # stateful.)
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
        if self.hparams.weight_decay_end is not None and self._trainer is not None:
            wd = _optim.weight_decay_at(self.global_step, float(self.hparams.weight_decay),
                                        float(self.hparams.weight_decay_end), self._max_steps())
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
    def _max_steps(self) -> Optional[int]:
        if self.hparams.max_steps:
            return int(self.hparams.max_steps)
        steps = getattr(self._trainer, "max_steps", -1) if self._trainer is not None else -1
        if steps and steps > 0:
            return int(steps)
        est = getattr(self._trainer, "estimated_stepping_batches", None) if self._trainer is not None else None
        return int(est) if est and math.isfinite(est) else None

    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks (for the ``tblr`` rule)."""
        if self.hparams.global_batch_size:
            return int(self.hparams.global_batch_size)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        local = getattr(dm, "batch_size", None)
        if local is None:
            raise ValueError("module.tblr needs the batch size: set module.global_batch_size or use a DataModule "
                             "with a batch_size attribute")
        world = int(getattr(self._trainer, "world_size", 1) or 1)
        accumulate = int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1)
        return int(local) * world * accumulate

    def learning_rate(self) -> float:
        """The base LR: ``lr``, or ``tblr * global_batch / 256``."""
        if self.hparams.lr is not None:
            return float(self.hparams.lr)
        return _optim.scaled_lr(float(self.hparams.tblr), self.global_batch_size())

    def configure_optimizers(self):
        groups = _optim.param_groups(self.transformer, float(self.hparams.weight_decay))
        sizes = _optim.describe_groups(groups)
        lr = self.learning_rate()
        log.info("optimizer %s, lr %.3g, parameter groups %s", self.hparams.optimizer, lr, sizes)
        self.param_group_sizes = sizes
        opt = _optim.build_optimizer(groups, name=self.hparams.optimizer, lr=lr, betas=self.hparams.betas,
                                     eps=float(self.hparams.eps), fused=self.hparams.fused)
        sched = _optim.build_lr_scheduler(opt, schedule=self.hparams.lr_schedule,
                                          warmup_steps=int(self.hparams.warmup_steps),
                                          warmup_start_factor=float(self.hparams.warmup_start_factor),
                                          final_factor=float(self.hparams.final_lr_factor),
                                          max_steps=self._max_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- checkpoints -------------------------------------------------------------------------
    _FROZEN = ("tokenizer.", "text_encoder.")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        self._fix_data_epoch(checkpoint)
        if not self.hparams.save_frozen_modules and isinstance(checkpoint.get("state_dict"), dict):
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith(self._FROZEN)]:
                del sd[k]

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
        if isinstance(sd, dict):
            # Checkpoints hold the transformer only: the frozen modules keep the weights they have.
            for k, v in super().state_dict().items():
                if k.startswith(self._FROZEN) and k not in sd:
                    sd[k] = v

    # -- generation --------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> TextFeatures:
        """Text features of prompts with the module's text encoder."""
        return self.text_features({"captions": list(prompts)})

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], seeds: Optional[Sequence[int]] = None,
                        **kwargs: Any) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], one generation per prompt with its own seed.

        Keyword arguments override ``sample_kwargs`` (``cfg``, ``tau``, ``top_k``, ``top_p``,
        ``h_div_w``); ``scale_schedule`` gives an explicit schedule.
        """
        from ..sampling import generate

        if self.tokenizer is None:
            raise ValueError("generating images needs a tokenizer")
        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        opts = {**self.sample_kwargs, **kwargs}
        schedule = opts.pop("scale_schedule", None) or self.scale_schedule_for(float(opts.pop("h_div_w")))
        opts.pop("h_div_w", None)
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            images = []
            for prompt, seed in zip(prompts, seeds):
                text = self.encode_prompts([prompt])
                out = generate(self.transformer, text, schedule, tokenizer=self.tokenizer, seed=seed, **opts)
                images.append(out.images.float())
        finally:
            self.transformer.train(was_training)
        return torch.cat(images, dim=0)

    @torch.no_grad()
    def log_images(self, prompts: Sequence[str] = (), seeds: Optional[Sequence[int]] = None,
                   **kwargs: Any) -> Dict[str, torch.Tensor]:
        """``{"samples": (B, 3, H, W) in [0, 1]}`` for :class:`~infinity_lightning.callbacks.SampleLogger`."""
        images = self.generate_images(prompts, seeds, **kwargs)
        return {"samples": ((images + 1) / 2).clamp(0, 1)}

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> List[Dict[str, Any]]:
        """Generate for a prompt batch: a list of prompts, or ``{"prompts": [...], "seeds": [...]}``
        (optionally with sampling options).  Returns one record per prompt:
        ``{"prompt", "seed", "image": (3, H, W) in [0, 1] on CPU}``."""
        if isinstance(batch, str):
            batch = [batch]
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping):
            # prompt records {"prompt", "seed", ["h_div_w"], ...} (lit.predict.prompt_records)
            out = []
            for i, rec in enumerate(batch):
                seed = int(rec.get("seed", derive_seed(int(self.hparams.seed), batch_idx, i) % (2 ** 31)))
                opts = {"h_div_w": float(rec["h_div_w"])} if rec.get("h_div_w") is not None else {}
                image = self.log_images([rec["prompt"]], [seed], **opts)["samples"][0].cpu()
                out.append({**dict(rec), "seed": seed, "image": image})
            return out
        if isinstance(batch, Mapping):
            opts = dict(batch)
            prompts = list(opts.pop("prompts"))
            seeds = opts.pop("seeds", None)
        else:
            prompts, seeds, opts = list(batch), None, {}
        if seeds is None:
            seeds = [derive_seed(int(self.hparams.seed), batch_idx, i) % (2 ** 31) for i in range(len(prompts))]
        seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
        images = self.log_images(prompts, seeds, **opts)["samples"].cpu()
        return [{"prompt": p, "seed": s, "image": img} for p, s, img in zip(prompts, seeds, images)]


# --------------------------------------------------------------------------------------------
# pre-encoded latents
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def precompute_latents(tokenizer: nn.Module, batches: Iterable[Mapping[str, Any]], path: Union[str, Path], *,
                       text_encoder: Optional[Callable[[List[str]], Any]] = None,
                       max_batches: Optional[int] = None) -> Path:
    """Encode a dataset once and store the raw tokenizer features (and text features).

    ``batches``: a DataModule (its training loader is used), a loader, or batch dicts with
    ``images``, ``captions``, ``h_div_w_template``.  Writes ``{"latents": [ (d, h, w) ],
    "captions": [...], "h_div_w_template": [...], "text_features": [ (len_i, C) ] or None}`` with
    :func:`infinity_lightning.io.atomic_save`; :class:`LatentsDataModule` serves it.  Training
    on latents skips the encoder (the frozen tokenizer gives the same features every epoch;
    data augmentation, if any, is frozen too).
    """
    from ..io import atomic_save

    if callable(getattr(batches, "train_dataloader", None)):  # a DataModule
        if callable(getattr(batches, "setup", None)):
            batches.setup("fit")
        batches = batches.train_dataloader()
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    latents: List[torch.Tensor] = []
    captions: List[str] = []
    templates: List[float] = []
    texts: Optional[List[torch.Tensor]] = [] if text_encoder is not None else None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["images"].to(device)
        raw = tokenizer.encode_raw(images.float()).cpu()
        latents.extend(raw.unbind(0))
        caps = list(batch["captions"])
        captions.extend(caps)
        t = _as_template(batch.get("h_div_w_template"), tuple(images.shape[-2:]))
        templates.extend([t] * len(caps))
        if texts is not None:
            encode = getattr(text_encoder, "encode", text_encoder)
            feats = encode(caps)
            rows = feats.split() if isinstance(feats, TextFeatures) else list(feats)
            texts.extend(r.detach().float().cpu().clone() for r in rows)
    if not latents:
        raise ValueError("precompute_latents: the loader yielded no batches")
    return atomic_save({"latents": latents, "captions": captions, "h_div_w_template": templates,
                        "text_features": texts}, Path(path))


class _LatentBatches(torch.utils.data.IterableDataset):
    def __init__(self, dm: "LatentsDataModule") -> None:
        self.dm = dm

    def __len__(self) -> int:
        return len(self.dm.plan(0))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        data = self.dm.data
        for template, idx in self.dm.plan(self.dm.epoch):
            batch: Dict[str, Any] = {
                "latents": torch.stack([data["latents"][i] for i in idx]),
                "captions": [data["captions"][i] for i in idx],
                "h_div_w_template": template,
            }
            if data.get("text_features") is not None:
                batch["text_features"] = [data["text_features"][i] for i in idx]
            yield batch


class LatentsDataModule(pl.LightningDataModule):
    """Serves a :func:`precompute_latents` file as batches ``{"latents", "captions",
    "h_div_w_template", ["text_features"]}``.

    Records are grouped by template and latent shape; an epoch's batch order is a pure
    function of ``(seed, epoch)`` (set with :meth:`set_epoch`, saved in checkpoints), so resumed
    runs see the same batches.  Single process (no rank split).
    """

    def __init__(self, path: Union[str, Path], batch_size: int = 8, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.data: Optional[Dict[str, Any]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            from ..io import safe_load

            self.data = safe_load(self.path, what="latents file")

    def plan(self, epoch: int) -> List[Tuple[float, List[int]]]:
        """The epoch's batches as ``(template, record indices)``."""
        self.setup()
        assert self.data is not None
        buckets: Dict[Tuple[float, Tuple[int, ...]], List[int]] = {}
        for i, (t, z) in enumerate(zip(self.data["h_div_w_template"], self.data["latents"])):
            buckets.setdefault((float(t), tuple(z.shape)), []).append(i)
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches = []
        for (t, _), idx in sorted(buckets.items()):
            idx = list(rng.permutation(idx)) if self.shuffle else idx
            for s in range(0, len(idx), self.batch_size):
                chunk = [int(i) for i in idx[s:s + self.batch_size]]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append((t, chunk))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if not batches:
            raise ValueError(f"{self.path}: no full batch of {self.batch_size}; lower batch_size or set drop_last=False")
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass."""
        self.epoch = int(epoch)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup()
        return torch.utils.data.DataLoader(_LatentBatches(self), batch_size=None)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.set_epoch(int(state_dict.get("epoch", 0)))

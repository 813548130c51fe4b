"""Training the BSQ-VAE tokenizer with Lightning.

:class:`BSQTokenizerModule` owns the steps, losses, metrics and optimizers; the tokenizer, the
discriminator and the perceptual network are injected ``nn.Module``s.  One training step:

1. ``raw = tokenizer.encode_raw(images)``; a scale schedule for the latent grid
   (``schedule_mode`` "dense" | "dynamic" | "single", optionally with stochastic scale dropping)
   and the same multi-scale residual BSQ as at inference, ``tokenizer.quantize_multiscale``;
   ``recon = tokenizer.decoder(codes)`` (unclamped, so gradients flow everywhere).
2. Generator loss ``l1 |x - x'| + l2 (x - x')^2 + perceptual LPIPS(x, x')
   + commitment E||u - sg(q)||^2 + entropy (E H(q(c|u)) - gamma H(E q(c|u)))
   [+ adv_weight * lambda_adaptive * L_G(D(x'))  once step >= disc_start_step]``.
3. Discriminator loss (hinge or non-saturating) on real images and detached reconstructions,
   plus an optional LeCam term.

Both optimizers step once per batch; ``trainer.global_step`` counts batches (generator updates)
so that ``trainer.max_steps``, ``disc_start_step`` and ``warmup_steps`` all mean the same thing.

The recipe layer (:mod:`infinity_lightning.recipes`) builds it from ``recipes/tokenizer/*.yaml``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
import torch.nn as nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from infinity_lightning import scales
from infinity_lightning.lit.optim import OptimConfig, trainer_max_steps
from infinity_lightning.models.tokenizer_losses import (
    LeCamEMA, PatchDiscriminator, PerceptualLoss, adaptive_gan_weight, binary_entropy, bsq_entropy_terms,
    discriminator_loss, generator_adv_loss)

__all__ = ["BSQTokenizerModule", "build_perceptual"]


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise KeyError(f"tokenizer batches need an 'images' entry; got keys {sorted(batch)}")
        return batch["images"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"unsupported batch type {type(batch).__name__}; expected a tensor or a dict with 'images'")


def build_perceptual(arch: str = "vgg16", weights: Optional[Union[str, Sequence[str]]] = None) -> PerceptualLoss:
    """A :class:`PerceptualLoss` with weights read by ``infinity_lightning.io.safe_load``.

    ``weights`` is one file or a list of files whose state dicts are merged (for example
    torchvision's ``vgg16-397923af.pth`` and LPIPS's ``vgg.pth``); ``None`` gives random weights
    and a loud warning.
    """
    if weights is None:
        return PerceptualLoss(arch)
    from infinity_lightning.io import safe_load

    files = [weights] if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) else list(weights)
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        loaded = safe_load(f, what="perceptual weights")
        if not isinstance(loaded, Mapping):
            raise ValueError(f"perceptual weights file {f} does not hold a state dict")
        state.update(loaded)
    return PerceptualLoss(arch, state_dict=state)


class _FIDFeatures(nn.Module):
    """Wraps a user feature module for torchmetrics' FID: float images in [0, 1] -> (B, F)."""

    def __init__(self, module: nn.Module, num_features: Optional[int] = None):
        super().__init__()
        self.module = module
        if num_features is None:
            num_features = getattr(module, "num_features", None)
        if num_features is None:
            with torch.no_grad():
                num_features = int(module(torch.rand(1, 3, 64, 64)).reshape(1, -1).shape[1])
        self.num_features = int(num_features)
        # Frozen: it is an evaluation network, never in an optimizer (DDP would flag it unused).
        self.module.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.float()).reshape(images.shape[0], -1)


class BSQTokenizerModule(pl.LightningModule):
    """LightningModule training a BSQ-VAE tokenizer (reconstruction, perceptual, adversarial and
    BSQ entropy/commitment losses) with manual optimization.

    Args:
        tokenizer: a ``BSQVAE`` (``encode_raw``, ``quantize_multiscale``, ``decoder``).
        discriminator: image discriminator (B, 3, H, W) -> logits; ``None`` builds a
            :class:`PatchDiscriminator` from ``disc_channels``/``disc_layers``/``disc_norm`` when
            ``adv_weight > 0``.
        perceptual: perceptual distance module ``(x, y) -> (B,)``; ``None`` builds one from
            ``perceptual_arch``/``perceptual_weights`` when ``perceptual_weight > 0``.
        l1_weight, l2_weight, perceptual_weight: reconstruction terms.
        adv_weight: generator GAN weight (BitVAE: 0.3), multiplied by the VQGAN adaptive weight
            (``adaptive_weight=True``, clamped to ``adaptive_weight_max``) computed at the last
            decoder layer ``last_layer`` (default ``tokenizer.decoder.conv_out``'s weight).
        disc_start_step: generator and discriminator adversarial terms are off before this step.
        disc_loss: ``"hinge"`` or ``"non_saturating"``.
        lecam_weight, lecam_decay: LeCam regulariser on the discriminator (``decay=None``: zero anchors).
        commitment_weight, entropy_weight, entropy_gamma, entropy_inv_temperature: BSQ terms,
            averaged over the schedule's scales.
        schedule_mode: how the latent grid is cut into scales (:func:`infinity_lightning.scales.latent_schedule`):
            ``"template"`` (the aspect-ratio template's table up to the latent grid, the schedule a
            transformer generates at that size: 1-2-4-6-8 for an 8x8 grid), ``"dynamic"``,
            ``"dense"`` or ``"single"``.
        scale_drop_rate: during training each scale but the last is left out of the schedule
            with this probability (the remaining scales quantize the residual), so the decoder
            and later scales learn to cope with coarse scales missing.
        detach_residual: detach the residual between scales (``False``: gradients also flow
            through the residual chain, as the BitVAE recipe).
        optim: optimiser and LR schedule of both networks
            (:class:`~infinity_lightning.lit.optim.OptimConfig`; ``grad_clip`` clips each network's
            gradient norm); the discriminator runs at ``lr * disc_lr_mult``.
        fid_feature: optional feature module for rFID (float images in [0, 1] -> features).
        log_images_max: how many validation images :meth:`log_images` returns.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        discriminator: Optional[nn.Module] = None,
        perceptual: Optional[nn.Module] = None,
        *,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        perceptual_arch: str = "vgg16",
        perceptual_weights: Optional[Union[str, Sequence[str]]] = None,
        adv_weight: float = 0.3,
        adaptive_weight: bool = True,
        adaptive_weight_max: float = 1e4,
        last_layer: Optional[nn.Parameter] = None,
        disc_start_step: int = 0,
        disc_loss: str = "hinge",
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "group",
        lecam_weight: float = 0.0,
        lecam_decay: Optional[float] = 0.999,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        entropy_gamma: float = 1.0,
        entropy_inv_temperature: float = 100.0,
        schedule_mode: str = "dense",
        scale_drop_rate: float = 0.0,
        detach_residual: bool = False,
        optim: Union[OptimConfig, Mapping[str, Any], None] = None,
        disc_lr_mult: float = 2.0,
        fid_feature: Optional[nn.Module] = None,
        log_images_max: int = 8,
    ):
        super().__init__()
        self.automatic_optimization = False
        if disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {disc_loss!r}")
        if schedule_mode not in scales.LATENT_MODES:
            raise ValueError(f"schedule_mode must be one of {scales.LATENT_MODES}, got {schedule_mode!r}")
        if not 0.0 <= scale_drop_rate < 1.0:
            raise ValueError(f"scale_drop_rate must be in [0, 1), got {scale_drop_rate}")
        self.tokenizer = tokenizer
        if discriminator is None and adv_weight > 0:
            discriminator = PatchDiscriminator(channels=disc_channels, n_layers=disc_layers, norm=disc_norm)
        self.discriminator = discriminator
        if perceptual is None and perceptual_weight > 0:
            perceptual = build_perceptual(perceptual_arch, perceptual_weights)
        self.perceptual = perceptual
        self.lecam = LeCamEMA(lecam_decay) if lecam_weight > 0 else None
        self._last_layer = last_layer
        self.optim = OptimConfig.from_dict(optim if optim is not None else {"lr": 1e-4, "betas": (0.9, 0.99)})
        self.save_hyperparameters(ignore=["tokenizer", "discriminator", "perceptual", "last_layer", "fid_feature",
                                          "optim"])

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.fid = None
        if fid_feature is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid = FrechetInceptionDistance(feature=_FIDFeatures(fid_feature), normalize=True)
        self._bit_sum: Optional[torch.Tensor] = None
        self._bit_count = 0
        self._unique_fracs: List[float] = []
        #: per-bit mean activation (d,) of the last validation epoch
        self.bit_usage: Optional[torch.Tensor] = None
        self._log_batch: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ helpers
    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is computed at (last decoder convolution)."""
        if self._last_layer is not None:
            return self._last_layer
        conv_out = getattr(self.tokenizer.decoder, "conv_out", None)
        conv_out = getattr(conv_out, "conv", conv_out)
        if conv_out is not None and getattr(conv_out, "weight", None) is not None:
            return conv_out.weight
        weights = [p for p in self.tokenizer.decoder.parameters() if p.dim() == 4]
        return weights[-1]

    def training_schedule(self, latent_h: int, latent_w: int, train: bool = True) -> List[Tuple[int, int, int]]:
        """Scale schedule for a latent grid, with stochastic scale dropping when ``train``."""
        try:
            schedule = list(scales.latent_schedule(latent_h, latent_w, self.hparams.schedule_mode))
        except ValueError as e:
            raise ValueError(f"schedule_mode={self.hparams.schedule_mode!r} cannot quantize a {latent_h}x{latent_w} "
                             f"latent grid: {e}") from e
        rate = self.hparams.scale_drop_rate
        if train and rate > 0 and len(schedule) > 1:
            keep = torch.rand(len(schedule) - 1) >= rate
            schedule = [s for s, k in zip(schedule[:-1], keep.tolist()) if k] + [schedule[-1]]
        return schedule

    def reconstruct(self, images: torch.Tensor, train: bool = False) -> Dict[str, Any]:
        """Encode, quantize over the schedule and decode (unclamped): a dict with ``recon``,
        ``bit_labels``, ``normalized`` (per-scale unit inputs, (B, 1, h, w, d)) and ``schedule``."""
        raw = self.tokenizer.encode_raw(images)
        schedule = self.training_schedule(raw.shape[-2], raw.shape[-1], train=train)
        codes, bit_labels, aux = self.tokenizer.quantize_multiscale(
            raw, schedule, detach_residual=self.hparams.detach_residual, return_aux=True)
        recon = self.tokenizer.decoder(codes)
        return {"recon": recon, "bit_labels": bit_labels, "normalized": aux["normalized"], "schedule": schedule}

    def quantizer_losses(self, normalized: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Commitment and entropy terms averaged over scales (code dimension last)."""
        commit, ent, per_sample, codebook = [], [], [], []
        for u in normalized:
            d = u.shape[-1]
            q = torch.where(u > 0, 1.0, -1.0) / math.sqrt(d)
            commit.append((u - q.detach()).pow(2).sum(-1).mean())
            terms = bsq_entropy_terms(u, self.hparams.entropy_inv_temperature, self.hparams.entropy_gamma, dim=-1)
            ent.append(terms.loss)
            per_sample.append(terms.per_sample.detach())
            codebook.append(terms.codebook.detach())
        return {"commitment": torch.stack(commit).mean(), "entropy": torch.stack(ent).mean(),
                "per_sample_entropy": torch.stack(per_sample).mean(), "codebook_entropy": torch.stack(codebook).mean()}

    def generator_losses(self, images: torch.Tensor, out: Dict[str, Any], adversarial: bool
                         ) -> Dict[str, torch.Tensor]:
        """All generator terms; ``total`` is what gets back-propagated."""
        hp = self.hparams
        recon = out["recon"].float()
        target = images.float()
        logs: Dict[str, torch.Tensor] = {}
        nll = recon.new_zeros(())
        if hp.l1_weight:
            logs["l1"] = (recon - target).abs().mean()
            nll = nll + hp.l1_weight * logs["l1"]
        if hp.l2_weight:
            logs["l2"] = (recon - target).pow(2).mean()
            nll = nll + hp.l2_weight * logs["l2"]
        if hp.perceptual_weight and self.perceptual is not None:
            logs["perceptual"] = self.perceptual(recon, target).mean()
            nll = nll + hp.perceptual_weight * logs["perceptual"]
        logs["nll"] = nll
        q = self.quantizer_losses(out["normalized"])
        logs.update(q)
        total = nll + hp.commitment_weight * q["commitment"] + hp.entropy_weight * q["entropy"]
        if adversarial:
            logits_fake = self.discriminator(out["recon"])
            g_loss = generator_adv_loss(hp.disc_loss, logits_fake.float())
            if hp.adaptive_weight and torch.is_grad_enabled():
                d_weight = adaptive_gan_weight(nll, g_loss, self.last_layer, hp.adaptive_weight_max)
            else:
                d_weight = torch.ones((), device=g_loss.device)
            logs["g_adv"] = g_loss
            logs["adaptive_weight"] = d_weight
            total = total + hp.adv_weight * d_weight * g_loss
        logs["total"] = total
        return logs

    def discriminator_losses(self, images: torch.Tensor, recon: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Discriminator loss on real images and detached reconstructions (+ LeCam)."""
        logits_real = self.discriminator(images.detach()).float()
        logits_fake = self.discriminator(recon.detach()).float()
        d_loss = discriminator_loss(self.hparams.disc_loss, logits_real, logits_fake)
        logs = {"d_loss": d_loss, "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
        total = d_loss
        if self.lecam is not None:
            logs["lecam"] = self.lecam(logits_real, logits_fake)
            total = total + self.hparams.lecam_weight * logs["lecam"]
        logs["total"] = total
        return logs

    def adversarial_active(self) -> bool:
        return (self.discriminator is not None and self.hparams.adv_weight > 0
                and self.global_step >= self.hparams.disc_start_step)

    # ------------------------------------------------------------------ training
    def _clip(self, optimizer) -> None:
        if self.optim.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = _images_of(batch)
        if self._log_batch is None:
            self._log_batch = images[: self.hparams.log_images_max].detach().cpu()
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        adversarial = self.adversarial_active()

        # Generator update.  toggle_optimizer freezes the discriminator so the generator's
        # backward pass does not accumulate gradients into it.
        self.toggle_optimizer(opt_g)
        out = self.reconstruct(images, train=True)
        g_logs = self.generator_losses(images, out, adversarial)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_logs["total"])
        self._clip(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        # Discriminator update.  It goes through the strategy (precision plugin, hooks) but not
        # through the LightningOptimizer wrapper, so that global_step counts one step per batch.
        d_logs: Dict[str, torch.Tensor] = {}
        if adversarial and opt_d is not None:
            self.toggle_optimizer(opt_d)
            d_logs = self.discriminator_losses(images, out["recon"])
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_logs["total"])
            self._clip(opt_d)
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
            self.untoggle_optimizer(opt_d)
        with warnings.catch_warnings():
            # Before disc_start_step the discriminator's scheduler advances without its optimizer
            # having stepped: intended (both schedules follow the batch count), not the ordering
            # mistake torch warns about.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            for sch in schedulers:
                if sch is not None:
                    sch.step()

        logs = {f"train/{k}": v.detach().float() for k, v in g_logs.items()}
        logs.update({f"train/{k}": v.detach().float() for k, v in d_logs.items() if k != "total"})
        logs["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.log("train/loss", g_logs["total"].detach().float(), prog_bar=True, on_step=True,
                 batch_size=images.shape[0])
        return g_logs["total"].detach()

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._bit_sum, self._bit_count, self._unique_fracs = None, 0, []

    @staticmethod
    def unique_code_fraction(bits: torch.Tensor) -> float:
        """Distinct codes / positions for bit labels (..., d) with d <= 62."""
        flat = bits.reshape(-1, bits.shape[-1]).long()
        weights = 2 ** torch.arange(flat.shape[1], device=flat.device, dtype=torch.long)
        codes = (flat * weights).sum(-1)
        return torch.unique(codes).numel() / max(1, codes.numel())

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, torch.Tensor]:
        images = _images_of(batch)
        if batch_idx == 0:
            self._log_batch = images[: self.hparams.log_images_max].detach().cpu()
        out = self.reconstruct(images, train=False)
        logs = self.generator_losses(images, out, adversarial=False)
        recon01 = ((out["recon"].float().clamp(-1, 1) + 1) / 2)
        images01 = ((images.float().clamp(-1, 1) + 1) / 2)
        self.val_psnr.update(recon01, images01)
        self.val_ssim.update(recon01, images01)
        if self.fid is not None:
            self.fid.update(images01, real=True)
            self.fid.update(recon01, real=False)
        bits = torch.cat([b.reshape(-1, b.shape[-1]) for b in out["bit_labels"]]).float()
        bit_sum = bits.sum(0)
        self._bit_sum = bit_sum if self._bit_sum is None else self._bit_sum + bit_sum
        self._bit_count += bits.shape[0]
        if out["bit_labels"][-1].shape[-1] <= 62:
            self._unique_fracs.append(self.unique_code_fraction(out["bit_labels"][-1]))
        bs = images.shape[0]
        self.log_dict({f"val/{k}": v.detach().float() for k, v in logs.items() if k != "adaptive_weight"},
                      on_epoch=True, batch_size=bs, sync_dist=True)
        return logs

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True, sync_dist=False)
        self.log("val/ssim", self.val_ssim.compute(), prog_bar=True, sync_dist=False)
        self.val_psnr.reset()
        self.val_ssim.reset()
        if self.fid is not None:
            if self.fid.fake_features_num_samples >= 2:
                self.log("val/rfid", self.fid.compute())
            self.fid.reset()
        if self._bit_sum is not None and self._bit_count:
            usage = self._bit_sum / self._bit_count
            self.bit_usage = usage.detach().cpu()
            ent_bits = binary_entropy(usage) / math.log(2)
            self.log_dict({"val/bit_usage_min": usage.min(), "val/bit_usage_max": usage.max(),
                           "val/bit_entropy": ent_bits.mean()})
        if self._unique_fracs:
            self.log("val/unique_code_frac", float(sum(self._unique_fracs) / len(self._unique_fracs)))

    # ------------------------------------------------------------------ images and export
    @torch.no_grad()
    def log_images(self, batch: Any = None, prompts: Any = None, seeds: Any = None, **kwargs: Any
                   ) -> Dict[str, torch.Tensor]:
        """``{"inputs", "reconstructions"}``: (B, 3, H, W) in [0, 1].

        Uses ``batch`` if given, else the first validation batch (or first training batch) seen.
        ``prompts`` and ``seeds`` (passed by the sample-logging callback) have no meaning for a
        tokenizer and are ignored.
        """
        images = _images_of(batch) if batch is not None else self._log_batch
        if images is None:
            return {}
        images = images[: self.hparams.log_images_max].to(self.device)
        was_training = self.training
        self.eval()
        try:
            recon = self.reconstruct(images.float(), train=False)["recon"]
        finally:
            self.train(was_training)
        return {"inputs": ((images.float().clamp(-1, 1) + 1) / 2).cpu(),
                "reconstructions": ((recon.float().clamp(-1, 1) + 1) / 2).cpu()}

    def export(self, path: Any, format: str = "released") -> Any:
        """Write the tokenizer's weights with ``infinity_lightning.checkpoints.save_tokenizer``
        (``format="released"``: the ``infinity_vae_*.pth`` layout; ``"safetensors"``)."""
        from infinity_lightning.checkpoints import save_tokenizer

        return save_tokenizer(self.tokenizer, path, format=format)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        max_steps = trainer_max_steps(self._trainer)
        wd = float(self.optim.weight_decay)
        params = [p for p in self.tokenizer.parameters() if p.requires_grad]
        lr = self.optim.base_lr()
        opt_g, sched_g = self.optim.build([{"params": params, "weight_decay": wd}], lr, max_steps)
        optimizers = [opt_g]
        schedulers = [{"scheduler": sched_g, "interval": "step", "name": "lr"}]
        if self.discriminator is not None and self.hparams.adv_weight > 0:
            opt_d, sched_d = self.optim.build([{"params": list(self.discriminator.parameters()), "weight_decay": wd}],
                                              lr * float(self.hparams.disc_lr_mult), max_steps)
            optimizers.append(opt_d)
            schedulers.append({"scheduler": sched_d, "interval": "step", "name": "lr-discriminator"})
        return optimizers, schedulers

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The frozen perceptual network is rebuilt from its own weights file; keep it out of the
        # training checkpoint.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("perceptual.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self.perceptual is not None:
            state = checkpoint.get("state_dict", {})
            for k, v in self.perceptual.state_dict().items():
                state.setdefault(f"perceptual.{k}", v)

"""Score the model on the strict evaluation protocol while it trains.

A loss curve can look fine while the images are garbage.  :class:`ProtocolEvaluation` runs a
cheap, fixed subset of an evaluation protocol (:mod:`infinity_lightning.evaluation`; ``subset``
items of each category, always the same ones) every ``every_n_steps`` optimizer steps, with the
EMA weights when an :class:`~infinity_lightning.callbacks.EMA` callback is present, and logs
``eval/<category>`` and ``eval/overall`` to every logger, so each category becomes a curve.

Images come from ``pl_module.log_images(prompts=..., seeds=...)["samples"]`` (floats in [0, 1]),
the same call the sample-logging callback makes.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Mapping, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from infinity_lightning.evaluation import evaluate, load_protocol, select_subset

from .ema import EMA

log = logging.getLogger(__name__)

__all__ = ["ProtocolEvaluation"]


class ProtocolEvaluation(Callback):
    """Every ``every_n_steps`` steps, generate and judge a subset of a protocol and log the scores.

    Args:
        every_n_steps: run after every n-th optimizer step (0: only at the end of fit).
        subset: items per category (the protocol's own deterministic selection).
        protocol: a protocol file (default: the shipped strict shapes protocol).
        batch_size: prompts per ``log_images`` call.
        at_fit_end: run once more at the end of fit (unless that step was just scored).
        use_ema: score the EMA weights when an EMA callback is present.
        sampling: sampler overrides passed to ``log_images`` (``cfg``, ``tau``, ...).

    ``history`` keeps ``(step, {"overall": ..., <category>: ...})`` of every run.
    """

    def __init__(self, every_n_steps: int = 500, subset: int = 4, protocol: Optional[str] = None,
                 batch_size: int = 32, at_fit_end: bool = True, use_ema: bool = True,
                 sampling: Optional[Mapping[str, Any]] = None) -> None:
        if every_n_steps < 0 or subset < 1 or batch_size < 1:
            raise ValueError(f"ProtocolEvaluation needs every_n_steps >= 0, subset >= 1 and batch_size >= 1, got "
                             f"{every_n_steps}, {subset}, {batch_size}")
        self.every_n_steps = int(every_n_steps)
        self.subset = int(subset)
        self.protocol = select_subset(load_protocol(protocol), self.subset)
        self.batch_size = int(batch_size)
        self.at_fit_end = bool(at_fit_end)
        self.use_ema = bool(use_ema)
        self.sampling = dict(sampling or {})
        self.history: list = []
        self._last_step: Optional[int] = None

    @torch.no_grad()
    def score(self, trainer: Trainer, pl_module: LightningModule) -> Dict[str, Union[float, None]]:
        """Generate, judge and log once; returns ``{"overall": ..., <category>: ...}``."""
        def generate(prompts, seeds):
            return pl_module.log_images(prompts=list(prompts), seeds=list(seeds), **self.sampling)["samples"]

        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None) if self.use_ema else None
        swap = ema.average_weights(pl_module) if ema is not None and ema.initialized else contextlib.nullcontext()
        with swap:
            report = evaluate(generate, self.protocol, batch_size=self.batch_size)
        scores = {name: row["accuracy"] for name, row in report["categories"].items()}
        scores["overall"] = report["overall"]["accuracy"]
        if report["held_out_pairs"]["n"]:
            scores["held_out_pairs"] = report["held_out_pairs"]["accuracy"]
        step = int(trainer.global_step)
        metrics = {f"eval/{k}": float(v) for k, v in scores.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append((step, scores))
        self._last_step = step
        log.info("step %d: protocol subset overall %.3f (%s)", step, scores["overall"] or 0.0,
                 ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "overall" and v is not None))
        return scores

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            if trainer.is_global_zero:
                self.score(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step and trainer.is_global_zero:
            self.score(trainer, pl_module)

"""Optimizer parameter groups, LR / weight-decay schedules and the optimizer factory (docs/model.md#optimiser-and-learning-rate).

Parameter groups follow the original ``--nowd 1`` rule: a parameter goes to the no-decay group
``"ND"`` when it is 1-D, when its name ends in ``bias``, or when its name contains one of
:data:`NO_WEIGHT_DECAY_KEYS` (substring match); everything else is in the decay group ``"D"``.

LR schedule (one factor per optimizer step ``it``, multiplied into the base LR)::

    warm-up (it < warmup_steps):  f = start + (1 - start) * it / warmup_steps
    afterwards pasd = (it - warmup_steps) / (max_steps - 1 - warmup_steps), rest = 1 - pasd
      "lin0":     f = 1 while pasd < 0.05, then end + (1 - end) * rest / 0.95
      "cosine":   f = end + (1 - end) * (0.5 + 0.5 * cos(pi * pasd))
      "constant": f = 1 (``lin0`` with end = 1, what the original's train.sh runs)

Weight decay ``wd(it) = end + (start - end) * (0.5 + 0.5 * cos(pi * it / (max_steps - 1)))``,
times 0 for the ND group (constant when start == end, as in train.sh).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "OptimConfig",
    "NO_WEIGHT_DECAY_KEYS",
    "is_no_weight_decay",
    "param_groups",
    "lr_factor",
    "weight_decay_at",
    "build_optimizer",
    "build_lr_scheduler",
    "scaled_lr",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "trainer_max_steps",
]

#: Substrings that put a parameter in the no-weight-decay group (the original's ``--nowd 1`` list).
NO_WEIGHT_DECAY_KEYS: Tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul", "text_proj_for_sos.ca.mat_q",
)

LR_SCHEDULES = ("constant", "lin0", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")


def is_no_weight_decay(name: str, param: torch.Tensor, keys: Sequence[str] = NO_WEIGHT_DECAY_KEYS) -> bool:
    """Whether ``name`` belongs to the ND (weight decay 0) group: 1-D, ``*bias`` or a listed substring."""
    return param.ndim <= 1 or name.endswith("bias") or any(k in name for k in keys)


def param_groups(model: nn.Module, weight_decay: float, keys: Sequence[str] = NO_WEIGHT_DECAY_KEYS
                 ) -> List[Dict[str, Any]]:
    """The ``"D"`` and ``"ND"`` AdamW groups of the trainable parameters of ``model``.

    Each group is a dict with ``params``, ``names``, ``group`` ("D"/"ND"), ``name`` ("decay" /
    "no_decay": how the learning-rate monitor labels the group), ``weight_decay``
    (``weight_decay`` for D, 0 for ND) and ``wd_scale`` (1 / 0, used by the WD schedule).
    Groups without parameters are left out.
    """
    decay: Tuple[List[str], List[torch.Tensor]] = ([], [])
    no_decay: Tuple[List[str], List[torch.Tensor]] = ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if is_no_weight_decay(name, p, keys) else decay
        target[0].append(name)
        target[1].append(p)
    groups = []
    for tag, label, (names, params), wd_scale in (("D", "decay", decay, 1.0), ("ND", "no_decay", no_decay, 0.0)):
        if params:  # "name" labels the group's learning rate in the logs: lr/decay, lr/no_decay
            groups.append({"params": params, "names": names, "group": tag, "name": label,
                           "weight_decay": float(weight_decay) * wd_scale, "wd_scale": wd_scale})
    return groups


def describe_groups(groups: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """``{"D": {"tensors": n, "params": numel}, "ND": ...}`` for logging."""
    return {g["group"]: {"tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"])}
            for g in groups}


def scaled_lr(tblr: float, global_batch_size: int) -> float:
    """The original's LR rule ``lr = tblr * global_batch / 256`` (docs/model.md#optimiser-and-learning-rate)."""
    return float(tblr) * float(global_batch_size) / 256.0


def lr_factor(step: int, *, schedule: str = "constant", warmup_steps: int = 0, warmup_start_factor: float = 0.005,
              final_factor: float = 0.3, max_steps: Optional[int] = None) -> float:
    """LR multiplier at optimizer step ``step`` (see the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    if not max_steps or max_steps <= 0:
        raise ValueError(f"lr_schedule {schedule!r} needs max_steps (the trainer's max_steps)")
    span = max(max_steps - 1 - warmup_steps, 1)
    pasd = min(max((step - warmup_steps) / span, 0.0), 1.0)
    rest = 1.0 - pasd
    if schedule == "lin0":
        if pasd < 0.05:
            return 1.0
        return final_factor + (1.0 - final_factor) * rest / 0.95
    return final_factor + (1.0 - final_factor) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def weight_decay_at(step: int, start: float, end: Optional[float] = None, max_steps: Optional[int] = None) -> float:
    """Weight decay of the D group at ``step``: cosine from ``start`` to ``end`` (constant if equal)."""
    if end is None or end == start or not max_steps or max_steps <= 1:
        return float(start)
    t = min(max(step / (max_steps - 1), 0.0), 1.0)
    return float(end) + (float(start) - float(end)) * (0.5 + 0.5 * math.cos(math.pi * t))


def build_optimizer(groups: List[Dict[str, Any]], *, name: str = "adamw", lr: float,
                    betas: Sequence[float] = (0.9, 0.97), eps: float = 1e-8, fused: Optional[bool] = None
                    ) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes ``AdamW8bit`` over ``groups`` (from :func:`param_groups`).

    ``fused`` is passed to torch's AdamW when given (``None``: torch decides).  ``adamw8bit``
    imports bitsandbytes lazily; it works on CPU, but not on FSDP2 (DTensor) parameters.
    """
    betas = tuple(float(b) for b in betas)
    if len(betas) != 2:
        raise ValueError(f"betas must have two values, got {betas}")
    if name == "adamw":
        kwargs: Dict[str, Any] = {}
        if fused is not None:
            kwargs["fused"] = bool(fused)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                              "(or pip install 'infinity-lightning[bnb]'), or use optimizer 'adamw'") from e
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer {name!r}; expected one of {OPTIMIZERS}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, **schedule: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` (keyword arguments as there) per optimizer step."""
    lr_factor(0, **schedule)  # fail early on a bad configuration
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and learning-rate schedule of a training run (both LightningModules).

    Args:
        lr: base learning rate; or ``tblr``: LR per 256 samples (``lr = tblr * global_batch / 256``,
            the original's rule; ``global_batch_size`` defaults to batch size x world size x
            gradient accumulation).  Exactly one of the two.
        optimizer: ``"adamw"`` (torch) or ``"adamw8bit"`` (bitsandbytes); ``fused``: torch's flag.
        betas, eps: AdamW's.
        weight_decay: of the decay group (``D``; the ``ND`` group never decays), cosine to
            ``weight_decay_end`` over the run when that is given.
        lr_schedule: ``"constant"``, ``"lin0"`` or ``"cosine"`` after ``warmup_steps`` of linear
            warm-up from ``warmup_start_factor``; decays to ``final_lr_factor`` at ``max_steps``
            (default: the trainer's).  See :func:`lr_factor`.
        grad_clip: gradient-norm clipping (``None``/0: off).
    """

    lr: Optional[float] = None
    tblr: Optional[float] = None
    global_batch_size: Optional[int] = None
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    fused: Optional[bool] = None
    betas: Tuple[float, float] = (0.9, 0.97)
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_end: Optional[float] = None
    lr_schedule: Literal["constant", "lin0", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_start_factor: float = 0.005
    final_lr_factor: float = 0.3
    max_steps: Optional[int] = None
    grad_clip: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if (self.lr is None) == (self.tblr is None):
            raise ValueError("optim needs exactly one of lr (absolute) or tblr (per 256 samples)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.lr_schedule {self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {list(self.betas)}")
        if self.warmup_steps < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"optim.warmup_steps must be >= 0 and optim.max_steps >= 1, got {self.warmup_steps} "
                             f"and {self.max_steps}")
        if (self.lr if self.lr is not None else self.tblr) <= 0:
            raise ValueError(f"optim learning rate must be positive, got {self.lr if self.lr is not None else self.tblr}")

    @classmethod
    def from_dict(cls, values: Union["OptimConfig", Dict[str, Any], None]) -> "OptimConfig":
        """From a recipe's ``optim`` section (unknown keys are an error naming them)."""
        if isinstance(values, OptimConfig):
            return values
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"optim: unknown key(s) {unknown}; known: {names}")
        return cls(**values)

    def base_lr(self, global_batch_size: Optional[int] = None) -> float:
        """``lr``, or ``tblr * global_batch / 256`` (``global_batch_size`` wins when set here)."""
        if self.lr is not None:
            return float(self.lr)
        batch = self.global_batch_size or global_batch_size
        if not batch:
            raise ValueError("optim.tblr needs the global batch size: set optim.global_batch_size or use a "
                             "DataModule with a batch_size attribute")
        return scaled_lr(float(self.tblr), int(batch))

    def schedule(self, max_steps: Optional[int]) -> Dict[str, Any]:
        """Keyword arguments of :func:`lr_factor` for a run of ``max_steps`` optimizer steps."""
        return dict(schedule=self.lr_schedule, warmup_steps=int(self.warmup_steps),
                    warmup_start_factor=float(self.warmup_start_factor), final_factor=float(self.final_lr_factor),
                    max_steps=self.max_steps or max_steps)

    def build(self, groups: List[Dict[str, Any]], lr: float, max_steps: Optional[int]):
        """``(optimizer, LambdaLR scheduler)`` over parameter ``groups`` at base ``lr``."""
        opt = build_optimizer(groups, name=self.optimizer, lr=lr, betas=self.betas, eps=float(self.eps),
                              fused=self.fused)
        return opt, build_lr_scheduler(opt, **self.schedule(max_steps))

    def weight_decay_at(self, step: int, max_steps: Optional[int]) -> float:
        """Weight decay of the D group at ``step`` (constant unless ``weight_decay_end`` is set)."""
        return weight_decay_at(step, float(self.weight_decay), self.weight_decay_end, self.max_steps or max_steps)


def trainer_max_steps(trainer: Any) -> Optional[int]:
    """The trainer's optimizer-step count: ``max_steps``, else its estimate, else None."""
    if trainer is None:
        return None
    steps = getattr(trainer, "max_steps", -1)
    if steps and steps > 0:
        return int(steps)
    est = getattr(trainer, "estimated_stepping_batches", None)
    return int(est) if est and math.isfinite(est) else None

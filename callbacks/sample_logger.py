"""Log sample images during training: the module makes them, this callback decides when and where.

Every ``every_n_steps`` optimizer steps (and once at the end of fit) the callback calls
``pl_module.log_images(prompts=..., seeds=..., **log_kwargs)``, which returns a dict
``name -> (B, 3, H, W)`` float tensor in [0, 1].  Each entry becomes one grid image, sent to every
logger that takes images (TensorBoard's ``add_image``, or a ``log_image`` method such as
WandbLogger's) and optionally written as ``<folder>/<name>/step_<global_step>.png``.  When an
entry has one image per prompt, each tile carries its prompt underneath (:func:`label_grid`), so
a grid says what was asked for.
"""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["SampleLogger", "make_grid", "label_grid"]

#: Pixel size of a character of Pillow's built-in bitmap font (the labels need no font file).
_CHAR_W, _LINE_H = 6, 11


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (B, C, H, W) images into one (C, rows*(H+p)+p, nrow*(W+p)+p) image.

    ``nrow`` images per row (default ceil(sqrt(B))), ``padding`` pixels of ``pad_value`` around
    and between the tiles, row-major order.  Grey (C=1) images are repeated to 3 channels.
    """
    if images.dim() != 4:
        raise ValueError(f"make_grid expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, c, h, w = images.shape
    if b == 0:
        raise ValueError("make_grid got an empty batch")
    ncol = min(nrow or math.ceil(math.sqrt(b)), b)
    nrows = math.ceil(b / ncol)
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def label_grid(images: torch.Tensor, labels: Sequence[str], nrow: Optional[int] = None, padding: int = 2,
               max_lines: int = 3) -> torch.Tensor:
    """Like :func:`make_grid` (white padding), with ``labels[i]`` written in black under tile ``i``.

    Each tile gets a strip of up to ``max_lines`` lines of Pillow's built-in font, wrapped to the
    tile width (text that does not fit ends with "..."); returns a (3, H', W') tensor in [0, 1].
    """
    from PIL import Image, ImageDraw, ImageFont

    if images.dim() != 4 or len(labels) != images.shape[0]:
        raise ValueError(f"label_grid needs one label per image, got {len(labels)} labels for images of shape "
                         f"{tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    width = max(1, (w - 2) // _CHAR_W)
    wrapped = []
    for label in labels:
        lines = textwrap.wrap(str(label), width) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][: max(0, width - 3)] + "..."
        wrapped.append(lines)
    strip = max(len(lines) for lines in wrapped) * _LINE_H + 2
    ncol = min(nrow or math.ceil(math.sqrt(b)), b)
    nrows = math.ceil(b / ncol)
    canvas = Image.new("RGB", (ncol * (w + padding) + padding, nrows * (h + strip + padding) + padding), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    tiles = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, col = divmod(i, ncol)
        left, top = padding + col * (w + padding), padding + r * (h + strip + padding)
        canvas.paste(Image.fromarray(tiles[i]), (left, top))
        for k, line in enumerate(wrapped[i]):
            draw.text((left + 1, top + h + 1 + k * _LINE_H), line, fill="black", font=font)
    return torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "samples"


class SampleLogger(Callback):
    """Generate images for fixed prompts and seeds at a fixed step interval.

    Args:
        prompts: the prompts passed to ``log_images`` every time.
        seeds: one seed per prompt (default 0, 1, 2, ...), so successive grids are comparable.
        every_n_steps: log after every n-th optimizer step (0 disables the periodic logging).
        at_fit_end: log once more at the end of fit (unless that step was just logged).
        folder: if set, also write PNG files under it.
        nrow: images per grid row (default ceil(sqrt(B))).
        tag_prefix: logger tag is ``"<tag_prefix>/<name>"``.
        log_kwargs: extra keyword arguments for ``log_images`` (e.g. ``cfg``, ``tau``).
        labels: write each prompt under its image (entries with one image per prompt).
        all_ranks: call ``log_images`` on every rank (only rank zero writes).  Needed when the
            model is sharded (FSDP2), because generation then runs collectives on all ranks;
            ``None`` turns it on automatically when any parameter is a DTensor.

    The module runs in eval mode and under ``torch.no_grad()`` during the call; the training
    mode of every submodule is restored afterwards.
    """

    def __init__(self, prompts: Sequence[str], seeds: Optional[Sequence[int]] = None, every_n_steps: int = 1000,
                 at_fit_end: bool = True, folder: Optional[Union[str, Path]] = None, nrow: Optional[int] = None,
                 tag_prefix: str = "samples", log_kwargs: Optional[Mapping[str, Any]] = None,
                 all_ranks: Optional[bool] = None, labels: bool = True) -> None:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("SampleLogger needs at least one prompt")
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(prompts):
            raise ValueError(f"SampleLogger got {len(prompts)} prompts but {len(seeds)} seeds")
        if every_n_steps < 0:
            raise ValueError(f"SampleLogger every_n_steps must be >= 0, got {every_n_steps}")
        self.prompts = prompts
        self.seeds = seeds
        self.every_n_steps = int(every_n_steps)
        self.at_fit_end = at_fit_end
        self.folder = Path(folder) if folder is not None else None
        self.nrow = nrow
        self.tag_prefix = tag_prefix
        self.log_kwargs = dict(log_kwargs or {})
        self.all_ranks = all_ranks
        self.labels = bool(labels)
        self.last_logged_step: Optional[int] = None

    def _run_on_all_ranks(self, pl_module: LightningModule) -> bool:
        if self.all_ranks is not None:
            return self.all_ranks
        from infinity_lightning.parallel import is_dtensor

        return any(is_dtensor(p) for p in pl_module.parameters())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_logged_step:
            self.log_samples(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self.last_logged_step:
            self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: Trainer, pl_module: LightningModule) -> Dict[str, torch.Tensor]:
        """Generate, grid and send the samples now; returns ``name -> grid`` (empty off rank zero)."""
        step = trainer.global_step
        self.last_logged_step = step
        if not trainer.is_global_zero and not self._run_on_all_ranks(pl_module):
            return {}
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            images = pl_module.log_images(prompts=list(self.prompts), seeds=list(self.seeds), **self.log_kwargs)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not trainer.is_global_zero:
            return {}
        if not isinstance(images, Mapping):
            raise TypeError(f"{type(pl_module).__name__}.log_images must return a dict name -> (B,3,H,W) tensor, "
                            f"got {type(images).__name__}")
        grids = {}
        for name, batch in images.items():
            batch = batch.detach().float().clamp(0, 1).cpu()
            if self.labels and batch.shape[0] == len(self.prompts):
                grid = label_grid(batch, self.prompts, nrow=self.nrow)
            else:
                grid = make_grid(batch, nrow=self.nrow)
            grids[name] = grid
            tag = f"{self.tag_prefix}/{name}" if self.tag_prefix else name
            self._send(trainer, tag, grid, step)
            if self.folder is not None:
                self._write_png(grid, self.folder / _safe_name(name) / f"step_{step:08d}.png")
        return grids

    @staticmethod
    def _send(trainer: Trainer, tag: str, grid: torch.Tensor, step: int) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image(tag, grid, step)
            elif hasattr(logger, "log_image"):  # W&B and loggers with the same method
                logger.log_image(key=tag, images=[_to_pil(grid)], step=step)

    @staticmethod
    def _write_png(grid: torch.Tensor, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(grid).save(path)


def _to_pil(grid: torch.Tensor):
    from PIL import Image

    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)

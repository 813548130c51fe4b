"""Pre-encoded tokenizer latents: :func:`precompute_latents` writes them, :class:`LatentsDataModule`
serves them.

Training a transformer on a frozen tokenizer encodes every image the same way every epoch;
encoding once (and the captions' text features with it) removes the encoder from the training
loop.  Data augmentation, if any, is frozen too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from infinity_lightning import scales as _scales
from infinity_lightning.io import atomic_save, safe_load
from infinity_lightning.models.text_encoder import TextFeatures

__all__ = ["precompute_latents", "LatentsDataModule"]


def _template_of(value: Any, latent_hw: Tuple[int, int]) -> float:
    if value is None:
        return _scales.nearest_template(latent_hw[0] / latent_hw[1])
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
        t = _template_of(batch.get("h_div_w_template"), tuple(images.shape[-2:]))
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

"""Prompts for prediction (generation) runs.

Prompts come from a Python list, a text file (one prompt per line, blank lines skipped) or a
jsonl file (``{"prompt": ..., "seed": ..., "negative_prompt": ..., "h_div_w": ...}``, all but
``prompt`` optional).  Item ``i`` gets seed ``seed + i`` unless it brings its own.

Ranks split the items without padding: rank ``r`` of ``W`` takes items ``i`` with
``i % W == r`` (a ``DistributedSampler`` would repeat items to even out the ranks, and a
prediction writer would then write some images twice).  The dataset is iterable, so Lightning
never replaces this split by its own sampler; within a rank, batch ``j`` goes to worker
``j % num_workers``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from .base import resolve_rank_world, worker_id_count


def read_prompts(source: Union[str, Path, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Prompt records ``{"prompt", optional "seed", "negative_prompt", "h_div_w"}`` from a list
    (of strings or dicts), a ``.txt`` file or a ``.jsonl`` file."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            items: List[Any] = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            where = str(path)
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
            where = str(path)
    else:
        items, where = list(source), "prompts"
    records = []
    for i, item in enumerate(items):
        rec = {"prompt": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if rec is None or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ValueError(f"{where}: item {i} has no non-empty 'prompt' string: {item!r}")
        unknown = set(rec) - {"prompt", "seed", "negative_prompt", "h_div_w"}
        if unknown:
            raise ValueError(f"{where}: item {i} has unknown keys {sorted(unknown)}; "
                             "allowed: prompt, seed, negative_prompt, h_div_w")
        records.append(rec)
    return records


class PromptDataset(IterableDataset):
    """Batches of prompt records for this rank (see the module docstring).

    Each batch is ``{"prompts": list[str], "seeds": list[int], "indices": list[int],
    "negative_prompts": list[str], "h_div_w": list[float]}``.
    """

    def __init__(self, records: Sequence[Dict[str, Any]], *, batch_size: int = 1, seed: int = 0,
                 h_div_w: float = 1.0, negative_prompt: str = "", rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        super().__init__()
        self.records = list(records)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.h_div_w = float(h_div_w)
        self.negative_prompt = negative_prompt
        self.rank = rank
        self.world_size = world_size

    def indices_for_rank(self) -> List[int]:
        """Item indices this rank predicts (``i % world_size == rank``)."""
        rank, world = resolve_rank_world(self.rank, self.world_size)
        return list(range(rank, len(self.records), world))

    def batches_for_rank(self) -> List[List[int]]:
        """This rank's indices grouped into batches."""
        idx = self.indices_for_rank()
        return [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]

    def __len__(self) -> int:
        return len(self.batches_for_rank())

    def item(self, index: int) -> Dict[str, Any]:
        """The full record of item ``index`` with defaults filled in."""
        rec = self.records[index]
        return {
            "index": index,
            "prompt": rec["prompt"],
            "seed": int(rec["seed"]) if rec.get("seed") is not None else self.seed + index,
            "negative_prompt": rec.get("negative_prompt") or self.negative_prompt,
            "h_div_w": float(rec["h_div_w"]) if rec.get("h_div_w") is not None else self.h_div_w,
        }

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker, num_workers = worker_id_count()
        for batch in self.batches_for_rank()[worker::num_workers]:
            items = [self.item(i) for i in batch]
            yield {
                "prompts": [it["prompt"] for it in items],
                "seeds": [it["seed"] for it in items],
                "indices": [it["index"] for it in items],
                "negative_prompts": [it["negative_prompt"] for it in items],
                "h_div_w": [it["h_div_w"] for it in items],
            }


class PromptDataModule(L.LightningDataModule):
    """Prompts for ``trainer.predict`` (see the module docstring).

    Args:
        prompts: a list of prompts (strings or dicts) or a path to a ``.txt`` / ``.jsonl`` file.
        batch_size: prompts per batch.
        seed: base seed; item ``i`` uses ``seed + i`` unless it has its own ``seed``.
        h_div_w: default aspect ratio (height / width) of the images.
        negative_prompt: default negative prompt.
        num_workers: DataLoader workers.
        rank / world_size: used when ``torch.distributed`` is not initialised.
    """

    def __init__(self, *, prompts: Union[str, Path, Sequence[Any]], batch_size: int = 1, seed: int = 0,
                 h_div_w: float = 1.0, negative_prompt: str = "", num_workers: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not float(h_div_w) > 0:
            raise ValueError(f"h_div_w must be positive, got {h_div_w}")
        self.prompts = prompts
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.h_div_w = float(h_div_w)
        self.negative_prompt = negative_prompt
        self.num_workers = int(num_workers)
        self.rank = rank
        self.world_size = world_size
        self.dataset: Optional[PromptDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the prompts (once)."""
        if self.dataset is None:
            self.dataset = PromptDataset(read_prompts(self.prompts), batch_size=self.batch_size, seed=self.seed,
                                         h_div_w=self.h_div_w, negative_prompt=self.negative_prompt,
                                         rank=self.rank, world_size=self.world_size)

    def predict_dataloader(self) -> DataLoader:
        """Batches of this rank's prompts."""
        self.setup("predict")
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)

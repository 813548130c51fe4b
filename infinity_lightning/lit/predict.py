"""Batch generation with ``Trainer.predict``: :class:`InfinityPredictor` and :class:`ImageWriter`.

A prompt *record* is a dict ``{"prompt", "seed", "index"}`` with optional ``"negative_prompt"``
and ``"h_div_w"``.  An *editing record* also names an ``"image"`` (a file path, relative to the
working folder) and edits it with the pipeline's editing methods instead of generating from text:
``"mask"`` (white = regenerate; with ``"grow"``, ``"blend"``, ``"feather"``, ``"keep_scales"``)
inpaints, ``"outpaint"`` (an aspect-ratio template, with ``"anchor"``) outpaints, and neither
makes variations that keep the image's first ``"keep_scales"`` scales (default half of them).
The image's aspect ratio picks the schedule (``"h_div_w"`` does not apply); each record is edited
alone with its own seed, so its image equals the direct ``pipe.inpaint(...)`` / ``pipe.outpaint``
/ ``pipe.variations`` call.  ``index`` is global (the position in the whole prompt list), so output files
never collide between ranks: with several devices, the prediction sampler gives rank r the
records i with ``i % world_size == r`` and each rank writes only its own files.

Example::

    records = prompt_records(["a dog", "a cat"], seed=0)
    trainer = Trainer(accelerator="cpu", devices=1, callbacks=[ImageWriter("out")], logger=False)
    trainer.predict(InfinityPredictor(pipe, pipe.sampling.replace(cfg=3.0)), prompt_dataloader(records, batch_size=1),
                    return_predictions=False)

Because the pipeline samples each image from its own seed, the image of a record equals
``pipe(record["prompt"], seed=record["seed"])`` (with ``batch_size=1``, the default), whichever
device or batch the record lands in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from ..io import atomic_write
from ..sampling import SamplingConfig

__all__ = ["InfinityPredictor", "ImageWriter", "PromptRecordDataset", "prompt_records", "read_prompts_file",
           "prompt_dataloader", "collate_records"]

PROMPT_KEYS = ("prompt", "text", "caption", "long_caption")
#: Keys of an editing record (see the module docstring), copied from a prompt dict.
EDIT_KEYS = ("image", "mask", "outpaint", "anchor", "keep_scales", "grow", "blend", "feather")


# -- prompt records ---------------------------------------------------------------------------
def prompt_records(prompts: Sequence[Union[str, Mapping[str, Any]]], *, seed: int = 0, num_images_per_prompt: int = 1,
                   negative_prompt: Optional[str] = None, aspect_ratio: float = 1.0) -> List[Dict[str, Any]]:
    """One record per image: prompt ``p`` image ``r`` gets index ``p * num_images_per_prompt + r``
    and seed ``seed + index`` unless the prompt (a dict) carries its own ``seed``, which then
    applies to its first image (``seed + r`` for the r-th).

    Dict prompts may give ``negative_prompt`` and ``h_div_w`` (or ``aspect_ratio``) per prompt;
    the keyword arguments are the defaults.  Dict prompts with an ``image`` are editing records
    (:data:`EDIT_KEYS`, checked here; an empty prompt is allowed for variations).
    """
    out: List[Dict[str, Any]] = []
    for p, item in enumerate(prompts):
        entry = {"prompt": item} if isinstance(item, str) else dict(item)
        text = next((entry[k] for k in PROMPT_KEYS if isinstance(entry.get(k), str)), None)
        if text is None:
            raise ValueError(f"prompt {p} has no text: expected a string or a dict with one of {list(PROMPT_KEYS)}")
        for r in range(num_images_per_prompt):
            index = p * num_images_per_prompt + r
            record = {"index": index, "prompt": text,
                      "seed": int(entry["seed"]) + r if entry.get("seed") is not None else int(seed) + index,
                      "h_div_w": float(entry.get("h_div_w", entry.get("aspect_ratio", aspect_ratio)))}
            neg = entry.get("negative_prompt", negative_prompt)
            if neg is not None:
                record["negative_prompt"] = str(neg)
            record.update(_edit_fields(entry, p))
            out.append(record)
    return out


def _edit_fields(entry: Mapping[str, Any], p: int) -> Dict[str, Any]:
    """The editing keys of prompt ``p`` (a dict), checked; ``{}`` for a text prompt."""
    fields = {k: entry[k] for k in EDIT_KEYS if entry.get(k) is not None}
    if not fields:
        return {}
    if "image" not in fields:
        raise ValueError(f"prompt {p}: {sorted(fields)} edit an image, but the prompt names no 'image'")
    if "mask" in fields and "outpaint" in fields:
        raise ValueError(f"prompt {p}: give 'mask' (inpaint) or 'outpaint' (a template ratio), not both")
    kind = "inpaint" if "mask" in fields else "outpaint" if "outpaint" in fields else "variations"
    allowed = {"inpaint": ("image", "mask", "grow", "blend", "feather", "keep_scales"),
               "outpaint": ("image", "outpaint", "anchor", "grow", "blend", "feather", "keep_scales"),
               "variations": ("image", "keep_scales")}[kind]
    extra = sorted(set(fields) - set(allowed))
    if extra:
        raise ValueError(f"prompt {p}: {extra} do not apply to {kind} (keys: {', '.join(allowed)})")
    for key in ("grow", "feather", "keep_scales"):
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"prompt {p}: '{key}' must be a whole number >= 0, got {value!r}")
    for key in ("image", "mask"):
        if key in fields and not isinstance(fields[key], (str, Path)):
            raise ValueError(f"prompt {p}: '{key}' must be a file path, got {fields[key]!r}")
    return {"edit": kind, **{k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}}


def read_prompts_file(path: Union[str, Path]) -> List[Union[str, Dict[str, Any]]]:
    """Prompts from a text file (one per line; blank lines and lines starting with ``#`` are
    skipped) or a ``.jsonl`` file (one JSON object per line with ``prompt``/``text``/``caption``/
    ``long_caption`` and optional ``seed``, ``negative_prompt``, ``h_div_w``)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"prompts file {path} is a folder, expected a text or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        out: List[Union[str, Dict[str, Any]]] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not any(isinstance(item.get(k), str) for k in PROMPT_KEYS):
                raise ValueError(f"{path}:{n}: expected an object with one of {list(PROMPT_KEYS)}")
            out.append(item)
        return out
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class PromptRecordDataset(Dataset):
    """A map-style dataset over prompt records (keeps their global ``index``)."""

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self.records = [dict(r) for r in records]
        indices = [r["index"] for r in self.records]
        if len(set(indices)) != len(indices):
            raise ValueError("prompt records have repeated indices; output files would overwrite each other")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.records[i]


def collate_records(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Keep a batch as a list of records (strings and per-record seeds do not stack)."""
    return list(batch)


def prompt_dataloader(records: Sequence[Mapping[str, Any]], batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """An unshuffled loader of records; under several devices Lightning's prediction sampler
    splits it as ``i % world_size == rank`` without repeating records."""
    return DataLoader(PromptRecordDataset(records), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_records)


def _as_records(batch: Any) -> List[Dict[str, Any]]:
    if isinstance(batch, Mapping):  # a default-collated dict of lists
        n = len(batch["prompt"])
        return [{k: (v[i].item() if torch.is_tensor(v) else v[i]) for k, v in batch.items()} for i in range(n)]
    return [dict(r) for r in batch]


# -- the module -------------------------------------------------------------------------------
def _jsonable_resolution(resolution: Any) -> Any:
    return resolution.to_dict() if hasattr(resolution, "to_dict") else resolution


class InfinityPredictor(pl.LightningModule):
    """Wraps an :class:`~infinity_lightning.pipeline.InfinityPipeline` for ``Trainer.predict``.

    Args:
        pipeline: the pipeline (its components become submodules, so Lightning places them).
        sampling: the :class:`~infinity_lightning.sampling.SamplingConfig` of every image (default:
            the pipeline's).
        resolution: pixel budget, pixel size or schedule (default: the pipeline's).
        batch_size: images per transformer batch inside a step (1: every image exactly as a
            direct pipeline call with its seed; see the pipeline's notes on batching).
        truncate_prompts: cut prompts longer than the transformer's text length instead of failing.

    Each record brings its own prompt, seed, aspect ratio (``h_div_w``) and negative prompt.
    ``predict_step(batch)`` takes a list of records (or a collated dict of lists) and returns
    ``{"images": [PIL images], "records": [records with the settings used]}``.
    """

    def __init__(self, pipeline, sampling: Optional[SamplingConfig] = None, *, resolution: Any = None,
                 batch_size: Optional[int] = 1, truncate_prompts: bool = False):
        super().__init__()
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        self.pipeline = pipeline
        self.sampling = sampling if sampling is not None else pipeline.sampling
        self.resolution = resolution if resolution is not None else pipeline.resolution
        pipeline.schedule_for(1.0, self.resolution)  # a bad resolution fails here, before the loop
        self.batch_size = batch_size
        self.truncate_prompts = bool(truncate_prompts)
        if not pipeline.offload:
            # as submodules they follow the Trainer's device placement
            self.transformer = pipeline.transformer
            self.tokenizer = pipeline.tokenizer
            if pipeline.text_encoder is not None:
                self.text_encoder = pipeline.text_encoder

    def on_predict_start(self) -> None:
        self.pipeline.device = self.device

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Dict[str, Any]:
        records = _as_records(batch)
        images: Dict[int, Any] = {}
        edits: Dict[int, Dict[str, Any]] = {}
        for i, r in enumerate(records):
            if r.get("image") is not None:
                images[i], edits[i] = self._edit(r)
        # text-to-image records with and without a negative prompt go through separate calls
        for has_neg in (False, True):
            part = [(i, r) for i, r in enumerate(records)
                    if i not in edits and (r.get("negative_prompt") is not None) == has_neg]
            if not part:
                continue
            recs = [r for _, r in part]
            out = self.pipeline([r["prompt"] for r in recs],
                                negative_prompt=[r["negative_prompt"] for r in recs] if has_neg else None,
                                seed=[int(r["seed"]) for r in recs],
                                aspect_ratio=[float(r.get("h_div_w", 1.0)) for r in recs],
                                sampling=self.sampling, resolution=self.resolution, batch_size=self.batch_size,
                                truncate_prompts=self.truncate_prompts, output_type="pil", progress=False)
            for (i, _), img in zip(part, out):
                images[i] = img
        settings = {**self.sampling.to_dict(), "resolution": _jsonable_resolution(self.resolution)}
        out_records = []
        for i, r in enumerate(records):
            rec = dict(r)
            rec["settings"] = dict(settings)
            if i in edits:
                rec["settings"].update(edits[i])
            rec["width"], rec["height"] = images[i].size
            out_records.append(rec)
        return {"images": [images[i] for i in range(len(records))], "records": out_records}

    def _edit(self, record: Mapping[str, Any]):
        """(PIL image, the edit's settings) of an editing record, through the pipeline's method."""
        r = record
        kind = _edit_fields(r, r["index"])["edit"]
        common = dict(seed=int(r["seed"]), negative_prompt=r.get("negative_prompt"), sampling=self.sampling,
                      resolution=self.resolution, truncate_prompts=self.truncate_prompts, output_type="pil")
        shaping = {k: r[k] for k in ("grow", "blend", "feather", "keep_scales") if r.get(k) is not None}
        try:
            if kind == "inpaint":
                out = self.pipeline.inpaint(r["prompt"], r["image"], r["mask"], **shaping, **common)
            elif kind == "outpaint":
                out = self.pipeline.outpaint(r["prompt"], r["image"], float(r["outpaint"]),
                                             anchor=r.get("anchor", "center"), **shaping, **common)
            else:
                out = self.pipeline.variations(r["image"], r["prompt"], r.get("keep_scales"), **common)
        except (ValueError, OSError) as e:
            raise ValueError(f"record {r['index']} ({kind} of {r['image']}): {e}") from e
        return out[0], {"edit": kind, **out.settings}


# -- writing ----------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class ImageWriter(BasePredictionWriter):
    """Writes ``<index:06d>.png`` and ``<index:06d>.json`` (prompt, seed, settings) per image.

    Files are written atomically.  An index is written at most once per run (a repeat is an
    error), and an existing file is an error unless ``overwrite=True``, so two runs or two ranks
    never silently replace each other's images.  ``extra`` is merged into every JSON record
    (for example the model paths).
    """

    def __init__(self, output_dir: Union[str, Path], overwrite: bool = False,
                 extra: Optional[Mapping[str, Any]] = None, write_interval: str = "batch"):
        super().__init__(write_interval)
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.extra = dict(extra or {})
        self.written: List[int] = []

    def paths(self, index: int):
        """(png, json) paths of a record index."""
        stem = f"{int(index):06d}"
        return self.output_dir / f"{stem}.png", self.output_dir / f"{stem}.json"

    def write(self, image, record: Mapping[str, Any]) -> Path:
        """Write one image and its record; returns the PNG path."""
        index = int(record["index"])
        png, meta = self.paths(index)
        if index in self.written:
            raise FileExistsError(f"record index {index} was written twice in this run ({png})")
        if not self.overwrite and (png.exists() or meta.exists()):
            raise FileExistsError(f"{png} already exists; use another output folder or overwrite=True (--overwrite)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(png, lambda tmp: image.save(tmp, format="PNG"))
        data = {**_jsonable(dict(record)), **_jsonable(self.extra), "file": png.name}
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, ensure_ascii=False),
                                                            encoding="utf-8"))
        self.written.append(index)
        return png

    def _write_prediction(self, prediction: Mapping[str, Any]) -> None:
        for image, record in zip(prediction["images"], prediction["records"]):
            self.write(image, record)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self._write_prediction(prediction)

    def write_on_epoch_end(self, trainer, pl_module, predictions: Iterable[Any], batch_indices) -> None:
        for group in predictions:
            # one dataloader gives a list of batch outputs; several give a list of such lists
            for prediction in (group if isinstance(group, list) else [group]):
                self._write_prediction(prediction)

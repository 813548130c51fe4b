"""The original Infinity training layout: a folder of ``<h_div_w_template>_<count>.jsonl`` files.

Each line is a JSON object with ``image_path`` (relative to the jsonl file's folder, or to
``image_root`` when given, or absolute), ``h_div_w`` (the image's height / width),
``long_caption``, and optionally ``text`` (a short caption) and ``long_caption_type`` (docs/model.md#data).

Differences from the original, on purpose:

* The count in the file name is not trusted: lines are counted while indexing, and a mismatch
  is only a warning (the original drops into a debugger or hangs).
* A record is bucketed by its own ``h_div_w``, not by the file it sits in: a record whose ratio
  is nearer another template than the file's is moved to that template's bucket (a warning
  counts them), so every image is cropped as little as possible.  A record without a usable
  ``h_div_w`` falls back to the file's template.
* ``text`` may be missing.  Unusable lines (invalid JSON, invalid UTF-8, no ``image_path``) and
  unusable samples (see :mod:`.transforms`, empty captions) are skipped and counted.
* Nothing is written next to the data (the original pre-splits files into per-rank parts).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import ImageTextDataModule, IndexedSource
from .captions import select_caption
from .transforms import DEFAULT_MAX_IMAGE_PIXELS, SkipSample, open_image

log = logging.getLogger("infinity_lightning.datamodules")

_NAME_RE = re.compile(r"^(?P<ratio>\d+(?:\.\d+)?)_(?P<count>\d+)$")


def parse_jsonl_name(path: Union[str, Path]) -> Tuple[Optional[float], Optional[int]]:
    """``(h_div_w_template, count)`` from a file name like ``1.000_000002500.jsonl``
    (``None`` for a part that does not parse)."""
    m = _NAME_RE.match(Path(path).stem)
    if not m:
        return None, None
    return float(m.group("ratio")), int(m.group("count"))


class JsonlSource(IndexedSource):
    """Index of the records of one or more jsonl files (byte offsets, ratios; lines read lazily)."""

    def __init__(self, files: Sequence[Path], *, image_root: Optional[Union[str, Path]] = None,
                 short_caption_prob: float = 0.0, dynamic_length_prompts: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.files = [Path(f) for f in files]
        self.image_root = Path(image_root) if image_root is not None else None
        self.short_caption_prob = float(short_caption_prob)
        self.dynamic_length_prompts = dynamic_length_prompts
        self.max_image_pixels = max_image_pixels
        self.index_skips: Counter = Counter()
        self.index_attempted = 0
        self.rebucketed = 0
        file_ids: List[int] = []
        offsets: List[int] = []
        ratios: List[float] = []
        for fid, path in enumerate(self.files):
            self._index_file(fid, path, file_ids, offsets, ratios)
        self.file_ids = np.asarray(file_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.ratios = np.asarray(ratios, dtype=np.float64)
        if self.rebucketed:
            log.warning("%d records are nearer another template than their file's; they were bucketed by their "
                        "own h_div_w", self.rebucketed)
        self._handles: Dict[int, Any] = {}
        self._pid = os.getpid()

    def _skip(self, reason: str, detail: str) -> None:
        self.index_skips[reason] += 1
        if self.index_skips[reason] <= 20:
            log.warning("skipping unusable record (%s): %s", reason, detail)

    def _index_file(self, fid: int, path: Path, file_ids: List[int], offsets: List[int], ratios: List[float]) -> None:
        from infinity_lightning.scales import nearest_template

        template, named_count = parse_jsonl_name(path)
        lines = 0
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                lines += 1
                self.index_attempted += 1
                where = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._skip("bad_encoding", f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    self._skip("malformed_line", f"{where}: {e.msg}")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("image_path"), str) or not rec["image_path"]:
                    self._skip("bad_record", f"{where}: no 'image_path' string")
                    continue
                ratio = rec.get("h_div_w")
                try:
                    ratio = float(ratio)
                    if not math.isfinite(ratio) or ratio <= 0:
                        raise ValueError
                except (TypeError, ValueError):
                    if template is None:
                        self._skip("bad_record", f"{where}: no usable 'h_div_w' and the file name has no template")
                        continue
                    ratio = template
                if template is not None and nearest_template(ratio) != nearest_template(template):
                    self.rebucketed += 1
                file_ids.append(fid)
                offsets.append(start)
                ratios.append(ratio)
        if named_count is not None and named_count != lines:
            log.warning("%s: the file name says %d records but the file has %d lines; using the %d lines",
                        path, named_count, lines, lines)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files never travel to worker processes
        return state

    def _read_line(self, index: int) -> Dict[str, Any]:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        fid = int(self.file_ids[index])
        f = self._handles.get(fid)
        if f is None:
            f = self._handles[fid] = open(self.files[fid], "rb")
        f.seek(int(self.offsets[index]))
        return json.loads(f.readline().decode("utf-8"))

    def __len__(self) -> int:
        return len(self.offsets)

    def aspect_ratios(self) -> Sequence[float]:
        return self.ratios

    def image_path(self, rec: Dict[str, Any], index: int) -> Path:
        """Absolute path of a record's image."""
        p = Path(rec["image_path"])
        if p.is_absolute():
            return p
        root = self.image_root if self.image_root is not None else self.files[int(self.file_ids[index])].parent
        return root / p

    def load(self, index: int, rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Any, str]:
        rec = self._read_line(index)
        where = self.describe(index)
        long_caption = rec.get("long_caption")
        text = rec.get("text")
        if long_caption is None and not text:
            raise SkipSample("missing_caption", f"{where}: no 'long_caption'")
        if not isinstance(long_caption, (str, type(None))) or not isinstance(text, (str, type(None))):
            raise SkipSample("bad_record", f"{where}: captions must be strings")
        if not (long_caption or "").strip() and not (text or "").strip():
            raise SkipSample("empty_caption", where)
        caption = select_caption(long_caption or "", text, rng, short_caption_prob=self.short_caption_prob,
                                 dynamic_length=self.dynamic_length_prompts,
                                 long_caption_type=rec.get("long_caption_type"))
        image = open_image(self.image_path(rec, index), max_pixels=self.max_image_pixels)
        return image, caption

    def describe(self, index: int) -> str:
        return f"{self.files[int(self.file_ids[index])]} record at byte {int(self.offsets[index])}"


def find_jsonl_files(data_dir: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """The ``*.jsonl`` files of a folder (sorted), or the given file(s)."""
    paths = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"jsonl data path not found: {p}")
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {data_dir}")
    return files


class JsonlDataModule(ImageTextDataModule):
    """Training data in the original Infinity jsonl layout (docs/model.md#data).

    Args (besides those of :class:`~.base.ImageTextDataModule`):
        data_dir: folder of ``<template>_<count>.jsonl`` files, or a file or list of files.
        image_root: folder relative image paths start from (default: each jsonl file's folder).
        short_caption_prob: probability of training on the short caption (``text``).
        dynamic_length_prompts: cut long captions to a random number of sentences (docs/model.md#data).
    """

    def __init__(self, *, data_dir: Union[str, Path, Sequence[Union[str, Path]]],
                 image_root: Optional[Union[str, Path]] = None, short_caption_prob: float = 0.0,
                 dynamic_length_prompts: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= short_caption_prob <= 1.0:
            raise ValueError(f"short_caption_prob must be in [0, 1], got {short_caption_prob}")
        self.data_dir = data_dir
        self.image_root = image_root
        self.short_caption_prob = float(short_caption_prob)
        self.dynamic_length_prompts = dynamic_length_prompts

    def build_source(self) -> JsonlSource:
        return JsonlSource(find_jsonl_files(self.data_dir), image_root=self.image_root,
                           short_caption_prob=self.short_caption_prob,
                           dynamic_length_prompts=self.dynamic_length_prompts,
                           max_image_pixels=self.max_image_pixels)

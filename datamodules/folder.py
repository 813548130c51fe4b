"""A folder of images with captions, searched recursively.

Captions come from a ``captions.jsonl`` file at the top of the folder (one
``{"file": <path relative to the folder>, "caption": ...}`` per line, optionally ``"h_div_w"``),
or, for images it does not list, from a sidecar text file with the same stem
(``cat/01.jpg`` -> ``cat/01.txt``, UTF-8).  Images without a caption are skipped and counted,
unless captions are not required (``require_captions=False``, set by tokenizer recipes): then a
plain folder of images is enough and uncaptioned images get the caption ``""``.  Aspect ratios
for bucketing are read from the image headers while indexing (no decoding).  Layout::

    my_images/
      captions.jsonl          optional: {"file": "cats/01.jpg", "caption": "a cat on a sofa"} per line
      cats/01.jpg
      cats/01.txt             optional: the caption of cats/01.jpg (when captions.jsonl does not list it)
      dogs/02.png
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import ImageTextDataModule, IndexedSource
from .transforms import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, SkipSample, image_aspect, open_image

log = logging.getLogger("infinity_lightning.datamodules")

CAPTIONS_FILE = "captions.jsonl"


def read_caption_file(path: Path) -> str:
    """A sidecar caption (UTF-8, stripped); :class:`SkipSample` if missing, not UTF-8 or empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_caption", f"{path} not found") from None
    try:
        caption = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise SkipSample("bad_encoding", f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not caption:
        raise SkipSample("empty_caption", str(path))
    return caption


class FolderSource(IndexedSource):
    """Index of a captioned image folder (see the module docstring)."""

    def __init__(self, root: Union[str, Path], *, captions_file: Optional[str] = CAPTIONS_FILE,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, require_captions: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "not found"
            raise FileNotFoundError(f"image folder {self.root} {what} (data.data_dir)")
        self.max_image_pixels = max_image_pixels
        self.require_captions = require_captions
        self.index_skips: Counter = Counter()
        self.index_attempted = 0
        exts = {e.lower() for e in extensions}
        listed: Dict[str, Dict[str, Any]] = {}
        self._invalid: set = set()
        if captions_file and (self.root / captions_file).is_file():
            listed = self._read_captions_jsonl(self.root / captions_file)
        self.paths: List[Path] = []
        self.captions: List[Optional[str]] = []
        ratios: List[float] = []
        images = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        for path in images:
            rel = path.relative_to(self.root).as_posix()
            if rel in self._invalid:
                continue
            entry = listed.get(rel)
            sidecar = path.with_suffix(".txt")
            self.index_attempted += 1
            if entry is None and not sidecar.exists() and self.require_captions:
                self._skip("missing_caption", f"{path}: not in {captions_file} and no {sidecar.name}")
                continue
            ratio = entry.get("h_div_w") if entry else None
            if not isinstance(ratio, (int, float)) or not ratio > 0:
                try:
                    ratio = image_aspect(path, max_pixels=max_image_pixels)
                except SkipSample as e:
                    self._skip(e.reason, e.detail)
                    continue
            self.paths.append(path)
            self.captions.append(entry["caption"] if entry else None)
            ratios.append(float(ratio))
        for rel in sorted(set(listed) - {p.relative_to(self.root).as_posix() for p in images}):
            self.index_attempted += 1
            self._skip("missing_file", f"{self.root / rel} (listed in {captions_file})")
        self.ratios = np.asarray(ratios, dtype=np.float64)

    def _skip(self, reason: str, detail: str) -> None:
        self.index_skips[reason] += 1
        if self.index_skips[reason] <= 20:
            log.warning("skipping unusable record (%s): %s", reason, detail)

    def _read_captions_jsonl(self, path: Path) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.index_attempted += 1
                    self._skip("bad_encoding", f"{where}: not UTF-8")
                    continue
                except json.JSONDecodeError as e:
                    self.index_attempted += 1
                    self._skip("malformed_line", f"{where}: {e.msg}")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                    self.index_attempted += 1
                    self._skip("bad_record", f"{where}: no 'file' string")
                    continue
                caption = rec.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    if not self.require_captions:
                        continue  # the image is used all the same
                    self.index_attempted += 1
                    self._skip("empty_caption" if isinstance(caption, str) else "missing_caption", where)
                    # Remembered so the image is neither captioned from a sidecar nor counted twice.
                    self._invalid.add(Path(rec["file"]).as_posix())
                    continue
                out[Path(rec["file"]).as_posix()] = rec
        return out

    def __len__(self) -> int:
        return len(self.paths)

    def aspect_ratios(self) -> Sequence[float]:
        return self.ratios

    def load(self, index: int, rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Any, str]:
        path = self.paths[index]
        caption = self.captions[index]
        if caption is None:
            sidecar = path.with_suffix(".txt")
            if self.require_captions or sidecar.exists():
                try:
                    caption = read_caption_file(sidecar)
                except SkipSample:
                    if self.require_captions:
                        raise
                    caption = ""
            else:
                caption = ""
        image = open_image(path, max_pixels=self.max_image_pixels)
        return image, caption

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class ImageFolderDataModule(ImageTextDataModule):
    """Training data from a folder of images with ``captions.jsonl`` or sidecar ``.txt`` captions.

    Args (besides those of :class:`~.base.ImageTextDataModule`):
        data_dir: the folder (searched recursively).
        captions_file: name of the jsonl caption file at the top of the folder (``None``: only
            sidecar files).
        extensions: image file extensions to index.
    """

    def __init__(self, *, data_dir: Union[str, Path], captions_file: Optional[str] = CAPTIONS_FILE,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not Path(data_dir).is_dir():  # checked now, before a run starts, not when the data is first read
            what = "is a file, not a folder" if Path(data_dir).exists() else "not found"
            raise FileNotFoundError(f"image folder {data_dir} {what} (data.data_dir)")
        self.data_dir = data_dir
        self.captions_file = captions_file
        self.extensions = tuple(extensions)

    def build_source(self) -> FolderSource:
        return FolderSource(self.data_dir, captions_file=self.captions_file, extensions=self.extensions,
                            max_image_pixels=self.max_image_pixels, require_captions=self.require_captions)

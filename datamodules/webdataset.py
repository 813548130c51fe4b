"""Training data from webdataset tar shards.

A shard is a tar file; files sharing a *key* (the member path up to the first ``.`` of its base
name: ``000123.jpg`` and ``000123.txt``) form one sample.  A sample needs an image (``jpg``,
``jpeg``, ``png`` or ``webp``) and a caption: a ``txt`` file (UTF-8), or a ``json`` file with
``"caption"``, ``"text"`` or ``"long_caption"`` (with ``"long_caption"`` and ``"text"`` both
present, the caption is chosen as for the jsonl layout, docs/model.md#data).

Splitting
    Each epoch the shard list is shuffled with ``(seed, epoch)`` (the same order on every rank);
    rank ``r`` of ``W`` takes shards ``r, r + W, ...`` and its worker ``w`` of ``N`` every
    ``N``-th of those, so every shard is read exactly once per epoch over all ``W x N``
    workers.  With fewer shards than ``W x N`` some workers get none; a one-pass epoch then has
    idle workers, and (with ``batches_per_epoch``) every worker is given shard ``g mod S``, so
    some shards are read by several workers.  Use at least ``W x N`` shards.

Epoch length
    Without ``batches_per_epoch`` an epoch is one pass over the shards; its length is unknown
    in advance and ranks may run different numbers of steps, which DDP does not allow: set
    ``batches_per_epoch`` (per rank) for multi-device training.  Each worker then yields its
    share of that count, cycling through its shards (reshuffled every pass) as needed.

Inside a worker, raw samples go through a shuffle buffer (``shuffle_buffer`` samples), are
decoded, and are collected into one buffer per aspect-ratio bucket; a full buffer is a batch.
A shard that is cut short or is not a tar file is counted (``truncated_shard`` /
``corrupt_shard``) and the stream continues with the next shard; the samples read before the
cut are used.
"""
from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .base import (
    ImageTextDataModule,
    SkipCounter,
    TextFeatureCache,
    BatchMaker,
    EpochMixin,
    SKIPS_ONLY_KEY,
    SKIPS_KEY,
    assign_template,
    bucket_templates,
    split_for,
    target_size,
    worker_id_count,
)
from .captions import select_caption
from .transforms import DEFAULT_MAX_IMAGE_PIXELS, SkipSample, open_image, transform_image

log = logging.getLogger("infinity_lightning.datamodules")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")


def expand_braces(pattern: str) -> List[str]:
    """Expand webdataset-style braces: ``"a-{000..002}.tar"`` -> ``a-000.tar a-001.tar a-002.tar``,
    ``"{a,b}.tar"`` -> ``a.tar b.tar`` (nested and repeated groups allowed)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def resolve_shards(shards: Union[str, Path, Sequence[Union[str, Path]]]) -> List[str]:
    """Shard paths from a folder (its ``*.tar`` files), a glob, a brace pattern, or a list of them."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    out: List[str] = []
    for item in items:
        item = str(item)
        if Path(item).is_dir():
            out += sorted(str(p) for p in Path(item).glob("*.tar"))
            continue
        for pattern in expand_braces(item):
            if any(ch in pattern for ch in "*?["):
                out += sorted(glob.glob(pattern))
            else:
                out.append(pattern)
    if not out:
        raise FileNotFoundError(f"no webdataset shards found for {shards!r}")
    return out


def _split_key(name: str) -> Tuple[str, str]:
    # webdataset convention: the key runs to the first '.' of the base name.
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_tar_samples(path: str, counter: SkipCounter) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a shard; a shard cut short or unreadable
    is counted in ``counter`` and ends the stream of that shard."""
    key: Optional[str] = None
    files: Dict[str, bytes] = {}
    read = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_key(member.name)
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if f is not None and len(data) < member.size:
                    raise tarfile.ReadError("unexpected end of data")
                read += 1
                if k != key:
                    if key is not None:
                        yield key, files
                    key, files = k, {}
                files[ext] = data
    except FileNotFoundError:
        counter.skip("missing_file", path)
        return
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        reason = "truncated_shard" if read else "corrupt_shard"
        counter.skip(reason, f"{path}: {e} (after {read} files; the sample being read is dropped)")
        return
    if key is not None:
        yield key, files


class ShardStreamDataset(EpochMixin, IterableDataset):
    """Streams batches of one aspect-ratio bucket each from tar shards (see the module docstring)."""

    def __init__(self, shards: Sequence[str], *, batch_size: int, seed: int = 0, pn: str = "0.06M",
                 image_size: Optional[int] = None, h_div_w_templates: Optional[Sequence[float]] = None,
                 shuffle: bool = True, drop_last: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None, text_cache: Optional[TextFeatureCache] = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, short_caption_prob: float = 0.0,
                 dynamic_length_prompts: bool = False, shuffle_buffer: int = 256,
                 batches_per_epoch: Optional[int] = None) -> None:
        super().__init__()
        self.shards = list(shards)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pn = pn
        self.image_size = image_size
        self.templates = [1.0] if image_size is not None else bucket_templates(h_div_w_templates)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.maker = BatchMaker(text_cache)
        self.max_image_pixels = max_image_pixels
        self.short_caption_prob = short_caption_prob
        self.dynamic_length_prompts = dynamic_length_prompts
        self.shuffle_buffer = max(1, int(shuffle_buffer)) if shuffle else 1
        self.batches_per_epoch = batches_per_epoch
        self.skips = SkipCounter()

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a webdataset epoch has no known length; set batches_per_epoch")
        return int(self.batches_per_epoch)

    def _decode(self, shard: str, key: str, files: Dict[str, bytes],
                rng: np.random.Generator) -> Tuple[torch.Tensor, str, float]:
        where = f"{shard}:{key}"
        image_ext = next((e for e in IMAGE_KEYS if e in files), None)
        if image_ext is None:
            raise SkipSample("incomplete_sample", f"{where}: no image (has {sorted(files)})")
        caption = self._caption(files, where, rng)
        image = open_image(files[image_ext], max_pixels=self.max_image_pixels, name=f"{where}.{image_ext}")
        w, h = image.size
        template = 1.0 if self.image_size is not None else assign_template(h / w, self.templates)
        size = target_size(template, self.pn, self.image_size)
        return transform_image(image, size[0], size[1]), caption, template

    def _caption(self, files: Dict[str, bytes], where: str, rng: np.random.Generator) -> str:
        ext = next((e for e in CAPTION_KEYS if e in files), None)
        if ext is not None:
            try:
                caption = files[ext].decode("utf-8-sig").strip()
            except UnicodeDecodeError:
                raise SkipSample("bad_encoding", f"{where}.{ext}: not UTF-8") from None
        elif "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except UnicodeDecodeError:
                raise SkipSample("bad_encoding", f"{where}.json: not UTF-8") from None
            except json.JSONDecodeError as e:
                raise SkipSample("malformed_line", f"{where}.json: {e.msg}") from None
            if not isinstance(meta, dict):
                raise SkipSample("bad_record", f"{where}.json: not an object")
            long_caption, text = meta.get("long_caption"), meta.get("text")
            if isinstance(long_caption, str) and long_caption.strip():
                caption = select_caption(long_caption, text if isinstance(text, str) else None, rng,
                                         short_caption_prob=self.short_caption_prob,
                                         dynamic_length=self.dynamic_length_prompts,
                                         long_caption_type=meta.get("long_caption_type"))
            else:
                caption = next((meta[k] for k in ("caption", "text", "prompt") if isinstance(meta.get(k), str)), None)
                if caption is None:
                    raise SkipSample("missing_caption", f"{where}.json: no caption field")
        else:
            raise SkipSample("missing_caption", f"{where}: no txt or json caption (has {sorted(files)})")
        if not caption.strip():
            raise SkipSample("empty_caption", where)
        return caption

    def _shards_for_worker(self, epoch: int, rank: int, world: int, worker: int, num_workers: int,
                           rng: np.random.Generator) -> List[str]:
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        mine = split_for(order, rank, world, worker, num_workers)
        if not mine and self.batches_per_epoch is not None:
            mine = [order[(rank * num_workers + worker) % len(order)]]
        return mine

    def _raw_stream(self, shards: List[str], rng: np.random.Generator) -> Iterator[Tuple[str, str, Dict[str, bytes]]]:
        buffer: List[Tuple[str, str, Dict[str, bytes]]] = []
        for shard in shards:
            for key, files in iter_tar_samples(shard, self.skips):
                buffer.append((shard, key, files))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        rank, world = self.rank_world()
        worker, num_workers = worker_id_count()
        rng = np.random.default_rng([self.seed, epoch, rank * num_workers + worker, 3])
        shards = self._shards_for_worker(epoch, rank, world, worker, num_workers, rng)
        quota = None
        if self.batches_per_epoch is not None:
            quota = len(range(worker, int(self.batches_per_epoch), num_workers))
            if quota == 0:
                return
        if not shards:
            return
        buckets: Dict[float, Tuple[List[torch.Tensor], List[str]]] = {}
        produced = 0
        while True:
            used_this_pass = 0
            for shard, key, files in self._raw_stream(shards, rng):
                self.skips.attempt()
                try:
                    image, caption, template = self._decode(shard, key, files, rng)
                except SkipSample as e:
                    self.skips.skip(e.reason, e.detail)
                    continue
                used_this_pass += 1
                images, captions = buckets.setdefault(template, ([], []))
                images.append(image)
                captions.append(caption)
                if len(images) == self.batch_size:
                    item = self.maker.make(images, captions, template)
                    item[SKIPS_KEY] = self.skips.take_delta()
                    buckets[template] = ([], [])
                    yield item
                    produced += 1
                    if quota is not None and produced >= quota:
                        return
            if quota is None:
                break
            if used_this_pass == 0:
                # Cycling over shards without a single usable sample would never end.
                yield {SKIPS_ONLY_KEY: True, SKIPS_KEY: self.skips.take_delta()}
                raise RuntimeError(f"webdataset shards {shards} hold no usable samples (skips: {dict(self.skips.reasons)})")
            if self.shuffle:
                shards = [shards[i] for i in rng.permutation(len(shards))]
        if not self.drop_last:
            for template, (images, captions) in buckets.items():
                if images:
                    item = self.maker.make(images, captions, template)
                    item[SKIPS_KEY] = self.skips.take_delta()
                    yield item
        delta = self.skips.take_delta()
        if delta["attempted"] or delta["reasons"]:
            yield {SKIPS_ONLY_KEY: True, SKIPS_KEY: delta}


class WebDatasetDataModule(ImageTextDataModule):
    """Training data from webdataset tar shards (see the module docstring).

    Args (besides those of :class:`~.base.ImageTextDataModule`):
        shards: a folder of ``.tar`` files, a glob, a brace pattern (``"data/{000..099}.tar"``)
            or a list of paths.
        shuffle_buffer: samples held in each worker's shuffle buffer.
        batches_per_epoch: batches per rank per epoch (needed for DDP; ``None``: one pass).
        short_caption_prob / dynamic_length_prompts: caption choice for ``json`` captions with
            ``long_caption`` and ``text`` (docs/model.md#data).
    """

    def __init__(self, *, shards: Union[str, Path, Sequence[Union[str, Path]]], shuffle_buffer: int = 256,
                 batches_per_epoch: Optional[int] = None, short_caption_prob: float = 0.0,
                 dynamic_length_prompts: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if batches_per_epoch is not None and int(batches_per_epoch) < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.shards = shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.short_caption_prob = float(short_caption_prob)
        self.dynamic_length_prompts = dynamic_length_prompts

    def build_dataset(self) -> ShardStreamDataset:
        return ShardStreamDataset(
            resolve_shards(self.shards), batch_size=self.batch_size, seed=self.seed, pn=self.pn,
            image_size=self.image_size, h_div_w_templates=self.h_div_w_templates, shuffle=self.shuffle,
            drop_last=self.drop_last, rank=self.rank, world_size=self.world_size,
            text_cache=self.make_text_cache(), max_image_pixels=self.max_image_pixels,
            short_caption_prob=self.short_caption_prob, dynamic_length_prompts=self.dynamic_length_prompts,
            shuffle_buffer=self.shuffle_buffer, batches_per_epoch=self.batches_per_epoch,
        )

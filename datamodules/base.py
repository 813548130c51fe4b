"""Common machinery of the training DataModules.

Batches
    Every training DataModule yields dicts ``{"images": float (B, 3, H, W) in [-1, 1],
    "captions": list[str], "h_div_w_template": float}``, plus ``"text_features": list[Tensor
    (len_i, C)]`` when a text-feature cache is configured.  All images of a batch share one
    aspect-ratio template (the transformer's scale schedule is chosen per batch, docs/model.md#scale-schedules):
    records are bucketed by their height/width onto :data:`infinity_lightning.scales.TEMPLATES`
    (or onto ``h_div_w_templates`` when given), and the pixel size of a bucket is
    ``scales.resolve(pn, template).pixel_size()``; an explicit square ``image_size`` (small models, the
    quick start trains at 64 px) overrides that and puts every record in the 1.0 bucket.

Epochs, seeds, splitting
    The datasets are ``IterableDataset``s that yield whole batches (``DataLoader(batch_size=None)``,
    as the original), so Lightning never injects a ``DistributedSampler`` that would pad with
    duplicates.  For indexed sources (:class:`BucketBatchDataset`) an epoch's batch plan is a pure
    function of ``(seed, epoch)``, identical on every rank: records are shuffled within their
    bucket, cut into batches, and the batch order is shuffled.  Rank ``r`` of ``W`` takes plan
    batches ``r, r + W, ...``; worker ``w`` of ``N`` takes every ``N``-th of those, so across
    ``W x N`` workers every batch is produced exactly once.  Random choices inside a worker use
    ``numpy.random.default_rng([seed, epoch, global_worker_id])`` (global worker id
    ``rank * N + w``); a record's caption choice uses ``[seed, epoch, record index]`` so it does
    not depend on the worker layout.  The rank and world size come from ``torch.distributed`` when
    it is initialised, else from the ``rank``/``world_size`` arguments (to simulate ranks), else
    0 and 1.  The epoch advances by one each time the loader is iterated, or is set explicitly
    with ``set_epoch`` (:class:`DataModuleMonitor` does it from ``trainer.current_epoch``).

``drop_last``
    ``True`` (training default): the incomplete last batch of each bucket is dropped and the plan
    is cut to a multiple of the world size, so every rank runs the same number of steps (DDP
    would otherwise wait forever for the rank with one step more).  Which records fall out
    changes every epoch.  ``False``: every record appears exactly once per epoch over all ranks
    and workers; the last batch of a bucket may be smaller and ranks may differ by one batch,
    which suits single-device training, validation and prediction.

Captions
    Text-to-image training needs a caption per record: a record without one is skipped (below).
    ``require_captions=False`` (what tokenizer recipes set: a tokenizer learns from images alone)
    accepts records without a caption, with ``""`` as their caption, so a plain image folder
    trains a tokenizer.

Bad data
    A record that cannot be used (missing, empty, truncated, undecodable or oversized image,
    missing/empty/non-UTF-8 caption, malformed line, a shard cut short) is skipped, counted by
    reason, and logged as a warning naming the file.  Within a batch a skipped record is
    replaced by a record of the same bucket that this worker already loaded this epoch, so the
    batch keeps its size (a batch is shorter only when no such record exists yet).  Counts travel
    with the batches to the main process, where :meth:`ImageTextDataModule.skip_summary` sums
    them; when more than ``max_skip_fraction`` of the attempted records (checked once
    ``min_samples_for_skip_check`` were attempted, and at the end of every epoch) or more than
    ``max_skips`` records were skipped in an epoch, :class:`TooManySkipsError` stops training.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infinity_lightning import scales
from infinity_lightning.errors import UserError

from .transforms import DEFAULT_MAX_IMAGE_PIXELS, SkipSample, transform_image

log = logging.getLogger("infinity_lightning.datamodules")

TextEncoder = Callable[[List[str]], List[torch.Tensor]]

#: Key of the per-batch skip counts sent from the workers (removed by the loader).
SKIPS_KEY = "skips"
#: Marker of an item that only carries skip counts (never reaches the training step).
SKIPS_ONLY_KEY = "_skips_only"


class TooManySkipsError(UserError, RuntimeError):
    """Raised when more records are skipped as unusable than the configured threshold allows."""


# --------------------------------------------------------------------------------------------
# Skip counting
# --------------------------------------------------------------------------------------------


class SkipCounter:
    """Counts attempted and skipped records by reason, and logs each skip (rate-limited).

    ``reasons`` maps a short reason (``"corrupt_image"``, ``"malformed_line"``, ...) to a count.
    """

    #: Warnings logged per reason before further ones are only counted.
    log_limit = 20

    def __init__(self) -> None:
        self.attempted = 0
        self.reasons: Counter = Counter()
        self._logged: Counter = Counter()
        self._sent_attempted = 0
        self._sent_reasons: Counter = Counter()

    @property
    def skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.reasons.values())

    def attempt(self, n: int = 1) -> None:
        """Count ``n`` records that were tried (used or skipped)."""
        self.attempted += n

    def skip(self, reason: str, detail: str = "") -> None:
        """Count one skipped record and log a warning naming it."""
        self.reasons[reason] += 1
        self._logged[reason] += 1
        if self._logged[reason] <= self.log_limit:
            log.warning("skipping unusable sample (%s): %s", reason, detail)
            if self._logged[reason] == self.log_limit:
                log.warning("further '%s' skips are counted but not logged", reason)

    def take_delta(self) -> Dict[str, Any]:
        """Counts since the previous call (what a worker sends along with a batch)."""
        delta = {"attempted": self.attempted - self._sent_attempted,
                 "reasons": dict(self.reasons - self._sent_reasons)}
        self._sent_attempted = self.attempted
        self._sent_reasons = Counter(self.reasons)
        return delta

    def merge(self, delta: Dict[str, Any]) -> None:
        """Add counts received from a worker (see :meth:`take_delta`)."""
        self.attempted += int(delta.get("attempted", 0))
        self.reasons.update(delta.get("reasons", {}))

    def reset(self) -> None:
        """Forget all counts (start of an epoch)."""
        self.__init__()

    def summary(self) -> Dict[str, Any]:
        """``{"attempted", "skipped", "skip_fraction", "reasons"}``."""
        return {
            "attempted": self.attempted,
            "skipped": self.skipped,
            "skip_fraction": self.skipped / self.attempted if self.attempted else 0.0,
            "reasons": dict(self.reasons),
        }

    def check(self, *, max_skip_fraction: Optional[float], max_skips: Optional[int], min_attempted: int = 0,
              where: str = "dataset") -> None:
        """Raise :class:`TooManySkipsError` if a threshold is exceeded."""
        skipped = self.skipped
        if max_skips is not None and skipped > max_skips:
            raise TooManySkipsError(
                f"{where}: {skipped} of {self.attempted} samples were unusable, more than max_skips={max_skips} "
                f"(reasons: {dict(self.reasons)}); fix the data or raise max_skips"
            )
        if max_skip_fraction is not None and self.attempted and self.attempted >= min_attempted:
            frac = skipped / self.attempted
            if frac > max_skip_fraction:
                raise TooManySkipsError(
                    f"{where}: {skipped} of {self.attempted} samples ({frac:.1%}) were unusable, more than "
                    f"max_skip_fraction={max_skip_fraction} (reasons: {dict(self.reasons)}); fix the data or "
                    "raise max_skip_fraction"
                )


# --------------------------------------------------------------------------------------------
# Ranks, workers, seeds
# --------------------------------------------------------------------------------------------


def resolve_rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rank, world_size)``: from ``torch.distributed`` when initialised, else the arguments, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = 1 if world_size is None else int(world_size)
    r = 0 if rank is None else int(rank)
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"rank={r} and world_size={world} are inconsistent; expected 0 <= rank < world_size")
    return r, world


def worker_id_count() -> Tuple[int, int]:
    """``(worker_id, num_workers)`` of the current DataLoader worker, ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_for(items: Sequence[Any], rank: int, world_size: int, worker: int, num_workers: int) -> List[Any]:
    """The items of one worker: rank ``r`` takes ``items[r::W]``, its worker ``w`` every ``N``-th of those.

    Over all ``W x N`` workers every item is taken exactly once.
    """
    return list(items[rank::world_size])[worker::num_workers]


# --------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------


def bucket_templates(h_div_w_templates: Optional[Sequence[float]] = None) -> List[float]:
    """The templates records may be assigned to (all 15, or the given subset, checked)."""
    if h_div_w_templates is None:
        return list(scales.TEMPLATE_RATIOS)
    out = []
    for t in h_div_w_templates:
        t = float(t)
        match = [r for r in scales.TEMPLATE_RATIOS if abs(r - t) < 1e-6]
        if not match:
            raise ValueError(f"h_div_w_templates: {t} is not an aspect-ratio template; templates are "
                             f"{scales.TEMPLATE_RATIOS}")
        out.append(match[0])
    if not out:
        raise ValueError("h_div_w_templates is empty")
    return out


def assign_template(h_div_w: float, templates: Sequence[float]) -> float:
    """The template nearest to ``h_div_w`` among ``templates`` (first one on ties)."""
    return min(templates, key=lambda r: abs(r - h_div_w))


def target_size(template: float, pn: str, image_size: Optional[int]) -> Tuple[int, int]:
    """Pixel size ``(H, W)`` of a bucket: square ``image_size`` if given, else the table's size."""
    if image_size is not None:
        return int(image_size), int(image_size)
    return scales.resolve(pn, template).pixel_size()


# --------------------------------------------------------------------------------------------
# Text-feature cache
# --------------------------------------------------------------------------------------------


class TextFeatureCache:
    """Text features of captions cached on disk, one file per caption.

    The file name is the SHA-256 of ``namespace`` and the caption (``<dir>/<2 hex>/<hash>.pt``);
    use a different ``namespace`` per text encoder.  Missing entries are computed with
    ``encoder(list[str]) -> list[Tensor (len_i, C)]`` in one call per batch and written through
    a temporary file and a rename, so concurrent workers and ranks never see half-written files.
    Without an encoder a miss is an error.  ``hits``/``misses`` count lookups in this process.
    """

    def __init__(self, cache_dir: Union[str, Path], encoder: Optional[TextEncoder] = None,
                 namespace: str = "default") -> None:
        self.cache_dir = Path(cache_dir)
        self.encoder = encoder
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def key(self, caption: str) -> str:
        """Hex digest naming the cache file of ``caption``."""
        return hashlib.sha256(f"{self.namespace}\0{caption}".encode("utf-8")).hexdigest()

    def path(self, caption: str) -> Path:
        """Cache file of ``caption``."""
        k = self.key(caption)
        return self.cache_dir / k[:2] / f"{k}.pt"

    def _read(self, path: Path) -> Optional[torch.Tensor]:
        if not path.exists():
            return None
        try:
            value = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt entry is recomputed, never fatal
            log.warning("text-feature cache entry %s is unreadable (%s); recomputing it", path, e)
            return None
        return value if isinstance(value, torch.Tensor) else None

    def get(self, captions: Sequence[str]) -> List[torch.Tensor]:
        """Features of each caption, computing and storing the ones not cached yet."""
        from infinity_lightning.io import atomic_save

        out: List[Optional[torch.Tensor]] = []
        missing: List[int] = []
        for i, caption in enumerate(captions):
            value = self._read(self.path(caption))
            out.append(value)
            if value is None:
                missing.append(i)
        self.hits += len(captions) - len(missing)
        self.misses += len(missing)
        if missing:
            if self.encoder is None:
                raise FileNotFoundError(
                    f"text-feature cache {self.cache_dir} has no entry for caption {captions[missing[0]]!r} "
                    f"({self.path(captions[missing[0]])}) and no text_encoder was given to compute it"
                )
            todo = [captions[i] for i in missing]
            computed = self.encoder(todo)
            if len(computed) != len(todo):
                raise ValueError(f"text_encoder returned {len(computed)} feature tensors for {len(todo)} captions")
            for i, caption, feats in zip(missing, todo, computed):
                feats = feats.detach().to("cpu").contiguous()
                atomic_save(feats, self.path(caption))
                out[i] = feats
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class IndexedSource:
    """A sized collection of captioned images that :class:`BucketBatchDataset` batches.

    Subclasses set ``index_skips`` (records dropped while indexing, by reason) and
    ``index_attempted``, and implement :meth:`__len__`, :meth:`aspect_ratios` and :meth:`load`.
    """

    index_skips: Counter
    index_attempted: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def aspect_ratios(self) -> Sequence[float]:
        """Height / width of every record (used for bucketing)."""
        raise NotImplementedError

    def load(self, index: int, rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Any, str]:
        """``(image, caption)`` of a record; the image is a PIL image (resized and cropped to
        ``size`` = ``(H, W)`` by the caller) or a float tensor ``(3, H, W)`` in ``[-1, 1]``.
        Raises :class:`~.transforms.SkipSample` for an unusable record."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A short label (file name) of a record for log messages."""
        return f"record {index}"


class BatchMaker:
    """Turns loaded samples into a batch dict (shared by the indexed and streaming datasets)."""

    def __init__(self, text_cache: Optional[TextFeatureCache]) -> None:
        self.text_cache = text_cache

    def make(self, images: List[torch.Tensor], captions: List[str], template: float) -> Dict[str, Any]:
        batch: Dict[str, Any] = {
            "images": torch.stack(images, 0),
            "captions": captions,
            "h_div_w_template": float(template),
        }
        if self.text_cache is not None:
            batch["text_features"] = self.text_cache.get(captions)
        return batch


def _to_tensor(image: Any, size: Tuple[int, int]) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if tuple(image.shape) != (3, size[0], size[1]):
            raise SkipSample("bad_shape", f"tensor of shape {tuple(image.shape)}, expected (3, {size[0]}, {size[1]})")
        return image.float()
    if not isinstance(image, Image.Image):
        raise SkipSample("bad_shape", f"unsupported image type {type(image).__name__}")
    return transform_image(image, size[0], size[1])


class EpochMixin:
    """Epoch bookkeeping shared by the datasets: set explicitly, or advanced on each new pass."""

    epoch: int = 0
    _pending_epoch: Optional[int] = None
    _started: bool = False
    _rank_world: Optional[Tuple[int, int]] = None
    rank: Optional[int] = None
    world_size: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (seeds the shuffle and random choices)."""
        self._pending_epoch = int(epoch)

    def begin_epoch(self) -> int:
        """Called by the loader in the main process before workers start; returns the epoch."""
        if self._pending_epoch is not None:
            self.epoch, self._pending_epoch = self._pending_epoch, None
        elif self._started:
            self.epoch += 1
        self._started = True
        self._rank_world = resolve_rank_world(self.rank, self.world_size)
        return self.epoch

    def rank_world(self) -> Tuple[int, int]:
        """``(rank, world_size)`` fixed at the start of the pass (or resolved now)."""
        return self._rank_world or resolve_rank_world(self.rank, self.world_size)


class BucketBatchDataset(EpochMixin, IterableDataset):
    """Yields batches of one aspect-ratio bucket each from an :class:`IndexedSource`.

    See the module docstring for the epoch plan, the rank/worker split and ``drop_last``.
    Items are batch dicts with an extra ``"skips"`` entry (counts since the previous item) that
    :class:`EpochDataLoader` removes.
    """

    def __init__(self, source: IndexedSource, *, batch_size: int, seed: int = 0, pn: str = "0.06M",
                 image_size: Optional[int] = None, h_div_w_templates: Optional[Sequence[float]] = None,
                 shuffle: bool = True, drop_last: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None, text_cache: Optional[TextFeatureCache] = None,
                 require_captions: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pn = pn
        self.image_size = image_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.maker = BatchMaker(text_cache)
        self.require_captions = require_captions
        self.skips = SkipCounter()  # this process's counts (a worker's own copy in workers)
        if image_size is not None:
            templates = [1.0]
        else:
            templates = bucket_templates(h_div_w_templates)
            scales.check_budget(pn)
        ratios = np.asarray(source.aspect_ratios(), dtype=np.float64)
        order = {t: i for i, t in enumerate(scales.TEMPLATE_RATIOS)}
        self.buckets: Dict[float, np.ndarray] = {}
        if len(ratios):
            if image_size is None:
                table = np.asarray(templates, dtype=np.float64)
                # argmin keeps the first template on ties, as assign_template / the original do
                assigned = table[np.argmin(np.abs(ratios[:, None] - table[None, :]), axis=1)]
            else:
                assigned = np.ones(len(ratios))
            for t in sorted(set(assigned.tolist()), key=lambda t: order[t]):
                self.buckets[t] = np.nonzero(assigned == t)[0]
        self.sizes = {t: target_size(t, pn, image_size) for t in self.buckets}

    # -- plan ---------------------------------------------------------------------------------
    def plan(self, epoch: int) -> List[Tuple[float, np.ndarray]]:
        """All batches of an epoch as ``(template, record indices)``, identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: List[Tuple[float, np.ndarray]] = []
        for t, members in self.buckets.items():
            idx = rng.permutation(members) if self.shuffle else members
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append((t, chunk))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            _, world = self.rank_world()
            batches = batches[: len(batches) - len(batches) % world]
        return batches

    def num_batches(self) -> int:
        """Batches per epoch over all ranks (after ``drop_last``)."""
        n = sum((len(m) // self.batch_size) if self.drop_last else -(-len(m) // self.batch_size)
                for m in self.buckets.values())
        if self.drop_last:
            n -= n % self.rank_world()[1]
        return n

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together)."""
        rank, world = self.rank_world()
        total = self.num_batches()
        return len(range(rank, total, world))

    # -- iteration ----------------------------------------------------------------------------
    def _load_one(self, i: int, epoch: int, size: Tuple[int, int]) -> Tuple[torch.Tensor, str]:
        rng = np.random.default_rng([self.seed, epoch, int(i), 1])
        image, caption = self.source.load(int(i), rng, size)
        if not isinstance(caption, str) or not caption.strip():
            if self.require_captions:
                raise SkipSample("empty_caption", self.source.describe(int(i)))
            caption = ""
        return _to_tensor(image, size), caption

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        rank, world = self.rank_world()
        worker, num_workers = worker_id_count()
        rng = np.random.default_rng([self.seed, epoch, rank * num_workers + worker, 2])
        mine = split_for(self.plan(epoch), rank, world, worker, num_workers)
        good: Dict[float, List[int]] = {}
        for template, indices in mine:
            size = self.sizes[template]
            loaded = good.setdefault(template, [])
            queue = [int(i) for i in indices]
            images: List[torch.Tensor] = []
            captions: List[str] = []
            missing = 0
            budget = 2 * len(queue) + 8  # bounded retries: unusable data never loops forever
            while budget > 0:
                if not queue:
                    # Refill from records of this bucket this worker already loaded fine, so the
                    # batch keeps its size and every bad record is tried once per epoch.
                    if not (missing and loaded):
                        break
                    queue.append(loaded[int(rng.integers(len(loaded)))])
                    missing -= 1
                budget -= 1
                i = queue.pop(0)
                self.skips.attempt()
                try:
                    image, caption = self._load_one(i, epoch, size)
                except SkipSample as e:
                    self.skips.skip(e.reason, e.detail or self.source.describe(i))
                    missing += 1
                    continue
                if len(loaded) < 4096 and i not in loaded[-len(indices):]:
                    loaded.append(i)
                images.append(image)
                captions.append(caption)
            item: Dict[str, Any]
            if images:
                item = self.maker.make(images, captions, template)
            else:
                item = {SKIPS_ONLY_KEY: True}
            item[SKIPS_KEY] = self.skips.take_delta()
            yield item


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


class EpochDataLoader(DataLoader):
    """A ``DataLoader(batch_size=None)`` over a batch-yielding dataset.

    Each iteration starts an epoch on the dataset (:meth:`EpochMixin.begin_epoch`, in the main
    process so the workers inherit the epoch and rank), strips the skip counts the workers send
    with the batches, adds them to ``counter`` and applies the skip thresholds; at the end of the
    pass it logs a summary.  Workers are never persistent, so each epoch's settings reach them.
    """

    def __init__(self, dataset: IterableDataset, *, counter: Optional[SkipCounter] = None,
                 max_skip_fraction: Optional[float] = 0.1, max_skips: Optional[int] = None,
                 min_samples_for_skip_check: int = 100, num_workers: int = 0, pin_memory: bool = False,
                 name: str = "dataset", **kwargs: Any) -> None:
        kwargs.pop("batch_size", None)
        kwargs.pop("persistent_workers", None)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False, **kwargs)
        self.counter = counter if counter is not None else SkipCounter()
        self.max_skip_fraction = max_skip_fraction
        self.max_skips = max_skips
        self.min_samples_for_skip_check = min_samples_for_skip_check
        self.name = name
        self.last_summary: Optional[Dict[str, Any]] = None

    def _check(self, final: bool) -> None:
        self.counter.check(max_skip_fraction=self.max_skip_fraction, max_skips=self.max_skips,
                           min_attempted=0 if final else self.min_samples_for_skip_check, where=self.name)

    def __iter__(self) -> Iterator[Dict[str, Any]]:  # type: ignore[override]
        begin = getattr(self.dataset, "begin_epoch", None)
        epoch = begin() if callable(begin) else 0
        self.counter.reset()
        inner = super().__iter__()
        return self._wrap(inner, epoch)

    def _wrap(self, inner: Iterator[Dict[str, Any]], epoch: int) -> Iterator[Dict[str, Any]]:
        while True:
            with warnings.catch_warnings():
                # Items that only carry skip counts make torch count more items than len() says.
                warnings.filterwarnings("ignore", message="Length of IterableDataset")
                try:
                    item = next(inner)
                except StopIteration:
                    break
            delta = item.pop(SKIPS_KEY, None) if isinstance(item, dict) else None
            if delta:
                self.counter.merge(delta)
                if delta.get("reasons"):
                    self._check(final=False)
            if isinstance(item, dict) and item.pop(SKIPS_ONLY_KEY, False):
                continue
            yield item
        summary = self.counter.summary()
        summary["epoch"] = epoch
        self.last_summary = summary
        if summary["skipped"]:
            log.warning("%s epoch %d: skipped %d of %d samples (%s)", self.name, epoch, summary["skipped"],
                        summary["attempted"], ", ".join(f"{k}: {v}" for k, v in sorted(summary["reasons"].items())))
        self._check(final=True)


# --------------------------------------------------------------------------------------------
# DataModule base
# --------------------------------------------------------------------------------------------


class ImageTextDataModule(L.LightningDataModule):
    """Base of the training DataModules (see the module docstring for the batch format).

    Args:
        batch_size: records per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        seed: base seed of shuffling and random choices.
        pn: pixel budget (``"0.06M"``, ``"0.25M"``, ``"0.60M"``, ``"1M"``) giving each bucket's size.
        image_size: square pixel size overriding ``pn`` (every record in the 1.0 bucket).
        h_div_w_templates: restrict buckets to these templates (records go to the nearest one).
        shuffle: shuffle records within buckets and the batch order each epoch.
        drop_last: see the module docstring.
        max_skip_fraction / max_skips / min_samples_for_skip_check: skip thresholds.
        max_image_pixels: decoded images larger than this are skipped (decompression bombs).
        text_encoder: optional ``encode(list[str]) -> list[Tensor (len_i, C)]`` filling the cache
            (it runs inside the DataLoader workers, so it must be picklable when ``num_workers > 0``).
        text_cache_dir: folder of cached text features; when set batches carry ``"text_features"``.
        text_cache_namespace: distinguishes caches of different text encoders in one folder.
        rank / world_size: used when ``torch.distributed`` is not initialised (to simulate ranks).
        pin_memory: DataLoader ``pin_memory``.
        require_captions: skip records without a caption (``True``, text-to-image training) or
            use them with the caption ``""`` (``False``, tokenizer training; tokenizer recipes set
            it).  Read when the data is indexed, so it may be changed after construction.
    """

    def __init__(self, *, batch_size: int = 8, num_workers: int = 0, seed: int = 0, pn: str = "0.06M",
                 image_size: Optional[int] = None, h_div_w_templates: Optional[Sequence[float]] = None,
                 shuffle: bool = True, drop_last: bool = True, max_skip_fraction: Optional[float] = 0.1,
                 max_skips: Optional[int] = None, min_samples_for_skip_check: int = 100,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, text_encoder: Optional[TextEncoder] = None,
                 text_cache_dir: Optional[Union[str, Path]] = None, text_cache_namespace: str = "default",
                 rank: Optional[int] = None, world_size: Optional[int] = None, pin_memory: bool = False,
                 require_captions: bool = True) -> None:
        super().__init__()
        if image_size is None:
            scales.check_budget(pn)
        elif int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if h_div_w_templates is not None:
            bucket_templates(h_div_w_templates)
        if text_encoder is not None and text_cache_dir is None:
            raise ValueError("text_encoder needs text_cache_dir: features are cached on disk")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pn = pn
        self.image_size = None if image_size is None else int(image_size)
        self.h_div_w_templates = None if h_div_w_templates is None else list(h_div_w_templates)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_skip_fraction = max_skip_fraction
        self.max_skips = max_skips
        self.min_samples_for_skip_check = int(min_samples_for_skip_check)
        self.max_image_pixels = int(max_image_pixels)
        self.text_encoder = text_encoder
        self.text_cache_dir = text_cache_dir
        self.text_cache_namespace = text_cache_namespace
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.require_captions = bool(require_captions)
        self.train_dataset: Optional[IterableDataset] = None
        self.skips = SkipCounter()
        self.index_skips: Counter = Counter()
        self._loader: Optional[EpochDataLoader] = None
        self._epoch: Optional[int] = None

    # -- to implement -------------------------------------------------------------------------
    def build_source(self) -> IndexedSource:
        """The indexed source of training records (indexed sources); streaming modules override
        :meth:`build_dataset` instead."""
        raise NotImplementedError

    def build_dataset(self) -> IterableDataset:
        """The batch-yielding training dataset (default: :class:`BucketBatchDataset` over
        :meth:`build_source`)."""
        source = self.build_source()
        self.index_skips = Counter(getattr(source, "index_skips", Counter()))
        attempted = getattr(source, "index_attempted", 0)
        if self.index_skips:
            bad = sum(self.index_skips.values())
            log.warning("%s: %d of %d records were unusable while indexing (%s)", type(self).__name__, bad,
                        attempted, dict(self.index_skips))
            counter = SkipCounter()
            counter.attempted = attempted
            counter.reasons = Counter(self.index_skips)
            counter.check(max_skip_fraction=self.max_skip_fraction, max_skips=self.max_skips,
                          where=f"{type(self).__name__} index")
        if len(source) == 0:
            raise ValueError(f"{type(self).__name__}: no usable records found")
        ds = BucketBatchDataset(source, batch_size=self.batch_size, seed=self.seed, pn=self.pn,
                                image_size=self.image_size, h_div_w_templates=self.h_div_w_templates,
                                shuffle=self.shuffle, drop_last=self.drop_last, rank=self.rank,
                                world_size=self.world_size, text_cache=self.make_text_cache(),
                                require_captions=self.require_captions)
        if ds.num_batches() == 0:
            raise ValueError(
                f"{type(self).__name__}: {len(source)} records give no full batch of {self.batch_size} per rank "
                f"(buckets: { {t: len(m) for t, m in ds.buckets.items()} }); lower batch_size or set drop_last=False"
            )
        return ds

    # -- Lightning hooks ----------------------------------------------------------------------
    def make_text_cache(self) -> Optional[TextFeatureCache]:
        """The text-feature cache, or ``None`` when ``text_cache_dir`` is not set."""
        if self.text_cache_dir is None:
            return None
        return TextFeatureCache(self.text_cache_dir, self.text_encoder, self.text_cache_namespace)

    def setup(self, stage: Optional[str] = None) -> None:
        """Index the data (once)."""
        if self.train_dataset is None:
            self.train_dataset = self.build_dataset()
            if self._epoch is not None:
                self.train_dataset.set_epoch(self._epoch)

    def train_dataloader(self) -> EpochDataLoader:
        """Loader of batch dicts; iterate it once per epoch."""
        self.setup("fit")
        self._loader = EpochDataLoader(
            self.train_dataset, counter=self.skips, max_skip_fraction=self.max_skip_fraction,
            max_skips=self.max_skips, min_samples_for_skip_check=self.min_samples_for_skip_check,
            num_workers=self.num_workers, pin_memory=self.pin_memory, name=type(self).__name__,
        )
        return self._loader

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass over the data."""
        self._epoch = int(epoch)
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    def skip_summary(self) -> Dict[str, Any]:
        """Skips of the current (or last finished) epoch in this process, all workers included:
        ``{"epoch", "attempted", "skipped", "skip_fraction", "reasons", "index_reasons"}``."""
        out = self.skips.summary()
        out["epoch"] = getattr(self.train_dataset, "epoch", 0)
        out["index_reasons"] = dict(self.index_skips)
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The epoch, so a resumed run continues the shuffle sequence."""
        return {"epoch": getattr(self.train_dataset, "epoch", self._epoch or 0)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "epoch" in state_dict:
            self.set_epoch(int(state_dict["epoch"]))


class DataModuleMonitor(L.Callback):
    """Sets the DataModule's epoch from ``trainer.current_epoch`` and logs its skip summary.

    At each training epoch end it logs ``data/skipped`` and ``data/skip_fraction`` (and one
    ``data/skipped_<reason>`` per reason) through the LightningModule and a summary line, then
    applies the DataModule's skip thresholds (:class:`TooManySkipsError`).
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "skip_summary"):
            return
        summary = dm.skip_summary()
        metrics = {"data/skipped": float(summary["skipped"]), "data/skip_fraction": float(summary["skip_fraction"])}
        for reason, n in summary["reasons"].items():
            metrics[f"data/skipped_{reason}"] = float(n)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=False, sync_dist=False)
        log.info("data epoch %s: %s", summary.get("epoch"), summary)
        # The loader checks the thresholds when a pass runs to its end; an epoch cut short (max_steps,
        # limit_train_batches) never gets there, so the end-of-epoch check is made here as well.
        counter = getattr(dm, "skips", None)
        if isinstance(counter, SkipCounter):
            counter.check(max_skip_fraction=getattr(dm, "max_skip_fraction", None),
                          max_skips=getattr(dm, "max_skips", None), where=type(dm).__name__)


def accepted_kwargs(cls: type) -> List[str]:
    """Keyword arguments accepted by ``cls(...)``, following ``**kwargs`` up the class hierarchy."""
    names: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names += [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        if not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            break
    return sorted(set(names))

"""Lightning DataModules, installed as ``infinity_lightning.datamodules``.

Training DataModules yield ``{"images": (B, 3, H, W) in [-1, 1], "captions": list[str],
"h_div_w_template": float}`` batches (plus ``"text_features"`` with a text-feature cache), one
aspect-ratio template per batch; see :mod:`.base`.  :func:`build_datamodule` builds one by its
registry name from keyword arguments (as recipes do).
"""
from __future__ import annotations

from typing import Any, Dict, Type

import lightning as L

from .base import (
    BucketBatchDataset,
    DataModuleMonitor,
    EpochDataLoader,
    ImageTextDataModule,
    IndexedSource,
    SkipCounter,
    TextFeatureCache,
    TooManySkipsError,
    accepted_kwargs,
)
from .captions import select_caption
from .emoji import EmojiDataModule, list_emoji, render_emoji
from .folder import ImageFolderDataModule
from .jsonl import JsonlDataModule
from .latents import LatentsDataModule, precompute_latents
from .prompts import PromptDataModule, read_prompts
from .shapes import (
    ShapeObject,
    ShapesChecker,
    ShapesDataModule,
    ShapesGenerator,
    ShapeSpec,
    parse_caption,
    render_shapes,
)
from .transforms import SkipSample, open_image, resize_and_crop, to_model_range, transform_image
from .webdataset import WebDatasetDataModule

#: Registry name -> DataModule class (the ``data.name`` of a recipe).
DATAMODULES: Dict[str, Type[L.LightningDataModule]] = {
    "shapes": ShapesDataModule,
    "jsonl": JsonlDataModule,
    "webdataset": WebDatasetDataModule,
    "folder": ImageFolderDataModule,
    "emoji": EmojiDataModule,
    "prompts": PromptDataModule,
    "latents": LatentsDataModule,
}

try:  # tokenizer-training photo crops (needs scikit-image at build time, not at import)
    from .photos import PhotoCropsDataModule

    DATAMODULES["photos"] = PhotoCropsDataModule
except ImportError:  # pragma: no cover - the module is optional
    pass


def build_datamodule(name: str, **kwargs: Any) -> L.LightningDataModule:
    """Instantiate the DataModule registered as ``name`` with keyword arguments.

    Raises ``ValueError`` naming the unknown name or keyword and listing the valid ones.
    """
    if name not in DATAMODULES:
        raise ValueError(f"unknown datamodule {name!r}; available: {sorted(DATAMODULES)}")
    cls = DATAMODULES[name]
    valid = accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"datamodule {name!r} ({cls.__name__}) got unknown argument(s) {unknown}; "
                         f"valid arguments: {valid}")
    return cls(**kwargs)


__all__ = [
    "DATAMODULES",
    "BucketBatchDataset",
    "DataModuleMonitor",
    "EmojiDataModule",
    "EpochDataLoader",
    "ImageFolderDataModule",
    "ImageTextDataModule",
    "IndexedSource",
    "JsonlDataModule",
    "LatentsDataModule",
    "PromptDataModule",
    "ShapeObject",
    "ShapeSpec",
    "ShapesChecker",
    "ShapesDataModule",
    "ShapesGenerator",
    "SkipCounter",
    "SkipSample",
    "TextFeatureCache",
    "TooManySkipsError",
    "WebDatasetDataModule",
    "build_datamodule",
    "list_emoji",
    "open_image",
    "parse_caption",
    "precompute_latents",
    "read_prompts",
    "render_emoji",
    "render_shapes",
    "resize_and_crop",
    "select_caption",
    "to_model_range",
    "transform_image",
]

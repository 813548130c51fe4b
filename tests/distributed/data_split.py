"""Which records each rank's DataLoader workers yield, for tests/test_distributed.py.

``python -m torch.distributed.run --nproc_per_node=2 --standalone data_split.py OUT`` iterates the
shapes and the image-folder DataModules on every rank (2 DataLoader workers each, two epochs,
``drop_last`` on and off) under a real gloo process group, identifies every sample, and writes
``OUT/data_split.json``::

    {case: {"expected": [key, ...] (every record once), "batch_size": n,
            "epochs": [[rank 0's batches, rank 1's batches], ...]}}   # a batch is a list of keys

A shapes sample is identified by its caption and a hash of its image tensor (scenes can repeat);
a folder sample by its caption (unique per file).  The expected keys are computed from the
records directly (source + transform), not through the DataModule.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from infinity_lightning.datamodules.folder import ImageFolderDataModule
from infinity_lightning.datamodules.shapes import ShapesDataModule
from infinity_lightning.datamodules.transforms import transform_image

EPOCHS = 2
WORKERS = 2


def image_key(caption: str, image: torch.Tensor) -> str:
    return caption + "|" + hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()[:16]


def run_epochs(dm, key_fn):
    loader = dm.train_dataloader()
    epochs = []
    for _ in range(EPOCHS):  # every pass over the loader is the next epoch
        batches = []
        for batch in loader:
            batches.append([key_fn(c, img) for c, img in zip(batch["captions"], batch["images"])])
        epochs.append(batches)
    return epochs


def gather(epochs):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, epochs)
    return [[out[r][e] for r in range(len(out))] for e in range(EPOCHS)]


def make_folder(root: Path, n: int) -> None:
    """``n`` images of three aspect ratios (three buckets), distinct pixels, captions.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(48, 48), (32, 64), (64, 32)]
    lines = []
    for i in range(n):
        h, w = sizes[i % 3]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"sub{i % 2}/img{i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / name)
        lines.append(json.dumps({"file": name, "caption": f"picture number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}

    n_shapes, size = 23, 32
    for drop_last in (False, True):
        dm = ShapesDataModule(num_samples=n_shapes, image_size=size, batch_size=3, num_workers=WORKERS, seed=5,
                              drop_last=drop_last)
        epochs = gather(run_epochs(dm, image_key))
        if rank == 0:
            source = dm.build_source()
            expected = []
            for i in range(n_shapes):
                img, cap = source.load(i, np.random.default_rng(0), (size, size))
                expected.append(image_key(cap, transform_image(img, size, size)))
            result[f"shapes_drop_last_{drop_last}"] = {"expected": expected, "batch_size": 3, "epochs": epochs}

    folder = out / "folder_data"
    n_folder = 17
    if rank == 0:
        make_folder(folder, n_folder)
    dist.barrier()
    for drop_last in (False, True):
        # No image_size: records are bucketed by aspect ratio (three buckets at the 0.06M sizes).
        dm = ImageFolderDataModule(data_dir=folder, pn="0.06M", batch_size=2, num_workers=WORKERS, seed=3,
                                   drop_last=drop_last)
        epochs = gather(run_epochs(dm, lambda c, img: c))
        if rank == 0:
            result[f"folder_drop_last_{drop_last}"] = {
                "expected": [f"picture number {i}" for i in range(n_folder)], "batch_size": 2, "epochs": epochs}

    if rank == 0:
        (out / "data_split.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

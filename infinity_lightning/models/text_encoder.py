"""Frozen text encoder and the packed ("varlen") text-feature layout of Infinity (docs/model.md#text-conditioning).

A prompt batch is encoded once by a Hugging Face encoder (flan-t5-xl for the released models) and
only the real rows of each prompt are kept, concatenated along the token axis::

    kv_compact  (sum(lens), C) float32   rows of prompt 0, then prompt 1, ...
    lens        [len_0, ..., len_{B-1}]  real tokens per prompt, EOS included
    cu_seqlens  (B+1,) int32             [0, len_0, len_0+len_1, ...]
    max_seqlen  int                      max(lens)

:class:`TextFeatures` holds that tuple; :class:`TextEncoder` produces it.  Tiny random T5
encoders for tests, notebooks and the CPU quick start are built by :mod:`infinity_lightning.tiny`.

Example (offline)::

    folder = infinity_lightning.tiny.make_tiny_t5("/tmp/tiny_t5", ["a red apple", "a dog on grass"])
    encoder = TextEncoder.from_pretrained(folder)
    feats = encoder.encode(["a red apple", "a dog"])
    feats.kv_compact.shape   # (sum(feats.lens), 64)
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..io import PathLike
from ..quiet import hf_progress_bars_off, is_small_model

logger = logging.getLogger(__name__)


__all__ = [
    "TextFeatures",
    "TextEncoder",
    "PromptTruncatedWarning",
    "flan_t5_xl_config",
]


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder's ``max_length`` and was cut."""


def _cu_seqlens(lens: Sequence[int], device=None) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if len(lens):
        out[1:] = torch.cumsum(torch.tensor(list(lens), dtype=torch.int64), 0).to(torch.int32)
    return out.to(device) if device is not None else out


@dataclasses.dataclass(frozen=True)
class TextFeatures:
    """Packed text features of a batch of B prompts (docs/model.md#text-conditioning).

    Attributes:
        kv_compact: (sum(lens), C) float tensor, the real rows of every prompt, concatenated.
        lens: list of B ints, rows per prompt (real tokens including EOS).
        cu_seqlens: (B+1,) int32 tensor ``[0, cumsum(lens)]`` on ``kv_compact``'s device.
        max_seqlen: ``max(lens)`` (0 for an empty batch).

    ``as_tuple()`` gives ``(kv_compact, lens, cu_seqlens, max_seqlen)``, the order the original
    code passes around.
    """

    kv_compact: torch.Tensor
    lens: List[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def __post_init__(self) -> None:
        lens = [int(n) for n in (self.lens.tolist() if torch.is_tensor(self.lens) else self.lens)]
        object.__setattr__(self, "lens", lens)
        if self.kv_compact.dim() != 2:
            raise ValueError(f"kv_compact must be (sum(lens), C), got shape {tuple(self.kv_compact.shape)}")
        if sum(lens) != self.kv_compact.shape[0]:
            raise ValueError(f"lens sum to {sum(lens)} but kv_compact has {self.kv_compact.shape[0]} rows")
        if tuple(self.cu_seqlens.shape) != (len(lens) + 1,):
            raise ValueError(f"cu_seqlens must have B+1 = {len(lens) + 1} entries, got {tuple(self.cu_seqlens.shape)}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def pack(cls, rows: Sequence[torch.Tensor]) -> "TextFeatures":
        """Pack a list of per-prompt features, each (len_i, C), into one :class:`TextFeatures`."""
        rows = list(rows)
        if not rows:
            raise ValueError("cannot pack an empty list of prompts (the channel width is unknown)")
        widths = {r.shape[-1] for r in rows}
        if any(r.dim() != 2 for r in rows) or len(widths) != 1:
            raise ValueError(f"pack expects 2-D (len_i, C) tensors of one width, got {[tuple(r.shape) for r in rows]}")
        lens = [int(r.shape[0]) for r in rows]
        kv = torch.cat(rows, dim=0)
        return cls(kv, lens, _cu_seqlens(lens, kv.device), max(lens))

    @classmethod
    def from_padded(cls, hidden: torch.Tensor, attention_mask: torch.Tensor) -> "TextFeatures":
        """Pack (B, L, C) encoder outputs, keeping the ``mask.sum()`` real rows of each sample.

        Boolean indexing walks sample by sample, so the rows come out packed in batch order
        whichever side the tokenizer pads on.
        """
        mask = attention_mask.bool()
        lens = mask.sum(dim=1).tolist()
        kv = hidden[mask]
        return cls(kv, lens, _cu_seqlens(lens, kv.device), max(lens) if lens else 0)

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lens)

    @property
    def width(self) -> int:
        """Channel width C."""
        return int(self.kv_compact.shape[1])

    def as_tuple(self):
        """``(kv_compact, lens, cu_seqlens, max_seqlen)``."""
        return self.kv_compact, self.lens, self.cu_seqlens, self.max_seqlen

    def split(self) -> List[torch.Tensor]:
        """The per-prompt features, a list of B views of shape (len_i, C)."""
        return list(torch.split(self.kv_compact, self.lens, dim=0))

    def to(self, device=None, dtype: Optional[torch.dtype] = None, non_blocking: bool = False) -> "TextFeatures":
        """Move to ``device`` and/or cast the features to ``dtype`` (``cu_seqlens`` stays int32).

        A dtype given as the first argument (``feats.to(torch.bfloat16)``) is understood too.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        kv = self.kv_compact.to(device=device, dtype=dtype, non_blocking=non_blocking)
        cu = self.cu_seqlens.to(device=device, non_blocking=non_blocking) if device is not None else self.cu_seqlens
        return TextFeatures(kv, list(self.lens), cu, self.max_seqlen)

    def select(self, indices: Union[Sequence[int], torch.Tensor]) -> "TextFeatures":
        """The prompts at ``indices`` (any order, repeats allowed), re-packed."""
        if torch.is_tensor(indices):
            indices = indices.tolist()
        parts = self.split()
        picked = [parts[int(i)] for i in indices]
        if not picked:
            return TextFeatures(self.kv_compact[:0], [], torch.zeros(1, dtype=torch.int32, device=self.cu_seqlens.device), 0)
        return TextFeatures.pack(picked)

    def concat(self, other: "TextFeatures") -> "TextFeatures":
        """``[self; other]`` as one 2B-sequence batch (negative prompts for guidance, docs/model.md#sampling).

        ``kv_compact`` stacks self's rows, then other's; ``cu_seqlens`` is self's followed by
        other's without its leading 0, shifted by self's row count; ``max_seqlen`` the larger.
        """
        if other.width != self.width:
            raise ValueError(f"cannot concat text features of width {self.width} and {other.width}")
        kv = torch.cat([self.kv_compact, other.kv_compact.to(self.kv_compact)], dim=0)
        shift = self.kv_compact.shape[0]
        cu = torch.cat([self.cu_seqlens, other.cu_seqlens[1:].to(self.cu_seqlens.device) + shift]).to(torch.int32)
        return TextFeatures(kv, self.lens + other.lens, cu, max(self.max_seqlen, other.max_seqlen))


def _quantize_linears(module: nn.Module, quantization: str, compute_dtype: torch.dtype,
                      skip: Sequence[str] = ()) -> int:
    """Replace every ``nn.Linear`` of ``module`` by a bitsandbytes 8-bit or 4-bit (nf4) layer.

    The weights are copied in full precision; bitsandbytes quantizes them when the layer is moved
    to a device (``.to(...)``), which also works on CPU.  Linears whose attribute name is in
    ``skip`` stay as they are.  Returns the number of layers replaced.
    """
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in skip:
            continue
        if isinstance(child, nn.Linear):
            if quantization == "8bit":
                # threshold 0 disables the fp16 outlier path, which the CPU kernels do not need.
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=0.0)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, quant_type="nf4")
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device)
            new.requires_grad_(False)
            setattr(module, name, new)
            count += 1
        else:
            count += _quantize_linears(child, quantization, compute_dtype, skip)
    return count


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _silence_int8_cast_notice() -> None:
    # bitsandbytes logs, on every 8-bit matmul, that fp32 inputs are cast to fp16: expected here,
    # and one line per linear layer per prompt batch buries everything else.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastNotice())


def _transformers_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class TextEncoder(nn.Module):
    """A frozen Hugging Face tokenizer + encoder that returns packed :class:`TextFeatures`.

    Args:
        tokenizer: a Hugging Face tokenizer (right padding).
        encoder: a module called as ``encoder(input_ids=..., attention_mask=...)`` whose output has
            ``last_hidden_state`` (B, L, C): ``T5EncoderModel`` or any ``AutoModel`` encoder.
        max_length: token limit per prompt (512 for the released models, EOS included).
        on_too_long: ``"truncate"`` (warn and cut, as the original) or ``"error"``.
        pad_to_max_length: pad every batch to ``max_length`` as the original does; only the cost
            changes, because the encoder masks padding (default: pad to the longest prompt).

    The encoder is always in eval mode with ``requires_grad=False``; ``train()`` leaves it in eval.
    """

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = 512, on_too_long: str = "truncate",
                 pad_to_max_length: bool = False) -> None:
        super().__init__()
        if on_too_long not in ("truncate", "error"):
            raise ValueError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = int(max_length)
        self.on_too_long = on_too_long
        self.pad_to_max_length = bool(pad_to_max_length)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: PathLike, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                        quantization: Optional[str] = None, **kwargs) -> "TextEncoder":
        """Load tokenizer and encoder from a local Hugging Face folder (nothing is downloaded).

        Args:
            path: folder holding ``config.json``, the weights and the tokenizer files (for
                example a local copy of ``google/flan-t5-xl``).
            dtype: weight dtype; default float16 on CUDA (as the original) and float32 elsewhere.
            device: where the encoder runs.
            quantization: ``None``, ``"8bit"`` or ``"4bit"`` (nf4) bitsandbytes weights.  Every
                ``nn.Linear`` is swapped for ``bnb.nn.Linear8bitLt`` / ``Linear4bit`` after
                loading; this path works on CPU too, unlike transformers' ``BitsAndBytesConfig``
                loader, which requires accelerate and a ``device_map``.
            **kwargs: passed to :class:`TextEncoder` (``max_length``, ``on_too_long``,
                ``pad_to_max_length``).

        T5-family folders (``model_type`` t5 / mt5 / umt5) load only the encoder stack; other
        models load through ``AutoModel`` (the encoder of an encoder-decoder model is kept).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"text encoder folder {str(path)!r} does not exist. Text encoders are loaded from a local folder "
                "only; download one first, e.g. `huggingface-cli download google/flan-t5-xl --local-dir <folder>`")
        if not (folder / "config.json").exists():
            found = sorted(p.name for p in folder.iterdir())[:20]
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json (found: {found}); "
                                    "expected a Hugging Face model folder saved with save_pretrained")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        load_kw = {_transformers_dtype_kwarg(): dtype, "local_files_only": True}
        with hf_progress_bars_off(is_small_model(folder)):  # a bar for a tiny local encoder is noise
            if config.model_type in ("t5", "mt5", "umt5"):
                import transformers

                encoder_cls = getattr(transformers, {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
                                                     "umt5": "UMT5EncoderModel"}[config.model_type])
                encoder = encoder_cls.from_pretrained(folder, **load_kw)
            else:
                encoder = AutoModel.from_pretrained(folder, **load_kw)
                if getattr(encoder.config, "is_encoder_decoder", False):
                    encoder = encoder.get_encoder()
        if quantization is not None:
            # Modules the model class keeps in fp32 (T5's FFN output ``wo``) stay unquantized, as
            # transformers' own loader does: T5 casts the FFN activations to ``wo.weight.dtype``,
            # which for a packed 4-bit weight is uint8 and would destroy the features.
            skip = tuple(getattr(encoder, "_keep_in_fp32_modules", None) or ())
            n = _quantize_linears(encoder, quantization, compute_dtype=dtype, skip=skip)
            _silence_int8_cast_notice()
            logger.info("text encoder %s: %d linear layers quantized to %s", folder, n, quantization)
        encoder.to(device)
        return cls(tokenizer, encoder, **kwargs)

    # -- properties and device helpers --------------------------------------------------------
    @property
    def width(self) -> int:
        """Hidden size C of the features."""
        config = self.encoder.config
        for name in ("d_model", "hidden_size"):
            if hasattr(config, name):
                return int(getattr(config, name))
        raise AttributeError(f"cannot find the hidden size in {type(config).__name__}")

    @property
    def device(self) -> torch.device:
        for p in self.encoder.parameters():
            return p.device
        return torch.device("cpu")

    def offload(self) -> "TextEncoder":
        """Move the encoder to CPU (to free accelerator memory between encodes)."""
        return self.to("cpu")

    def train(self, mode: bool = True) -> "TextEncoder":
        """The encoder is frozen: it stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    # -- encoding -----------------------------------------------------------------------------
    def _check_lengths(self, prompts: Sequence[str]) -> None:
        # A separate untruncated pass counts the tokens; the fast tokenizer makes this cheap next
        # to the encoder, and it is the only way to tell the user how much was cut.
        ids = self.tokenizer(list(prompts), truncation=False, padding=False, verbose=False)["input_ids"]
        for i, (prompt, toks) in enumerate(zip(prompts, ids)):
            if len(toks) <= self.max_length:
                continue
            head = prompt[:80] + ("..." if len(prompt) > 80 else "")
            msg = (f"prompt {i} has {len(toks)} tokens, more than max_length={self.max_length}; "
                   f"it is cut to {self.max_length} tokens: {head!r}")
            if self.on_too_long == "error":
                raise ValueError(msg)
            logger.warning(msg)
            warnings.warn(msg, PromptTruncatedWarning, stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]], pad_to_max_length: Optional[bool] = None) -> TextFeatures:
        """Encode prompts into packed fp32 features on the encoder's device.

        Tokenize (``max_length``, truncation, right padding), run the encoder with the attention
        mask, take ``last_hidden_state`` as float32 and keep the ``mask.sum()`` real rows of each
        prompt (EOS included).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        self._check_lengths(prompts)
        pad_full = self.pad_to_max_length if pad_to_max_length is None else pad_to_max_length
        batch = self.tokenizer(prompts, max_length=self.max_length, truncation=True,
                               padding="max_length" if pad_full else "longest", return_tensors="pt")
        device = self.device
        input_ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        return TextFeatures.from_padded(hidden, mask)

    def forward(self, prompts: Union[str, Sequence[str]]) -> TextFeatures:
        """Same as :meth:`encode`."""
        return self.encode(prompts)


def flan_t5_xl_config():
    """The ``T5Config`` of flan-t5-xl's encoder (the released models' text encoder).

    Build it on the meta device for memory estimates::

        with torch.device("meta"):
            model = T5EncoderModel(flan_t5_xl_config())
    """
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                    num_heads=32, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)

"""Named architectures: frozen dataclasses in two registries.

``TOKENIZER_PRESETS`` holds the released BSQ-VAE tokenizers (d16, d24, d32, d32_reg, d64 and the
8B model's stride-8 d56 patchify tokenizer) plus tiny ones; ``TRANSFORMER_PRESETS`` the Infinity
transformers of spec 1.1 (2b, 8b, 20b, layer12 ... layer48) plus tiny ones.  A trailing ``c<N>``
on a transformer name (``layer12c4``, ``2bc8``) sets ``block_chunks=N`` as the original CLI does.
``dataclasses.replace(preset, **overrides)`` derives variants; unknown fields are an error.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class TokenizerConfig:
    """BSQ-VAE architecture (spec 6.1-6.3)."""

    codebook_dim: int = 32
    base_ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16  # total stride; log2(patch_size) down/up-sampling levels
    in_channels: int = 3
    #: GroupNorm groups: 32 if channels % 32 == 0 else 24 (the released rule, "auto"), or a number
    norm_groups: Any = "auto"
    #: The 8B tokenizer feeds the transformer 2x2 pixel-unshuffled tokens (4 * codebook_dim bits)
    spatial_patchify: bool = False

    @property
    def stride(self) -> int:
        return self.patch_size

    @property
    def bits_per_token(self) -> int:
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def image_stride(self) -> int:
        """Pixels per transformer token side (16 for every released tokenizer)."""
        return self.patch_size * (2 if self.spatial_patchify else 1)


_VAE16 = dict(base_ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, patch_size=16)

TOKENIZER_PRESETS: Dict[str, TokenizerConfig] = {
    "d16": TokenizerConfig(codebook_dim=16, **_VAE16),
    "d24": TokenizerConfig(codebook_dim=24, **_VAE16),
    "d32": TokenizerConfig(codebook_dim=32, **_VAE16),
    "d32_reg": TokenizerConfig(codebook_dim=32, **_VAE16),
    "d64": TokenizerConfig(codebook_dim=64, **_VAE16),
    "d56_f8_14_patchify": TokenizerConfig(codebook_dim=14, base_ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                          patch_size=8, spatial_patchify=True),
    # Small tokenizers for tests, notebooks and the CPU quick start.
    "tiny": TokenizerConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, patch_size=16),
    "tiny_f8": TokenizerConfig(codebook_dim=16, base_ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_size=8),
}
TOKENIZER_ALIASES = {"d32reg": "d32_reg", "d56": "d56_f8_14_patchify", "d14": "d56_f8_14_patchify",
                     "infinity_vae_d16": "d16", "infinity_vae_d24": "d24", "infinity_vae_d32": "d32",
                     "infinity_vae_d32_reg": "d32_reg", "infinity_vae_d32reg": "d32_reg",
                     "infinity_vae_d64": "d64", "infinity_vae_d56_f8_14_patchify": "d56_f8_14_patchify"}


@dataclass(frozen=True)
class TransformerConfig:
    """Infinity transformer architecture and the switches of spec 1.2."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    #: groups consecutive blocks; >1 gives ``block_chunks.{c}.module.{j}`` keys, 1 gives ``blocks.{i}``
    block_chunks: int = 8
    text_channels: int = 2048
    text_maxlen: int = 512
    #: bits per latent position of the paired tokenizer (d); tokens carry 4d bits with patchify
    codebook_dim: int = 32
    apply_spatial_patchify: bool = False
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    pad_to_multiplier: int = 128
    #: clamp of the cosine-attention temperature (log 100)
    max_scale_mul_log: float = 4.605170185988092
    num_levels: int = 15  # rows of lvl_embed
    rope_theta: float = 10000.0
    #: tokenizer preset the released weights pair with (for pipeline validation)
    tokenizer: Optional[str] = "d32_reg"

    @property
    def bits_per_token(self) -> int:
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # Python's round is half-to-even, as in the original (layer32: 32.5 -> 32).
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def text_pool_heads(self) -> int:
        head_dim = 64 if self.embed_dim > 4096 else 128
        return max(1, self.text_channels // head_dim)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.ffn_hidden <= 0:
            raise ValueError(f"embed_dim {self.embed_dim} with mlp_ratio {self.mlp_ratio} gives an FFN width of 0")


def _t(depth, c, h, chunks, drop=0.1, **kw) -> TransformerConfig:
    return TransformerConfig(depth=depth, embed_dim=c, num_heads=h, block_chunks=chunks, drop_path_rate=drop, **kw)


TRANSFORMER_PRESETS: Dict[str, TransformerConfig] = {
    "2b": _t(32, 2048, 16, 8, tokenizer="d32_reg"),
    "8b": _t(40, 3584, 28, 8, codebook_dim=14, apply_spatial_patchify=True, tokenizer="d56_f8_14_patchify"),
    "20b": _t(58, 4608, 36, 1, drop=0.25, tokenizer="d32"),
    "layer12": _t(12, 768, 8, 4, tokenizer="d32"),
    "layer16": _t(16, 1152, 12, 4, tokenizer="d32"),
    "layer24": _t(24, 1536, 16, 4, tokenizer="d32"),
    "layer32": _t(32, 2080, 20, 4, tokenizer="d32"),
    "layer40": _t(40, 2688, 24, 4, tokenizer="d32"),
    "layer48": _t(48, 3360, 28, 4, tokenizer="d32"),
    # Small transformers for tests, notebooks and the CPU quick start.
    "tiny": _t(2, 64, 2, 2, drop=0.0, text_channels=64, text_maxlen=32, codebook_dim=16, tokenizer="tiny"),
    "tiny_patchify": _t(2, 64, 2, 2, drop=0.0, text_channels=64, text_maxlen=32, codebook_dim=16,
                        apply_spatial_patchify=True, tokenizer="tiny_f8"),
    "small": _t(4, 192, 4, 1, drop=0.0, text_channels=64, text_maxlen=32, codebook_dim=16, tokenizer=None),
}
TRANSFORMER_ALIASES = {"infinity_2b": "2b", "infinity_8b": "8b", "infinity_20b": "20b", "125m": "layer12",
                       "1b": "layer24"}


def _resolve(name: str, registry: Mapping[str, Any], aliases: Mapping[str, str], kind: str) -> Tuple[str, Any]:
    key = name.lower()
    key = aliases.get(key, key)
    if key in registry:
        return key, registry[key]
    raise KeyError(f"unknown {kind} preset {name!r}; known presets: {sorted(registry)}")


def tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """The tokenizer preset ``name`` with field overrides."""
    _, cfg = _resolve(name, TOKENIZER_PRESETS, TOKENIZER_ALIASES, "tokenizer")
    return replace_config(cfg, overrides)


def transformer_config(name: str, **overrides: Any) -> TransformerConfig:
    """The transformer preset ``name`` (a trailing ``c<N>`` sets ``block_chunks``) with overrides."""
    m = re.fullmatch(r"(.+?)c(\d+)", name.lower())
    chunks = None
    if m and m.group(1) in {**TRANSFORMER_PRESETS, **TRANSFORMER_ALIASES}:
        name, chunks = m.group(1), int(m.group(2))
    _, cfg = _resolve(name, TRANSFORMER_PRESETS, TRANSFORMER_ALIASES, "transformer")
    if chunks is not None:
        overrides = {"block_chunks": chunks, **overrides}
    return replace_config(cfg, overrides)


def replace_config(cfg, overrides: Mapping[str, Any]):
    """``dataclasses.replace`` with a clear error for unknown fields; lists become tuples."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {type(cfg).__name__} field(s) {unknown}; valid fields: {sorted(names)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, **fixed)


def config_to_dict(cfg) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

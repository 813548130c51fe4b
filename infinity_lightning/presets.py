"""Named architectures: the registries of tokenizer and transformer configurations.

The configuration classes live beside their models (:class:`~.models.bsq_vae.TokenizerConfig`,
:class:`~.models.infinity.TransformerConfig`); this module names instances of them.

``TOKENIZER_PRESETS`` holds the released BSQ-VAE tokenizers (d16, d24, d32, d32_reg, d64 and the
8B model's stride-8 d56 patchify tokenizer) plus tiny ones; ``TRANSFORMER_PRESETS`` the Infinity
transformers of the original release (docs/model.md#the-transformer; 2b, 8b, 20b, layer12 ... layer48) plus tiny ones.  A trailing ``c<N>``
on a transformer name (``layer12c4``, ``2bc8``) sets ``block_chunks=N`` as the original CLI does.
``dataclasses.replace(preset, **overrides)`` derives variants; unknown fields are an error.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .models.bsq_vae import TokenizerConfig
from .models.infinity import TransformerConfig


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


#: Tokenizer preset -> the released file names that hold it (first = the Hugging Face name).
TOKENIZER_FILES: Dict[str, Tuple[str, ...]] = {
    "d16": ("infinity_vae_d16.pth",), "d24": ("infinity_vae_d24.pth",), "d32": ("infinity_vae_d32.pth",),
    "d32_reg": ("infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"), "d64": ("infinity_vae_d64.pth",),
    "d56_f8_14_patchify": ("infinity_vae_d56_f8_14_patchify.pth",),
}

#: Sampling settings for models without released settings (small and custom models).
CUSTOM_SAMPLING: Dict[str, Any] = {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97}


@dataclass(frozen=True)
class ReleasedVariant:
    """A released transformer: where its weights are, what it pairs with and how it samples.

    ``transformer``: the file (or sharded folder) name in the Hugging Face repository;
    ``tokenizers``: acceptable tokenizer file names, preferred first; ``architecture``: the
    transformer preset the file holds; ``resolution``: the pixel budget the authors used;
    ``sampling``: the released sampling settings (cfg, tau, top_k, top_p).
    """

    transformer: str
    tokenizers: Tuple[str, ...]
    architecture: str
    resolution: str
    sampling: Mapping[str, Any]


#: Released variants by name (``from_pretrained(..., variant=)``, ``generate --variant``).  Adding a
#: released model means adding one entry here.
RELEASED_VARIANTS: Dict[str, ReleasedVariant] = {
    "2b": ReleasedVariant("infinity_2b_reg.pth", TOKENIZER_FILES["d32_reg"], "2b", "1M",
                          {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97}),
    "8b": ReleasedVariant("infinity_8b_weights", TOKENIZER_FILES["d56_f8_14_patchify"], "8b", "1M",
                          {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97}),
    "8b_512": ReleasedVariant("infinity_8b_512x512_weights", TOKENIZER_FILES["d56_f8_14_patchify"], "8b", "0.25M",
                              {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97}),
    "125m": ReleasedVariant("infinity_125M_256x256.pth",
                            TOKENIZER_FILES["d32"] + TOKENIZER_FILES["d32_reg"], "layer12", "0.06M",
                            dict(CUSTOM_SAMPLING)),
}

#: Fields that identify a released architecture (block chunking and dropout do not).
_ARCHITECTURE_FIELDS = ("depth", "embed_dim", "num_heads", "text_channels", "codebook_dim", "apply_spatial_patchify")


def released_architecture(cfg: TransformerConfig) -> Optional[str]:
    """The transformer preset name ("2b", "8b", "layer12", ...) of a released variant whose
    architecture ``cfg`` is, or None for any other model."""
    for variant in RELEASED_VARIANTS.values():
        preset = TRANSFORMER_PRESETS[variant.architecture]
        if all(getattr(cfg, f) == getattr(preset, f) for f in _ARCHITECTURE_FIELDS):
            return variant.architecture
    return None


def released_sampling(cfg: TransformerConfig) -> Dict[str, Any]:
    """The released sampling settings of ``cfg``'s architecture (:data:`CUSTOM_SAMPLING` otherwise)."""
    arch = released_architecture(cfg)
    for variant in RELEASED_VARIANTS.values():
        if variant.architecture == arch:
            return dict(variant.sampling)
    return dict(CUSTOM_SAMPLING)


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

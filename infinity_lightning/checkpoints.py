"""Loading and exporting model weights (layer 3).

Every loader is strict: a key that is missing, unexpected or of the wrong shape raises an error
that names the file and lists the keys, because a silently skipped tensor of a 100M-parameter
model produces garbage instead of an error.  Files are read with :func:`infinity_lightning.io.read_weights`
(``torch.load(weights_only=True)`` or safetensors) and written atomically.

Sections: *Tokenizer* (BSQ-VAE), then *Transformer*.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from infinity_lightning.dtypes import parse_dtype
from infinity_lightning.io import (CheckpointError, PathLike, atomic_save, atomic_save_safetensors, check_state_dict,
                                   read_weights)
from infinity_lightning.presets import (TOKENIZER_ALIASES, TOKENIZER_PRESETS, TokenizerConfig, config_to_dict,
                                        replace_config, tokenizer_config)



# ============================================================================================
# Tokenizer (BSQ-VAE)
# ============================================================================================
#
# Released files (``infinity_vae_d*.pth``) are ``{"vae": state_dict}`` with wrapped key names
# (``encoder.conv_in.conv.weight``, ``...norm1.norm.weight``) and the quantizer mask listed twice
# (``quantizer.lfq.mask`` and ``quantize.lfq.mask``).  Also accepted: a plain state dict, a
# safetensors file, LDM-style plain names (``encoder.conv_in.weight``), a Lightning checkpoint
# whose ``state_dict`` holds the tokenizer under a prefix, and files without mask entries (the
# mask is a constant and is always recomputed).

#: The duplicated quantizer buffer; optional in files, recomputed from codebook_dim.
TOKENIZER_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
#: Top-level key under which :func:`save_tokenizer` stores the architecture next to ``"vae"``
#: (the original loader ignores every top-level key but ``"vae"``).
TOKENIZER_CONFIG_KEY = "tokenizer_config"
_SAFETENSORS_CONFIG_KEY = "infinity_lightning.tokenizer_config"

# Module names whose plain ``.weight``/``.bias`` map to the wrapped ``.conv.weight`` (the attention
# names q/k/v/proj_out only occur in tokenizers with attention blocks, which Infinity has none of).
_CONV_MODULES = {"conv_in", "conv_out", "conv1", "conv2", "nin_shortcut", "conv", "q", "k", "v", "proj_out"}
_NORM_MODULES = {"norm1", "norm2", "norm_out", "norm"}
_TRANSFORMER_MARKERS = ("block_chunks.", "blocks.", "cfg_uncond", "word_embed.", "text_proj_for_sos.",
                        "text_proj_for_ca.", "lvl_embed.", "shared_ada_lin.", "head_nm.", "pos_start")


def canonical_tokenizer_key(key: str) -> str:
    """Map a plain LDM-style name to the wrapped released name (docs/model.md#checkpoint-formats).

    ``encoder.conv_in.weight`` -> ``encoder.conv_in.conv.weight``,
    ``encoder.down.0.downsample.conv.bias`` -> ``encoder.down.0.downsample.conv.conv.bias``,
    ``decoder.norm_out.weight`` -> ``decoder.norm_out.norm.weight``; wrapped names are unchanged.
    """
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return key
    module, parent = parts[-2], (parts[-3] if len(parts) >= 3 else "")
    if (module == "conv" and parent in _CONV_MODULES) or (module == "norm" and parent in _NORM_MODULES):
        return key  # already wrapped
    if module in _CONV_MODULES:
        return ".".join(parts[:-1] + ["conv", parts[-1]])
    if module in _NORM_MODULES:
        return ".".join(parts[:-1] + ["norm", parts[-1]])
    return key


def _looks_like_transformer(keys) -> bool:
    return any(k.startswith(_TRANSFORMER_MARKERS) or "cfg_uncond" in k for k in keys)


def _transformer_error(source: str, keys) -> CheckpointError:
    examples = [k for k in keys if k.startswith(_TRANSFORMER_MARKERS) or "cfg_uncond" in k][:3]
    return CheckpointError(
        f"{source} looks like an Infinity transformer checkpoint (keys such as {examples}), not a BSQ-VAE "
        "tokenizer; load it with infinity_lightning.load_transformer(...) instead of load_tokenizer")


def _unwrap_tokenizer_container(obj: Mapping[str, Any], source: str):
    """The tokenizer state dict and the stored config (or None) inside a loaded file."""
    stored = obj.get(TOKENIZER_CONFIG_KEY) if isinstance(obj.get(TOKENIZER_CONFIG_KEY), Mapping) else None
    if isinstance(obj.get("vae"), Mapping):
        return dict(obj["vae"]), stored
    if "trainer" in obj and isinstance(obj["trainer"], Mapping):
        raise CheckpointError(
            f"{source} is an Infinity transformer training checkpoint ('trainer' entry), not a BSQ-VAE tokenizer; "
            "load it with infinity_lightning.load_transformer(...)")
    if isinstance(obj.get("state_dict"), Mapping):
        # A Lightning checkpoint: take the keys under the prefix that holds the tokenizer.
        sd = obj["state_dict"]
        for key in sd:
            if key.endswith("encoder.conv_in.conv.weight") or key.endswith("encoder.conv_in.weight"):
                prefix = key[: key.index("encoder.conv_in.")]
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, stored
        if _looks_like_transformer(sd):
            raise _transformer_error(source, list(sd))
        raise CheckpointError(f"{source} is a Lightning checkpoint whose state_dict holds no BSQ-VAE tokenizer "
                              f"(no '*encoder.conv_in.conv.weight' key)")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{source} is neither a tokenizer state dict nor a released tokenizer file ({{'vae': state_dict}}): "
            f"top-level entries {sorted(map(str, obj))[:10]} include non-tensors {non_tensors[:5]}")
    return dict(obj), stored


def tokenizer_state_dict_from(obj: Mapping[str, Any], source: str = "tokenizer weights"):
    """Normalise a loaded tokenizer file: returns ``(state_dict with released key names, stored
    config dict or None)``.  Raises :class:`CheckpointError` for transformer files and for key
    collisions between plain and wrapped names."""
    raw, stored = _unwrap_tokenizer_container(obj, source)
    if _looks_like_transformer(raw):
        raise _transformer_error(source, list(raw))
    return _rename_keys(raw, canonical_tokenizer_key, source), stored


def _rename_keys(raw: Mapping[str, Any], rename, source: str) -> "OrderedDict[str, Any]":
    sd: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in raw.items():
        new = rename(key)
        if new in sd:
            raise CheckpointError(f"{source} holds the same tensor twice, under {new!r} and a plain-named alias {key!r}")
        sd[new] = value
    return sd


def _match_model_keys(raw: Mapping[str, Any], model_keys, source: str) -> "OrderedDict[str, Any]":
    """Rename file keys to model keys as the original loader does: a key the model has is kept,
    otherwise its wrapped form is used if the model has that; any other key keeps its file name
    (and is then reported as unexpected under the name the user can find in the file)."""
    model_keys = set(model_keys)

    def rename(key: str) -> str:
        if key in model_keys:
            return key
        new = canonical_tokenizer_key(key)
        return new if new in model_keys else key

    return _rename_keys(raw, rename, source)


def _shape(sd: Mapping[str, Any], key: str, source: str):
    if key not in sd:
        raise CheckpointError(f"{source} is not a BSQ-VAE tokenizer state dict (or is incomplete): key {key!r} "
                              f"is missing, so the architecture cannot be inferred; first keys: {list(sd)[:5]}")
    return tuple(sd[key].shape)


def infer_tokenizer_config(sd: Mapping[str, Any], source: str = "tokenizer weights") -> TokenizerConfig:
    """Architecture of a state dict (released key names) from its tensor shapes.

    codebook_dim from ``encoder.conv_out``, base_ch and in_channels from ``encoder.conv_in``,
    ch_mult from each encoder level's first block, num_res_blocks from the block count of level 0,
    patch_size = 2 ** (number of downsampling levels).  The stride-8 d14 tokenizer of the 8B model
    is recognised by its shapes and gets ``spatial_patchify=True``.  GroupNorm groups cannot be
    seen in the weights: the released rule (``"auto"``) is assumed.
    """
    base, in_ch = _shape(sd, "encoder.conv_in.conv.weight", source)[:2]
    d = _shape(sd, "encoder.conv_out.conv.weight", source)[0]
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels {levels} are not numbered 0..n-1")
    ch_mult = []
    for i in levels:
        width = _shape(sd, f"encoder.down.{i}.block.0.conv1.conv.weight", source)[0]
        if width % base:
            raise CheckpointError(f"{source}: encoder level {i} has {width} channels, not a multiple of base_ch {base}")
        ch_mult.append(width // base)
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m}
    n_down = sum(f"encoder.down.{i}.downsample.conv.conv.weight" in sd for i in levels)
    cfg = TokenizerConfig(codebook_dim=int(d), base_ch=int(base), ch_mult=tuple(ch_mult), num_res_blocks=len(blocks),
                          patch_size=2 ** n_down, in_channels=int(in_ch))
    for preset in TOKENIZER_PRESETS.values():
        if preset.spatial_patchify and dataclasses.replace(preset, spatial_patchify=False, norm_groups="auto") == cfg:
            return dataclasses.replace(cfg, spatial_patchify=True)
    return cfg


def _describe(cfg: TokenizerConfig) -> str:
    return (f"tokenizer architecture (codebook_dim={cfg.codebook_dim}, base_ch={cfg.base_ch}, "
            f"ch_mult={tuple(cfg.ch_mult)}, num_res_blocks={cfg.num_res_blocks}, patch_size={cfg.patch_size}, "
            f"norm_groups={cfg.norm_groups!r})")


def _is_preset_name(name: str) -> bool:
    key = name.lower()
    return TOKENIZER_ALIASES.get(key, key) in TOKENIZER_PRESETS


def _safetensors_config(path: Path) -> Optional[Dict[str, Any]]:
    # Only the JSON header is read (no tensor data, nothing executable).
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # the tensors are read (and errors reported) by read_weights
        return None
    text = meta.get(_SAFETENSORS_CONFIG_KEY)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {_SAFETENSORS_CONFIG_KEY!r} is not valid JSON ({e})") from e
    return value if isinstance(value, dict) else None


def _config_from_dict(stored: Mapping[str, Any], source: str) -> TokenizerConfig:
    try:
        return replace_config(TokenizerConfig(), dict(stored))
    except TypeError as e:
        raise CheckpointError(f"{source}: stored {TOKENIZER_CONFIG_KEY} is invalid ({e})") from e


def check_overrides_agree(stored: Any, cfg: Any, overrides: Mapping[str, Any], source: str,
                          allowed: Any = ()) -> None:
    """Raise :class:`CheckpointError` when an override changes a setting that a weights file stores
    (``stored``: the file's config, ``cfg``: with the overrides applied; ``allowed``: fields that
    may change, such as training-only rates).  The weights were trained with the stored value, so
    another one would silently change the model; an override that repeats it is fine."""
    conflicts = [f"{k}={getattr(cfg, k)!r} (the file has {getattr(stored, k)!r})" for k in overrides
                 if k not in allowed and hasattr(stored, k) and getattr(cfg, k) != getattr(stored, k)]
    if conflicts:
        raise CheckpointError(f"{source} stores its architecture, and the override {', '.join(conflicts)} contradicts "
                              "it (the weights were trained with the stored value); drop the override")


def load_tokenizer(path_or_preset: Union[PathLike, str], *, preset: Optional[str] = None,
                   config: Optional[TokenizerConfig] = None, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None, **overrides: Any):
    """A :class:`~infinity_lightning.models.bsq_vae.BSQVAE` in eval mode, without gradients, on
    ``device`` (default CPU), fp32 unless ``dtype`` casts its floating weights (as :func:`load_transformer`).

    ``path_or_preset``: a preset name (``"d32"``, ``"tiny"``; random weights, ``overrides`` are
    :class:`TokenizerConfig` fields) or a weights file (released ``{"vae": state_dict}``, plain
    state dict, ``.safetensors``, Lightning checkpoint).  The architecture of a file comes, in
    order of precedence, from ``config``, from ``preset`` plus ``overrides``, or from the config
    stored by :func:`save_tokenizer` / inferred from the tensor shapes, plus ``overrides``
    (e.g. ``norm_groups=8``).  Loading is strict; the quantizer masks may be absent.
    """
    from infinity_lightning.models.bsq_vae import BSQVAE

    if config is not None and (preset is not None or overrides):
        raise TypeError("pass either config= or preset=/field overrides, not both")
    dtype = parse_dtype(dtype, what="tokenizer dtype")
    path = Path(path_or_preset) if isinstance(path_or_preset, (str, os.PathLike)) else None
    if path is None:
        raise TypeError(f"load_tokenizer expects a file path or a preset name, got {type(path_or_preset).__name__}")

    if not path.exists() and isinstance(path_or_preset, str) and _is_preset_name(path_or_preset):
        if preset is not None:
            raise TypeError("preset= is only used with a weights file")
        cfg = config or tokenizer_config(path_or_preset, **overrides)
        return BSQVAE(cfg).float().to(device=device, dtype=dtype).eval().requires_grad_(False)
    if not path.exists():
        known = sorted(TOKENIZER_PRESETS)
        raise CheckpointError(f"tokenizer {str(path_or_preset)!r} is neither an existing file nor a known preset "
                              f"(presets: {known})")

    source = f"tokenizer file {path}"
    obj = read_weights(path, what="tokenizer")
    raw, stored = _unwrap_tokenizer_container(obj, source)
    if _looks_like_transformer(raw):
        raise _transformer_error(source, list(raw))
    if stored is None and path.is_file() and str(path).endswith(".safetensors"):
        stored = _safetensors_config(path)
    if config is not None:
        cfg = config
    elif preset is not None:
        cfg = tokenizer_config(preset, **overrides)
    else:
        base = (_config_from_dict(stored, source) if stored is not None
                else infer_tokenizer_config(_rename_keys(raw, canonical_tokenizer_key, source), source))
        cfg = replace_config(base, overrides)
        if stored is not None:
            check_overrides_agree(base, cfg, overrides, source)

    try:
        with torch.device("meta"):
            meta_model = BSQVAE(cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: cannot build the {_describe(cfg)}: {e}") from e
    sd = _match_model_keys(raw, meta_model.state_dict().keys(), source)
    check_state_dict(meta_model.state_dict(), sd, source=source, what=_describe(cfg),
                     ignore_missing=TOKENIZER_MASK_KEYS)

    # Allocate without the random initialisation (seconds for the 110M released models): every
    # parameter is overwritten below and the mask, the only buffer, is recomputed.
    model = meta_model.to_empty(device="cpu")
    weights = {k: v for k, v in sd.items() if k not in TOKENIZER_MASK_KEYS}
    result = model.load_state_dict(weights, strict=False)
    left = [k for k in result.missing_keys if k not in TOKENIZER_MASK_KEYS]
    if left or result.unexpected_keys:  # unreachable after check_state_dict; kept as a guard
        raise CheckpointError(f"{source}: keys not loaded: {left + list(result.unexpected_keys)}")
    with torch.no_grad():
        model.quantizer.lfq.mask.copy_(model.quantizer.lfq.make_mask(cfg.codebook_dim))
    return model.float().to(device=device, dtype=dtype).eval().requires_grad_(False)


def tokenizer_export_state_dict(vae) -> "OrderedDict[str, torch.Tensor]":
    """The released-layout state dict of ``vae`` on CPU: wrapped key names, both mask aliases."""
    sd = OrderedDict()
    for key, value in vae.state_dict().items():
        sd[key] = value.detach().to("cpu").clone()
    # The mask is one buffer registered twice; torch lists it under both names.  Recompute it in
    # case a caller's module lacks one of the aliases.
    d = int(vae.codebook_dim)
    for key in TOKENIZER_MASK_KEYS:
        if key not in sd:
            sd[key] = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.long)
    return sd


def save_tokenizer(vae, path: PathLike, format: Optional[str] = None) -> Path:
    """Export a tokenizer, atomically.

    ``format="released"`` (default unless ``path`` ends in ``.safetensors``): ``{"vae": state_dict,
    "tokenizer_config": {...}}``, loadable by the original code.  ``"safetensors"``: the flat state
    dict, with the config in the file's metadata.  Returns the written path.
    """
    if format is None:
        format = "safetensors" if str(path).endswith(".safetensors") else "released"
    sd = tokenizer_export_state_dict(vae)
    cfg = getattr(vae, "config", None)
    cfg_dict = config_to_dict(cfg) if cfg is not None else None
    if format == "released":
        obj: Dict[str, Any] = {"vae": sd}
        if cfg_dict is not None:
            obj[TOKENIZER_CONFIG_KEY] = cfg_dict
        return atomic_save(obj, path)
    if format == "safetensors":
        meta = {"format": "pt"}
        if cfg_dict is not None:
            meta[_SAFETENSORS_CONFIG_KEY] = json.dumps(cfg_dict)
        return atomic_save_safetensors(sd, path, metadata=meta)
    raise ValueError(f"unknown tokenizer export format {format!r}; expected 'released' or 'safetensors'")


# ============================================================================================
# Transformer (implemented in transformer_checkpoints.py, re-exported here: one place to load from)
# ============================================================================================
from infinity_lightning.transformer_checkpoints import (  # noqa: E402,F401
    extract_transformer_state,
    infer_transformer_config,
    load_transformer,
    save_transformer,
    transformer_state_dict,
)

__all__ = [
    "load_tokenizer", "save_tokenizer", "check_overrides_agree", "infer_tokenizer_config",
    "load_transformer", "save_transformer", "infer_transformer_config", "extract_transformer_state",
    "transformer_state_dict",
]

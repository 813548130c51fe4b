"""Loading and exporting Infinity transformer weights (re-exported by :mod:`.checkpoints`).

Accepted sources (docs/model.md#checkpoint-formats):

* the released flat state dict (``infinity_2b_reg.pth``, ``infinity_125M_256x256.pth``);
* original training checkpoints ``{"trainer": {"gpt_fsdp": state_dict, "gpt_ema_fsdp": ...}}``
  (``use_ema=True`` picks the EMA copy) and ``{"trainer": {"gpt_wo_ddp": ...}}``;
* Lightning checkpoints of :class:`~infinity_lightning.lit.BitwiseVARModule` (``state_dict``
  with a ``transformer.`` prefix);
* safetensors files and folders of safetensors shards with an index (the 8B release).

Loading is strict: the only tolerated differences are the all-zero ``zero_k_bias`` buffers and
the length of ``cfg_uncond`` (rows are appended from the model's own initialisation or cut, as
the original does).  Anything else raises an error listing the keys and naming the file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .io import CheckpointError, PathLike, atomic_save, atomic_save_safetensors, check_state_dict, read_weights
from .models.infinity import InfinityTransformer
from .presets import TRANSFORMER_PRESETS, TransformerConfig, config_to_dict, replace_config, transformer_config

_TRANSFORMER_MARKERS = ("cfg_uncond", "pos_start", "word_embed.weight", "head.weight")
_LEGACY_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def _looks_like_tokenizer(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.conv_in", "decoder.conv_in", "quantizer.", "quantize.")) for k in sd)


def extract_transformer_state(obj: Mapping[str, Any], source: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Find the transformer state dict inside any of the accepted containers."""
    if "trainer" in obj and isinstance(obj["trainer"], Mapping):
        trainer = obj["trainer"]
        keys = (["gpt_ema_fsdp", "gpt_ema_for_vis"] if use_ema else []) + ["gpt_fsdp", "gpt_wo_ddp"]
        for k in keys:
            if isinstance(trainer.get(k), Mapping):
                return dict(trainer[k])
        raise CheckpointError(f"{source} is a training checkpoint without a transformer state ({sorted(trainer)})")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):  # Lightning checkpoint
        sd = {k: v for k, v in obj["state_dict"].items() if not k.startswith("__ema__.")}
        if use_ema:
            ema = obj.get("ema_state")
            if not (isinstance(ema, Mapping) and isinstance(ema.get("weights"), Mapping)):
                raise CheckpointError(f"{source} holds no EMA weights (ema_state['weights']); "
                                      "train with the EMA callback or load without use_ema")
            attribute = ema.get("attribute")
            prefix = f"{attribute}." if attribute else ""
            sd = {**sd, **{prefix + k: v for k, v in ema["weights"].items()}}
        sub = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
        return sub or dict(sd)
    if "vae" in obj and isinstance(obj["vae"], Mapping):
        raise CheckpointError(f"{source} is a tokenizer file ({{'vae': ...}}); load it with load_tokenizer")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_transformer_config(sd: Mapping[str, torch.Tensor], source: str = "state dict", **overrides: Any) -> TransformerConfig:
    """The architecture of a transformer state dict, from its tensor shapes.

    Matches a named preset when every inferred field agrees (so drop-path and the paired
    tokenizer are known); otherwise builds a config.  ``overrides`` win over inferred values.
    """
    if not all(k in sd for k in _TRANSFORMER_MARKERS):
        if _looks_like_tokenizer(sd):
            raise CheckpointError(f"{source} looks like a BSQ-VAE tokenizer, not an Infinity transformer; "
                                  "load it with load_tokenizer")
        missing = [k for k in _TRANSFORMER_MARKERS if k not in sd]
        raise CheckpointError(f"{source} is not an Infinity transformer state dict (missing {missing})")
    C = sd["pos_start"].shape[-1]
    maxlen, Ct = sd["cfg_uncond"].shape
    d_tok = sd["word_embed.weight"].shape[1]
    chunk_ids = {int(m.group(1)) for k in sd for m in [re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k)] if m}
    if chunk_ids:
        n_chunks = max(chunk_ids) + 1
        per = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"block_chunks\.0\.module\.(\d+)\.", k)] if m)
        depth = n_chunks * per
        prefix = "block_chunks.0.module.0."
    else:
        ids = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
        if not ids:
            raise CheckpointError(f"{source} has no transformer blocks")
        n_chunks, depth, prefix = 1, max(ids) + 1, "blocks.0."
    heads = sd[prefix + "sa.scale_mul_1H11"].shape[1]
    hidden = sd[prefix + "ffn.fc1.weight"].shape[0]
    patchify = d_tok == 56
    inferred = dict(depth=depth, embed_dim=C, num_heads=heads, block_chunks=n_chunks, text_channels=Ct,
                    codebook_dim=d_tok // 4 if patchify else d_tok, apply_spatial_patchify=patchify)
    if round(C * 4 / 256) * 256 != hidden:
        inferred["mlp_ratio"] = hidden / C
    inferred.update(overrides)
    base = None
    for preset in TRANSFORMER_PRESETS.values():
        if all(getattr(preset, k) == v for k, v in inferred.items() if k != "block_chunks"):
            base = preset
            break
    if base is None:
        base = TransformerConfig(text_maxlen=int(maxlen), drop_path_rate=0.0, tokenizer=None,
                                 **{k: v for k, v in inferred.items() if k in ("depth", "embed_dim", "num_heads",
                                                                              "block_chunks", "text_channels")})
    cfg = replace_config(base, {k: v for k, v in inferred.items()})
    pool = sd["text_proj_for_sos.ca.mat_q"].shape[1]
    if cfg.text_pool_heads != pool:
        raise CheckpointError(f"{source}: text pool has {pool} heads, but a text width of {Ct} implies "
                              f"{cfg.text_pool_heads}; this architecture is not supported")
    return cfg


def _config_beside(path: Path) -> Optional[Dict[str, Any]]:
    # save_transformer writes <name>.json beside a file; a sharded folder may hold a config.json
    for cand in ([path / "config.json"] if path.is_dir() else [path.with_suffix(".json")]):
        if cand.exists():
            try:
                data = json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"config file {cand} is not valid JSON ({e})") from e
            if isinstance(data, dict) and data.get("model_type", "infinity") in ("infinity", "infinity_transformer"):
                return {k: v for k, v in data.items() if k in TransformerConfig.__dataclass_fields__}
    return None


#: Config fields that only matter for training (or for how blocks are grouped), which an override
#: may change in a model whose config is stored beside its weights.
TRAINING_FIELDS = ("drop_path_rate", "cond_drop_rate", "block_chunks")


def load_transformer(path_or_preset: Union[PathLike, str], *, config: Union[None, str, Mapping[str, Any], TransformerConfig] = None,
                     use_ema: bool = False, device: Union[str, torch.device] = "cpu",
                     dtype: Optional[torch.dtype] = None, **overrides: Any) -> InfinityTransformer:
    """Build an :class:`InfinityTransformer` from a preset name or load it from weights.

    ``path_or_preset``: a preset (``"2b"``, ``"layer12c4"``, ``"tiny"``) gives random weights; a
    file or folder is loaded strictly.  ``config`` fixes the architecture (preset name, dict of
    :class:`TransformerConfig` fields or a config) where the shapes are ambiguous; a
    ``config.json`` beside the weights is used too.  ``overrides`` are config fields (e.g.
    ``cond_drop_rate=0.0``).  Returns the model in eval mode.
    """
    p = Path(str(path_or_preset))
    if not p.exists():
        name = str(path_or_preset)
        if "/" in name or name.endswith((".pth", ".pt", ".safetensors", ".ckpt", ".bin")):
            raise CheckpointError(f"transformer weights not found: {name}")
        cfg = transformer_config(name, **overrides)
        model = InfinityTransformer(cfg)
        from .models.infinity import init_weights
        init_weights(model)
        return model.to(device=device, dtype=dtype).eval()
    source = str(p)
    sd = extract_transformer_state(read_weights(p, what="transformer"), source, use_ema=use_ema)
    if isinstance(config, TransformerConfig):
        cfg = replace_config(config, overrides)
    elif isinstance(config, str):
        cfg = transformer_config(config, **overrides)
    else:
        stored = None if config else _config_beside(p)
        given = dict(config or stored or {})
        given.update(overrides)
        cfg = infer_transformer_config(sd, source, **given)
        if stored:
            from .checkpoints import check_overrides_agree

            check_overrides_agree(replace_config(cfg, {k: stored[k] for k in overrides if k in stored}), cfg,
                                  overrides, f"transformer {source}", TRAINING_FIELDS)
    with torch.device("meta"):
        model = InfinityTransformer(cfg)
    sd = adapt_state_dict(model, sd)
    model_sd = model.state_dict()
    check_state_dict(model_sd, sd, source=source, what=f"Infinity transformer ({_describe(cfg)})",
                     ignore_missing=[k for k in model_sd if k.endswith("zero_k_bias")])
    # weights load as fp32 whatever the file holds (bf16 exports included); ``dtype`` casts after
    full = {k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) if k in sd else torch.zeros(v.shape, dtype=v.dtype)
            for k, v in model_sd.items()}
    model.load_state_dict(full, strict=True, assign=True)
    model.kv_caching(False)
    return model.to(device=device, dtype=dtype).eval()


def _describe(cfg: TransformerConfig) -> str:
    return f"depth {cfg.depth}, width {cfg.embed_dim}, {cfg.num_heads} heads, {cfg.block_chunks} chunks, " \
           f"{cfg.bits_per_token} bits/token, text width {cfg.text_channels}"


def adapt_state_dict(model: InfinityTransformer, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The original's tolerated differences: legacy buffers dropped, ``cfg_uncond`` length fixed,
    ``blocks.{i}`` <-> ``block_chunks.{c}.module.{j}`` renamed to the model's nesting."""
    sd = {k: v for k, v in sd.items() if k not in _LEGACY_BUFFERS}
    sd = rename_block_keys(sd, model.config)
    rows = model.config.text_maxlen
    if "cfg_uncond" in sd and sd["cfg_uncond"].shape[0] != rows:
        cu = sd["cfg_uncond"]
        if cu.shape[0] > rows:
            sd["cfg_uncond"] = cu[:rows]
        else:
            own = model.cfg_uncond.detach()
            if own.is_meta:
                own = torch.randn(own.shape) / own.shape[1] ** 0.5
            sd["cfg_uncond"] = torch.cat([cu, own[cu.shape[0]:].to(cu.dtype)], dim=0)
    return sd


def rename_block_keys(sd: Dict[str, torch.Tensor], cfg: TransformerConfig) -> Dict[str, torch.Tensor]:
    """Map block keys (``blocks.{i}`` or any ``block_chunks`` grouping) to the nesting of ``cfg``."""
    per = cfg.depth // cfg.block_chunks
    file_per = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"block_chunks\.0\.module\.(\d+)\.", k)] if m),
                       default=0)
    out = {}
    for k, v in sd.items():
        m = re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.(.*)", k)
        n = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)) * file_per + int(m.group(2)), m.group(3)
        elif n:
            i, rest = int(n.group(1)), n.group(2)
        else:
            out[k] = v
            continue
        k = f"block_chunks.{i // per}.module.{i % per}.{rest}" if cfg.block_chunks > 1 else f"blocks.{i}.{rest}"
        out[k] = v
    return out


def transformer_state_dict(model: InfinityTransformer, include_buffers: bool = True) -> Dict[str, torch.Tensor]:
    """The model's state dict in the released layout (fp32 CPU tensors, zero_k_bias kept)."""
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if not include_buffers:
        sd = {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}
    return sd


def save_transformer(model: InfinityTransformer, path: PathLike, format: str = "released",
                     dtype: Optional[torch.dtype] = None) -> Path:
    """Export to the released flat ``.pth`` layout or to safetensors, with a ``config.json``-style
    record of the architecture beside it (``<name>.json``)."""
    sd = transformer_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path = Path(path)
    if format == "released":
        atomic_save(sd, path)
    elif format == "safetensors":
        atomic_save_safetensors(sd, path, metadata={"format": "pt", "model_type": "infinity"})
    else:
        raise ValueError(f"unknown export format {format!r}; expected 'released' or 'safetensors'")
    from .io import atomic_write
    meta = {"model_type": "infinity", **config_to_dict(model.config)}
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return path

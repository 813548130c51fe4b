"""Recipe -> objects for bitwise VAR training (``kind: var``).

:func:`build_var_training` turns a loaded recipe into ``(module, datamodule, trainer_kwargs,
callbacks)``.  Sections (every key is checked against :data:`VAR_SCHEMA`):

``model``
    ``transformer``: preset name (``tiny``, ``layer12c4``, ``2b``, ...) trained from scratch
    with the spec 1.12 init (``init``), or the architecture to load ``weights`` into;
    ``weights``: released ``.pth`` / original training checkpoint / Lightning checkpoint /
    safetensors (strict, see :func:`load_transformer_weights`); ``overrides``: config fields;
    ``drop_mismatched``: any of ``head``, ``word_embed``, ``text`` (the original's
    ``--rush_resume`` tolerance); ``use_ema_weights``; ``tokenizer``: preset or weights file
    (+ ``tokenizer_overrides``); ``text_encoder``: a Hugging Face folder, ``"tiny:<d_model>"``
    (a random tiny T5 with a vocabulary trained on the dataset's captions, built offline into
    ``<output_dir>/tiny_t5_<d_model>``), or ``null`` when batches carry cached text features;
    ``text_encoder_kwargs`` for :meth:`TextEncoder.from_pretrained`.
``data``
    ``name`` plus the DataModule's keyword arguments (``shapes``, ``jsonl``, ``webdataset``,
    ``folder``, ``emoji``, ``photos``; ``latents`` serves a :func:`precompute_latents` file).
``module``
    :class:`BitwiseVARModule` hyper-parameters.
``trainer``
    ``lightning.Trainer`` keyword arguments.
``callbacks``
    ``self_correction`` (:class:`SelfCorrectionSchedule`), ``ema`` (:class:`EMA`),
    ``sample_logger`` (:class:`SampleLogger`), ``checkpoint`` (``ModelCheckpoint``; files in
    ``<output_dir>/checkpoints``), ``lr_monitor`` (bool); ``null`` switches one off.
    DataModules that count skipped records (``skip_summary``) always get a
    :class:`~infinity_lightning.datamodules.DataModuleMonitor`, which logs the skips of every epoch
    (``data/skipped``, ``data/skipped_<reason>``) and a summary line.
top level
    ``kind: var``, ``seed``, ``output_dir``, ``ckpt_path`` (resume; ``last`` = newest checkpoint
    in ``<output_dir>/checkpoints``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "VAR_SCHEMA",
    "MODULE_SCHEMA",
    "build_var_training",
    "build_transformer",
    "build_tokenizer",
    "build_text_encoder",
    "build_datamodule",
    "load_transformer_weights",
    "load_var_recipe",
    "overrides_for_missing",
    "missing_values",
    "DROP_GROUPS",
]

DROP_GROUPS = ("head", "word_embed", "text")

MODULE_SCHEMA: Dict[str, Any] = {
    "pn": Optional[str],
    "scale_schedule": Optional[Union[List[List[int]], Dict[Any, List[List[int]]]]],
    "image_size": Optional[int],
    "lr": Optional[float],
    "tblr": Optional[float],
    "global_batch_size": Optional[int],
    "betas": List[float],
    "eps": float,
    "weight_decay": float,
    "weight_decay_end": Optional[float],
    "optimizer": Literal["adamw", "adamw8bit"],
    "fused": Optional[bool],
    "lr_schedule": Literal["constant", "lin0", "cosine"],
    "warmup_steps": int,
    "warmup_start_factor": float,
    "final_lr_factor": float,
    "max_steps": Optional[int],
    "cond_drop_rate": Optional[float],
    "bsc_strength": float,
    "bsc_layers": int,
    "val_bsc_strength": float,
    "val_bsc_layers": int,
    "reweight_loss_by_scale": bool,
    "label_smoothing": float,
    "bitloss_type": Literal["mean", "sum"],
    "activation_checkpointing": Optional[Literal["full-block", "self-attn"]],
    "reseed_global_rng": bool,
    "max_nonfinite_steps": Optional[int],
    "sample_kwargs": Optional[Dict[str, Any]],
    "log_per_scale": bool,
    "cache_text_features": bool,
    "save_frozen_modules": bool,
    # FSDP2 options for infinity_lightning.parallel.parallelize (with trainer.strategy=fsdp2):
    # mixed_precision (bf16 | fp32), cpu_offload, reshard_after_forward; checked by make_parallelize_fn
    "parallelize": Optional[dict],
}

VAR_SCHEMA: Dict[str, Any] = {
    "kind": Literal["var"],
    "seed": int,
    "output_dir": Optional[str],
    "ckpt_path": Optional[str],
    "model": {
        "transformer": Optional[str],
        "weights": Optional[str],
        "overrides": Optional[Dict[str, Any]],
        "drop_mismatched": Optional[List[Literal["head", "word_embed", "text"]]],
        "use_ema_weights": bool,
        "init": {"tini": float, "aln": float, "alng": float, "hd0": float},
        "tokenizer": str,
        "tokenizer_overrides": Optional[Dict[str, Any]],
        "text_encoder": Optional[str],
        "text_encoder_kwargs": Optional[Dict[str, Any]],
    },
    "data": {"name": str, "*": Any},
    "module": MODULE_SCHEMA,
    "trainer": dict,
    "callbacks": {
        "self_correction": Optional[dict],
        "ema": Optional[dict],
        "sample_logger": Optional[dict],
        "checkpoint": Optional[dict],
        "lr_monitor": bool,
    },
}


# --------------------------------------------------------------------------------------------
# recipe loading
# --------------------------------------------------------------------------------------------
def missing_values(cfg: Any) -> List[str]:
    """Dotted keys whose value is OmegaConf's mandatory marker ``???``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(cfg, (DictConfig, ListConfig)):
        return []
    return sorted(OmegaConf.missing_keys(cfg))


def check_missing(cfg: Any, source: str) -> None:
    """Raise a :class:`~infinity_lightning.recipes.RecipeError` listing every ``???`` value."""
    from ..recipes import RecipeError

    missing = missing_values(cfg)
    if missing:
        example = " ".join(f"{k}=..." for k in missing)
        raise RecipeError(f"{source}: required value(s) not set: {', '.join(missing)}. "
                          f"Give them on the command line, e.g. `infinity-lightning fit RECIPE {example}`")


def overrides_for_missing(path_or_name: Any, overrides: Sequence[str]) -> List[str]:
    """Overrides with a ``+`` added where they set a ``???`` value.

    ``recipes.apply_overrides`` checks that a key exists with ``in``, which OmegaConf answers
    with False for mandatory (``???``) values, so ``model.weights=...`` would be refused as an
    unknown key exactly where the recipe asks for it.
    """
    from ..recipes import load_recipe

    missing = set(missing_values(load_recipe(path_or_name)))
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip() if isinstance(item, str) else ""
        out.append("+" + item if key in missing else item)
    return out


def load_var_recipe(path_or_name: Any, overrides: Sequence[str] = ()):
    """Load a ``kind: var`` recipe with overrides, check ``???`` values and validate it."""
    from ..recipes import load_recipe, resolve_recipe

    overrides = overrides_for_missing(path_or_name, overrides)
    cfg = load_recipe(path_or_name, overrides)
    check_missing(cfg, str(resolve_recipe(path_or_name)))
    return load_recipe(path_or_name, overrides, schema=VAR_SCHEMA)


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    from ..recipes import to_dict

    return to_dict(value)


def load_transformer_weights(model: nn.Module, path: Union[str, Path], drop_mismatched: Sequence[str] = (),
                             use_ema: bool = False) -> List[str]:
    """Load a weights file into ``model`` strictly, except for the tensors ``drop_mismatched`` allows.

    Groups (the original's ``--rush_resume``): ``word_embed`` drops ``word_embed.weight`` when the
    bits per token differ; ``head`` drops ``head.weight``/``head.bias`` when the head size
    differs; ``text`` drops ``cfg_uncond`` and every key containing ``text`` when the text width
    differs (``text_proj_for_sos.ca.mat_kv.weight`` or ``cfg_uncond`` columns).  Dropped tensors
    keep the model's own (initial) values.  Anything else that does not match raises.
    Returns the sorted list of dropped keys (also logged).
    """
    from ..io import check_state_dict, read_weights
    from ..transformer_checkpoints import adapt_state_dict, extract_transformer_state

    unknown = sorted(set(drop_mismatched) - set(DROP_GROUPS))
    if unknown:
        raise ValueError(f"model.drop_mismatched: unknown group(s) {unknown}; allowed: {list(DROP_GROUPS)}")
    source = str(path)
    sd = extract_transformer_state(read_weights(path, what="transformer"), source, use_ema=use_ema)
    own = model.state_dict()

    def differs(key: str) -> bool:
        return key in sd and key in own and tuple(sd[key].shape) != tuple(own[key].shape)

    dropped: List[str] = []
    if "word_embed" in drop_mismatched and differs("word_embed.weight"):
        dropped.append("word_embed.weight")
    if "head" in drop_mismatched and (differs("head.weight") or differs("head.bias")):
        dropped += [k for k in ("head.weight", "head.bias") if k in sd]
    text_differs = differs("text_proj_for_sos.ca.mat_kv.weight") or (
        "cfg_uncond" in sd and sd["cfg_uncond"].shape[1:] != own["cfg_uncond"].shape[1:])
    if "text" in drop_mismatched and text_differs:
        dropped += [k for k in sd if k == "cfg_uncond" or "text" in k]
    dropped = sorted(set(dropped))
    for k in dropped:
        sd.pop(k)
    sd = adapt_state_dict(model, sd)
    check_state_dict(own, sd, source=source, what="Infinity transformer",
                     ignore_missing=dropped + [k for k in own if k.endswith("zero_k_bias")])
    model.load_state_dict({**own, **sd}, strict=True)
    if dropped:
        log.warning("%s: dropped %d mismatching tensor(s) (model.drop_mismatched=%s), kept at their initial "
                    "values: %s", source, len(dropped), list(drop_mismatched), ", ".join(dropped))
    return dropped


def build_transformer(model_cfg: Mapping[str, Any], seed: int = 0) -> nn.Module:
    """The transformer of a recipe's ``model`` section, in training mode with gradients."""
    from ..models.infinity import InfinityTransformer, init_weights
    from ..presets import transformer_config
    from ..transformer_checkpoints import load_transformer

    preset, weights = model_cfg.get("transformer"), model_cfg.get("weights")
    overrides = dict(model_cfg.get("overrides") or {})
    drop = list(model_cfg.get("drop_mismatched") or [])
    use_ema = bool(model_cfg.get("use_ema_weights", False))
    if not preset and not weights:
        raise ValueError("recipe section 'model' needs 'transformer' (a preset) and/or 'weights' (a file)")
    if weights and not drop:
        model = load_transformer(weights, config=preset or None, use_ema=use_ema, **overrides)
    else:
        if not preset:
            raise ValueError("model.drop_mismatched needs model.transformer: the architecture cannot be "
                             "inferred from weights whose shapes do not fit it")
        model = InfinityTransformer(transformer_config(preset, **overrides))
        init = dict(model_cfg.get("init") or {})
        init_weights(model, generator=torch.Generator().manual_seed(int(seed)), **init)
        if weights:
            model.dropped_keys = load_transformer_weights(model, weights, drop, use_ema)
    model.train()
    model.requires_grad_(True)
    return model


def build_tokenizer(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The frozen tokenizer (preset name or weights file)."""
    from ..checkpoints import load_tokenizer

    return load_tokenizer(model_cfg["tokenizer"], **dict(model_cfg.get("tokenizer_overrides") or {}))


def _dataset_captions(datamodule: Any, limit: int = 2000) -> List[str]:
    """Captions to train a tiny vocabulary on: from the shapes grammar when available, else from
    the first training batches."""
    gen = getattr(datamodule, "generator", None)
    if gen is not None and hasattr(gen, "spec"):
        n = min(int(getattr(datamodule, "num_samples", limit)), limit)
        return [gen.spec(i).caption for i in range(n)]
    captions: List[str] = []
    try:
        datamodule.setup("fit")
        for batch in datamodule.train_dataloader():
            captions.extend(batch["captions"])
            if len(captions) >= limit:
                break
    except Exception as e:  # a vocabulary from fewer captions still works
        log.warning("could not read captions for the tiny text vocabulary (%s)", e)
    return captions


def build_text_encoder(spec: Optional[str], kwargs: Optional[Mapping[str, Any]], output_dir: Path,
                       datamodule: Any = None, extra_texts: Sequence[str] = ()):
    """``None``, a tiny random T5 (``"tiny:<d_model>"``) or a local Hugging Face folder."""
    from ..models.text_encoder import TextEncoder, make_tiny_t5

    if spec is None:
        return None
    kwargs = dict(kwargs or {})
    if "dtype" in kwargs and isinstance(kwargs["dtype"], str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if str(spec).startswith("tiny:"):
        d_model = int(str(spec).split(":", 1)[1])
        folder = Path(output_dir) / f"tiny_t5_{d_model}"
        if not (folder / "config.json").exists():
            texts = list(_dataset_captions(datamodule)) if datamodule is not None else []
            texts += list(extra_texts)
            make_tiny_t5(folder, texts or None, d_model=d_model, num_heads=max(1, d_model // 32))
        return TextEncoder.from_pretrained(folder, **kwargs)
    return TextEncoder.from_pretrained(spec, **kwargs)


def build_datamodule(data_cfg: Mapping[str, Any]):
    """A DataModule from ``{"name": ..., **kwargs}``; ``latents`` is :class:`LatentsDataModule`."""
    from ..recipes import check_kwargs

    data_cfg = dict(data_cfg)
    if "name" not in data_cfg:
        raise KeyError("recipe section 'data' needs a 'name' (shapes, jsonl, webdataset, folder, emoji, photos, "
                       "latents)")
    name = data_cfg.pop("name")
    if name == "latents":
        from .var_module import LatentsDataModule

        return LatentsDataModule(**check_kwargs(LatentsDataModule, data_cfg, "recipe section 'data'"))
    try:
        from ..datamodules import build_datamodule as registry_build
    except ImportError:
        registry_build = None
    if registry_build is not None:
        return registry_build(name, **data_cfg)
    # Registry not available: the modules this package ships, by name.
    import importlib

    known = {"shapes": ("shapes", "ShapesDataModule"), "jsonl": ("jsonl", "JsonlDataModule"),
             "webdataset": ("webdataset", "WebDatasetDataModule"), "folder": ("folder", "ImageFolderDataModule"),
             "emoji": ("emoji", "EmojiDataModule"), "photos": ("photos", "PhotoCropsDataModule")}
    if name not in known:
        raise KeyError(f"recipe section 'data': unknown data module {name!r}; known: {sorted(known) + ['latents']}")
    mod, cls_name = known[name]
    cls = getattr(importlib.import_module(f"infinity_lightning.datamodules.{mod}"), cls_name)
    return cls(**check_kwargs(cls, data_cfg, "recipe section 'data'"))


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------
def _build_callbacks(cb_cfg: Mapping[str, Any], output_dir: Path) -> List[Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from ..callbacks import EMA, SampleLogger, SelfCorrectionSchedule
    from ..recipes import check_kwargs

    out: List[Any] = []
    if cb_cfg.get("self_correction") is not None:
        kw = check_kwargs(SelfCorrectionSchedule, cb_cfg["self_correction"], "recipe callbacks.self_correction")
        out.append(SelfCorrectionSchedule(**kw))
    if cb_cfg.get("ema") is not None:
        kw = check_kwargs(EMA, cb_cfg["ema"], "recipe callbacks.ema")
        if isinstance(kw.get("ema_dtype"), str):
            kw["ema_dtype"] = getattr(torch, kw["ema_dtype"])
        if "swap_for" in kw:
            kw["swap_for"] = tuple(kw["swap_for"])
        out.append(EMA(**kw))
    if cb_cfg.get("sample_logger") is not None:
        kw = check_kwargs(SampleLogger, cb_cfg["sample_logger"], "recipe callbacks.sample_logger")
        kw.setdefault("folder", str(output_dir / "samples"))
        out.append(SampleLogger(**kw))
    if cb_cfg.get("checkpoint") is not None:
        kw = check_kwargs(ModelCheckpoint, cb_cfg["checkpoint"], "recipe callbacks.checkpoint")
        kw.setdefault("dirpath", str(output_dir / "checkpoints"))
        out.append(ModelCheckpoint(**kw))
    if cb_cfg.get("lr_monitor"):
        out.append(LearningRateMonitor(logging_interval="step"))
    return out


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def build_var_training(cfg: Any) -> Tuple[Any, Any, Dict[str, Any], List[Any]]:
    """Turn a ``kind: var`` recipe into ``(module, datamodule, trainer_kwargs, callbacks)``.

    ``cfg``: a ``DictConfig`` from :func:`load_var_recipe` (or a plain dict, validated here).
    ``trainer_kwargs`` are checked ``lightning.Trainer`` arguments (logger and root dir are the
    caller's: see :mod:`infinity_lightning.commands.fit`).  The module's ``seed`` defaults to the
    recipe's; the global RNG is seeded with it before the networks are built.
    """
    import lightning.pytorch as pl

    from ..recipes import check_kwargs, trainer_kwargs as checked_trainer_kwargs, validate
    from .var_module import BitwiseVARModule

    check_missing(cfg, "recipe")
    validate(cfg, VAR_SCHEMA, "recipe")
    cfg = _plain(cfg)
    if cfg.get("kind", "var") != "var":
        raise ValueError(f"build_var_training: recipe kind is {cfg['kind']!r}, expected 'var'")
    seed = int(cfg.get("seed", 0))
    output_dir = Path(cfg.get("output_dir") or "runs/var")
    pl.seed_everything(seed, workers=True, verbose=False)

    model_cfg = dict(cfg.get("model") or {})
    module_section = dict(cfg.get("module") or {})
    parallel_cfg = module_section.pop("parallelize", None)
    module_cfg = check_kwargs(BitwiseVARModule, module_section, "recipe section 'module'")
    tkw = checked_trainer_kwargs(cfg.get("trainer") or {})
    strategy_name = tkw.get("strategy") if isinstance(tkw.get("strategy"), str) else None
    if strategy_name in ("fsdp", "fsdp2", "model_parallel", "ddp"):
        # "fsdp2" shards the transformer with infinity_lightning.parallel.parallelize in
        # configure_model; "fsdp" (FSDP1) is refused with a pointer to fsdp2.
        from ..parallel import check_optimizer_strategy, make_parallelize_fn, make_strategy

        tkw["strategy"] = make_strategy(strategy_name)
        check_optimizer_strategy(module_cfg.get("optimizer", "adamw"), strategy_name)
        if strategy_name in ("fsdp2", "model_parallel"):
            module_cfg["parallelize_fn"] = make_parallelize_fn(**(parallel_cfg or {}))
    elif parallel_cfg:
        raise ValueError("module.parallelize is set but trainer.strategy is not fsdp2; "
                         "set trainer.strategy=fsdp2 or remove module.parallelize")
    datamodule = build_datamodule(cfg.get("data") or {"name": "shapes"})

    transformer = build_transformer(model_cfg, seed)
    tokenizer = build_tokenizer(model_cfg) if model_cfg.get("tokenizer") else None
    if tokenizer is not None and tokenizer.config.codebook_dim != transformer.config.codebook_dim:
        raise ValueError(f"the tokenizer has {tokenizer.config.codebook_dim} bits per position but the transformer "
                         f"expects {transformer.config.codebook_dim} (model.tokenizer vs model.transformer)")
    cb_cfg = dict(cfg.get("callbacks") or {})
    prompts = list((cb_cfg.get("sample_logger") or {}).get("prompts") or [])
    text_encoder = build_text_encoder(model_cfg.get("text_encoder"), model_cfg.get("text_encoder_kwargs"),
                                      output_dir, datamodule, prompts)
    if text_encoder is not None and text_encoder.width != transformer.config.text_channels:
        raise ValueError(f"the text encoder's width is {text_encoder.width} but the transformer's text_channels "
                         f"is {transformer.config.text_channels} (model.text_encoder vs model.transformer)")
    module_cfg.setdefault("seed", seed)
    if "betas" in module_cfg:
        module_cfg["betas"] = tuple(module_cfg["betas"])
    module = BitwiseVARModule(transformer, tokenizer, text_encoder, **module_cfg)
    callbacks = _build_callbacks(cb_cfg, output_dir)
    if callable(getattr(datamodule, "skip_summary", None)):
        from ..datamodules import DataModuleMonitor

        callbacks.append(DataModuleMonitor())
    return module, datamodule, tkw, callbacks

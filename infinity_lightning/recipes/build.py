"""Recipe -> objects, for both recipe kinds (``kind: var`` and ``kind: tokenizer``).

Every recipe has the same sections; each is checked before anything is built, and every error
names the recipe file and the dotted key:

``kind``, ``seed``, ``output_dir``, ``ckpt_path``
    what to train, the seed of everything, where the run writes, what to resume from.
``schedule``
    the scale schedule, stated once: ``resolution`` (a pixel budget ``"0.06M"`` ... ``"1M"``, a
    pixel size, or explicit ``[[h, w], ...]`` grids; see :func:`infinity_lightning.scales.resolve`)
    and, for tokenizers, ``mode`` (how a latent grid is cut into scales).  The DataModule's image
    size is derived from it; a ``data`` section that sets its own size is an error.
``model``
    the networks (:data:`VAR_MODEL` or :data:`TOKENIZER_MODEL`).  ``model.lora`` (:data:`VAR_LORA`)
    trains LoRA adapters instead of the whole transformer: they are injected once the weights are
    loaded, before the module (and any FSDP2/DDP wrapping) exists; checkpoints then hold the
    adapters only, and the module's ``export`` writes them as ``<output_dir>/lora/`` (PEFT format).
``data``
    ``name`` (a key of :data:`infinity_lightning.datamodules.DATAMODULES`) and that DataModule's
    keyword arguments.
``module``
    the LightningModule's keyword arguments (:class:`~infinity_lightning.lit.BitwiseVARModule` or
    :class:`~infinity_lightning.lit.BSQTokenizerModule`), networks and configs excluded.
``optim``
    :class:`~infinity_lightning.lit.optim.OptimConfig` (the same for both kinds).
``sampling``
    (VAR) :class:`~infinity_lightning.sampling.SamplingConfig` of the sample images.
``trainer``
    ``lightning.Trainer`` keyword arguments; ``strategy`` may be ``ddp`` or ``fsdp2``.
``callbacks``
    ``name: {keyword arguments}`` for the callbacks of
    :data:`infinity_lightning.callbacks.CALLBACKS` (``true``: defaults, ``null``: off).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import scales
from .loader import RecipeError, Switch, check_kwargs, load_recipe, resolve_recipe, to_dict, validate

log = logging.getLogger(__name__)

__all__ = ["Run", "build_run", "load_run_recipe", "recipe_kind", "recipe_schema", "recipe_components", "build_transformer",
           "build_text_encoder", "load_transformer_weights", "missing_values", "KINDS", "DROP_GROUPS",
           "VAR_MODEL", "VAR_LORA", "TOKENIZER_MODEL", "apply_lora"]

KINDS = ("var", "tokenizer")
DROP_GROUPS = ("head", "word_embed", "text")
#: Arguments of the modules that the builder supplies (never set in a recipe's ``module``).
_BUILT = ("transformer", "tokenizer", "text_encoder", "discriminator", "perceptual", "resolution", "optim",
          "sampling", "parallelize_fn", "trainable_filter", "schedule_mode", "last_layer", "fid_feature", "seed")
#: DataModule arguments derived from ``schedule.resolution``.
_SIZE_KEYS = ("pn", "image_size")

#: ``model.lora`` of VAR recipes: the fields of :class:`infinity_lightning.lora.LoraSettings` and
#: ``quantize_base`` (``8bit``: int8 frozen base Linears, not with fsdp2); null: full fine-tuning.
VAR_LORA: Dict[str, Any] = {
    "rank": int,
    "alpha": float,
    "dropout": float,
    "targets": Optional[List[str]],
    "bias": Literal["none", "all", "lora_only"],
    "init": Literal["default", "gaussian", "random"],
    "quantize_base": Optional[Literal["8bit"]],
}
#: The ``model`` section of VAR recipes.
VAR_MODEL: Dict[str, Any] = {
    "transformer": Optional[str],
    "weights": Optional[str],
    "overrides": Optional[Dict[str, Any]],
    "drop_mismatched": Optional[List[Literal["head", "word_embed", "text"]]],
    "use_ema_weights": bool,
    "init": {"tini": float, "aln": float, "alng": float, "hd0": float},
    "activation_checkpointing": Optional[Literal["full-block", "self-attn"]],
    "attention_backend": Literal["exact", "fast"],
    "tokenizer": str,
    "random_tokenizer": bool,
    "tokenizer_overrides": Optional[Dict[str, Any]],
    "text_encoder": Optional[str],
    "text_encoder_kwargs": Optional[Dict[str, Any]],
    "cache_text_features": bool,
    "lora": Switch(VAR_LORA),
}
#: The ``model`` section of tokenizer recipes.
TOKENIZER_MODEL: Dict[str, Any] = {"preset": Optional[str], "weights": Optional[str], "overrides": Optional[dict]}


def _signature_schema(cls: Any, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Keyword arguments of ``cls`` -> their annotated types (``Any`` where none can be read)."""
    import inspect
    import typing

    target = cls.__init__ if inspect.isclass(cls) else cls
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # annotations naming optional packages
        hints = {}
    out: Dict[str, Any] = {}
    for name, p in inspect.signature(target).parameters.items():
        if name == "self" or name in exclude or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        tp = hints.get(name, Any)
        out[name] = tp if _simple_type(tp) else Any
    return out


def _simple_type(tp: Any) -> bool:
    """Whether the schema checker understands ``tp`` (plain values, not modules or callables)."""
    import typing

    if tp in (int, float, str, bool, dict, list, type(None)):
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, Literal, list, dict, tuple):
        return all(_simple_type(a) for a in typing.get_args(tp) if a is not Ellipsis) if origin is not Literal else True
    return False


def recipe_schema(kind: str, cfg: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The keys and types of a ``kind`` recipe.  The ``module``, ``data`` (for ``cfg``'s
    ``data.name``), ``callbacks`` and ``sampling`` sections take the keyword arguments of the classes
    they configure, so one checker names every unknown key, its file and the valid choices."""
    from ..callbacks import CALLBACKS
    from ..datamodules import DATAMODULES
    from ..datamodules.base import accepted_kwargs
    from ..lit.optim import OptimConfig
    from ..sampling import SamplingConfig

    if kind == "var":
        from ..lit.var_module import BitwiseVARModule as module_cls
    else:
        from ..lit.tokenizer_module import BSQTokenizerModule as module_cls
    module = _signature_schema(module_cls, _BUILT)
    if kind == "var":
        module["parallelize"] = Optional[dict]
    data: Dict[str, Any] = {"name": Literal[tuple(DATAMODULES)]}
    name = ((cfg or {}).get("data") or {}).get("name")
    if name in DATAMODULES:
        # the size keys pass here so that the builder can say where the size comes from instead
        data.update({k: Any for k in accepted_kwargs(DATAMODULES[name])})
    else:
        data["*"] = Any
    callbacks = {name: Switch(_signature_schema(cls)) for name, (cls, _) in CALLBACKS.items()}
    schema: Dict[str, Any] = {
        "kind": Literal["var", "tokenizer"],
        "seed": int,
        "output_dir": Optional[str],
        "ckpt_path": Optional[str],
        "schedule": {"resolution": Optional[Union[str, int, float, List[List[int]]]]},
        "model": VAR_MODEL if kind == "var" else TOKENIZER_MODEL,
        "data": data,
        "module": module,
        "optim": OptimConfig,
        "trainer": dict,
        "callbacks": callbacks,
    }
    if kind == "var":
        schema["sampling"] = {k: Any for k in SamplingConfig.names()}
    else:
        schema["schedule"]["mode"] = Literal[scales.LATENT_MODES]
    return schema


def _switches(cfg: Any) -> Any:
    """The recipe with callback switches normalised: ``name: true`` -> ``{}``, ``null``/``false``
    entries dropped (what the schema and the builder see)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg = dict(cfg)
    cbs = cfg.get("callbacks")
    if isinstance(cbs, Mapping):
        cfg["callbacks"] = {k: ({} if v is True else v) for k, v in cbs.items() if v is not None and v is not False}
    return cfg


@dataclasses.dataclass
class Run:
    """What a recipe builds: call ``lightning.Trainer(callbacks=run.callbacks, **run.trainer_kwargs)
    .fit(run.module, datamodule=run.datamodule)``."""

    kind: str
    module: Any
    datamodule: Any
    trainer_kwargs: Dict[str, Any]
    callbacks: List[Any]
    output_dir: Path


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def recipe_kind(cfg: Any, path: Path) -> str:
    """The recipe's ``kind`` (its top-level key, else its folder name ``var/`` or ``tokenizer/``)."""
    kind = cfg.get("kind") or path.parent.name
    if kind not in KINDS:
        raise RecipeError(f"recipe {path}: kind {kind!r} is not one of {KINDS}; set a top-level 'kind:' key")
    return str(kind)


def missing_values(cfg: Any) -> List[str]:
    """Dotted keys whose value is OmegaConf's mandatory marker ``???``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(cfg, (DictConfig, ListConfig)):
        return []
    return sorted(OmegaConf.missing_keys(cfg))


def recipe_components(section: str, name: Any) -> Optional[List[str]]:
    """The keys the component ``name`` of a recipe ``section`` takes (``data``: the DataModule's
    arguments, the size keys excluded), or None for an unknown one: what a recipe keeps when a
    section's component changes (:func:`infinity_lightning.recipes.loader.apply_overrides`)."""
    if section != "data":
        return None
    from ..datamodules import DATAMODULES
    from ..datamodules.base import accepted_kwargs

    if name not in DATAMODULES:
        return None
    return [k for k in accepted_kwargs(DATAMODULES[name]) if k not in _SIZE_KEYS]


def load_run_recipe(path_or_name: Any, overrides: Sequence[str] = ()):
    """Load a recipe with overrides, require its ``???`` values and check it against its kind's
    schema.  Returns ``(cfg, kind, path)``."""
    path = resolve_recipe(path_or_name)
    missing = set(missing_values(load_recipe(path, components=recipe_components)))
    # OmegaConf answers False for `key in cfg` on ??? values: mark such overrides as additions.
    overrides = ["+" + o if isinstance(o, str) and "=" in o and not o.startswith(("~", "+"))
                 and o.split("=", 1)[0].strip() in missing else o for o in overrides]
    cfg = load_recipe(path, overrides, components=recipe_components)
    still = missing_values(cfg)
    if still:
        example = " ".join(f"{k}=..." for k in still)
        raise RecipeError(f"{path}: required value(s) not set: {', '.join(still)}. "
                          f"Give them on the command line, e.g. infinity-lightning fit {path_or_name} {example}")
    kind = recipe_kind(cfg, path)
    _check_reserved(to_dict(cfg, str(path)), str(path))
    schema = recipe_schema(kind, to_dict(cfg, str(path)))
    return load_recipe(path, overrides, schema=schema, components=recipe_components), kind, path


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
def load_transformer_weights(model: nn.Module, path: Union[str, Path], drop_mismatched: Sequence[str] = (),
                             use_ema: bool = False) -> List[str]:
    """Load a weights file into ``model`` strictly, except for the tensors ``drop_mismatched`` allows.

    Groups (the original's ``--rush_resume``): ``word_embed`` drops ``word_embed.weight`` when the
    bits per token differ; ``head`` drops ``head.weight``/``head.bias`` when the head size
    differs; ``text`` drops ``cfg_uncond`` and every key containing ``text`` when the text width
    differs.  Dropped tensors keep the model's own (initial) values; anything else that does not
    match raises.  Returns the sorted list of dropped keys (also logged).
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


def build_transformer(model_cfg: Mapping[str, Any], seed: int = 0, where: str = "recipe") -> nn.Module:
    """The transformer of a VAR recipe's ``model`` section, in training mode with gradients (only
    the adapters' with ``model.lora``)."""
    from ..checkpoints import load_transformer
    from ..models.infinity import InfinityTransformer, init_weights
    from ..presets import transformer_config

    preset, weights = model_cfg.get("transformer"), model_cfg.get("weights")
    overrides = dict(model_cfg.get("overrides") or {})
    drop = list(model_cfg.get("drop_mismatched") or [])
    use_ema = bool(model_cfg.get("use_ema_weights", False))
    if not preset and not weights:
        raise RecipeError("recipe section 'model' needs 'transformer' (a preset) and/or 'weights' (a file)")
    if weights and not drop:
        model = load_transformer(weights, config=preset or None, use_ema=use_ema, **overrides)
    else:
        if not preset:
            raise RecipeError("model.drop_mismatched needs model.transformer: the architecture cannot be "
                              "inferred from weights whose shapes do not fit it")
        model = InfinityTransformer(transformer_config(preset, **overrides))
        init_weights(model, generator=torch.Generator().manual_seed(int(seed)), **dict(model_cfg.get("init") or {}))
        if weights:
            model.dropped_keys = load_transformer_weights(model, weights, drop, use_ema)
    model.set_activation_checkpointing(model_cfg.get("activation_checkpointing"))
    # "fast": unpadded block-causal attention (equal to exact within rounding; docs/model.md)
    model.set_attention_backend(model_cfg.get("attention_backend") or "exact")
    model.train().requires_grad_(True)
    lora_cfg = model_cfg.get("lora")
    if lora_cfg:
        apply_lora(model, {} if lora_cfg is True else lora_cfg, where)
    return model


def apply_lora(model: nn.Module, lora_cfg: Mapping[str, Any], where: str = "recipe") -> Any:
    """Inject the LoRA adapter of a ``model.lora`` section (:data:`VAR_LORA`) into ``model`` (base
    frozen, only the adapter trains); returns :class:`~infinity_lightning.lora.LoraCounts`.
    Bad values are a :class:`RecipeError` naming ``model.lora``."""
    from ..lora import LoraSettings, add_lora

    fields = {k: v for k, v in dict(lora_cfg).items() if k != "quantize_base"}
    if fields.get("targets") is not None:
        fields["targets"] = tuple(fields["targets"])
    else:
        fields.pop("targets", None)
    try:
        settings = LoraSettings(**fields)
        counts = add_lora(model, settings, quantize_base=lora_cfg.get("quantize_base"))
    except ValueError as e:
        raise RecipeError(f"{where}: model.lora: {e}") from None
    log.info("LoRA rank %d, alpha %g on %d Linears: %d trainable of %d parameters (%.2f%%)", settings.rank,
             settings.alpha, counts.layers, counts.trainable, counts.total, 100 * counts.fraction)
    return counts


def _adapter_checkpoints(transformer: nn.Module):
    """The module's ``trainable_filter`` for a transformer with LoRA adapters: checkpoints keep the
    adapter weights and the other trained parameters (biases with ``model.lora.bias``)."""
    import functools

    from ..lora import is_lora_key, lora_checkpoint_filter

    keep = sorted(f"transformer.{n}" for n, p in transformer.named_parameters()
                  if p.requires_grad and not is_lora_key(n))
    return functools.partial(lora_checkpoint_filter, keep=keep)


def _dataset_captions(datamodule: Any, limit: int = 2000) -> List[str]:
    """Captions to train a tiny vocabulary on: from the DataModule's caption grammar when it has
    one, else from the first training batches."""
    generator = getattr(datamodule, "generator", None)
    if generator is not None and hasattr(generator, "spec"):
        n = min(int(getattr(datamodule, "num_samples", limit)), limit)
        return [generator.spec(i).caption for i in range(n)]
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
    """``None``, a tiny random T5 (``"tiny:<d_model>"``, built offline into
    ``<output_dir>/tiny_t5_<d_model>`` with a vocabulary of the dataset's captions) or a local
    Hugging Face folder."""
    from ..dtypes import parse_dtype
    from ..models.text_encoder import TextEncoder
    from ..tiny import make_tiny_t5

    if spec is None:
        return None
    kwargs = dict(kwargs or {})
    if "dtype" in kwargs:
        kwargs["dtype"] = parse_dtype(kwargs["dtype"], what="model.text_encoder_kwargs.dtype")
    if str(spec).startswith("tiny:"):
        d_model = int(str(spec).split(":", 1)[1])
        folder = Path(output_dir) / f"tiny_t5_{d_model}"
        if not (folder / "config.json").exists():
            texts = (list(_dataset_captions(datamodule)) if datamodule is not None else []) + list(extra_texts)
            make_tiny_t5(folder, texts or None, d_model=d_model, num_heads=max(1, d_model // 32))
        spec = folder
    return TextEncoder.from_pretrained(spec, **kwargs)  # quiet for small encoders


def _check_tokenizer_source(model_cfg: Mapping[str, Any], where: str) -> None:
    """A VAR recipe's ``model.tokenizer`` must be a weights file unless random weights are asked
    for (``model.random_tokenizer: true``): a transformer trained on the codes of a random
    tokenizer generates noise with any trained one."""
    from ..checkpoints import _is_preset_name

    name = str(model_cfg["tokenizer"])
    if Path(name).expanduser().exists():
        if model_cfg.get("random_tokenizer"):
            raise RecipeError(f"{where}: model.random_tokenizer is true but model.tokenizer {name!r} is a weights "
                              "file; set model.random_tokenizer=false or name a tokenizer preset")
        return
    if not _is_preset_name(name):
        raise RecipeError(f"{where}: model.tokenizer {name!r}: no such file (expected a trained tokenizer file such "
                          "as the <output_dir>/tokenizer.pth a tokenizer recipe writes)")
    if not model_cfg.get("random_tokenizer"):
        raise RecipeError(f"{where}: model.tokenizer {name!r} is a preset with random weights; give a trained "
                          "tokenizer file (model.tokenizer=runs/quickstart/tokenizer.pth; the quick start and the "
                          "tokenizer recipes write one) or set model.random_tokenizer=true to train on a random "
                          "tokenizer on purpose")


def _build_tokenizer(model_cfg: Mapping[str, Any], training: bool, where: str = "recipe") -> nn.Module:
    """A tokenizer from a preset (random weights) or a weights file; an override that contradicts
    the architecture a file stores is an error naming the recipe key."""
    from ..checkpoints import load_tokenizer
    from ..io import CheckpointError

    key = "model.overrides" if training else "model.tokenizer_overrides"
    try:
        if training:
            preset, weights = model_cfg.get("preset"), model_cfg.get("weights")
            if bool(preset) == bool(weights):
                raise RecipeError(f"{where}: section 'model' needs exactly one of 'preset' (a tokenizer preset, "
                                  "training from scratch) or 'weights' (a released or exported tokenizer file)")
            tokenizer = load_tokenizer(weights or preset, **dict(model_cfg.get("overrides") or {}))
            return tokenizer.train().requires_grad_(True)
        return load_tokenizer(model_cfg["tokenizer"], **dict(model_cfg.get("tokenizer_overrides") or {}))
    except CheckpointError as e:
        if "contradicts" in str(e):
            raise RecipeError(f"{where}: {key}: " + str(e).replace("drop the override", f"drop the override ({key}={{}} "
                                                                                  "drops them all)")) from None
        raise


# --------------------------------------------------------------------------------------------
# data and callbacks
# --------------------------------------------------------------------------------------------
def _check_resolution(resolution: Any, token_stride: int, where: str) -> Any:
    """``schedule.resolution`` if it resolves (every template), else a RecipeError naming the key."""
    if resolution is None:
        return None
    try:
        scales.resolve(resolution, 1.0, token_stride=token_stride)
    except ValueError as e:
        raise RecipeError(f"{where}: schedule.resolution: {e}") from None
    return resolution


def _build_datamodule(data_cfg: Mapping[str, Any], resolution: Any, token_stride: int, where: str):
    """The DataModule of the ``data`` section, its image size derived from ``resolution``."""
    from ..datamodules import DATAMODULES
    from ..datamodules.base import accepted_kwargs

    data_cfg = dict(data_cfg)
    name = data_cfg.pop("name", None)
    if name not in DATAMODULES:
        raise RecipeError(f"{where}: data.name {name!r} is not a DataModule; known: {sorted(DATAMODULES)}")
    cls = DATAMODULES[name]
    accepted = accepted_kwargs(cls)
    set_here = [k for k in _SIZE_KEYS if k in data_cfg]
    if set_here:
        raise RecipeError(f"{where}: data.{set_here[0]} is derived from schedule.resolution; set the size there")
    if resolution is not None:
        if isinstance(resolution, str) and resolution in scales.PIXEL_BUDGETS and "pn" in accepted:
            data_cfg["pn"] = resolution
        elif "image_size" in accepted:
            data_cfg["image_size"] = scales.resolve(resolution, 1.0, token_stride=token_stride).pixel_size(token_stride)[0]
    kwargs = check_kwargs(cls, data_cfg, where, prefix="data")
    required = [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is p.empty and p.kind is p.KEYWORD_ONLY and n not in kwargs]
    if required:
        raise RecipeError(f"{where}: data.name={name} needs {', '.join(f'data.{n}' for n in required)}")
    return cls(**kwargs)


def _build_callbacks(cb_cfg: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]], where: str) -> List[Any]:
    from ..callbacks import CALLBACKS, build_callback

    out = []
    for name, kwargs in cb_cfg.items():
        if kwargs is None or kwargs is False:
            continue
        if name not in CALLBACKS:
            raise RecipeError(f"{where}: callbacks.{name} is not a callback; known: {sorted(CALLBACKS)}")
        kwargs = {**dict(defaults.get(name, {})), **({} if kwargs is True else dict(kwargs))}
        cls = CALLBACKS[name][0]
        out.append(build_callback(name, check_kwargs(cls, kwargs, where, prefix=f"callbacks.{name}")))
    return out


def _check_reserved(cfg: Any, where: str) -> None:
    """``module`` keys the builder sets itself are an error that says so (before the schema would
    call them unknown)."""
    section = (cfg or {}).get("module") if isinstance(cfg, Mapping) else None
    reserved = sorted(set(section) & set(_BUILT)) if isinstance(section, Mapping) else []
    if reserved:
        raise RecipeError(f"{where}: module.{reserved[0]} is set by the recipe builder (see the recipe's "
                          "schedule, model, optim and sampling sections)")


def _module_kwargs(cls: Any, section: Mapping[str, Any], where: str) -> Dict[str, Any]:
    section = dict(section)
    _check_reserved({"module": section}, where)
    return check_kwargs(cls, section, where, prefix="module", exclude=_BUILT)


def _optim(cfg: Mapping[str, Any], where: str):
    from ..lit.optim import OptimConfig

    try:
        return OptimConfig.from_dict(cfg.get("optim"))
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------
# the two kinds
# --------------------------------------------------------------------------------------------
def _strategy(tkw: Dict[str, Any], optimizer: str) -> Optional[str]:
    """Turn ``trainer.strategy`` names into strategies (and ``precision: auto`` into a precision);
    returns the strategy name.  An integer ``val_check_interval`` counts optimizer steps across
    epochs (recipes are written in steps; Lightning would otherwise refuse an interval longer than
    one epoch of a small dataset) unless the recipe sets ``check_val_every_n_epoch``."""
    from ..dtypes import auto_precision
    from ..parallel import check_optimizer_strategy, make_strategy

    if tkw.get("precision") == "auto":
        tkw["precision"] = auto_precision(tkw.get("accelerator", "auto"))
    interval = tkw.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and "check_val_every_n_epoch" not in tkw:
        tkw["check_val_every_n_epoch"] = None

    name = tkw.get("strategy") if isinstance(tkw.get("strategy"), str) else None
    if name in ("fsdp", "fsdp2", "model_parallel", "ddp"):
        tkw["strategy"] = make_strategy(name)
        check_optimizer_strategy(optimizer, name)
    return name


def _build_var(cfg: Dict[str, Any], out_dir: Path, where: str, objects: Mapping[str, Any]) -> Run:
    from ..lit.var_module import BitwiseVARModule
    from ..sampling import SamplingConfig
    from .loader import trainer_kwargs

    seed = int(cfg.get("seed", 0))
    model_cfg = dict(cfg.get("model") or {})
    module_cfg = dict(cfg.get("module") or {})
    parallel_cfg = module_cfg.pop("parallelize", None)
    module_cfg = _module_kwargs(BitwiseVARModule, module_cfg, where)
    optim = _optim(cfg, where)
    tkw = trainer_kwargs(cfg.get("trainer") or {}, where)
    if optim.grad_clip:
        if "gradient_clip_val" in tkw:
            raise RecipeError(f"{where}: set the gradient clipping once, in optim.grad_clip (not trainer.gradient_clip_val)")
        tkw["gradient_clip_val"] = float(optim.grad_clip)
    strategy = _strategy(tkw, optim.optimizer)
    lora_cfg = model_cfg.get("lora")
    if strategy in ("fsdp2", "model_parallel") and isinstance(lora_cfg, Mapping) \
            and lora_cfg.get("quantize_base") == "8bit":
        raise RecipeError(f"{where}: model.lora.quantize_base=8bit cannot be used with trainer.strategy={strategy}: "
                          "int8 base weights cannot be sharded as FSDP2 (DTensor) parameters; use "
                          "trainer.strategy=ddp or one device with the 8-bit base, or quantize_base: null with fsdp2")
    if strategy in ("fsdp2", "model_parallel"):
        from ..parallel import make_parallelize_fn

        module_cfg["parallelize_fn"] = make_parallelize_fn(**(parallel_cfg or {}))
    elif parallel_cfg:
        raise RecipeError(f"{where}: module.parallelize is set but trainer.strategy is not fsdp2")

    if objects.get("tokenizer") is None and model_cfg.get("tokenizer"):
        _check_tokenizer_source(model_cfg, where)
    transformer = objects.get("transformer") or build_transformer(model_cfg, seed, where)
    from ..lora import lora_configs

    if lora_configs(transformer):
        module_cfg["trainable_filter"] = _adapter_checkpoints(transformer)
    tokenizer = objects.get("tokenizer") or (_build_tokenizer(model_cfg, False, where) if model_cfg.get("tokenizer") else None)
    if tokenizer is not None and tokenizer.config.codebook_dim != transformer.config.codebook_dim:
        raise RecipeError(f"{where}: the tokenizer has {tokenizer.config.codebook_dim} bits per position but the "
                          f"transformer expects {transformer.config.codebook_dim} (model.tokenizer vs model.transformer)")
    stride = tokenizer.config.image_stride if tokenizer is not None else 16
    resolution = _check_resolution((cfg.get("schedule") or {}).get("resolution", "0.06M"), stride, where)
    data_cfg = dict(cfg.get("data") or {"name": "shapes"})
    datamodule = _build_datamodule(data_cfg, resolution, stride, where)
    cb_cfg = dict(cfg.get("callbacks") or {})
    prompts = list((cb_cfg.get("sample_logger") or {}).get("prompts") or []) if isinstance(
        cb_cfg.get("sample_logger"), Mapping) else []
    text_encoder = objects.get("text_encoder") or build_text_encoder(
        model_cfg.get("text_encoder"), model_cfg.get("text_encoder_kwargs"), out_dir, datamodule, prompts)
    if text_encoder is not None and text_encoder.width != transformer.config.text_channels:
        raise RecipeError(f"{where}: the text encoder's width is {text_encoder.width} but the transformer's "
                          f"text_channels is {transformer.config.text_channels} (model.text_encoder vs model.transformer)")
    if model_cfg.get("cache_text_features") and text_encoder is not None:
        _attach_text_cache(datamodule, text_encoder, out_dir, str(model_cfg.get("text_encoder")), where)
    try:
        sampling = SamplingConfig.from_dict(cfg.get("sampling"), f"{where}, section 'sampling'")
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from None
    module = BitwiseVARModule(transformer, tokenizer, text_encoder, resolution=resolution, optim=optim,
                              sampling=sampling, seed=seed, **module_cfg)
    defaults = {"checkpoint": {"dirpath": str(out_dir / "checkpoints")}, "ema": {"attribute": "transformer"},
                "sample_logger": {"folder": str(out_dir / "samples")}}
    callbacks = _build_callbacks(cb_cfg, defaults, where)
    return Run("var", module, datamodule, tkw, callbacks, out_dir)


def _attach_text_cache(datamodule: Any, text_encoder: Any, out_dir: Path, namespace: str, where: str) -> None:
    """Let the DataModule cache each caption's text features on disk (computed once)."""
    if not hasattr(datamodule, "text_cache_dir"):
        raise RecipeError(f"{where}: model.cache_text_features needs a DataModule with a text cache "
                          f"({type(datamodule).__name__} has none)")

    def encode(captions: List[str]) -> List[torch.Tensor]:
        with torch.no_grad():
            return [t.float().cpu() for t in text_encoder.encode(captions).split()]

    datamodule.text_encoder = encode
    datamodule.text_cache_dir = str(out_dir / "text_cache")
    datamodule.text_cache_namespace = namespace


def _build_tokenizer_run(cfg: Dict[str, Any], out_dir: Path, where: str, objects: Mapping[str, Any]) -> Run:
    from ..lit.tokenizer_module import BSQTokenizerModule
    from .loader import trainer_kwargs

    model_cfg = dict(cfg.get("model") or {})
    module_cfg = _module_kwargs(BSQTokenizerModule, cfg.get("module") or {}, where)
    optim = _optim(cfg, where)
    tkw = trainer_kwargs(cfg.get("trainer") or {}, where)
    if "gradient_clip_val" in tkw:
        raise RecipeError(f"{where}: trainer.gradient_clip_val does not apply to the tokenizer's two optimizers; "
                          "use optim.grad_clip")
    _strategy(tkw, optim.optimizer)
    tokenizer = objects.get("tokenizer") or _build_tokenizer(model_cfg, True, where)
    schedule = dict(cfg.get("schedule") or {})
    resolution = _check_resolution(schedule.get("resolution"), tokenizer.config.patch_size, where)
    datamodule = _build_datamodule(cfg.get("data") or {"name": "photos"}, resolution, tokenizer.config.patch_size,
                                   where)
    if hasattr(datamodule, "require_captions") and "require_captions" not in (cfg.get("data") or {}):
        datamodule.require_captions = False  # a tokenizer learns from images alone
    module = BSQTokenizerModule(tokenizer, optim=optim, schedule_mode=schedule.get("mode", "dense"),
                                **{k: v for k, v in objects.items() if k != "tokenizer"}, **module_cfg)
    defaults = {"checkpoint": {"dirpath": str(out_dir / "checkpoints")}, "ema": {"attribute": "tokenizer"},
                "sample_logger": {"folder": str(out_dir / "samples"), "prompts": ["reconstruction"]}}
    callbacks = _build_callbacks(dict(cfg.get("callbacks") or {}), defaults, where)
    return Run("tokenizer", module, datamodule, tkw, callbacks, out_dir)


def build_run(cfg: Any, output_dir: Optional[Union[str, Path]] = None, source: str = "recipe",
              **objects: Any) -> Run:
    """Build a recipe's objects (see the module docstring); ``objects`` replace networks the
    recipe would build (``transformer=``, ``tokenizer=``, ``text_encoder=``, or for tokenizer
    recipes ``perceptual=``, ``fid_feature=``: modules that cannot live in a YAML file)."""
    import lightning.pytorch as pl

    plain = _switches(to_dict(cfg, source))
    kind = plain.get("kind")
    if kind not in KINDS:
        raise RecipeError(f"{source}: kind {kind!r} is not one of {KINDS}")
    _check_reserved(plain, source)
    validate(plain, recipe_schema(kind, plain), source)
    out_dir = Path(output_dir or plain.get("output_dir") or f"runs/{kind}")
    pl.seed_everything(int(plain.get("seed", 0)), workers=True, verbose=False)
    build = _build_var if kind == "var" else _build_tokenizer_run
    run = build(plain, out_dir, source, objects)
    if callable(getattr(run.datamodule, "skip_summary", None)):
        from ..datamodules import DataModuleMonitor

        run.callbacks.append(DataModuleMonitor())
    return run

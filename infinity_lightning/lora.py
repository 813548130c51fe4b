"""LoRA fine-tuning of the Infinity transformer through PEFT.

The adapters are PEFT's own layers (``peft.tuners.lora``), injected into the plain
:class:`~infinity_lightning.models.infinity.InfinityTransformer` with ``peft.inject_adapter_in_model``
(no ``PeftModel`` wrapper: the transformer keeps its class, its methods and its attribute names).
An adapted Linear ``W`` computes ``W x + (alpha / rank) * scale * B A x`` with ``A`` (rank, in) and
``B`` (out, rank); ``B`` starts at zero, so a fresh adapter leaves the outputs unchanged.

Typical use::

    model = load_transformer("2b-weights.pth")
    add_lora(model, LoraSettings(rank=32, alpha=32))    # base frozen, only lora_A / lora_B train
    ...train...                                         # (parallelize()/DDP after add_lora, see below)
    save_lora(model, "out/style")                       # adapter_model.safetensors + adapter_config.json

    model = load_transformer("2b-weights.pth")
    load_lora(model, "out/style", scale=0.8)            # several adapters may sit side by side
    merge_lora(model)                                   # plain module again, LoRA folded into W
    save_transformer(model, "merged.pth")               # the released layout

Order with parallelism: inject the adapters first, then apply FSDP2 (``parallel.parallelize``) or
wrap in DDP.  ``fully_shard`` turns parameters into DTensor shards and PEFT cannot wrap a sharded
Linear, so :func:`add_lora` refuses a sharded model.  FSDP2 handles groups that mix frozen base
weights and trainable adapter weights; DDP reduces the adapter gradients only.

Targets (:class:`LoraSettings.targets`) name Linears: a name relative to a block
(``"sa.mat_qkv"``) adapts that Linear in every block, whatever the nesting (``blocks.{i}`` or
``block_chunks.{c}.module.{j}``); any other name is the full name of one Linear of the model
(``"head"``, ``"text_proj_for_ca.0"``, ``"blocks.3.ffn.fc2"``).  PEFT receives one regular
expression that matches exactly those module names.

Files are PEFT's layout, loadable by ``peft.set_peft_model_state_dict`` (and ``PeftConfig``):
a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are those of
``peft.get_peft_model_state_dict`` (``block_chunks.0.module.0.sa.mat_qkv.lora_A.weight``).

8-bit base weights (``add_lora(..., quantize_base="8bit")``): the targeted Linears become
bitsandbytes ``Linear8bitLt`` (int8 weights with one fp32 scale per output row, LLM.int8 with
outlier threshold 6) and PEFT wraps them with its bitsandbytes LoRA layer.  This runs on CPU with
bitsandbytes >= 0.45, forward and backward: in training mode bitsandbytes multiplies by the
dequantized weight there, in eval mode it also quantizes the activations to int8 (LLM.int8, about
5e-3 relative per layer).  Not with FSDP2 (int8 parameters cannot be DTensor shards).
:func:`merge_lora` folds the adapter into the dequantized weight and gives fp32 Linears (equal to
the training-mode outputs within fp32 rounding); :func:`unload_lora` keeps the int8 layers (the
never-quantized weights are not kept).

Lightning checkpoints: :func:`lora_checkpoint_filter` keeps only the adapter weights of a module's
state dict (``on_save_checkpoint``); :func:`lora_checkpoint_restore` fills the frozen weights back
in from the live module (``on_load_checkpoint``), which must carry the same adapters.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .io import CheckpointError, PathLike, atomic_write, format_key_list, safe_load

__all__ = [
    "DEFAULT_TARGETS",
    "LoraSettings",
    "LoraCounts",
    "add_lora",
    "resolve_targets",
    "lora_adapters",
    "lora_configs",
    "lora_state_dict",
    "save_lora",
    "load_lora",
    "set_lora_scale",
    "set_adapters",
    "unload_lora",
    "merge_lora",
    "lora_checkpoint_filter",
    "lora_checkpoint_restore",
    "is_lora_key",
    "count_parameters",
]

#: the attention and MLP Linears of every transformer block
DEFAULT_TARGETS: Tuple[str, ...] = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")
#: a block's module name in either nesting of the released weights
BLOCK_PREFIX = r"(?:blocks\.\d+|block_chunks\.\d+\.module\.\d+)"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"
#: PeftModel.save_pretrained prefixes keys with this; stripped on loading
PEFT_MODEL_PREFIX = "base_model.model."
INITS = {"default": True, "gaussian": "gaussian", "random": False}
BIASES = ("none", "all", "lora_only")
QUANTIZE = (None, "8bit")
#: LLM.int8 outlier threshold of the 8-bit base layers
INT8_THRESHOLD = 6.0
_INSTALL_HINT = "pip install 'infinity-lightning[lora]'"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------
# lazy imports
# --------------------------------------------------------------------------------------------
def _peft():
    """The ``peft`` package, or an ImportError saying how to install it."""
    try:
        import peft  # noqa: F401
        import peft.functional  # noqa: F401
    except ImportError as e:
        raise ImportError(f"LoRA fine-tuning needs the peft package (>= 0.13): {_INSTALL_HINT}") from e
    return peft


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("quantize_base='8bit' needs bitsandbytes (>= 0.45): pip install "
                          "'infinity-lightning[bnb]'") from e
    return bnb


def _tuner_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    """One LoRA adapter's hyper-parameters.

    Attributes:
        rank: inner width r of ``B A`` (A: r x in, B: out x r).
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input (training only).
        targets: Linear names (see the module docstring): block-relative names adapt every block,
            other names one Linear of the model.  Default: the blocks' attention and MLP Linears.
        bias: ``"none"`` (biases frozen), ``"lora_only"`` (train the biases of adapted Linears,
            the separate q/v biases of the fused attention projections included) or ``"all"``
            (train every bias, LayerNorm biases included); trained biases change the base model
            and are not removed by :func:`unload_lora`.
        init: ``"default"`` (A Kaiming-uniform, B = 0: starts equal to the base model),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``"random"`` (A and B both random, so the
            adapted model differs from the start; for tests).
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    bias: str = "none"
    init: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise ValueError(f"LoraSettings.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        try:
            targets = tuple(targets)
        except TypeError:
            raise ValueError(f"LoraSettings.targets must be a sequence of Linear names, got {self.targets!r}") from None
        if not targets:
            raise ValueError("LoraSettings.targets is empty; name at least one Linear (default: "
                             f"{', '.join(DEFAULT_TARGETS)})")
        for t in targets:
            if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*", t):
                raise ValueError(f"LoraSettings.targets: {t!r} is not a module name (dotted, e.g. 'sa.mat_qkv')")
        duplicates = sorted({t for t in targets if targets.count(t) > 1})
        if duplicates:
            raise ValueError(f"LoraSettings.targets names {duplicates} more than once")
        object.__setattr__(self, "targets", targets)
        if self.bias not in BIASES:
            raise ValueError(f"LoraSettings.bias must be one of {BIASES}, got {self.bias!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraSettings.init must be one of {tuple(INITS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on ``B A`` at scale 1."""
        return float(self.alpha) / self.rank

    def peft_config(self, target_modules: str):
        """The ``peft.LoraConfig`` of these settings with a resolved target pattern."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=float(self.dropout),
                          target_modules=target_modules, bias=self.bias, init_lora_weights=INITS[self.init])


@dataclass(frozen=True)
class LoraCounts:
    """Parameter counts after :func:`add_lora`: trainable / total elements, adapted Linears."""

    trainable: int
    total: int
    layers: int
    adapter_name: str = "default"
    targets: Tuple[str, ...] = field(default=(), repr=False)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter elements of ``module``."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------
# structure helpers
# --------------------------------------------------------------------------------------------
def is_lora_key(key: str) -> bool:
    """Whether a state-dict key or parameter name belongs to a LoRA adapter (``...lora_A...``)."""
    return any(part.startswith("lora_") for part in key.split("."))


def _is_internal(name: str) -> bool:
    # modules inside an adapter wrapper (its base layer, lora_A/lora_B dicts)
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") and hasattr(module, "base_layer") else module


def _linear_names(module: nn.Module) -> List[str]:
    """Names of the Linears (plain, 8-bit or adapter-wrapped) of ``module``, adapter internals left out."""
    return [name for name, m in module.named_modules()
            if name and not _is_internal(name) and isinstance(_base(m), nn.Linear)]


def _blocks(transformer: nn.Module) -> List[nn.Module]:
    if not hasattr(transformer, "block_list"):
        raise TypeError("LoRA helpers expect an InfinityTransformer (with block_list()), "
                        f"got {type(transformer).__name__}")
    return transformer.block_list()


def _block_prefixes(transformer: nn.Module) -> List[str]:
    ids = {id(b) for b in _blocks(transformer)}
    return [name for name, m in transformer.named_modules() if id(m) in ids]


def _check_plain(transformer: nn.Module, what: str) -> None:
    """Refuse wrapped or sharded models: adapters go into the plain module, before parallelism."""
    if isinstance(transformer, nn.parallel.DistributedDataParallel):
        raise TypeError(f"{what}: pass the transformer itself (ddp_model.module), not the DDP wrapper; "
                        "inject LoRA before wrapping the model in DDP")
    if _has_dtensors(transformer):
        raise RuntimeError(f"{what}: the transformer is already sharded with FSDP2 (fully_shard); inject LoRA "
                           "before parallelize()/fully_shard, e.g. add_lora(model, settings) and then "
                           "parallelize(model, mesh)")


def _has_dtensors(module: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def _adapter_layers(transformer: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, LoraLayer)`` for every adapter wrapper (outermost only)."""
    layer_cls = _tuner_layer_cls()
    for name, m in transformer.named_modules():
        if isinstance(m, layer_cls) and not _is_internal(name):
            yield name, m


def _configs(transformer: nn.Module) -> Dict[str, Any]:
    return dict(getattr(transformer, "peft_config", None) or {})


def _check_adapter(transformer: nn.Module, adapter_name: str) -> None:
    names = list(_configs(transformer))
    if adapter_name not in names:
        raise KeyError(f"no LoRA adapter {adapter_name!r} on this transformer (adapters: {names or 'none'})")


@contextlib.contextmanager
def _keep_requires_grad(transformer: nn.Module) -> Iterator[None]:
    """PEFT's set_adapter/delete_adapter make the active adapters trainable; keep our choice."""
    before = {id(p): p.requires_grad for p in transformer.parameters()}
    yield
    for p in transformer.parameters():
        if id(p) in before:
            p.requires_grad_(before[id(p)])


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT warns when a second adapter joins a model that already has one: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        yield


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def resolve_targets(transformer: nn.Module, targets: Sequence[str]) -> Tuple[str, List[str]]:
    """``(pattern, module names)``: the PEFT ``target_modules`` regular expression of ``targets`` on
    this transformer and the full names of the Linears it matches.  Raises ValueError naming any
    target that matches no Linear, with the names available."""
    block_linears = _linear_names(_blocks(transformer)[0])
    prefixes = _block_prefixes(transformer)
    all_linears = set(_linear_names(transformer))
    root_linears = sorted(n for n in all_linears if not any(n.startswith(p + ".") for p in prefixes))
    parts, names = [], []
    for t in targets:
        if t in block_linears:
            parts.append(BLOCK_PREFIX + r"\." + re.escape(t))
            names += [f"{p}.{t}" for p in prefixes]
        elif t in all_linears:
            parts.append(re.escape(t))
            names.append(t)
        else:
            modules = dict(transformer.named_modules())
            relative = dict(_blocks(transformer)[0].named_modules())
            found = modules.get(t, relative.get(t))
            kind = f"is a {type(found).__name__}, not a Linear" if found is not None else "matches no module"
            raise ValueError(f"LoRA target {t!r} {kind} of the transformer; Linears in every block: "
                             f"{', '.join(block_linears)}; outside the blocks: {', '.join(root_linears)}")
    return "(?:" + "|".join(parts) + ")", sorted(set(names))


# --------------------------------------------------------------------------------------------
# injection
# --------------------------------------------------------------------------------------------
def add_lora(transformer: nn.Module, settings: Optional[LoraSettings] = None, adapter_name: str = "default", *,
             quantize_base: Optional[str] = None) -> LoraCounts:
    """Inject a trainable LoRA adapter into ``transformer`` (in place) and freeze everything else.

    Args:
        transformer: a plain :class:`InfinityTransformer` (not sharded, not wrapped in DDP:
            call this before ``parallelize`` / ``fully_shard`` / DDP).
        settings: :class:`LoraSettings` (default: rank 16, alpha 16, the blocks' attention and
            MLP Linears).
        adapter_name: the adapter's name (an identifier; the keys carry it as
            ``lora_A.<name>.weight``).  Adapters already present stay active and frozen.
        quantize_base: ``"8bit"`` replaces the targeted Linears by bitsandbytes ``Linear8bitLt``
            before injection (int8 frozen weights; CPU or CUDA; not with FSDP2).  Only with the
            first adapter.

    Returns :class:`LoraCounts` (trainable and total parameter elements, adapted Linears).
    """
    _peft()
    settings = LoraSettings() if settings is None else settings
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"add_lora: settings must be a LoraSettings, got {type(settings).__name__}")
    _check_name(adapter_name)
    _check_plain(transformer, "add_lora")
    if adapter_name in _configs(transformer):
        raise ValueError(f"a LoRA adapter named {adapter_name!r} is already in the transformer; choose another "
                         f"adapter_name or remove it with unload_lora(transformer, {adapter_name!r})")
    if quantize_base not in QUANTIZE:
        raise ValueError(f"quantize_base must be one of {QUANTIZE}, got {quantize_base!r}")
    pattern, names = resolve_targets(transformer, settings.targets)
    first = not _configs(transformer)
    if first:
        # restored by unload_lora / merge_lora
        transformer._lora_requires_grad = {n: p.requires_grad for n, p in transformer.named_parameters()}
    if quantize_base == "8bit":
        if not first:
            raise ValueError("quantize_base='8bit' can only be given with the first adapter (the base layers "
                             "are quantized once, before any adapter wraps them)")
        _quantize_linears(transformer, names)
    eight_bit = any(type(_base(transformer.get_submodule(n))).__module__.startswith("bitsandbytes") for n in names)
    active = _active_adapters(transformer)
    _inject(transformer, settings.peft_config(pattern), adapter_name, eight_bit)
    _activate(transformer, active + [adapter_name])
    # Only this adapter trains (plus biases when settings.bias asks): freeze every other parameter.
    for name, p in transformer.named_parameters():
        p.requires_grad_(_trainable(name, adapter_name, settings.bias, transformer))
    trainable, total = count_parameters(transformer)
    layers = sum(1 for _, m in _adapter_layers(transformer) if adapter_name in m.lora_A)
    return LoraCounts(trainable=trainable, total=total, layers=layers, adapter_name=adapter_name, targets=tuple(names))


def _inject(transformer: nn.Module, config: Any, adapter_name: str, eight_bit: bool) -> None:
    """``peft.inject_adapter_in_model`` without PEFT changing which parameters train; the adapter
    weights are fp32 whatever the base dtype."""
    peft = _peft()
    with _quiet_peft(), _keep_requires_grad(transformer):
        if eight_bit:  # PEFT picks its bitsandbytes LoRA layer only for a model flagged as 8-bit
            transformer.is_loaded_in_8bit = True
        try:
            peft.functional.inject_adapter_in_model(config, transformer, adapter_name)
        finally:
            transformer.__dict__.pop("is_loaded_in_8bit", None)
        # adapters on bf16 blocks (cast_blocks) are created in bf16: keep them fp32 (master weights)
        peft.functional.cast_adapter_dtype(transformer, adapter_name, autocast_adapter_dtype=True)


def _trainable(name: str, adapter_name: str, bias: str, transformer: nn.Module) -> bool:
    """Whether parameter ``name`` trains with adapter ``adapter_name`` and ``settings.bias``.

    The attention's fused projections keep their biases apart (``sa.q_bias``/``sa.v_bias`` for
    ``sa.mat_qkv``, ``ca.v_bias`` for ``ca.mat_kv``): they count as those Linears' biases."""
    parts = name.split(".")
    if is_lora_key(name):
        return adapter_name in parts
    leaf = parts[-1]
    is_bias = leaf == "bias" or leaf in ("q_bias", "v_bias")
    if bias == "all":
        return is_bias
    if bias == "lora_only" and is_bias:
        if leaf == "bias":
            return "base_layer" in parts
        owner = transformer.get_submodule(".".join(parts[:-1]))
        fused = getattr(owner, "mat_qkv", None) or getattr(owner, "mat_kv", None)
        return isinstance(fused, _tuner_layer_cls())
    return False


def _check_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name):
        raise ValueError(f"adapter_name must be an identifier (letters, digits, underscores), got {adapter_name!r}")


def _quantize_linears(transformer: nn.Module, names: Sequence[str]) -> None:
    """Replace the named ``nn.Linear`` modules by frozen bitsandbytes ``Linear8bitLt`` (int8)."""
    bnb = _bnb()
    for name in names:
        linear = transformer.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"quantize_base='8bit': {name} is a {type(linear).__name__}, expected a plain Linear")
        device = linear.weight.device
        if device.type not in ("cpu", "cuda", "xpu"):
            raise ValueError(f"quantize_base='8bit' runs on CPU or CUDA; {name} is on {device}")
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.data.detach().float().cpu(), requires_grad=False,
                                     has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
        q = q.to(device)  # quantizes the weight (int8 rows + fp32 scales)
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent) if parent else transformer, child, q)


def _active_adapters(transformer: nn.Module) -> List[str]:
    for _, m in _adapter_layers(transformer):
        return list(m.active_adapters)
    return []


def _activate(transformer: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active in every adapter layer (trainability unchanged)."""
    names = list(dict.fromkeys(names))
    with _keep_requires_grad(transformer):
        for _, m in _adapter_layers(transformer):
            # a layer skips active names it does not hold, so every layer gets the full list
            m.set_adapter(names)


# --------------------------------------------------------------------------------------------
# inspection and scales
# --------------------------------------------------------------------------------------------
def lora_adapters(transformer: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{name: {"rank", "alpha", "scale", "active", "trainable", "layers"}}`` of the adapters present."""
    out: Dict[str, Dict[str, Any]] = {}
    active = set(_active_adapters(transformer))
    for name, cfg in _configs(transformer).items():
        layers = [m for _, m in _adapter_layers(transformer) if name in m.lora_A]
        scale = None
        if layers:
            m = layers[0]
            scale = m.scaling[name] / (m.lora_alpha[name] / m.r[name])
        trainable = any(p.requires_grad for m in layers
                        for p in (*m.lora_A[name].parameters(), *m.lora_B[name].parameters()))
        out[name] = {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "scale": scale, "active": name in active,
                     "trainable": trainable, "layers": len(layers)}
    return out


def lora_configs(transformer: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{adapter name: adapter_config.json contents}``: JSON-able PEFT configs of the adapters,
    e.g. to keep beside an adapter-only Lightning checkpoint."""
    return {name: _config_dict(cfg) for name, cfg in _configs(transformer).items()}


def set_lora_scale(transformer: nn.Module, adapter_name: str, scale: float) -> None:
    """Multiply adapter ``adapter_name``'s update by ``scale`` (0: off, 1: as trained); the update
    becomes ``scale * alpha / rank * B A``."""
    _check_adapter(transformer, adapter_name)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    for _, m in _adapter_layers(transformer):
        m.set_scale(adapter_name, scale)


def set_adapters(transformer: nn.Module, adapter_names: Sequence[str],
                 weights: Optional[Sequence[float]] = None) -> None:
    """Activate exactly ``adapter_names`` (the others stay loaded but unused), with per-adapter
    scales ``weights`` (default: leave each adapter's scale as it is)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for n in names:
        _check_adapter(transformer, n)
    if weights is not None:
        weights = [float(w) for w in ([weights] if isinstance(weights, (int, float)) else weights)]
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        for n, w in zip(names, weights):
            set_lora_scale(transformer, n, w)
    _activate(transformer, names)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The adapter's weights with PEFT's keys (``...sa.mat_qkv.lora_A.weight``, no adapter name),
    as CPU copies.  Under FSDP2 the shards are gathered (call it on every rank)."""
    peft = _peft()
    _check_adapter(transformer, adapter_name)
    sd = peft.functional.get_peft_model_state_dict(transformer, adapter_name=adapter_name, save_embedding_layers=False)
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):  # DTensor shard under FSDP2: a collective
            v = v.full_tensor()
        out[k] = v.detach().to("cpu", copy=True)  # a snapshot, not a view of the live weights
    return out


def _config_dict(config: Any) -> Dict[str, Any]:
    # what PeftConfig.save_pretrained writes: to_dict(), sets as lists
    data = config.to_dict()
    data.pop("runtime_config", None)
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def save_lora(transformer: nn.Module, path: PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` to the folder ``path`` in PEFT's layout
    (``adapter_model.safetensors`` + ``adapter_config.json``), each file atomically.

    Under torch.distributed every rank must call it (FSDP2 shards are gathered); rank 0 writes.
    Returns the folder.
    """
    _check_adapter(transformer, adapter_name)
    sd = lora_state_dict(transformer, adapter_name)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"LoRA adapters are saved as a folder, but {folder} is a file")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return folder
    config = _config_dict(_configs(transformer)[adapter_name])
    # safetensors.save_file creates its files 0600; the bytes written into atomic_write's temporary
    # file keep the permissions a plain open() gives (0644 under the usual umask)
    from safetensors.torch import save as safetensors_bytes

    blob = safetensors_bytes({k: v.contiguous() for k, v in sd.items()}, metadata={"format": "pt"})
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: Path(tmp).write_bytes(blob))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(folder / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text))
    return folder


def _read_adapter(path: PathLike):
    """``(folder, LoraConfig, state dict with PEFT keys)`` of a saved adapter."""
    from peft import LoraConfig

    p = Path(path)
    if p.is_file() and p.name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE):
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"LoRA adapter folder not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"LoRA adapter path {p} is a file; expected a folder with {ADAPTER_CONFIG} "
                              f"and {ADAPTER_WEIGHTS}")
    cfg_file = p / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise CheckpointError(f"LoRA adapter folder {p} holds no {ADAPTER_CONFIG} (written by save_lora or "
                              "PEFT's save_pretrained)")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from e
    if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
        found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{cfg_file} is not a LoRA adapter config (peft_type {found!r}, expected 'LORA')")
    data.pop("runtime_config", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**data))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file} is not a valid LoRA config ({str(e).splitlines()[0]})") from e
    weights = p / ADAPTER_WEIGHTS
    if not weights.exists():
        weights = p / ADAPTER_WEIGHTS_PICKLE  # read with weights_only=True
    if not weights.exists():
        raise CheckpointError(f"LoRA adapter folder {p} holds no {ADAPTER_WEIGHTS}")
    sd = safe_load(weights, what="LoRA adapter")
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"LoRA adapter file {weights} holds no tensors")
    sd = {(k[len(PEFT_MODEL_PREFIX):] if k.startswith(PEFT_MODEL_PREFIX) else k): v for k, v in sd.items()}
    foreign = [k for k in sd if not is_lora_key(k)]
    if foreign:
        raise CheckpointError(f"{weights} is not a LoRA adapter: {len(foreign)} of its {len(sd)} keys are no "
                              f"lora_A/lora_B weights (e.g. {foreign[0]!r})")
    return p, config, sd, weights


def _free_name(transformer: nn.Module, base: str = "default") -> str:
    taken = set(_configs(transformer))
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def load_lora(transformer: nn.Module, path: PathLike, adapter_name: Optional[str] = None, scale: float = 1.0, *,
              trainable: bool = False) -> str:
    """Load an adapter saved by :func:`save_lora` (or PEFT) into ``transformer`` and activate it
    beside the adapters already present.

    ``path``: the adapter folder (or its ``adapter_model.safetensors``).  Weights are read with
    safetensors (``adapter_model.bin`` with ``torch.load(weights_only=True)``).  Keys saved with
    the other block nesting (``blocks.{i}`` vs ``block_chunks.{c}.module.{j}``) are renamed.
    ``adapter_name``: default ``"default"``, or ``"default_1"``, ... when taken.  ``scale``: the
    adapter's multiplier (:func:`set_lora_scale`).  ``trainable``: its weights require grad (to
    go on training it); otherwise it is frozen.  As with :func:`add_lora` the base weights are
    frozen and the other adapters keep their state.  Returns the adapter name.
    """
    peft = _peft()
    _check_plain(transformer, "load_lora")
    folder, config, sd, weights = _read_adapter(path)
    adapter_name = _free_name(transformer) if adapter_name is None else adapter_name
    _check_name(adapter_name)
    if adapter_name in _configs(transformer):
        raise ValueError(f"a LoRA adapter named {adapter_name!r} is already in the transformer; "
                         "pass another adapter_name")
    if hasattr(transformer, "config"):
        from .transformer_checkpoints import rename_block_keys

        sd = rename_block_keys(sd, transformer.config)
    first = not _configs(transformer)
    if first:
        transformer._lora_requires_grad = {n: p.requires_grad for n, p in transformer.named_parameters()}
    active = _active_adapters(transformer)
    before = {id(p): p.requires_grad for p in transformer.parameters()}
    eight_bit = any(type(m).__module__.startswith("bitsandbytes") for m in transformer.modules())
    try:
        _inject(transformer, config, adapter_name, eight_bit)
    except ValueError as e:
        _forget(transformer, adapter_name, first)
        raise CheckpointError(f"LoRA adapter {folder} does not fit this transformer: {str(e).splitlines()[0]}") from e
    expected = {k: v.shape for k, v in peft.functional.get_peft_model_state_dict(
        transformer, adapter_name=adapter_name, save_embedding_layers=False).items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}" for k in expected
             if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        _forget(transformer, adapter_name, first)
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({format_key_list(missing, 3)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys ({format_key_list(unexpected, 3)})")
        if wrong:
            problems.append(f"shape mismatches ({format_key_list(wrong, 3)})")
        raise CheckpointError(f"LoRA adapter {weights} does not match this transformer: {'; '.join(problems)}")
    with torch.no_grad():
        peft.functional.set_peft_model_state_dict(transformer, {k: v.float() for k, v in sd.items()},
                                                  adapter_name=adapter_name)
    for name, p in transformer.named_parameters():
        if not is_lora_key(name):
            p.requires_grad_(False)  # the base is frozen while adapters are in (unload_lora restores it)
        elif id(p) in before:
            p.requires_grad_(before[id(p)])
        else:  # the new adapter's weights
            p.requires_grad_(bool(trainable))
    _activate(transformer, active + [adapter_name])
    set_lora_scale(transformer, adapter_name, scale)
    return adapter_name


def _forget(transformer: nn.Module, adapter_name: str, first: bool) -> None:
    """Undo a half-done load: remove the adapter (and the wrappers if it was the only one)."""
    if adapter_name in _configs(transformer) or any(adapter_name in m.lora_A for _, m in _adapter_layers(transformer)):
        if first:
            _remove_wrappers(transformer, merge=False)
        else:
            _delete(transformer, adapter_name)


# --------------------------------------------------------------------------------------------
# removal and merging
# --------------------------------------------------------------------------------------------
def _delete(transformer: nn.Module, adapter_name: str) -> None:
    active = [a for a in _active_adapters(transformer) if a != adapter_name]
    with _keep_requires_grad(transformer):
        for _, m in _adapter_layers(transformer):
            if adapter_name in m.lora_A:
                m.delete_adapter(adapter_name)
    configs = getattr(transformer, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
    _activate(transformer, active)


def _replace(transformer: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(transformer.get_submodule(parent) if parent else transformer, child, module)


def _remove_wrappers(transformer: nn.Module, merge: bool, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Replace every adapter layer by its base layer (after merging ``adapter_names`` into it),
    drop PEFT's config record and restore the parameters' ``requires_grad`` from before LoRA."""
    for name, m in list(_adapter_layers(transformer)):
        base = m.get_base_layer()
        if merge:
            merged_names = [a for a in adapter_names if a in m.lora_A]
            if type(base).__module__.startswith("bitsandbytes"):
                base = _merged_dequantized(m, base, merged_names)
            elif merged_names:
                with torch.no_grad():
                    m.merge(adapter_names=merged_names)
        _replace(transformer, name, base)
    transformer.__dict__.pop("peft_config", None)
    previous = transformer.__dict__.pop("_lora_requires_grad", None) or {}
    for n, p in transformer.named_parameters():
        if n in previous:
            p.requires_grad_(previous[n])


def _merged_dequantized(layer: nn.Module, base: nn.Module, adapter_names: Sequence[str]) -> nn.Linear:
    """A plain fp32 Linear holding an 8-bit layer's dequantized weight plus the adapters' updates."""
    from peft.utils.integrations import dequantize_bnb_weight

    with torch.no_grad():
        weight = dequantize_bnb_weight(base.weight, state=base.state).float()
        for a in adapter_names:
            weight = weight + layer.get_delta_weight(a).float()
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
    linear.weight.requires_grad_(False)
    return linear


def unload_lora(transformer: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Remove adapter ``adapter_name``, or (``None``, or when it was the last one) every adapter:
    the wrappers go, the plain Linears come back, the state-dict keys are the released ones again,
    ``requires_grad`` is what it was before :func:`add_lora`, and the outputs are bit-identical to
    the never-adapted model (trained biases, ``bias != "none"``, and 8-bit base layers stay)."""
    _check_plain(transformer, "unload_lora")
    if adapter_name is not None:
        _check_adapter(transformer, adapter_name)
        if len(_configs(transformer)) > 1:
            _delete(transformer, adapter_name)
            return
    _remove_wrappers(transformer, merge=False)


def merge_lora(transformer: nn.Module, adapter_names: Optional[Sequence[str]] = None) -> List[str]:
    """Fold the adapters into the base weights (``W += scale * alpha / rank * B A``) and remove
    the wrappers, leaving a plain transformer with the released keys (``save_transformer``
    exports it).  ``adapter_names``: default the active adapters, at their current scales; other
    adapters are dropped.  8-bit base layers become fp32 Linears (dequantized weight + update).
    Returns the merged adapter names."""
    _check_plain(transformer, "merge_lora")
    if not _configs(transformer):
        raise ValueError("merge_lora: the transformer has no LoRA adapter")
    names = _active_adapters(transformer) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    for n in names:
        _check_adapter(transformer, n)
    _remove_wrappers(transformer, merge=True, adapter_names=names)
    return names


# --------------------------------------------------------------------------------------------
# Lightning checkpoints holding only the adapters
# --------------------------------------------------------------------------------------------
def lora_checkpoint_filter(state_dict: Mapping[str, Any], keep: Iterable[str] = ()) -> Dict[str, Any]:
    """The LoRA entries of a (module) state dict, plus the keys in ``keep`` (e.g. trained
    biases); for ``on_save_checkpoint``, so checkpoints hold only what training changes."""
    keep = set(keep)
    return {k: v for k, v in state_dict.items() if is_lora_key(k) or k in keep}


def lora_checkpoint_restore(state_dict: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`lora_checkpoint_filter` for ``on_load_checkpoint``: the checkpoint's
    entries, plus every non-LoRA entry of the live module's state dict ``current`` that the
    checkpoint lacks, so ``load_state_dict(strict=True)`` passes.  The live module must carry the
    same adapters: LoRA keys present on one side only are an error naming them."""
    missing = sorted(k for k in current if is_lora_key(k) and k not in state_dict)
    unexpected = sorted(k for k in state_dict if is_lora_key(k) and k not in current)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the checkpoint lacks {len(missing)} LoRA keys of the module ({format_key_list(missing, 3)})")
        if unexpected:
            parts.append(f"the module has no LoRA layers for {len(unexpected)} checkpoint keys "
                         f"({format_key_list(unexpected, 3)}); call add_lora with the same settings before loading")
        raise CheckpointError("LoRA checkpoint does not match the module: " + "; ".join(parts))
    out = dict(state_dict)
    for k, v in current.items():
        if k not in out:
            out[k] = v
    return out

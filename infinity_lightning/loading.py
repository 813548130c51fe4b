"""Finding and fetching the files of a pipeline: local folders, the Hugging Face Hub, ``pipeline.json``.

Folder layouts
--------------

*Released layout* (file names as the Hugging Face repository ``FoundationVision/Infinity`` has
them; the text encoder is a local copy of ``google/flan-t5-xl``)::

    weights/
      infinity_2b_reg.pth                    2B transformer (flat state dict)
      infinity_vae_d32reg.pth                its tokenizer (``infinity_vae_d32_reg.pth`` also accepted)
      flan-t5-xl/                            T5 folder (config.json, weights, spiece.model, ...)
      infinity_8b_weights/                   8B transformer: model-0000N-of-0000M.safetensors + index
      infinity_8b_512x512_weights/           8B at 512 px (pn 0.25M)
      infinity_vae_d56_f8_14_patchify.pth    the 8B tokenizer (stride 8, 2x2 patchify)
      infinity_125M_256x256.pth              the 125M (layer12) transformer (pn 0.06M)

  The variants and their files are the registry :data:`~infinity_lightning.presets.RELEASED_VARIANTS`;
  when a folder holds several transformers, ``variant=`` picks one.  The tokenizer is the
  ``infinity_vae_*.pth`` the transformer pairs with; the text encoder folder is one of
  :data:`TEXT_ENCODER_FOLDERS`.

*Generic layout* (what :meth:`InfinityPipeline.save_pretrained` writes)::

    my_model/
      transformer.safetensors | transformer.pth   (+ transformer.json: the architecture)
      tokenizer.safetensors   | tokenizer.pth     (architecture stored inside the file)
      text_encoder/                              Hugging Face folder (config.json, weights, tokenizer files)
      pipeline.json                              default schedule and sampling settings

``pipeline.json`` (format 2)::

    {"format_version": 2, "schedule": "1M" | 256 | {"grids": [[h, w], ...], "template": ..., "patchify": ...},
     "sampling": {"cfg": 3.0, "tau": 0.5, "top_k": 900, "top_p": 0.97, ...}}

Format 1 files (``{"default_resolution": ..., "defaults": {...}}``) are read too.

Names: an existing folder is loaded as it is; a Hugging Face repository id (``owner/name``) that
is not a local folder is fetched with ``huggingface_hub.snapshot_download`` (only the files of the
chosen variant); any other name (relative or absolute paths, names with a file suffix or several
path parts) is a missing folder and an error at once, never a Hub request.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .io import PathLike
from .checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from .dtypes import parse_dtype
from .errors import UserError
from .io import CheckpointError, atomic_write, usual_permissions
from .models.infinity import TransformerConfig
from .models.text_encoder import TextEncoder
from .presets import RELEASED_VARIANTS, TOKENIZER_FILES, released_architecture
from .quiet import hf_progress_bars_off, is_small_module
from .sampling import SamplingConfig
from .scales import ScaleSchedule


__all__ = ["ComponentMismatchError", "LoadedComponents", "PipelineSettings", "check_components", "check_source",
           "load_components", "save_components", "read_pipeline_config", "write_pipeline_config", "released_variant",
           "find_transformer", "find_tokenizer", "find_text_encoder", "hub_offline", "TEXT_ENCODER_FOLDERS",
           "PIPELINE_CONFIG", "STORED_SAMPLING"]

TEXT_ENCODER_FOLDERS = ("text_encoder", "flan-t5-xl", "flan-t5-xl-official")
DEFAULT_HUB_REPO = "FoundationVision/Infinity"
DEFAULT_TEXT_ENCODER_REPO = "google/flan-t5-xl"
GENERIC_FILES = dict(transformer=("transformer.safetensors", "transformer.pth", "transformer"),
                     tokenizer=("tokenizer.safetensors", "tokenizer.pth"))
PIPELINE_CONFIG = "pipeline.json"
PIPELINE_FORMAT_VERSION = 2
#: The sampling options a saved pipeline keeps (how the model samples, not run-time speed choices).
STORED_SAMPLING = ("cfg", "tau", "top_k", "top_p", "gumbel", "cfg_insertion_layer")
#: Suffixes that make a name a file path rather than a Hub repository id.
_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin", ".json", ".yaml", ".yml", ".txt", ".gguf")


class ComponentMismatchError(UserError, ValueError):
    """The transformer, tokenizer and text encoder of a pipeline do not belong together."""


# -- pairing -----------------------------------------------------------------------------------
def released_variant(cfg: TransformerConfig) -> Optional[str]:
    """The first released variant ("2b", "8b", "125m", ...) whose architecture ``cfg`` is, or None."""
    arch = released_architecture(cfg)
    return next((name for name, v in RELEASED_VARIANTS.items() if v.architecture == arch), None)


def _describe_tokenizer(tok: nn.Module) -> str:
    cfg = tok.config
    kind = f"a d{cfg.codebook_dim} tokenizer"
    return kind + (" with 2x2 spatial patchify" if cfg.spatial_patchify else f" (stride {cfg.patch_size})")


def _expected_tokenizer(cfg: TransformerConfig) -> str:
    if cfg.tokenizer in TOKENIZER_FILES:
        return TOKENIZER_FILES[cfg.tokenizer][0]
    if cfg.tokenizer:
        return f"the {cfg.tokenizer!r} tokenizer preset"
    stride = "stride-8 " if cfg.apply_spatial_patchify else ""
    return f"a {stride}d{cfg.codebook_dim} tokenizer"


def _pairing_problem(cfg: TransformerConfig, tcfg: Any) -> Optional[str]:
    if tcfg.codebook_dim != cfg.codebook_dim:
        return f"{cfg.codebook_dim} bits per latent position, the tokenizer has {tcfg.codebook_dim}"
    if cfg.apply_spatial_patchify and tcfg.patch_size * 2 != 16:
        return (f"2x2 spatial patchify of a stride-8 latent grid (16 px per token), the tokenizer has stride "
                f"{tcfg.patch_size}")
    if not cfg.apply_spatial_patchify and tcfg.spatial_patchify:
        return "tokens without spatial patchify, the tokenizer is a patchify (stride-8) tokenizer"
    return None


def check_components(transformer: nn.Module, tokenizer: nn.Module, text_encoder: Optional[nn.Module] = None,
                     names: Optional[Dict[str, str]] = None) -> None:
    """Raise :class:`ComponentMismatchError` unless the three components fit together.

    The tokenizer must have the transformer's bits per position (``codebook_dim``) and, for a
    transformer with 2x2 spatial patchify (8B), a stride-8 latent grid; a patchify tokenizer
    cannot feed a transformer without patchify.  The text encoder's width must equal the
    transformer's ``text_channels``.  ``names`` (component -> file) make the messages name the files.
    """
    names = names or {}
    cfg: TransformerConfig = transformer.config
    variant = released_variant(cfg)
    who = f"infinity_{variant}" if variant else "the transformer"
    if names.get("transformer"):
        who += f" ({names['transformer']})"
    problem = _pairing_problem(cfg, tokenizer.config)
    if problem is not None:
        tok_src = f" ({names['tokenizer']})" if names.get("tokenizer") else ""
        raise ComponentMismatchError(
            f"{who} needs {_expected_tokenizer(cfg)}, got {_describe_tokenizer(tokenizer)}{tok_src}: the transformer "
            f"expects {problem}")
    width = getattr(text_encoder, "width", None) if text_encoder is not None else None
    if width is not None and int(width) != cfg.text_channels:
        src = f" ({names['text_encoder']})" if names.get("text_encoder") else ""
        hint = " (flan-t5-xl, 2048 wide, for the released models)" if cfg.text_channels == 2048 else ""
        raise ComponentMismatchError(
            f"{who} expects {cfg.text_channels}-wide text features{hint}, but the text encoder{src} gives "
            f"{width}-wide features")


# -- names: folder or Hub repository -------------------------------------------------------------
def _is_repo_id(name: str) -> bool:
    """``owner/name`` as the Hub spells it, and nothing a user would write as a path."""
    if name.startswith((".", "~", "/")) or name.lower().endswith(_FILE_SUFFIXES) or (os.sep != "/" and os.sep in name):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def check_source(path_or_repo_id: PathLike) -> Optional[Path]:
    """The local folder ``path_or_repo_id`` names, or None for a Hub repository id to fetch.

    Raises ``FileNotFoundError`` ("pipeline folder ... does not exist") for any other missing
    name, including an ``owner/name`` whose ``owner`` is a local folder (``runs/nope``), and
    ``ValueError`` for a file where a folder is expected; nothing is downloaded.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; a pipeline is a folder (pass a single weights file as transformer=PATH "
                         "with tokenizer= and text_encoder=)")
    if not _is_repo_id(str(path_or_repo_id)):
        raise FileNotFoundError(f"pipeline folder {str(path_or_repo_id)!r} does not exist")
    owner = Path(str(path_or_repo_id).split("/", 1)[0])
    if owner.is_dir():  # 'runs/nope' next to a local runs/ folder is a path, not a Hub repository
        raise FileNotFoundError(f"pipeline folder {str(path_or_repo_id)!r} does not exist (a local folder "
                                f"{owner}/ exists, so it is not taken for a Hugging Face repository id)")
    return None


def hub_offline() -> bool:
    """Whether Hub downloads are switched off (``HF_HUB_OFFLINE``) or impossible (no huggingface_hub)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _variant(name: Optional[str]):
    if name is not None and name not in RELEASED_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {sorted(RELEASED_VARIANTS)}")
    return RELEASED_VARIANTS[name or next(iter(RELEASED_VARIANTS))]


def _weights_pattern(name: str) -> str:
    """A released transformer file, or ``folder/*`` for a sharded one."""
    return name if Path(name).suffix else f"{name}/*"


def _download_advice(repo_id: str, variant: Optional[str]) -> str:
    v = _variant(variant)
    return (f"download the files and pass the folder, e.g.\n"
            f"  huggingface-cli download {repo_id} {_weights_pattern(v.transformer)} {v.tokenizers[0]} "
            f"--local-dir DIR\n"
            f"  huggingface-cli download {DEFAULT_TEXT_ENCODER_REPO} --local-dir DIR/flan-t5-xl\n"
            f"then InfinityPipeline.from_pretrained('DIR')")


def _snapshot(repo_id: str, variant: Optional[str], revision: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    """Fetch the files of one variant (plus the generic layout) from the Hub; returns the local folder."""
    chosen = _variant(variant)
    reason = None
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub, reason = None, "huggingface_hub is not installed (pip install huggingface_hub)"
    if reason is None and hub_offline():
        reason = "the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set)"
    if reason is not None:
        raise FileNotFoundError(f"{repo_id!r} is not a local folder, and {reason}; "
                                f"{_download_advice(repo_id, variant)}")
    patterns = [PIPELINE_CONFIG, "transformer.*", "tokenizer.*", "text_encoder/*", _weights_pattern(chosen.transformer)]
    patterns += list(chosen.tokenizers) + [f"{f}/*" for f in TEXT_ENCODER_FOLDERS]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, revision=revision,
                                                      cache_dir=cache_dir))
    except Exception as e:  # network, authentication or missing repository
        raise FileNotFoundError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                                f"{_download_advice(repo_id, variant)}") from e


def _snapshot_text_encoder(repo_id: str, cache_dir: Optional[PathLike]) -> Path:
    import huggingface_hub

    patterns = ["*.json", "spiece.model", "*.safetensors"]
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))


# -- finding components in a folder --------------------------------------------------------------
def _listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())[:20]


def find_transformer(folder: Path, variant: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    """The transformer weights in ``folder`` and the released variant they are (or None)."""
    if variant is not None:
        path = folder / _variant(variant).transformer
        if not path.exists():
            raise FileNotFoundError(f"variant {variant!r} needs {path.name} in {folder}, which is missing "
                                    f"(found: {_listing(folder)})")
        return path, variant
    for name in GENERIC_FILES["transformer"]:
        if (folder / name).exists() and (name != "transformer" or (folder / name).is_dir()):
            return folder / name, None
    found = [(folder / v.transformer, key) for key, v in RELEASED_VARIANTS.items() if (folder / v.transformer).exists()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{folder} holds several transformers ({[p.name for p, _ in found]}); choose one with "
                         f"variant= one of {[k for _, k in found]}")
    expected = list(GENERIC_FILES["transformer"][:2]) + [v.transformer for v in RELEASED_VARIANTS.values()]
    raise FileNotFoundError(f"no transformer weights in {folder}: expected one of {expected} "
                            f"(found: {_listing(folder)}); or pass transformer=PATH")


def find_tokenizer(folder: Path, cfg: TransformerConfig, variant: Optional[str] = None) -> Path:
    """The tokenizer file in ``folder`` that pairs with a transformer of config ``cfg``."""
    for name in GENERIC_FILES["tokenizer"]:
        if (folder / name).is_file():
            return folder / name
    wanted: List[str] = list(TOKENIZER_FILES.get(cfg.tokenizer or "", ()))
    if variant is not None:
        wanted += [n for n in _variant(variant).tokenizers if n not in wanted]
    for name in wanted:
        if (folder / name).is_file():
            return folder / name
    present = sorted(folder.glob("infinity_vae_*.pth"))
    if len(present) == 1:
        return present[0]  # validated against the transformer afterwards, with a precise message
    expected = wanted or list(GENERIC_FILES["tokenizer"])
    raise FileNotFoundError(f"no tokenizer for this transformer in {folder}: expected {expected[0]}"
                            + (f" (or {expected[1:]})" if len(expected) > 1 else "")
                            + f"; found {[p.name for p in present] or 'no infinity_vae_*.pth'}; or pass tokenizer=PATH")


def find_text_encoder(folder: Path) -> Optional[Path]:
    """The Hugging Face text encoder folder inside ``folder`` (one of :data:`TEXT_ENCODER_FOLDERS`), or None."""
    return next((folder / n for n in TEXT_ENCODER_FOLDERS if (folder / n / "config.json").exists()), None)


# -- pipeline.json ---------------------------------------------------------------------------------
@dataclasses.dataclass
class PipelineSettings:
    """What ``pipeline.json`` stores: the default ``resolution`` (a pixel budget, a pixel size or a
    :class:`ScaleSchedule`; None: not stored) and the ``sampling`` options (a dict of
    :class:`SamplingConfig` fields)."""

    resolution: Any = None
    sampling: Dict[str, Any] = dataclasses.field(default_factory=dict)


def read_pipeline_config(folder: Path) -> PipelineSettings:
    """Read ``folder/pipeline.json`` (format 2, or format 1); empty settings when there is none."""
    path = folder / PIPELINE_CONFIG
    if not path.is_file():
        return PipelineSettings()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    version = data.get("format_version", 1) if isinstance(data, dict) else None
    if version == 1:
        resolution, sampling = data.get("default_resolution"), data.get("defaults")
    elif version == PIPELINE_FORMAT_VERSION:
        resolution, sampling = data.get("schedule"), data.get("sampling")
        if isinstance(resolution, dict):
            resolution = ScaleSchedule.from_dict(resolution, source=f"{path}: 'schedule'")
    else:
        raise CheckpointError(f"{path}: format_version {version!r} is not understood; expected 1 or "
                              f"{PIPELINE_FORMAT_VERSION} (an object with 'schedule' and 'sampling')")
    if sampling is not None and not isinstance(sampling, dict):
        raise CheckpointError(f"{path}: the sampling settings must be an object, got {sampling!r}")
    try:
        SamplingConfig.from_dict(sampling, source=str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    return PipelineSettings(resolution, dict(sampling or {}))


def write_pipeline_config(folder: Path, resolution: Any, sampling: SamplingConfig) -> Path:
    """Write ``folder/pipeline.json`` (format 2) atomically: the default schedule (a
    :class:`ScaleSchedule` as its dict, a budget or pixel size as it is) and the :data:`STORED_SAMPLING` options."""
    if isinstance(resolution, (list, tuple)):
        resolution = ScaleSchedule(resolution)
    schedule = resolution.to_dict() if isinstance(resolution, ScaleSchedule) else resolution
    meta = {"format_version": PIPELINE_FORMAT_VERSION, "schedule": schedule,
            "sampling": sampling.to_dict(only=STORED_SAMPLING)}
    path = folder / PIPELINE_CONFIG
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return path


def save_components(folder: PathLike, transformer: nn.Module, tokenizer: nn.Module, text_encoder: Optional[nn.Module],
                    resolution: Any, sampling: SamplingConfig, format: str = "safetensors") -> Path:
    """Write the generic layout into ``folder``: ``transformer.<ext>`` (+ ``.json``),
    ``tokenizer.<ext>``, ``text_encoder/`` (when given) and ``pipeline.json``; ``format`` is
    "safetensors" or "released" (.pth).  Each file is written atomically; the text encoder folder is
    written beside and renamed into place.  Returns the folder."""
    if format not in ("safetensors", "released"):
        raise ValueError(f"format must be 'safetensors' or 'released', got {format!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext, other = ("safetensors", "pth") if format == "safetensors" else ("pth", "safetensors")
    for stale in ("transformer", "tokenizer"):  # one weights file per component
        (folder / f"{stale}.{other}").unlink(missing_ok=True)
    save_transformer(transformer, folder / f"transformer.{ext}", format=format)
    save_tokenizer(tokenizer, folder / f"tokenizer.{ext}", format=format)
    if text_encoder is not None:
        tmp = Path(tempfile.mkdtemp(prefix=".text_encoder.", dir=str(folder)))
        try:
            with hf_progress_bars_off(is_small_module(text_encoder.encoder)):  # no "Writing model shards" bar
                text_encoder.encoder.save_pretrained(tmp)
            text_encoder.tokenizer.save_pretrained(tmp)
            for written in [tmp, *tmp.rglob("*")]:  # mkdtemp makes the folder 0700, transformers model.safetensors 0600
                usual_permissions(written)
            if (folder / "text_encoder").exists():
                shutil.rmtree(folder / "text_encoder")
            os.replace(tmp, folder / "text_encoder")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    write_pipeline_config(folder, resolution, sampling)
    return folder


# -- loading -------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedComponents:
    """The components of a pipeline folder: modules, the files they came from (``names``:
    component -> path), the stored ``settings`` (resolution: stored, else the variant's when the
    transformer is that variant's architecture) and the released ``variant`` (or None)."""

    transformer: nn.Module
    tokenizer: nn.Module
    text_encoder: Optional[nn.Module]
    names: Dict[str, str]
    settings: PipelineSettings
    variant: Optional[str]


def _resolve_folder(path_or_repo_id: Optional[PathLike], variant: Optional[str], revision: Optional[str],
                    cache_dir: Optional[PathLike]) -> Tuple[Optional[Path], bool]:
    """(folder, fetched from the Hub)."""
    if path_or_repo_id is None:
        return None, False
    folder = check_source(path_or_repo_id)
    if folder is not None:
        return folder, False
    return _snapshot(str(path_or_repo_id), variant, revision, cache_dir), True


def _text_encoder(spec: Any, folder: Optional[Path], fetched: bool, repo_id: str, cache_dir: Optional[PathLike],
                  device: Any, dtype: Any, quantization: Optional[str], names: Dict[str, str]):
    if isinstance(spec, nn.Module) or spec is False:
        return spec or None
    path = spec if spec is not None else (find_text_encoder(folder) if folder else None)
    if path is None and fetched and not hub_offline():
        path = _snapshot_text_encoder(repo_id, cache_dir)
    if path is None and folder is None:
        raise ValueError("pass text_encoder=FOLDER (a Hugging Face text encoder folder), or text_encoder=False "
                         "to generate from precomputed prompt_embeds only")
    if path is None:
        raise FileNotFoundError(
            f"no text encoder in {folder}: expected a Hugging Face folder named one of {list(TEXT_ENCODER_FOLDERS)} "
            f"(for the released models a copy of {repo_id}: huggingface-cli download {repo_id} --local-dir "
            f"{folder}/flan-t5-xl), or pass text_encoder=FOLDER")
    names["text_encoder"] = str(path)
    dtype = parse_dtype(dtype, (torch.float32, torch.bfloat16, torch.float16), "text encoder dtype")
    return TextEncoder.from_pretrained(path, dtype=dtype, device=device, quantization=quantization)


def load_components(path_or_repo_id: Optional[PathLike] = None, *, transformer: Any = None, tokenizer: Any = None,
                    text_encoder: Any = None, variant: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                    use_ema: bool = False, text_encoder_dtype: Any = None,
                    text_encoder_quantization: Optional[str] = None,
                    revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                    text_encoder_repo_id: str = DEFAULT_TEXT_ENCODER_REPO) -> LoadedComponents:
    """Load the transformer, tokenizer and text encoder of a folder or Hub repository onto ``device``.

    ``transformer`` / ``tokenizer`` / ``text_encoder`` override the folder's (a path, a preset name
    for the first two, or a built module; ``text_encoder=False``: none).  The transformer and the
    tokenizer are checked to pair (:func:`check_components`) before the text encoder is loaded,
    and the text encoder's width after.
    """
    folder, fetched = _resolve_folder(path_or_repo_id, variant, revision, cache_dir)
    if folder is None and (transformer is None or tokenizer is None):
        raise ValueError("give a folder or repository id, or both transformer= and tokenizer=")
    names: Dict[str, str] = {}
    found_variant = variant
    if isinstance(transformer, nn.Module):
        model = transformer
    else:
        path = transformer
        if path is None:
            path, found_variant = find_transformer(folder, variant)
        names["transformer"] = str(path)
        model = load_transformer(path, use_ema=use_ema, device=device)
    if isinstance(tokenizer, nn.Module):
        vae = tokenizer
    else:
        tpath = tokenizer if tokenizer is not None else find_tokenizer(folder, model.config, found_variant)
        names["tokenizer"] = str(tpath)
        vae = load_tokenizer(tpath, device=device)
    check_components(model, vae, None, names)  # before the (large) text encoder is loaded
    encoder = _text_encoder(text_encoder, folder, fetched, text_encoder_repo_id, cache_dir, device, text_encoder_dtype,
                            text_encoder_quantization, names)
    check_components(model, vae, encoder, names)
    settings = read_pipeline_config(folder) if folder is not None else PipelineSettings()
    if settings.resolution is None and found_variant is not None:
        chosen = RELEASED_VARIANTS[found_variant]
        if released_architecture(model.config) == chosen.architecture:
            settings.resolution = chosen.resolution
    return LoadedComponents(model, vae, encoder, names, settings, found_variant)

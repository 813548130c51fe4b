"""``InfinityPipeline``: load a transformer, its tokenizer and a text encoder once, generate many images.

Example::

    from infinity_lightning import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained("weights/infinity-2b", dtype="bf16")
    images = pipe(["a red apple on a wooden table", "a dog on grass"], seed=1)
    images[0].save("apple.png")

Folder layouts understood by :meth:`InfinityPipeline.from_pretrained`
----------------------------------------------------------------------

*Released layout* (file names as the Hugging Face repository ``FoundationVision/Infinity`` has them;
the text encoder is a local copy of ``google/flan-t5-xl``)::

    weights/
      infinity_2b_reg.pth                    2B transformer (flat state dict)
      infinity_vae_d32reg.pth                its tokenizer (``infinity_vae_d32_reg.pth`` also accepted)
      flan-t5-xl/                            T5 folder (config.json, weights, spiece.model, ...)
      infinity_8b_weights/                   8B transformer: model-0000N-of-0000M.safetensors + index
      infinity_8b_512x512_weights/           8B at 512 px (pn 0.25M)
      infinity_vae_d56_f8_14_patchify.pth    the 8B tokenizer (stride 8, 2x2 patchify)
      infinity_125M_256x256.pth              the 125M (layer12) transformer (pn 0.06M)

  When a folder holds several transformers, ``variant=`` ("2b", "8b", "8b_512", "125m") picks one.
  The tokenizer is the ``infinity_vae_*.pth`` that the transformer pairs with (its preset's
  ``tokenizer`` field); the text encoder folder is ``text_encoder/``, ``flan-t5-xl/`` or
  ``flan-t5-xl-official/``.

*Generic layout* (what :meth:`InfinityPipeline.save_pretrained` writes)::

    my_model/
      transformer.safetensors | transformer.pth   (+ transformer.json: the architecture)
      tokenizer.safetensors   | tokenizer.pth     (architecture stored inside the file)
      text_encoder/                              Hugging Face folder (config.json, weights, tokenizer files)
      pipeline.json                              default resolution and sampling settings

Explicit ``transformer=``, ``tokenizer=``, ``text_encoder=`` arguments (paths, preset names or
already built modules) override what the folder holds.  A name that is not a local folder is
treated as a Hugging Face repository id and fetched with ``huggingface_hub.snapshot_download``
(only the files of the chosen variant); offline, the error says which files to download.

Seeds and batching
------------------

With ``seed=s`` (and no ``generator``) image ``i`` of a call (prompt-major order, then
``num_images_per_prompt``) is sampled from its own ``torch.Generator`` seeded ``s + i``, and by
default (``batch_size=1``) each image goes through the transformer alone.  Image ``i`` is then
exactly ``pipe(prompts[i], seed=s + i)[0]``, whatever else is in the call: images do not depend on
how prompts are grouped (the prediction loop relies on this).  ``batch_size > 1`` runs images
together for throughput with the same per-image random streams; results then match the
one-at-a-time images only up to float rounding, because batched matrix products round
differently and the bf16 cross-attention amplifies this enough to flip bits near a tie.  Passing a
single ``generator`` instead samples the whole call as one batch from that stream, like
:func:`infinity_lightning.sampling.generate`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import scales as _scales
from .checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from .io import CheckpointError, atomic_write
from .models.text_encoder import TextEncoder, TextFeatures
from .presets import TRANSFORMER_PRESETS, TransformerConfig
from .sampling import sample_bits, generate, images_to_uint8
from .presets import RELEASED_VARIANTS as _VARIANTS

RELEASED_DEFAULTS = {k: dict(_VARIANTS[k].sampling) for k in ('2b', '8b')}

PathLike = Union[str, os.PathLike]

__all__ = ["InfinityPipeline", "InfinityPipelineOutput", "ComponentMismatchError", "RELEASED_VARIANTS",
           "check_components", "make_tiny_pipeline", "resolve_schedule"]


class ComponentMismatchError(ValueError):
    """The transformer, tokenizer and text encoder of a pipeline do not belong together."""


# -- released files ---------------------------------------------------------------------------
#: Variants of the released weights: transformer file or folder, tokenizer file names, the text
#: encoder repository and the pixel budget the authors used (spec 5.1).
RELEASED_VARIANTS: Dict[str, Dict[str, Any]] = {
    "2b": dict(transformer="infinity_2b_reg.pth", tokenizer=("infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"),
               resolution="1M", family="2b"),
    "8b": dict(transformer="infinity_8b_weights", tokenizer=("infinity_vae_d56_f8_14_patchify.pth",),
               resolution="1M", family="8b"),
    "8b_512": dict(transformer="infinity_8b_512x512_weights", tokenizer=("infinity_vae_d56_f8_14_patchify.pth",),
                   resolution="0.25M", family="8b"),
    "125m": dict(transformer="infinity_125M_256x256.pth",
                 tokenizer=("infinity_vae_d32.pth", "infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"),
                 resolution="0.06M", family=None),
}
#: Tokenizer preset -> released file names.
TOKENIZER_FILES: Dict[str, Tuple[str, ...]] = {
    "d16": ("infinity_vae_d16.pth",), "d24": ("infinity_vae_d24.pth",), "d32": ("infinity_vae_d32.pth",),
    "d32_reg": ("infinity_vae_d32reg.pth", "infinity_vae_d32_reg.pth"), "d64": ("infinity_vae_d64.pth",),
    "d56_f8_14_patchify": ("infinity_vae_d56_f8_14_patchify.pth",),
}
TEXT_ENCODER_FOLDERS = ("text_encoder", "flan-t5-xl", "flan-t5-xl-official")
DEFAULT_HUB_REPO = "FoundationVision/Infinity"
DEFAULT_TEXT_ENCODER_REPO = "google/flan-t5-xl"
GENERIC_FILES = dict(transformer=("transformer.safetensors", "transformer.pth", "transformer"),
                     tokenizer=("tokenizer.safetensors", "tokenizer.pth"))
PIPELINE_CONFIG = "pipeline.json"
#: Sampling settings for models without released settings (small and custom models).
CUSTOM_DEFAULTS = dict(cfg=3.0, tau=1.0, top_k=900, top_p=0.97)


# -- resolution -------------------------------------------------------------------------------
def resolve_schedule(aspect_ratio: float, resolution: Union[str, int, float],
                     stride: int = 16) -> List[Tuple[int, int, int]]:
    """Token-side scale schedule for an aspect ratio and a resolution (see :func:`scales.resolve`)."""
    return _scales.resolve(resolution, aspect_ratio, token_stride=stride)


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16}


def _parse_dtype(dtype: Union[str, torch.dtype], allowed: Tuple[torch.dtype, ...], what: str) -> torch.dtype:
    """A dtype from a torch dtype or a name (fp32, bf16, fp16, ...), checked against ``allowed``."""
    value = dtype if isinstance(dtype, torch.dtype) else _DTYPE_NAMES.get(str(dtype).lower())
    if value not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{what} {dtype!r}: expected one of {names}")
    return value


def _as_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """The pipeline's compute dtype: float32 (default) or bfloat16."""
    return torch.float32 if dtype is None else _parse_dtype(dtype, (torch.float32, torch.bfloat16), "dtype")


def _optional_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """The text encoder's weight dtype, or None for its default."""
    if dtype is None:
        return None
    return _parse_dtype(dtype, (torch.float32, torch.bfloat16, torch.float16), "text encoder dtype")


def _released_family(cfg: TransformerConfig) -> Optional[str]:
    """"2b"/"8b" when ``cfg`` is the released architecture (sampling defaults of spec 5.1)."""
    fields = ("depth", "embed_dim", "num_heads", "text_channels", "codebook_dim", "apply_spatial_patchify")
    for name in ("2b", "8b"):
        preset = TRANSFORMER_PRESETS[name]
        if all(getattr(cfg, f) == getattr(preset, f) for f in fields):
            return name
    return None


def _is_variant_architecture(variant: str, cfg: TransformerConfig) -> bool:
    """Whether ``cfg`` is the architecture a released variant's file holds (a small model saved
    under a released file name keeps its own default resolution)."""
    family = RELEASED_VARIANTS[variant]["family"]
    if family is not None:
        return _released_family(cfg) == family
    ref = TRANSFORMER_PRESETS["layer12"]
    return (cfg.depth, cfg.embed_dim, cfg.num_heads) == (ref.depth, ref.embed_dim, ref.num_heads)


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


def check_components(transformer: nn.Module, tokenizer: nn.Module, text_encoder: Optional[nn.Module] = None,
                     names: Optional[Dict[str, str]] = None) -> None:
    """Raise :class:`ComponentMismatchError` unless the three components fit together.

    The tokenizer must have the transformer's bits per position (``codebook_dim``) and, for a
    transformer with 2x2 spatial patchify (8B), a stride-8 latent grid; a patchify tokenizer
    cannot feed a transformer without patchify.  The text encoder's width must equal the
    transformer's ``text_channels``.
    """
    names = names or {}
    cfg: TransformerConfig = transformer.config
    tcfg = tokenizer.config
    family = _released_family(cfg)
    who = f"infinity_{family}" if family else "the transformer"
    if names.get("transformer"):
        who += f" ({names['transformer']})"
    tok_src = f" ({names['tokenizer']})" if names.get("tokenizer") else ""
    problem = None
    if tcfg.codebook_dim != cfg.codebook_dim:
        problem = f"{cfg.codebook_dim} bits per latent position, the tokenizer has {tcfg.codebook_dim}"
    elif cfg.apply_spatial_patchify and tcfg.patch_size * 2 != 16:
        problem = (f"2x2 spatial patchify of a stride-8 latent grid (16 px per token), the tokenizer has stride "
                   f"{tcfg.patch_size}")
    elif not cfg.apply_spatial_patchify and tcfg.spatial_patchify:
        problem = "tokens without spatial patchify, the tokenizer is a patchify (stride-8) tokenizer"
    if problem is not None:
        raise ComponentMismatchError(
            f"{who} needs {_expected_tokenizer(cfg)}, got {_describe_tokenizer(tokenizer)}{tok_src}: the transformer "
            f"expects {problem}")
    if text_encoder is not None:
        width = getattr(text_encoder, "width", None)
        if width is not None and int(width) != cfg.text_channels:
            src = f" ({names['text_encoder']})" if names.get("text_encoder") else ""
            hint = " (flan-t5-xl, 2048 wide, for the released models)" if cfg.text_channels == 2048 else ""
            raise ComponentMismatchError(
                f"{who} expects {cfg.text_channels}-wide text features{hint}, but the text encoder{src} gives "
                f"{width}-wide features")


# -- locating files ----------------------------------------------------------------------------
def _looks_like_repo_id(name: str) -> bool:
    """``owner/name`` (what the Hub accepts), not a relative or absolute path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith((".", "~"))


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _download_advice(repo_id: str, variant: Optional[str]) -> str:
    v = RELEASED_VARIANTS.get(variant or "2b", RELEASED_VARIANTS["2b"])
    files = " ".join([v["transformer"] + ("/*" if "weights" in v["transformer"] else ""), v["tokenizer"][0]])
    return (f"download the files and pass the folder, e.g.\n"
            f"  huggingface-cli download {repo_id} {files} --local-dir DIR\n"
            f"  huggingface-cli download {DEFAULT_TEXT_ENCODER_REPO} --local-dir DIR/flan-t5-xl\n"
            f"then InfinityPipeline.from_pretrained('DIR')")


def _snapshot(repo_id: str, variant: Optional[str], revision: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    """Fetch the files of one variant (plus the generic layout) from the Hub."""
    reason = None
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub, reason = None, "huggingface_hub is not installed (pip install huggingface_hub)"
    if reason is None and _hub_offline():
        reason = "the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set)"
    if reason is not None:
        raise FileNotFoundError(f"{repo_id!r} is not a local folder, and {reason}; {_download_advice(repo_id, variant)}")
    patterns = [PIPELINE_CONFIG, "transformer.*", "tokenizer.*", "text_encoder/*"]
    chosen = RELEASED_VARIANTS.get(variant or "2b")
    if chosen is None:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(RELEASED_VARIANTS)}")
    t = chosen["transformer"]
    patterns += [f"{t}/*"] if not t.endswith(".pth") else [t]
    patterns += list(chosen["tokenizer"]) + [f"{f}/*" for f in TEXT_ENCODER_FOLDERS]
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


def _find_transformer(folder: Path, variant: Optional[str]) -> Tuple[Path, Optional[str]]:
    """The transformer weights in ``folder`` and the released variant they are (or None)."""
    if variant is not None:
        if variant not in RELEASED_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(RELEASED_VARIANTS)}")
        path = folder / RELEASED_VARIANTS[variant]["transformer"]
        if not path.exists():
            raise FileNotFoundError(f"variant {variant!r} needs {path.name} in {folder}, which is missing "
                                    f"(found: {sorted(p.name for p in folder.iterdir())[:20]})")
        return path, variant
    for name in GENERIC_FILES["transformer"]:
        if (folder / name).exists() and (name != "transformer" or (folder / name).is_dir()):
            return folder / name, None
    found = [(folder / v["transformer"], key) for key, v in RELEASED_VARIANTS.items()
             if (folder / v["transformer"]).exists()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{folder} holds several transformers ({[p.name for p, _ in found]}); choose one with "
                         f"variant= one of {[k for _, k in found]}")
    expected = list(GENERIC_FILES["transformer"][:2]) + [v["transformer"] for v in RELEASED_VARIANTS.values()]
    raise FileNotFoundError(f"no transformer weights in {folder}: expected one of {expected} "
                            f"(found: {sorted(p.name for p in folder.iterdir())[:20]}); or pass transformer=PATH")


def _find_tokenizer(folder: Path, cfg: TransformerConfig, variant: Optional[str]) -> Path:
    for name in GENERIC_FILES["tokenizer"]:
        if (folder / name).is_file():
            return folder / name
    wanted: List[str] = list(TOKENIZER_FILES.get(cfg.tokenizer or "", ()))
    if variant is not None:
        wanted += [n for n in RELEASED_VARIANTS[variant]["tokenizer"] if n not in wanted]
    for name in wanted:
        if (folder / name).is_file():
            return folder / name
    present = sorted(folder.glob("infinity_vae_*.pth"))
    if len(present) == 1:
        return present[0]  # validated against the transformer afterwards, with a precise message
    expected = (wanted or ["tokenizer.safetensors", "tokenizer.pth"])
    raise FileNotFoundError(f"no tokenizer for this transformer in {folder}: expected {expected[0]}"
                            + (f" (or {expected[1:]})" if len(expected) > 1 else "")
                            + f"; found {[p.name for p in present] or 'no infinity_vae_*.pth'}; or pass tokenizer=PATH")


def _find_text_encoder(folder: Path) -> Optional[Path]:
    for name in TEXT_ENCODER_FOLDERS:
        if (folder / name / "config.json").exists():
            return folder / name
    return None


# -- outputs -----------------------------------------------------------------------------------
@dataclasses.dataclass
class InfinityPipelineOutput:
    """What :meth:`InfinityPipeline.__call__` returns with ``return_bits`` / ``return_progression``.

    ``images``: in the requested ``output_type``; ``seeds``: the seed of each image (None when a
    ``generator`` was given); ``bit_labels``: per image, the per-scale uint8 labels (1, 1, h, w, d)
    in tokenizer layout; ``progression``: per image, the images after 1, 2, ..., K scales (same
    output type); ``settings``: the sampling settings used.
    """

    images: Any
    seeds: List[Optional[int]]
    bit_labels: Optional[List[List[torch.Tensor]]] = None
    progression: Optional[List[Any]] = None
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)


class _RecordLogits:
    """Keeps the last (post-guidance) logits; placed after every other logits hook."""

    def __init__(self):
        self.logits = None

    def on_logits(self, scale: int, logits: torch.Tensor) -> torch.Tensor:
        self.logits = logits
        return logits


class _PerImageSampler:
    """Re-samples every image's bits from its own generator (placed before other bits hooks)."""

    def __init__(self, recorder: _RecordLogits, generators: Sequence[torch.Generator], top_k: int, top_p: float,
                 gumbel: bool):
        self.recorder, self.generators = recorder, list(generators)
        self.top_k, self.top_p, self.gumbel = top_k, top_p, gumbel

    def on_bits(self, scale: int, bits: torch.Tensor) -> torch.Tensor:
        z = self.recorder.logits
        rows = [sample_bits(z[i].reshape(-1, 2), self.top_k, self.top_p, g, self.gumbel).view(bits.shape[1:])
                for i, g in enumerate(self.generators)]
        return torch.stack(rows).to(bits.dtype)


class _OnlyLogits:
    def __init__(self, hook):
        self.hook = hook

    def on_logits(self, scale: int, logits: torch.Tensor) -> torch.Tensor:
        return self.hook.on_logits(scale, logits)


class _OnlyBits:
    def __init__(self, hook):
        self.hook = hook

    def on_bits(self, scale: int, bits: torch.Tensor) -> torch.Tensor:
        return self.hook.on_bits(scale, bits)


class _ScaleProgress:
    def __init__(self, bar):
        self.bar = bar

    def on_bits(self, scale: int, bits: torch.Tensor) -> torch.Tensor:
        self.bar.update(1)
        return bits


def _to_output(images: torch.Tensor, output_type: str):
    """Decoder output (N, 3, H, W) in [-1, 1] -> the requested type."""
    if output_type == "tensor":
        return images.float().cpu()
    pixels = images_to_uint8(images.float()).cpu()
    if output_type == "np":
        return pixels.numpy()
    from PIL import Image

    return [Image.fromarray(p.numpy()) for p in pixels]


# -- the pipeline -----------------------------------------------------------------------------
class InfinityPipeline:
    """Text-to-image generation with an Infinity transformer, its BSQ-VAE tokenizer and a text encoder.

    Args:
        transformer: an :class:`~infinity_lightning.models.infinity.InfinityTransformer`.
        tokenizer: the paired :class:`~infinity_lightning.models.bsq_vae.BSQVAE`.
        text_encoder: a :class:`~infinity_lightning.models.text_encoder.TextEncoder` (or None when
            only precomputed :class:`TextFeatures` are passed).
        device: where generation runs (default: CUDA when available).
        dtype: ``float32`` or ``bfloat16``: the transformer and the decoder run under bf16 autocast
            (on CPU too); with bf16 the transformer blocks' weights are cast to bf16 (the released
            inference setting), the text path, embeddings, head and tokenizer stay fp32.
        default_resolution: pixel budget or size used when a call gives none (``"1M"`` for the
            released 2B/8B, ``"0.25M"`` for 8B-512, ``"0.06M"`` otherwise).
        defaults: sampling defaults ``cfg``, ``tau``, ``top_k``, ``top_p`` (the released settings of
            spec 5.1 for 2B and 8B).
        offload: keep every component on the CPU and move each to ``device`` only while it runs
            (text encoder while encoding, transformer while sampling, tokenizer while decoding).
    """

    def __init__(self, transformer: nn.Module, tokenizer: nn.Module, text_encoder: Optional[nn.Module] = None, *,
                 device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                 default_resolution: Optional[Union[str, int]] = None, defaults: Optional[Dict[str, Any]] = None,
                 offload: bool = False, check: bool = True, names: Optional[Dict[str, str]] = None):
        if check:
            check_components(transformer, tokenizer, text_encoder, names)
        self.transformer = transformer.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _as_dtype(dtype)
        #: pixels per token side (pixel-size resolutions are turned into token grids with it)
        self.token_stride = int(getattr(tokenizer.config, "image_stride", 16))
        if self.dtype == torch.bfloat16:
            # as the released inference: bf16 block weights (half the memory), fp32 elsewhere
            self.transformer.cast_blocks(torch.bfloat16)
        family = _released_family(transformer.config)
        self.family = family
        self.default_resolution = default_resolution or ("1M" if family else "0.06M")
        self.defaults = dict(RELEASED_DEFAULTS.get(family, CUSTOM_DEFAULTS))
        self.defaults.update(defaults or {})
        self.offload = bool(offload)
        self._place()

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: Optional[PathLike] = None, *, transformer: Any = None,
                        tokenizer: Any = None, text_encoder: Any = None, variant: Optional[str] = None,
                        device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                        text_encoder_dtype: Union[None, str, torch.dtype] = None,
                        text_encoder_quantization: Optional[str] = None, offload: bool = False,
                        use_ema: bool = False, default_resolution: Optional[Union[str, int]] = None,
                        revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                        text_encoder_repo_id: str = DEFAULT_TEXT_ENCODER_REPO) -> "InfinityPipeline":
        """Load a pipeline from a folder (layouts in the module docstring) or a Hub repository id.

        ``transformer``/``tokenizer``/``text_encoder`` override the folder's components: a path,
        a preset name (transformer, tokenizer) or a built module.  ``variant`` picks the released
        model in a folder holding several ("2b", "8b", "8b_512", "125m").  ``text_encoder_dtype``
        and ``text_encoder_quantization`` (None, "8bit", "4bit") apply to the T5 encoder;
        ``use_ema`` selects EMA weights in a training checkpoint.  The components are checked to
        belong together (:func:`check_components`).
        """
        folder: Optional[Path] = None
        if path_or_repo_id is not None:
            p = Path(path_or_repo_id).expanduser()
            if p.is_dir():
                folder = p
            elif p.exists():
                raise ValueError(f"{p} is a file; from_pretrained expects a folder (pass a single weights file as "
                                 "transformer=PATH with tokenizer= and text_encoder=)")
            elif not _looks_like_repo_id(str(path_or_repo_id)):
                raise FileNotFoundError(f"pipeline folder {str(path_or_repo_id)!r} does not exist")
            else:
                folder = _snapshot(str(path_or_repo_id), variant, revision, cache_dir)
        if folder is None and (transformer is None or tokenizer is None):
            raise ValueError("give a folder or repository id, or both transformer= and tokenizer=")
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        load_device = "cpu" if offload else device
        names: Dict[str, str] = {}
        saved = {}
        if folder is not None and (folder / PIPELINE_CONFIG).exists():
            try:
                saved = json.loads((folder / PIPELINE_CONFIG).read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{folder / PIPELINE_CONFIG} is not valid JSON ({e})") from e

        found_variant = variant
        if isinstance(transformer, nn.Module):
            model = transformer
        else:
            if transformer is None:
                path, found_variant = _find_transformer(folder, variant)
            else:
                path = transformer
            names["transformer"] = str(path)
            model = load_transformer(path, use_ema=use_ema, device=load_device)

        if isinstance(tokenizer, nn.Module):
            vae = tokenizer
        else:
            tpath = tokenizer if tokenizer is not None else _find_tokenizer(folder, model.config, found_variant)
            names["tokenizer"] = str(tpath)
            vae = load_tokenizer(tpath)
        # Pairing is checked before the (large) text encoder is loaded.
        check_components(model, vae, None, names)

        if isinstance(text_encoder, nn.Module) or text_encoder is False:
            encoder = text_encoder or None
        else:
            te_path = text_encoder if text_encoder is not None else (_find_text_encoder(folder) if folder else None)
            if te_path is None and folder is not None and not Path(str(path_or_repo_id)).exists() and not _hub_offline():
                te_path = _snapshot_text_encoder(text_encoder_repo_id, cache_dir)
            if te_path is None and folder is None:
                raise ValueError("pass text_encoder=FOLDER (a Hugging Face text encoder folder), or text_encoder=False "
                                 "to generate from precomputed prompt_embeds only")
            if te_path is None:
                raise FileNotFoundError(
                    f"no text encoder in {folder}: expected a Hugging Face folder named one of "
                    f"{list(TEXT_ENCODER_FOLDERS)} (for the released models a copy of {text_encoder_repo_id}: "
                    f"huggingface-cli download {text_encoder_repo_id} --local-dir {folder}/flan-t5-xl), "
                    "or pass text_encoder=FOLDER")
            names["text_encoder"] = str(te_path)
            encoder = TextEncoder.from_pretrained(te_path, dtype=_optional_dtype(text_encoder_dtype),
                                                  device=load_device, quantization=text_encoder_quantization)
        resolution = default_resolution or saved.get("default_resolution")
        if resolution is None and found_variant is not None and _is_variant_architecture(found_variant, model.config):
            resolution = RELEASED_VARIANTS[found_variant]["resolution"]
        return cls(model, vae, encoder, device=device, dtype=dtype, default_resolution=resolution,
                   defaults=saved.get("defaults"), offload=offload, names=names)

    def save_pretrained(self, folder: PathLike, format: str = "safetensors") -> Path:
        """Write the generic layout: ``transformer.<ext>`` (+ ``.json``), ``tokenizer.<ext>``,
        ``text_encoder/`` and ``pipeline.json``; ``format`` is "safetensors" or "released" (.pth).

        Each file is written atomically; the text encoder folder is written beside and renamed
        into place.
        """
        if format not in ("safetensors", "released"):
            raise ValueError(f"format must be 'safetensors' or 'released', got {format!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ext = "safetensors" if format == "safetensors" else "pth"
        for stale in ("transformer", "tokenizer"):  # one weights file per component
            other = folder / f"{stale}.{'pth' if ext == 'safetensors' else 'safetensors'}"
            if other.exists():
                other.unlink()
        save_transformer(self.transformer, folder / f"transformer.{ext}", format=format)
        save_tokenizer(self.tokenizer, folder / f"tokenizer.{ext}", format=format)
        if self.text_encoder is not None:
            tmp = Path(tempfile.mkdtemp(prefix=".text_encoder.", dir=str(folder)))
            try:
                self.text_encoder.encoder.save_pretrained(tmp)
                self.text_encoder.tokenizer.save_pretrained(tmp)
                target = folder / "text_encoder"
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        meta = {"format_version": 1, "default_resolution": self.default_resolution, "defaults": self.defaults}
        atomic_write(folder / PIPELINE_CONFIG, lambda t: Path(t).write_text(json.dumps(meta, indent=1)))
        return folder

    # ---- placement ---------------------------------------------------------------------------
    def _modules(self) -> List[nn.Module]:
        return [m for m in (self.transformer, self.tokenizer, self.text_encoder) if m is not None]

    def _place(self) -> None:
        target = torch.device("cpu") if self.offload else self.device
        for m in self._modules():
            m.to(target)

    def to(self, device: Union[str, torch.device]) -> "InfinityPipeline":
        """Run on ``device`` (components move there unless offloading is on)."""
        self.device = torch.device(device)
        self._place()
        return self

    def enable_model_cpu_offload(self, enabled: bool = True) -> "InfinityPipeline":
        """Keep components on the CPU; each moves to the device only while it is used."""
        self.offload = bool(enabled)
        self._place()
        return self

    @contextlib.contextmanager
    def _on_device(self, module: nn.Module):
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # ---- text --------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> TextFeatures:
        """Packed text features of ``prompts`` on the execution device.

        Each distinct prompt is encoded on its own, so a prompt's features never depend on which
        other prompts share the call (padding changes the encoder's rounding).
        """
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass TextFeatures as prompt_embeds")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        unique = list(dict.fromkeys(prompts))
        with self._on_device(self.text_encoder):
            rows = {p: self.text_encoder.encode([p]).kv_compact.float() for p in unique}
        return TextFeatures.pack([rows[p].to(self.device) for p in prompts])

    # ---- generation --------------------------------------------------------------------------
    def settings(self, **overrides: Any) -> Dict[str, Any]:
        """The sampling settings a call uses: the pipeline defaults updated by non-None overrides."""
        out = dict(self.defaults)
        out["resolution"] = self.default_resolution
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str], None] = None, negative_prompt: Union[None, str, Sequence[str]] = None,
                 *, cfg: Optional[Union[float, Sequence[float]]] = None, tau: Optional[Union[float, Sequence[float]]] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Union[None, int, Sequence[int]] = None, aspect_ratio: Union[float, Sequence[float]] = 1.0,
                 resolution: Optional[Union[str, int]] = None, num_images_per_prompt: int = 1,
                 generator: Optional[torch.Generator] = None, cfg_insertion_layer: int = 0, progress: bool = False,
                 output_type: str = "pil", return_bits: bool = False, return_progression: bool = False,
                 batch_size: Optional[int] = 1, gumbel: bool = False, hooks: Sequence[Any] = (),
                 prompt_embeds: Optional[TextFeatures] = None, negative_prompt_embeds: Optional[TextFeatures] = None):
        """Generate images for ``prompts``.

        Args:
            prompts: one prompt or a list.
            negative_prompt: None (the learned null condition), one shared string or one per prompt.
            cfg, tau, top_k, top_p: sampling settings (a value or, for cfg/tau, one per scale);
                None takes the pipeline's defaults (released settings for 2B/8B).
            seed: base seed (image i uses ``seed + i``) or one seed per image; None draws one from
                torch's global generator (so ``torch.manual_seed`` makes calls repeatable).
            aspect_ratio: h/w (mapped to the nearest template), or one per prompt.
            resolution: "0.06M", "0.25M", "0.60M", "1M" or a pixel size; None = pipeline default.
            num_images_per_prompt: images per prompt (prompt-major order).
            generator: one generator for the whole call instead of per-image seeds (see the module
                docstring for the difference).
            batch_size: images per transformer batch (None: all images of one aspect ratio at once).
            output_type: "pil" (list of RGB images), "np" (uint8 (N, H, W, 3)) or "tensor" (float
                (N, 3, H, W) in [-1, 1]).
            return_bits / return_progression: return an :class:`InfinityPipelineOutput` with the bit
                labels and/or the image after each scale.
            hooks: sampling hooks (see :mod:`infinity_lightning.sampling`).
            prompt_embeds, negative_prompt_embeds: precomputed text features instead of prompts.

        Returns a list of PIL images (or an array/tensor) or, with ``return_bits`` /
        ``return_progression``, an :class:`InfinityPipelineOutput`.
        """
        if output_type not in ("pil", "np", "tensor"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'tensor', got {output_type!r}")
        if prompt_embeds is None:
            if prompts is None:
                raise ValueError("give prompts or prompt_embeds")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            n_prompts = len(prompts)
        else:
            n_prompts = len(prompt_embeds)
        if n_prompts == 0:
            raise ValueError("no prompts given")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        st = self.settings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, resolution=resolution)
        n = n_prompts * num_images_per_prompt
        owner = [i // num_images_per_prompt for i in range(n)]

        # seeds: one per image
        if generator is not None:
            seeds: List[Optional[int]] = [None] * n
        elif seed is None:
            base = int(torch.randint(0, 2 ** 31 - 1, ()).item())
            seeds = [base + i for i in range(n)]
        elif isinstance(seed, int):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} images")

        ratios = [float(aspect_ratio)] * n_prompts if isinstance(aspect_ratio, (int, float)) else \
            [float(r) for r in aspect_ratio]
        if len(ratios) != n_prompts:
            raise ValueError(f"{len(ratios)} aspect ratios for {n_prompts} prompts")

        # text
        text = prompt_embeds.to(self.device) if prompt_embeds is not None else self.encode_prompt(prompts)
        neg = None
        if negative_prompt_embeds is not None:
            neg = negative_prompt_embeds.to(self.device)
        elif negative_prompt is not None:
            negs = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != n_prompts:
                raise ValueError(f"{len(negs)} negative prompts for {n_prompts} prompts; give one or one per prompt")
            neg = self.encode_prompt(negs)
        if neg is not None and len(neg) == 1 and n_prompts > 1:
            neg = neg.select([0] * n_prompts)

        # group images by schedule, then into batches
        groups: Dict[float, List[int]] = {}
        for i in range(n):
            groups.setdefault(_scales.nearest_template(ratios[owner[i]]), []).append(i)
        batches: List[List[int]] = []
        for members in groups.values():
            step = len(members) if (batch_size is None or generator is not None) else max(1, int(batch_size))
            batches += [members[j:j + step] for j in range(0, len(members), step)]

        decoded: Dict[int, torch.Tensor] = {}
        bits_out: Dict[int, List[torch.Tensor]] = {}
        progression: Dict[int, List[torch.Tensor]] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(len(resolve_schedule(ratios[owner[b[0]]], st["resolution"], self.token_stride)) for b in batches)
            bar = tqdm(total=total, desc="scales", unit="scale")
        try:
            for members in batches:
                schedule = resolve_schedule(ratios[owner[members[0]]], st["resolution"], self.token_stride)
                out = self._sample(text.select([owner[i] for i in members]),
                                   neg.select([owner[i] for i in members]) if neg is not None else None,
                                   schedule, [seeds[i] for i in members], generator, st, cfg_insertion_layer,
                                   gumbel, list(hooks) + ([_ScaleProgress(bar)] if bar is not None else []))
                vae_schedule = schedule.with_patchify(self.transformer.config.apply_spatial_patchify).tokenizer_side
                with self._on_device(self.tokenizer), self._autocast():
                    images = self.tokenizer.decode(out.summed_codes.to(self.device))
                    steps = []
                    if return_progression:
                        for k in range(1, len(schedule) + 1):
                            steps.append(self.tokenizer.decode_from_bits(
                                [b.to(self.device) for b in out.bit_labels[:k]], vae_schedule).float().cpu())
                for j, i in enumerate(members):
                    decoded[i] = images[j].float().cpu()
                    if return_bits:
                        bits_out[i] = [b[j:j + 1].cpu() for b in out.bit_labels]
                    if return_progression:
                        progression[i] = [s[j] for s in steps]
        finally:
            if bar is not None:
                bar.close()

        sizes = {tuple(decoded[i].shape) for i in range(n)}
        if output_type == "pil" or len(sizes) > 1:
            result: Any = [_to_output(decoded[i][None], output_type)[0] for i in range(n)]
        else:
            result = _to_output(torch.stack([decoded[i] for i in range(n)]), output_type)
        if not (return_bits or return_progression):
            return result
        prog = None
        if return_progression:
            prog = [_to_output(torch.stack(progression[i]), output_type) if len({tuple(t.shape) for t in progression[i]}) == 1
                    else [_to_output(t[None], output_type)[0] for t in progression[i]] for i in range(n)]
        return InfinityPipelineOutput(images=result, seeds=seeds,
                                      bit_labels=[bits_out[i] for i in range(n)] if return_bits else None,
                                      progression=prog, settings=st)

    def _sample(self, text: TextFeatures, neg: Optional[TextFeatures], schedule, seeds: List[Optional[int]],
                generator: Optional[torch.Generator], st: Dict[str, Any], cfg_insertion_layer: int, gumbel: bool,
                hooks: List[Any]):
        kw = dict(negative_text=neg, cfg=st["cfg"], tau=st["tau"], top_k=int(st["top_k"]), top_p=float(st["top_p"]),
                  gumbel=gumbel, cfg_insertion_layer=cfg_insertion_layer)
        with self._on_device(self.transformer), self._autocast():
            if generator is not None:
                return generate(self.transformer, text, schedule, generator=generator, hooks=hooks, **kw)
            gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
            if len(gens) == 1:
                # one image: its generator drives the sampler directly (identical to generate(seed=s))
                return generate(self.transformer, text, schedule, generator=gens[0], hooks=hooks, **kw)
            recorder = _RecordLogits()
            sampler = _PerImageSampler(recorder, gens, int(st["top_k"]), float(st["top_p"]), gumbel)
            # The batch-level draw below is discarded by the per-image sampler; it gets its own
            # stream so that the global RNG is left untouched.
            scratch = torch.Generator(device=self.device).manual_seed(0)
            # user hooks see the logits first and the bits after the per-image draw
            ordered = ([_OnlyLogits(h) for h in hooks if hasattr(h, "on_logits")] + [recorder, sampler]
                       + [_OnlyBits(h) for h in hooks if hasattr(h, "on_bits")])
            return generate(self.transformer, text, schedule, generator=scratch, hooks=ordered, **kw)

    def generate_per_scale(self, prompt: str, **kwargs: Any) -> List[Any]:
        """The images after 1, 2, ..., K scales for one prompt (``kwargs`` as :meth:`__call__`):
        each is the decoder applied to the sum of the first k scales' codes."""
        kwargs.pop("return_progression", None)
        out = self(prompt, return_progression=True, **kwargs)
        return out.progression[0]

    def __repr__(self) -> str:
        cfg = self.transformer.config
        return (f"InfinityPipeline(transformer depth {cfg.depth} x {cfg.embed_dim}, tokenizer d{self.tokenizer.config.codebook_dim}, "
                f"text encoder {'none' if self.text_encoder is None else self.text_encoder.width}, device {self.device}, "
                f"dtype {self.dtype}, default_resolution {self.default_resolution!r}, defaults {self.defaults})")


def make_tiny_pipeline(folder: PathLike, layout: str = "released", seed: int = 0,
                       texts: Optional[Sequence[str]] = None, transformer: str = "tiny",
                       tokenizer: str = "tiny") -> Path:
    """Write a random tiny pipeline into ``folder`` offline, for tests, notebooks and benchmarks.

    ``layout="released"``: ``infinity_2b_reg.pth``, ``infinity_vae_d32reg.pth`` and ``flan-t5-xl/``
    (the released file names, holding the tiny presets); ``"generic"``: ``transformer.pth``,
    ``tokenizer.pth``, ``text_encoder/``.  The text encoder is a tiny random T5 whose width
    matches the transformer's ``text_channels``.  Returns the folder.
    """
    from .models.text_encoder import make_tiny_t5

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

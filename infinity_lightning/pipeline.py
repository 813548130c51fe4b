"""``InfinityPipeline``: a transformer, its tokenizer and a text encoder, loaded once; one sampling call per batch.

Example::

    from infinity_lightning import InfinityPipeline

    pipe = InfinityPipeline.from_pretrained("weights/infinity-2b", dtype="bf16")
    out = pipe(["a red apple on a wooden table", "a dog on grass"], seed=1, tau=0.5)
    out[0].save("apple.png")            # the output is also the sequence of its images
    out.seeds, out.sampling, out.schedules

Folder layouts, Hub downloads and ``pipeline.json`` are described in :mod:`infinity_lightning.loading`.

*Editing.*  ``pipe.inpaint(prompt, image, mask)``, ``pipe.outpaint(prompt, image, aspect_ratio)``
and ``pipe.variations(image, prompt, keep_scales)`` (:mod:`infinity_lightning.editing`) force the
image's bits where it is kept and sample the rest with this pipeline's components and settings.

*LoRA.*  ``from_pretrained(..., lora=folder)``, ``pipe.load_lora(folder, adapter_name, scale)``,
``pipe.set_adapters(names, weights)``, ``pipe.unload_lora(name)`` and ``pipe.fuse_lora()``
(:mod:`infinity_lightning.pipeline_lora`).

*Seeds and batching.*  Every image draws its bits from its own ``torch.Generator``: ``seed=s``
gives image ``i`` (prompt-major, then ``num_images_per_prompt``) the generator seeded ``s + i``;
``generator=[g_0, g_1, ...]`` gives one per image.  Image ``i`` is then exactly ``pipe(prompts[i],
seed=s + i)[0]`` whatever else is in the call, with the default ``batch_size=1``.  ``batch_size > 1``
runs images through the transformer together with the same per-image streams (each generator
advances exactly as in a call of its own); images then match up to float rounding (batched matrix
products round differently; bf16 can flip bits near a tie).  One ``generator`` (not a list) samples
the whole call as one batch from that single stream, as :func:`~infinity_lightning.sampling.generate`.

*Output types.*  ``"pil"``, ``"np"``, ``"pt"`` (in [0, 1]) and ``"tensor"`` (in [-1, 1]), as
:mod:`infinity_lightning.outputs` describes; images of different sizes (several aspect ratios in
one call) come as a list.

*Progress.*  ``progress=None`` (default) shows a bar over the scales when stderr is a terminal
(tqdm's rule: none in logs, pipes and CI); ``True`` always, ``False`` never.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import editing
from .dtypes import parse_dtype
from .io import PathLike
from .loading import check_components, load_components, released_variant, save_components
from .models.text_encoder import PromptTruncatedWarning, TextFeatures
from .outputs import OUTPUT_TYPES, check_output_type, to_output
from .pipeline_lora import LoraLoaderMixin, LoraSources, lora_sources
from .pipeline_plan import CallPlan, plan_call, progress_hook
from .presets import RELEASED_VARIANTS, released_sampling
from .sampling import SamplingConfig, generate
from .scales import ScaleSchedule, resolve

Prompts = Union[None, str, Sequence[str]]

__all__ = ["InfinityPipeline", "InfinityPipelineOutput", "OUTPUT_TYPES"]
#: Default resolution of a model that is not a released architecture.
CUSTOM_RESOLUTION = "0.06M"


@dataclasses.dataclass
class InfinityPipelineOutput:
    """What :meth:`InfinityPipeline.__call__` returns; it is also the sequence of its images
    (``out[0]``, ``len(out)``, ``for image in out``).

    ``images``: in the requested ``output_type``; ``seeds``: the seed of each image (None where a
    generator was given); ``sampling``: the :class:`SamplingConfig` used; ``schedules``: each
    image's :class:`ScaleSchedule`; ``bit_labels`` (with ``return_bits``): per image, the per-scale
    uint8 labels (1, 1, h, w, d) in tokenizer layout; ``progression`` (with ``return_progression``):
    per image, the images after 1, 2, ..., K scales (same output type).
    """

    images: Any
    seeds: List[Optional[int]]
    sampling: SamplingConfig
    schedules: List[ScaleSchedule]
    bit_labels: Optional[List[List[torch.Tensor]]] = None
    progression: Optional[List[Any]] = None

    def __getitem__(self, index):
        return self.images[index]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return iter(self.images)


@contextlib.contextmanager
def _text_limit(encoder: nn.Module, limit: int):
    """The encoder cuts prompts at ``limit`` tokens, without its own per-prompt notices
    (:meth:`InfinityPipeline.check_prompts` has raised or warned once already)."""
    saved, notices = encoder.max_length, logging.getLogger(type(encoder).__module__)
    encoder.max_length, was_disabled, notices.disabled = limit, notices.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            yield
    finally:
        encoder.max_length, notices.disabled = saved, was_disabled


def _device(device: Union[None, str, torch.device]) -> torch.device:
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def _as_list(value: Prompts, what: str) -> List[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what}: give a string or a non-empty list of strings, got {value!r}")
    return items


class InfinityPipeline(LoraLoaderMixin):
    """Text-to-image generation with an Infinity transformer, its BSQ-VAE tokenizer and a text encoder.

    Args:
        transformer: an :class:`~infinity_lightning.models.infinity.InfinityTransformer`.
        tokenizer: the paired :class:`~infinity_lightning.models.bsq_vae.BSQVAE`.
        text_encoder: a :class:`~infinity_lightning.models.text_encoder.TextEncoder` (or None when
            only precomputed :class:`TextFeatures` are passed).
        device: where generation runs (default: CUDA when available).
        dtype: ``float32`` or ``bfloat16``: with bf16 the transformer blocks' weights are cast to
            bf16 and the transformer and decoder run under bf16 autocast (the released inference
            setting); the text path, embeddings, head and tokenizer weights stay fp32.
        resolution: the default when a call gives none: a pixel budget (``"1M"``), a pixel size, or
            a :class:`ScaleSchedule` / list of grids (which then fixes the grids whatever the
            aspect ratio); default the released variant's budget, ``"0.06M"`` for other models.
        sampling: the default :class:`SamplingConfig`, or a dict of its fields applied over the
            released settings of the architecture (cfg 3, tau 0.5 for 2B; tau 1.0 otherwise).
        offload: keep every component on the CPU and move each to ``device`` only while it runs.

    The arguments are kept as attributes, with ``token_stride`` and ``schedule`` (the default one).
    """

    def __init__(self, transformer: nn.Module, tokenizer: nn.Module, text_encoder: Optional[nn.Module] = None, *,
                 device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                 resolution: Any = None, sampling: Union[None, SamplingConfig, Mapping[str, Any]] = None,
                 offload: bool = False):
        check_components(transformer, tokenizer, text_encoder)
        self.transformer = transformer.eval().requires_grad_(False)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.device = _device(device)
        self.dtype = parse_dtype(dtype, (torch.float32, torch.bfloat16), "dtype", default=torch.float32)
        patchify = bool(transformer.config.apply_spatial_patchify)
        #: pixels per token side: the tokenizer's stride, doubled when the transformer patchifies
        self.token_stride = int(tokenizer.config.patch_size) * (2 if patchify else 1)
        if self.dtype == torch.bfloat16:
            self.transformer.cast_blocks(torch.bfloat16)
        variant = released_variant(transformer.config)
        self.resolution = resolution if resolution is not None else (
            RELEASED_VARIANTS[variant].resolution if variant else CUSTOM_RESOLUTION)
        if not isinstance(sampling, SamplingConfig):
            sampling = SamplingConfig.from_dict({**released_sampling(transformer.config), **dict(sampling or {})},
                                                source="sampling")
        self.sampling = sampling
        self.schedule_for(1.0)  # a bad default resolution is an error now, not at the first call
        self.offload = bool(offload)
        self._place()

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_repo_id: Optional[PathLike] = None, *,
                        device: Union[None, str, torch.device] = None, dtype: Union[None, str, torch.dtype] = None,
                        offload: bool = False, resolution: Any = None,
                        sampling: Union[None, SamplingConfig, Mapping[str, Any]] = None,
                        lora: LoraSources = None, **loading: Any) -> "InfinityPipeline":
        """Load a pipeline from a folder or a Hub repository id (:mod:`infinity_lightning.loading`).

        ``loading``: keywords of :func:`~infinity_lightning.loading.load_components` (``transformer``,
        ``tokenizer``, ``text_encoder`` overrides, ``variant``, ``use_ema``, ``text_encoder_dtype``,
        ``text_encoder_quantization``, ``revision``, ``cache_dir``, ...).  ``resolution`` and
        ``sampling`` (a config, or fields over the stored ones) override what ``pipeline.json`` stores.
        ``lora``: LoRA adapter folders to load (:meth:`load_lora`): one folder, a list, or
        ``{adapter name: folder}``; each at scale 1.
        """
        sources = lora_sources(lora)  # a bad argument fails before anything loads
        device = _device(device)
        loaded = load_components(path_or_repo_id, device="cpu" if offload else device, **loading)
        if not isinstance(sampling, SamplingConfig):
            sampling = {**released_sampling(loaded.transformer.config), **loaded.settings.sampling,
                        **dict(sampling or {})}
        pipe = cls(loaded.transformer, loaded.tokenizer, loaded.text_encoder, device=device, dtype=dtype,
                   resolution=resolution if resolution is not None else loaded.settings.resolution,
                   sampling=sampling, offload=offload)
        for name, folder in sources:
            pipe.load_lora(folder, adapter_name=name)
        return pipe

    def save_pretrained(self, folder: PathLike, format: str = "safetensors") -> Path:
        """Write the generic layout (:func:`~infinity_lightning.loading.save_components`): the three
        components and ``pipeline.json`` with this pipeline's default schedule and sampling settings;
        ``format`` is "safetensors" or "released" (.pth).  Returns the folder.  A transformer with
        LoRA adapters is refused: :meth:`fuse_lora` or :meth:`unload_lora` first."""
        self._check_no_adapters("save_pretrained")
        return save_components(folder, self.transformer, self.tokenizer, self.text_encoder, self.resolution,
                               self.sampling, format=format)

    # ---- placement ---------------------------------------------------------------------------
    def _place(self) -> None:
        target = torch.device("cpu") if self.offload else self.device
        for m in (self.transformer, self.tokenizer, self.text_encoder):
            if m is not None:
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
    def on_device(self, module: nn.Module):
        """Context manager: ``module`` is on :attr:`device` inside (moved there and back to the CPU
        only when offloading; otherwise it is there already).  Yields the module."""
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def autocast(self):
        """The autocast context of the transformer and the decoder: none for fp32, bf16 autocast on
        :attr:`device` for a bf16 pipeline."""
        exact = self.dtype == torch.float32
        return contextlib.nullcontext() if exact else torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # ---- schedules ---------------------------------------------------------------------------
    def schedule_for(self, aspect_ratio: float = 1.0, resolution: Any = None) -> ScaleSchedule:
        """The schedule of a call: ``resolution`` (None: the pipeline's) at the template nearest
        ``aspect_ratio`` (h/w), with this pipeline's token stride and patchify."""
        return resolve(self.resolution if resolution is None else resolution, aspect_ratio,
                       token_stride=self.token_stride, patchify=bool(self.transformer.config.apply_spatial_patchify))

    @property
    def schedule(self) -> ScaleSchedule:
        """The default schedule (square images at :attr:`resolution`)."""
        return self.schedule_for(1.0)

    # ---- text --------------------------------------------------------------------------------
    @property
    def text_length(self) -> int:
        """The most tokens a prompt may have: the transformer's ``text_maxlen`` (and the encoder's limit)."""
        limit = int(self.transformer.config.text_maxlen)
        return min(limit, int(getattr(self.text_encoder, "max_length", limit)))

    def check_prompts(self, prompts: Sequence[str], truncate: bool = False, what: str = "prompt",
                      labels: Optional[Sequence[Any]] = None) -> None:
        """Raise ``ValueError`` naming the first prompt longer than :attr:`text_length` tokens (as
        ``labels[i]``, default its index), or with ``truncate`` warn once
        (:class:`PromptTruncatedWarning`) that such prompts will be cut."""
        if self.text_encoder is None or not prompts:
            return
        limit = self.text_length
        ids = self.text_encoder.tokenizer(list(prompts), truncation=False, padding=False, verbose=False)["input_ids"]
        too_long = [(i, len(t)) for i, t in enumerate(ids) if len(t) > limit]
        if not too_long:
            return
        i, n = too_long[0]
        name = f"{what} {labels[i] if labels is not None else i}"
        if not truncate:
            raise ValueError(f"{name} has {n} tokens, more than the {limit} the transformer reads (text_maxlen); "
                             "shorten it or pass truncate_prompts=True (--truncate-prompts) to cut it")
        warnings.warn(f"{len(too_long)} {what}(s) longer than {limit} tokens ({name}: {n} tokens) are cut to "
                      f"{limit} tokens", PromptTruncatedWarning, stacklevel=3)

    def encode_prompt(self, prompts: Union[str, Sequence[str]], truncate_prompts: bool = False) -> TextFeatures:
        """Packed text features of ``prompts`` on the execution device (see :meth:`check_prompts`).

        Each distinct prompt is encoded on its own, so a prompt's features never depend on which
        other prompts share the call (padding changes the encoder's rounding).
        """
        prompts = _as_list(prompts, "prompts")
        self.check_prompts(prompts, truncate_prompts)
        return self._encode(prompts)

    def _encode(self, prompts: List[str]) -> TextFeatures:
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass TextFeatures as prompt_embeds")
        unique = list(dict.fromkeys(prompts))
        with self.on_device(self.text_encoder), _text_limit(self.text_encoder, self.text_length):
            rows = {p: self.text_encoder.encode([p]).kv_compact.float() for p in unique}
        return TextFeatures.pack([rows[p].to(self.device) for p in prompts])

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: Prompts = None, negative_prompt: Prompts = None, *,
                 seed: Union[None, int, Sequence[int]] = None,
                 generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                 aspect_ratio: Union[float, Sequence[float]] = 1.0, resolution: Any = None,
                 num_images_per_prompt: int = 1, batch_size: Optional[int] = 1,
                 sampling: Optional[SamplingConfig] = None, output_type: str = "pil", return_bits: bool = False,
                 return_progression: bool = False, progress: Optional[bool] = None, truncate_prompts: bool = False,
                 hooks: Sequence[Any] = (), prompt_embeds: Optional[TextFeatures] = None,
                 negative_prompt_embeds: Optional[TextFeatures] = None, **options: Any) -> InfinityPipelineOutput:
        """Generate images for ``prompts``; every argument is checked before any work.

        Args:
            prompts: one prompt or a list (or ``prompt_embeds``: precomputed text features).
            negative_prompt: None (the learned null condition), one shared string or one per prompt
                (or ``negative_prompt_embeds``).
            seed: base seed (image i uses ``seed + i``) or one seed per image; None draws one from
                torch's global generator (so ``torch.manual_seed`` makes calls repeatable).
            generator: instead of seeds, one generator per image (a list), or one generator for
                the whole call (see the module docstring); on the pipeline's device.
            aspect_ratio: h/w (mapped to the nearest template), or one per prompt.
            resolution: pixel budget, pixel size or schedule; None = the pipeline's.
            num_images_per_prompt: images per prompt (prompt-major order).
            batch_size: images per transformer batch (None: all images of one schedule at once).
            sampling / options: the :class:`SamplingConfig` (default the pipeline's) and field
                overrides: ``cfg=``, ``tau=``, ``top_k=``, ``top_p=`` or any other field.
            output_type: "pil", "np", "pt" or "tensor" (see the module docstring).
            return_bits / return_progression: also return the bit labels / the image after each scale.
            progress: the progress bar (None: on when stderr is a terminal).
            truncate_prompts: cut prompts longer than :attr:`text_length` tokens (with one
                warning) instead of raising an error naming the prompt.
            hooks: sampling hooks (see :mod:`infinity_lightning.sampling`).

        Returns an :class:`InfinityPipelineOutput` (also the sequence of its images).
        """
        check_output_type(output_type)
        if prompt_embeds is None:
            prompts = _as_list(prompts, "prompts")
        n_prompts = len(prompts) if prompt_embeds is None else len(prompt_embeds)
        negs = self._negatives(negative_prompt, n_prompts) if negative_prompt_embeds is None else None
        plan = plan_call(self.schedule_for, self.device, n_prompts, seed, generator, aspect_ratio, resolution,
                         num_images_per_prompt, batch_size, (sampling or self.sampling).replace(**options))
        self._check_text(prompts, negs, prompt_embeds, negative_prompt_embeds, truncate_prompts)
        text = prompt_embeds.to(self.device) if prompt_embeds is not None else self._encode(prompts)
        neg = negative_prompt_embeds.to(self.device) if negative_prompt_embeds is not None else (
            self._encode(negs) if negs is not None else None)
        if neg is not None and len(neg) == 1 and n_prompts > 1:
            neg = neg.select([0] * n_prompts)
        bar = self._progress_bar(plan, progress)
        hooks = list(hooks) + ([progress_hook(bar)] if bar is not None else [])
        decoded: Dict[int, torch.Tensor] = {}
        bits: Dict[int, List[torch.Tensor]] = {}
        steps: Dict[int, List[torch.Tensor]] = {}
        try:
            for members in plan.batches:
                images, labels, frames = self._sample_batch(members, plan, text, neg, hooks, return_progression)
                for j, i in enumerate(members):
                    decoded[i], bits[i] = images[j], [b[j:j + 1] for b in labels]
                    steps[i] = [f[j] for f in frames]
        finally:
            if bar is not None:
                bar.close()
        n = len(plan.owner)
        return InfinityPipelineOutput(
            images=to_output([decoded[i] for i in range(n)], output_type), seeds=plan.seeds, sampling=plan.config,
            schedules=plan.schedules, bit_labels=[bits[i] for i in range(n)] if return_bits else None,
            progression=[to_output(steps[i], output_type) for i in range(n)] if return_progression else None)

    def _negatives(self, negative_prompt: Prompts, n_prompts: int) -> Optional[List[str]]:
        negs = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negs is None:
            return None
        if len(negs) not in (1, n_prompts):
            raise ValueError(f"{len(negs)} negative prompts for {n_prompts} prompts; give one or one per prompt")
        return negs

    def _check_text(self, prompts, negs, prompt_embeds, negative_prompt_embeds, truncate: bool) -> None:
        limit = int(self.transformer.config.text_maxlen)
        for what, feats in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if feats is not None and max(feats.lens, default=0) > limit:
                i = max(range(len(feats)), key=lambda k: feats.lens[k])
                raise ValueError(f"{what} {i} has {feats.lens[i]} rows, more than text_maxlen={limit}")
        if prompt_embeds is None:
            self.check_prompts(prompts, truncate)
        if negs is not None:
            self.check_prompts(negs, truncate, what="negative prompt")

    def _progress_bar(self, plan: CallPlan, progress: Optional[bool]):
        if progress is False:
            return None
        from tqdm.auto import tqdm

        total = sum(len(plan.schedules[b[0]]) for b in plan.batches)
        return tqdm(total=total, desc="scales", unit="scale", disable=None if progress is None else False)

    def _sample_batch(self, members: List[int], plan: CallPlan, text: TextFeatures, neg: Optional[TextFeatures],
                      hooks: List[Any], return_progression: bool):
        """One sampling call for the images ``members`` (one schedule): decoded images (B, 3, H, W)
        in [-1, 1], bit labels per scale (B, 1, h, w, d) and, with progression, per scale (B, 3, H, W)."""
        schedule, rows = plan.schedules[members[0]], [plan.owner[i] for i in members]
        gens, config = plan.generators, plan.config
        gens = gens if isinstance(gens, torch.Generator) else [gens[i] for i in members]
        with self.on_device(self.transformer), self.autocast():
            out = generate(self.transformer, text.select(rows), schedule, config, generator=gens, hooks=hooks,
                           negative_text=neg.select(rows) if neg is not None else None)
        with self.on_device(self.tokenizer), self.autocast():
            images = self.tokenizer.decode(out.summed_codes.to(self.device), dtype=config.decode_dtype,
                                           channels_last=config.decode_channels_last).float().cpu()
            frames = [self.tokenizer.decode_from_bits([b.to(self.device) for b in out.bit_labels[:k]],
                                                      schedule.tokenizer_side).float().cpu()
                      for k in range(1, len(schedule) + 1)] if return_progression else []
        return images, [b.cpu() for b in out.bit_labels], frames

    # ---- editing (infinity_lightning.editing) -------------------------------------------------
    def inpaint(self, prompt: Prompts, image: Any, mask: Any, **kwargs: Any) -> "editing.EditOutput":
        """Regenerate the masked region of ``image`` (white / True = regenerate) for ``prompt``; the
        tokens outside keep the image's bits exactly.  ``kwargs``: those of
        :func:`~infinity_lightning.editing.inpaint` (``seed``, ``grow``, ``blend``, ``feather``,
        ``keep_scales``, ``cfg``, ``tau``, ``output_type``, ...).  Returns an ``EditOutput``."""
        return editing.inpaint(self, prompt, image, mask, **kwargs)

    def outpaint(self, prompt: Prompts, image: Any, aspect_ratio: float, **kwargs: Any) -> "editing.EditOutput":
        """Extend ``image`` to the canvas of the aspect-ratio template ``aspect_ratio`` (h/w); the
        new area is generated (:func:`~infinity_lightning.editing.outpaint`)."""
        return editing.outpaint(self, prompt, image, aspect_ratio, **kwargs)

    def variations(self, image: Any, prompt: Prompts = "", keep_scales: Optional[int] = None,
                   **kwargs: Any) -> "editing.EditOutput":
        """Images keeping the first ``keep_scales`` scales of ``image``'s bits (None: half of them)
        and sampling the rest (:func:`~infinity_lightning.editing.variations`)."""
        return editing.variations(self, image, prompt, keep_scales, **kwargs)

    def generate_per_scale(self, prompt: str, **kwargs: Any) -> Any:
        """The images after 1, 2, ..., K scales for one prompt (``kwargs`` as :meth:`__call__`):
        each is the decoder applied to the sum of the first k scales' codes."""
        return self(prompt, **{**kwargs, "return_progression": True}).progression[0]

    def __repr__(self) -> str:
        cfg, width = self.transformer.config, getattr(self.text_encoder, "width", None)
        sampling = self.sampling.to_dict(only=("cfg", "tau", "top_k", "top_p"))
        from .lora import lora_configs

        adapters = f", LoRA adapters {list(lora_configs(self.transformer))}" if lora_configs(self.transformer) else ""
        return (f"InfinityPipeline(transformer depth {cfg.depth} x {cfg.embed_dim}, tokenizer "
                f"d{self.tokenizer.config.codebook_dim}, text encoder width {width}, device {self.device}, "
                f"dtype {self.dtype}, resolution {self.resolution!r}, sampling {sampling}{adapters})")

"""Image editing by scale-wise bit forcing: inpainting, outpainting and variations.

An image is encoded to per-scale bit labels exactly as in training: the tokenizer's encoder, then
the multi-scale residual BSQ over the tokenizer side of the scale schedule (doubled grids with 2x2
patchify).  Generation then runs as usual (cfg, tau, top-k, top-p, one random stream per image),
except that a :class:`~infinity_lightning.sampling.ForceBits` hook replaces the sampled bits of
chosen tokens by the image's:

* :func:`inpaint`: at every scale, a token whose cell holds no masked pixel keeps the image's bits;
  the others are sampled.  The sampled tokens see the kept ones of their own and of every coarser
  scale through the KV cache, so the new content is generated in the context of the image.
* :func:`outpaint`: the image is placed on the canvas of a wider or taller aspect-ratio template;
  the new area is the mask of an inpainting.
* :func:`variations`: the first ``keep_scales`` scales are the image's (layout and colours), the
  later ones are sampled; ``keep_scales = 0`` is text-to-image generation, ``keep_scales = K``
  (every scale) the tokenizer's reconstruction.

Masks: white (``True``, >= 128 for uint8) marks pixels to regenerate.  A token of scale k is
regenerated when any pixel of its cell is masked, the cell being the window the tokenizer's area
downsampling averages for that token (rows ``floor(i*H/h) .. ceil((i+1)*H/h) - 1``: max pooling).
``grow=g`` dilates every scale's token mask by ``g`` tokens (the 8-neighbourhood, ``g`` times).
A mask that marks no pixel, or that (after ``grow``) covers every token of the last scale, is an
error: nothing would be regenerated, or nothing of the image kept (:func:`variations` and
``pipe(prompt)`` do those).

Exactness: forced bits are copied, so the generated bit labels equal the image's wherever a token
is kept, at every scale and with or without patchify.  The decoded pixels outside the mask are not
the original ones: a regenerated coarse token reaches outside its cell through the bilinear
upsampling of the codes (and the decoder's receptive field), and the tokenizer's reconstruction is
lossy.  ``blend=True`` puts the original pixels back outside the mask (only when asked):
``feather=0`` gives a hard edge, ``feather=f`` ramps linearly over the ``f`` pixels next to the
mask (pixels farther than ``f`` from it are exactly the original's; the masked pixels are exactly
the generated ones).  ``keep_scales=k`` in :func:`inpaint` also forces the first ``k`` scales
everywhere, trading freedom of the coarse layout inside the mask for a more faithful outside.

Numbers: the generated images are decoded exactly as ``pipe(prompt)`` decodes them (the
generation sum of the codes, channels-last), so ``variations(keep_scales=0)`` equals
``pipe(prompt, seed=s)``.  When no bit is sampled (``keep_scales = K``) the transformer does not
run: the result is the decoder applied to the quantizer's own sum, the tokenizer's reconstruction.

The functions take an :class:`~infinity_lightning.pipeline.InfinityPipeline` (also as its methods
``pipe.inpaint``, ``pipe.outpaint``, ``pipe.variations``) and use its components, ``device``,
``sampling``, ``token_stride``, ``schedule_for``, ``encode_prompt``, ``on_device`` and
``autocast``.  They return an :class:`EditOutput`, which is also the sequence of its images.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import images as _images
from . import scales as _scales
from .outputs import check_output_type, to_output
from .sampling import ForceBits, SamplingConfig, generate, images_to_uint8

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
MaskInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Prompts = Union[str, Sequence[str]]

__all__ = ["EditOutput", "encode_image_bits", "scale_masks", "inpaint", "outpaint", "variations",
           "inpaint_from_pretrained", "template_ratio", "OUTPAINT_ANCHORS"]

#: Where :func:`outpaint` places the image on the canvas.
OUTPAINT_ANCHORS = ("center", "top", "bottom", "left", "right", "top-left", "top-right", "bottom-left",
                    "bottom-right")


@dataclasses.dataclass
class EditOutput:
    """What the editing functions return; it is also the sequence of its images (``out[0]``,
    ``len(out)``, ``for image in out``).

    ``images``: in the requested ``output_type`` (one per prompt and ``num_images_per_prompt``,
    prompt-major); ``seeds``: the seed of each image; ``sampling``: the :class:`SamplingConfig`
    used; ``schedule``: the :class:`~infinity_lightning.scales.ScaleSchedule`; ``bit_labels``: per
    image, the per-scale uint8 labels (1, 1, h, w, d) in tokenizer layout; ``image_bit_labels``:
    the source image's labels (same layout); ``keep_masks``: per scale, the bool (1, h*w, 1) token
    mask of the kept tokens (True = the image's bits; None for :func:`variations`);
    ``pixel_mask``: the bool (H, W) mask of the regenerated pixels at the output size (None for
    variations); ``source``: the source image at the output size, (1, 3, H, W) in [-1, 1];
    ``settings``: the edit's own settings (``grow``, ``blend``, ``feather``, ``keep_scales``; for
    an outpainting also ``box`` = (left, top, width, height) of the image on the canvas).
    """

    images: Any
    seeds: List[int]
    sampling: SamplingConfig
    schedule: Any
    bit_labels: List[List[torch.Tensor]]
    image_bit_labels: List[torch.Tensor]
    keep_masks: Optional[List[torch.Tensor]]
    pixel_mask: Optional[torch.Tensor]
    source: torch.Tensor
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, index):
        return self.images[index]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return iter(self.images)


# -- images and masks ------------------------------------------------------------------------
@dataclasses.dataclass
class _Source:
    """An input image at the size of the schedule: float (1, 3, H, W) in [-1, 1] and uint8 (H, W, 3)."""

    pixels: torch.Tensor
    uint8: np.ndarray


def _read_image(image: ImageInput, what: str = "image") -> Union[Image.Image, torch.Tensor]:
    """A PIL RGB image, or a float (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        return _images.load_image(image)
    if isinstance(image, Image.Image):
        return _images.to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what}: a numpy image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image, mode="RGB")
    if torch.is_tensor(image):
        x = image.detach()
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] != 3 or not x.is_floating_point():
            raise ValueError(f"{what}: a tensor image must be float (3, H, W) or (1, 3, H, W) in [-1, 1], "
                             f"got {x.dtype} {tuple(image.shape)}")
        x = x.to("cpu", torch.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{what}: tensor values must be in [-1, 1], got {lo:.3g} .. {hi:.3g} "
                             "(images.pil_to_tensor converts uint8 pixels)")
        return x
    raise TypeError(f"{what}: expected a file path, a PIL image, a uint8 (H, W, 3) array or a tensor in [-1, 1], "
                    f"got {type(image).__name__}")


def _size_of(image: Union[Image.Image, torch.Tensor]) -> Tuple[int, int]:
    """(H, W)."""
    return (image.size[1], image.size[0]) if isinstance(image, Image.Image) else tuple(image.shape[-2:])


def _cover_geometry(h: int, w: int, tgt_h: int, tgt_w: int) -> Tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of :func:`images.resize_cover_crop`: cover, then centre crop."""
    new_w, new_h = _images.cover_size(w, h, tgt_h, tgt_w)
    return new_h, new_w, (new_h - tgt_h) // 2, (new_w - tgt_w) // 2


def _fit_image(image: Union[Image.Image, torch.Tensor], tgt_h: int, tgt_w: int) -> _Source:
    """Resize and centre-crop to (tgt_h, tgt_w) (LANCZOS for PIL images, antialiased bicubic for
    tensors; an image already of that size is used as it is)."""
    if isinstance(image, Image.Image):
        fitted = _images.resize_cover_crop(image, tgt_h, tgt_w)
        return _Source(_images.pil_to_tensor(fitted)[None], np.asarray(fitted, dtype=np.uint8).copy())
    x = image
    if tuple(x.shape[-2:]) != (tgt_h, tgt_w):
        new_h, new_w, top, left = _cover_geometry(x.shape[-2], x.shape[-1], tgt_h, tgt_w)
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x[:, top:top + tgt_h, left:left + tgt_w].clamp(-1, 1)
    return _Source(x[None].contiguous(), images_to_uint8(x[None])[0].numpy())


def _read_mask(mask: MaskInput, what: str = "mask") -> torch.Tensor:
    """A bool (H, W) tensor, True = regenerate.

    PIL images are converted to "L" (>= 128 is white); bool arrays are used as they are; uint8
    arrays are thresholded at 128, other integer arrays at != 0, float arrays at >= 0.5.
    """
    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            with Image.open(path) as img:
                img.load()
                mask = img.convert("L") if img.mode not in ("1", "L") else img.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {what} {path}: {e}") from e
    if isinstance(mask, Image.Image):
        return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.uint8) >= 128)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not torch.is_tensor(mask):
        raise TypeError(f"{what}: expected a file path, a PIL image, an array or a tensor, got {type(mask).__name__}")
    m = mask.detach().cpu()
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"{what} must be one channel (H, W), got shape {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        return m.clone()
    if m.dtype == torch.uint8:
        return m >= 128
    if m.is_floating_point():
        return m >= 0.5
    return m != 0


def _fit_mask(mask: torch.Tensor, image_hw: Tuple[int, int], tgt_h: int, tgt_w: int) -> torch.Tensor:
    """The mask taken through the image's resize and crop; a pixel is masked when any mask pixel
    overlapping it is (adaptive max pooling)."""
    if tuple(mask.shape) != tuple(image_hw):
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} (width x height) differs from the image size "
                         f"{image_hw[1]}x{image_hw[0]}")
    if tuple(image_hw) == (tgt_h, tgt_w):
        return mask
    new_h, new_w, top, left = _cover_geometry(image_hw[0], image_hw[1], tgt_h, tgt_w)
    m = F.adaptive_max_pool2d(mask.float()[None, None], (new_h, new_w))[0, 0]
    return m[top:top + tgt_h, left:left + tgt_w] > 0


# -- schedules and bits ----------------------------------------------------------------------
def _grids(schedule: Sequence[Sequence[int]]) -> List[Tuple[int, int]]:
    """(h, w) of each scale of a schedule given as (1, h, w) or (h, w) grids."""
    return [tuple(int(v) for v in g)[-2:] for g in schedule]


def _tokenizer_grids(schedule: Sequence[Sequence[int]], patchify: bool) -> List[Tuple[int, int, int]]:
    """The tokenizer-side grids (1, h, w) of a token-side schedule (doubled with 2x2 patchify)."""
    f = 2 if patchify else 1
    return [(1, f * h, f * w) for h, w in _grids(schedule)]


def _patchify(pipe: Any) -> bool:
    return bool(pipe.transformer.config.apply_spatial_patchify)


def _pixel_size(pipe: Any, schedule: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """(H, W) of the image a token-side schedule describes."""
    h, w = _grids(schedule)[-1]
    return pipe.token_stride * h, pipe.token_stride * w


def _encode(tokenizer: torch.nn.Module, pixels: torch.Tensor, vae_schedule: Sequence[Sequence[int]]):
    """(summed codes (1, d, h, w), bit labels [uint8 (1, 1, h_k, w_k, d)]) of (1, 3, H, W) pixels, fp32."""
    device = next(tokenizer.parameters()).device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        raw = tokenizer.encode_raw(pixels.to(device))
        return tokenizer.quantize_multiscale(raw, vae_schedule)


def encode_image_bits(tokenizer: torch.nn.Module, image: ImageInput, schedule: Sequence[Sequence[int]],
                      patchify: bool = False) -> List[torch.Tensor]:
    """Per-scale bit labels of an image, as the tokenizer quantizes it in training.

    The image (file path, PIL image, uint8 (H, W, 3) array or float (3, H, W) tensor in [-1, 1])
    is resized to cover the schedule's pixel size and centre-cropped (:func:`images.resize_cover_crop`),
    encoded, and quantized by the multi-scale residual BSQ over the tokenizer side of
    ``schedule`` (the token-side grids ``[(1, h, w), ...]``, doubled when ``patchify``).

    Returns a list of K uint8 tensors (1, 1, h_k, w_k, d) in tokenizer (VAE) layout, what
    :class:`~infinity_lightning.sampling.ForceBits` accepts with the same ``patchify``.
    """
    vae_schedule = _tokenizer_grids(schedule, patchify)
    _, h, w = vae_schedule[-1]
    stride = int(tokenizer.config.patch_size)
    source = _fit_image(_read_image(image), stride * h, stride * w)
    return [b.cpu() for b in _encode(tokenizer, source.pixels, vae_schedule)[1]]


def scale_masks(mask: MaskInput, schedule: Sequence[Sequence[int]], grow: int = 0) -> List[torch.Tensor]:
    """Keep masks per scale for :class:`~infinity_lightning.sampling.ForceBits`.

    ``mask``: the pixel mask at the schedule's image size (PIL image, array or tensor, (H, W);
    white / True = regenerate; H and W the same multiple of the last grid's sides); ``schedule``: the
    token-side grids ``[(1, h, w), ...]``; ``grow``: dilate every scale's regenerated tokens by
    that many tokens (8-neighbourhood).

    A token of a (h, w) grid is regenerated when any pixel of its cell is masked; cell i spans
    rows ``floor(i*H/h) .. ceil((i+1)*H/h) - 1`` (the windows of the tokenizer's area
    downsampling; neighbouring cells overlap when h does not divide H).

    Returns K bool tensors (1, h_k*w_k, 1) in token layout (row-major), True where the token is
    *kept* (the image's bits are forced), False where it is regenerated.
    """
    regen = _read_mask(mask)
    grids = _grids(schedule)
    if not grids:
        raise ValueError("empty scale schedule")
    grow = _check_whole(grow, "grow", "tokens")
    H, W = regen.shape
    gh, gw = grids[-1]
    if H % gh or W % gw or H // gh != W // gw:
        raise ValueError(f"mask size {W}x{H} (width x height) is not a multiple of the schedule's last token grid "
                         f"{gw}x{gh} (square cells); give the mask at the schedule's image size")
    x = regen.float()[None, None]
    keep = []
    for h, w in grids:
        m = F.adaptive_max_pool2d(x, (h, w))
        if grow:
            m = F.max_pool2d(m, kernel_size=2 * grow + 1, stride=1, padding=grow)
        keep.append((m == 0).reshape(1, h * w, 1))
    return keep


# -- running ---------------------------------------------------------------------------------
def _sampling(pipe: Any, sampling: Optional[SamplingConfig], **options: Any) -> SamplingConfig:
    """The call's sampler options: ``sampling`` (default the pipeline's) with non-None overrides."""
    return (sampling or pipe.sampling).replace(**options)


def _prompt_list(prompt: Prompts, what: str = "prompt") -> List[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what}: give a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _seeds(seed: Union[None, int, Sequence[int]], n: int) -> List[int]:
    """Image i uses ``seed + i`` (or ``seed[i]``); None draws a base from torch's global generator."""
    if seed is None:
        base = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        return [base + i for i in range(n)]
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    return seeds


def _check_common(output_type: str, num_images_per_prompt: int) -> None:
    check_output_type(output_type)
    if isinstance(num_images_per_prompt, bool) or int(num_images_per_prompt) != num_images_per_prompt \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt!r}")


def _generate_forced(pipe: Any, prompts: List[str], negative_prompt: Optional[Prompts], schedule: Any,
                     seeds: List[int], config: SamplingConfig, bits: List[torch.Tensor],
                     keep: Optional[List[torch.Tensor]], truncate_prompts: bool
                     ) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
    """Generate one image per prompt, each alone with its own generator (as ``pipe(prompt,
    seed=s)``), the given bits forced.

    ``bits``: the first len(bits) scales' labels (VAE layout) to force; ``keep``: per scale the
    token keep masks (None: force the given scales everywhere).  Returns the decoded images
    (1, 3, H, W) on the CPU and the generated bit labels per image.
    """
    text = pipe.encode_prompt(prompts, truncate_prompts=truncate_prompts)
    neg = None
    if negative_prompt is not None:
        negs = _prompt_list(negative_prompt, "negative_prompt")
        if len(negs) not in (1, len(prompts)):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} images; give one or one per prompt")
        neg = pipe.encode_prompt(negs * len(prompts) if len(negs) == 1 else negs, truncate_prompts=truncate_prompts)
    patchify = _patchify(pipe)
    decoded, labels = [], []
    for i, s in enumerate(seeds):
        hooks = [ForceBits(bits, mask=keep, patchify=patchify)] if bits else []
        generator = torch.Generator(device=pipe.device).manual_seed(int(s))
        with pipe.on_device(pipe.transformer), pipe.autocast():
            out = generate(pipe.transformer, text.select([i]), schedule, config, generator=[generator], hooks=hooks,
                           negative_text=neg.select([i]) if neg is not None else None)
        with pipe.on_device(pipe.tokenizer), pipe.autocast():
            decoded.append(pipe.tokenizer.decode(out.summed_codes.to(pipe.device), dtype=config.decode_dtype,
                                                 channels_last=config.decode_channels_last).float().cpu())
        labels.append([b.cpu() for b in out.bit_labels])
    return decoded, labels


def _feathered(regen: torch.Tensor, feather: int) -> torch.Tensor:
    """Blend weight of the generated image, (H, W) float: 1 on the mask, ``(f - j + 1) / (f + 1)``
    at Chebyshev distance j <= f from it, 0 farther away."""
    m = regen.float()[None, None]
    total, cur = m.clone(), m
    for _ in range(int(feather)):
        cur = F.max_pool2d(cur, kernel_size=3, stride=1, padding=1)
        total = total + cur
    return (total / (int(feather) + 1))[0, 0]


def _outputs(decoded: List[torch.Tensor], output_type: str, source: _Source, alpha: Optional[torch.Tensor]):
    """Decoder outputs (1, 3, H, W) in [-1, 1] -> the requested type, blended with the source when
    ``alpha`` (the generated image's weight, (H, W)) is given: in float for "tensor"/"pt", on the
    uint8 pixels (the source's own, exactly) for "pil"/"np"."""
    if alpha is None:
        return to_output([d[0] for d in decoded], output_type)
    x = torch.cat(decoded)
    if output_type in ("tensor", "pt"):
        x = alpha * x + (1 - alpha) * source.pixels
        return x if output_type == "tensor" else (x + 1) / 2
    pixels = images_to_uint8(x).numpy()
    a = alpha.numpy()[None, :, :, None].astype(np.float64)
    mixed = np.rint(a * pixels + (1 - a) * source.uint8[None]).astype(np.uint8)
    pixels = np.where(a == 0, source.uint8[None], np.where(a == 1, pixels, mixed))
    if output_type == "np":
        return pixels
    return [Image.fromarray(p) for p in pixels]


def _check_whole(value: Any, name: str, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a whole number of {unit} >= 0, got {value!r}")
    return int(value)


def _check_keep_scales(keep_scales: Any, K: int) -> int:
    if isinstance(keep_scales, bool) or not isinstance(keep_scales, (int, np.integer)) or not 0 <= keep_scales <= K:
        raise ValueError(f"keep_scales {keep_scales!r} is out of range: this {K}-scale schedule allows 0..{K}")
    return int(keep_scales)


# -- inpainting ------------------------------------------------------------------------------
def inpaint(pipe: Any, prompt: Prompts, image: ImageInput, mask: MaskInput, *, grow: int = 0, blend: bool = False,
            feather: int = 0, keep_scales: int = 0, seed: Union[None, int, Sequence[int]] = None,
            negative_prompt: Optional[Prompts] = None, cfg: Any = None, tau: Any = None, top_k: Optional[int] = None,
            top_p: Optional[float] = None, resolution: Any = None, num_images_per_prompt: int = 1,
            output_type: str = "pil", truncate_prompts: bool = False, sampling: Optional[SamplingConfig] = None,
            **options: Any) -> EditOutput:
    """Regenerate the masked region of ``image`` for ``prompt``; the rest keeps the image's bits.

    Args:
        pipe: an :class:`~infinity_lightning.pipeline.InfinityPipeline`.
        prompt: one prompt or a list (one image per prompt and ``num_images_per_prompt``).
        image: file path, PIL image, uint8 (H, W, 3) array or float (3, H, W) tensor in [-1, 1];
            resized to cover the schedule's pixel size and centre-cropped.
        mask: same size as ``image`` (PIL image / path: white = regenerate; bool array or tensor:
            True = regenerate); taken through the same resize and crop.
        grow: dilate the regenerated tokens of every scale by this many tokens.
        blend: paste the original pixels back outside the mask (``feather`` pixels of linear ramp;
            0 = hard edge); off by default, so every pixel is the decoder's.
        keep_scales: also force the first ``keep_scales`` scales everywhere (0 = the mask decides
            at every scale).
        seed: image i uses ``seed + i`` (or ``seed[i]``); None draws one.
        negative_prompt: None (the learned null condition), one string or one per prompt.
        cfg, tau, top_k, top_p, sampling, options: the sampler's settings, as for ``pipe(...)``
            (``sampling`` default the pipeline's; the others override its fields).
        resolution: pixel budget, pixel size or schedule (None: the pipeline's), at the template
            nearest the image's aspect ratio (``pipe.schedule_for``).
        output_type: "pil", "np", "pt" or "tensor", as for ``pipe(...)``.

    Returns an :class:`EditOutput`.  Raises ``ValueError`` when the mask's size differs from the
    image's, marks no pixel, or covers every token of the last scale (see the module docstring).
    """
    config = _sampling(pipe, sampling, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, **options)
    _check_common(output_type, num_images_per_prompt)
    prompts = _prompt_list(prompt)
    img = _read_image(image)
    regen = _read_mask(mask)
    h0, w0 = _size_of(img)
    sched = pipe.schedule_for(h0 / w0, resolution)
    H, W = _pixel_size(pipe, sched)
    pixel_mask = _fit_mask(regen, (h0, w0), H, W)
    source = _fit_image(img, H, W)
    return _inpaint_prepared(pipe, prompts, source, pixel_mask, sched, config, grow=grow, blend=blend,
                             feather=feather, keep_scales=keep_scales, seed=seed, negative_prompt=negative_prompt,
                             num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                             truncate_prompts=truncate_prompts, extra={})


def _inpaint_prepared(pipe: Any, prompts: List[str], source: _Source, pixel_mask: torch.Tensor, sched: Any,
                      config: SamplingConfig, *, grow: int, blend: bool, feather: int, keep_scales: int, seed: Any,
                      negative_prompt: Any, num_images_per_prompt: int, output_type: str, truncate_prompts: bool,
                      extra: Dict[str, Any]) -> EditOutput:
    """Inpaint with the source and the pixel mask already at the schedule's pixel size."""
    K = len(sched)
    keep_scales = _check_keep_scales(keep_scales, K)
    grow, feather = _check_whole(grow, "grow", "tokens"), _check_whole(feather, "feather", "pixels")
    if not bool(pixel_mask.any()):
        raise ValueError("the mask marks no pixel to regenerate (white / True = regenerate): nothing would change; "
                         "variations(keep_scales=<number of scales>) gives the tokenizer's reconstruction")
    keep = scale_masks(pixel_mask, sched, grow=grow)
    if not bool(keep[-1].any()):
        raise ValueError(f"the mask (grow={grow}) covers every token of the last scale: nothing of the image would be "
                         "kept; use pipe(prompt) for text-to-image generation, or a smaller mask or grow")
    for k in range(keep_scales):
        keep[k] = torch.ones_like(keep[k])
    all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    seeds = _seeds(seed, len(all_prompts))
    _, image_bits = _encode(pipe.tokenizer, source.pixels, _tokenizer_grids(sched, _patchify(pipe)))
    image_bits = [b.cpu() for b in image_bits]
    decoded, labels = _generate_forced(pipe, all_prompts, negative_prompt, sched, seeds, config, image_bits, keep,
                                       truncate_prompts)
    images = _outputs(decoded, output_type, source, _feathered(pixel_mask, feather) if blend else None)
    settings = dict(grow=grow, blend=bool(blend), feather=feather, keep_scales=keep_scales, **extra)
    return EditOutput(images=images, seeds=seeds, sampling=config, schedule=sched, bit_labels=labels,
                      image_bit_labels=image_bits, keep_masks=keep, pixel_mask=pixel_mask, source=source.pixels,
                      settings=settings)


# -- outpainting -----------------------------------------------------------------------------
def template_ratio(aspect_ratio: Any) -> float:
    """The template ratio (h/w) that ``aspect_ratio`` names (within 1%: ``2 / 3`` is ``0.666``), or
    a ``ValueError`` listing the templates."""
    try:
        ratio = float(aspect_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"aspect_ratio must be a number (height / width), got {aspect_ratio!r}") from None
    if ratio > 0:
        nearest = _scales.nearest_template(ratio)
        if abs(nearest - ratio) <= 0.01 * nearest:
            return nearest
    raise ValueError(f"aspect_ratio {aspect_ratio!r} (height / width) is not a template ratio; choose one of "
                     f"{sorted(_scales.TEMPLATE_RATIOS)}")


def _placement(h: int, w: int, H: int, W: int, stride: int, anchor: str) -> Tuple[int, int, int, int]:
    """(left, top, width, height) of an h x w image scaled to fit a W x H canvas, sides and offsets
    in whole tokens (``stride`` px) so that no token straddles the image's edge."""
    scale = min(H / h, W / w)
    ph = min(H, max(stride, int(round(h * scale)) // stride * stride))
    pw = min(W, max(stride, int(round(w * scale)) // stride * stride))
    vertical = "top" if "top" in anchor else "bottom" if "bottom" in anchor else "center"
    horizontal = "left" if "left" in anchor else "right" if "right" in anchor else "center"
    top = {"top": 0, "bottom": H - ph, "center": (H - ph) // 2 // stride * stride}[vertical]
    left = {"left": 0, "right": W - pw, "center": (W - pw) // 2 // stride * stride}[horizontal]
    return left, top, pw, ph


def outpaint(pipe: Any, prompt: Prompts, image: ImageInput, aspect_ratio: float, *, anchor: str = "center",
             grow: int = 0, blend: bool = False, feather: int = 0, keep_scales: int = 0,
             seed: Union[None, int, Sequence[int]] = None, negative_prompt: Optional[Prompts] = None, cfg: Any = None,
             tau: Any = None, top_k: Optional[int] = None, top_p: Optional[float] = None, resolution: Any = None,
             num_images_per_prompt: int = 1, output_type: str = "pil", truncate_prompts: bool = False,
             sampling: Optional[SamplingConfig] = None, **options: Any) -> EditOutput:
    """Extend ``image`` to the canvas of the aspect-ratio template ``aspect_ratio`` (height / width).

    The canvas is the template's schedule at ``resolution`` (None: the pipeline's).  The image is
    scaled to fit inside it with its own aspect ratio, its sides and position snapped to whole
    tokens, and placed at ``anchor`` (one of :data:`OUTPAINT_ANCHORS`); the rest of the canvas is
    filled with the image's mean colour and is the mask of an :func:`inpaint` (the other arguments
    are its own).  ``settings["box"]`` of the result is (left, top, width, height) of the image.

    Raises ``ValueError`` for a ratio that is not a template (the list is in the message), an
    unknown anchor, or an image that already fills the canvas.
    """
    ratio = template_ratio(aspect_ratio)
    if anchor not in OUTPAINT_ANCHORS:
        raise ValueError(f"anchor {anchor!r}: expected one of {OUTPAINT_ANCHORS}")
    config = _sampling(pipe, sampling, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, **options)
    _check_common(output_type, num_images_per_prompt)
    prompts = _prompt_list(prompt)
    img = _read_image(image)
    sched = pipe.schedule_for(ratio, resolution)
    H, W = _pixel_size(pipe, sched)
    h, w = _size_of(img)
    left, top, pw, ph = _placement(h, w, H, W, pipe.token_stride, anchor)
    if (pw, ph) == (W, H):
        raise ValueError(f"the image ({w}x{h}) already fills the {W}x{H} canvas of aspect ratio {ratio}; "
                         "choose a template ratio farther from the image's")
    placed = _fit_image(img, ph, pw)
    canvas = placed.pixels.mean(dim=(2, 3), keepdim=True).expand(1, 3, H, W).clone()
    canvas[:, :, top:top + ph, left:left + pw] = placed.pixels
    canvas_u8 = images_to_uint8(canvas)[0].numpy().copy()
    canvas_u8[top:top + ph, left:left + pw] = placed.uint8
    regen = torch.ones(H, W, dtype=torch.bool)
    regen[top:top + ph, left:left + pw] = False
    return _inpaint_prepared(pipe, prompts, _Source(canvas, canvas_u8), regen, sched, config, grow=grow, blend=blend,
                             feather=feather, keep_scales=keep_scales, seed=seed, negative_prompt=negative_prompt,
                             num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                             truncate_prompts=truncate_prompts,
                             extra={"box": (left, top, pw, ph), "aspect_ratio": ratio, "anchor": anchor})


# -- variations ------------------------------------------------------------------------------
def variations(pipe: Any, image: ImageInput, prompt: Prompts = "", keep_scales: Optional[int] = None, *,
               seed: Union[None, int, Sequence[int]] = None, negative_prompt: Optional[Prompts] = None,
               cfg: Any = None, tau: Any = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
               resolution: Any = None, num_images_per_prompt: int = 1, output_type: str = "pil",
               truncate_prompts: bool = False, sampling: Optional[SamplingConfig] = None,
               **options: Any) -> EditOutput:
    """Images that keep the first ``keep_scales`` scales of ``image``'s bits and sample the rest.

    ``keep_scales`` (0..K for a K-scale schedule; None: K // 2) sets how close the results stay:
    the coarse scales carry layout and colours, the fine ones detail.  0 is text-to-image
    generation (``pipe(prompt, seed=s)`` exactly); K samples nothing and returns the tokenizer's
    reconstruction without running the transformer.  ``prompt`` ("" by default) conditions the
    sampled scales.  The other arguments are those of :func:`inpaint`; returns an :class:`EditOutput`.
    """
    config = _sampling(pipe, sampling, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, **options)
    _check_common(output_type, num_images_per_prompt)
    prompts = _prompt_list(prompt)
    img = _read_image(image)
    h0, w0 = _size_of(img)
    sched = pipe.schedule_for(h0 / w0, resolution)
    K = len(sched)
    keep_scales = K // 2 if keep_scales is None else _check_keep_scales(keep_scales, K)
    H, W = _pixel_size(pipe, sched)
    source = _fit_image(img, H, W)
    summed, image_bits = _encode(pipe.tokenizer, source.pixels, _tokenizer_grids(sched, _patchify(pipe)))
    image_bits = [b.cpu() for b in image_bits]
    all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    seeds = _seeds(seed, len(all_prompts))
    if keep_scales == K:
        # nothing to sample: the decoder on the quantizer's own sum (the tokenizer's reconstruction)
        with pipe.on_device(pipe.tokenizer), pipe.autocast():
            recon = pipe.tokenizer.decode(summed.to(pipe.device), dtype=config.decode_dtype,
                                          channels_last=config.decode_channels_last).float().cpu()
        decoded, labels = [recon.clone() for _ in seeds], [list(image_bits) for _ in seeds]
    else:
        decoded, labels = _generate_forced(pipe, all_prompts, negative_prompt, sched, seeds, config,
                                           image_bits[:keep_scales], None, truncate_prompts)
    return EditOutput(images=_outputs(decoded, output_type, source, None), seeds=seeds, sampling=config,
                      schedule=sched, bit_labels=labels, image_bit_labels=image_bits, keep_masks=None,
                      pixel_mask=None, source=source.pixels, settings={"keep_scales": keep_scales})


# -- from a folder ---------------------------------------------------------------------------
def inpaint_from_pretrained(pipeline: Any, prompt: Prompts, image: ImageInput, mask: MaskInput, *,
                            device: Any = None, dtype: Any = None, **kwargs: Any) -> EditOutput:
    """:func:`inpaint` with the pipeline loaded from a folder (or an already built pipeline).

    ``pipeline``: a pipeline folder (any layout :meth:`InfinityPipeline.from_pretrained` reads)
    or an :class:`InfinityPipeline`; ``device`` (default: CPU) and ``dtype`` apply when loading;
    ``kwargs``: the keywords of :func:`inpaint`.
    """
    if isinstance(pipeline, (str, os.PathLike)):
        from .pipeline import InfinityPipeline

        pipeline = InfinityPipeline.from_pretrained(pipeline, device=device or "cpu", dtype=dtype)
    return inpaint(pipeline, prompt, image, mask, **kwargs)

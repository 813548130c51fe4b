"""``infinity-lightning inpaint``: regenerate the masked region of images (or outpaint them).

Examples::

    infinity-lightning inpaint --pipeline weights/ --image photo.png --mask mask.png \\
        --prompt "a red apple on the table" --seed 1 --out edited.png
    infinity-lightning inpaint --pipeline weights/ --image a.png --image b.png --mask mask.png \\
        --prompt "a dog" --grow 1 --blend --feather 8 --out edited/
    infinity-lightning inpaint --pipeline weights/ --image photo.png --outpaint 0.5 --anchor left \\
        --prompt "a wide beach" --out wide.png

``--lora FOLDER`` (repeatable) loads LoRA adapters (PEFT folders, e.g. the ``<output_dir>/lora``
of a ``fit`` with ``model.lora``) into the transformer first.

The mask (white = regenerate) has the size of the image it applies to; one ``--mask`` serves
every image, or give one per ``--image`` in the same order.  ``--outpaint RATIO`` replaces the
mask: the image is placed on the canvas of the aspect-ratio template RATIO (height / width) and
the new area is generated.  Image i of the call (in the order given; with ``--num-images N``,
N per image) uses seed ``--seed + i``.

``--out`` is a file (one image, one output: ``.png``, ``.jpg``, ``.webp``) or a folder
(``<image name>.png``, ``<image name>_<j>.png`` with several per image).  Beside each output a
``.json`` records the prompt, seed, settings and inputs.  Arguments are checked before anything
is loaded (missing files are named); an image that cannot be read or does not fit its mask is
skipped, reported on stderr and in the summary printed last (JSON), and the exit code is 1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``inpaint``."""
    add_common_arguments(parser)
    e = parser.add_argument_group("inpainting")
    e.add_argument("--mask", action="append", default=[], metavar="MASK",
                   help="mask image, white = regenerate (one for every image, or one per --image)")
    e.add_argument("--outpaint", type=float, metavar="RATIO",
                   help="instead of a mask: extend the image to the aspect-ratio template RATIO (height / width)")
    e.add_argument("--anchor", default="center", help="where --outpaint places the image (center, top, bottom, left, "
                                                      "right, top-left, top-right, bottom-left, bottom-right)")
    e.add_argument("--grow", type=int, default=0, help="dilate the regenerated tokens of every scale by N tokens")
    e.add_argument("--blend", action="store_true", help="paste the original pixels back outside the mask")
    e.add_argument("--feather", type=int, default=0, help="with --blend: linear ramp over N pixels at the mask edge")
    e.add_argument("--keep-scales", type=int, default=0,
                   help="also keep the image's first K scales everywhere (default 0: the mask decides)")


def add_common_arguments(parser: argparse.ArgumentParser, prompt_default: Optional[str] = None) -> None:
    """Options shared by ``inpaint`` and ``variations``."""
    src = parser.add_argument_group("model")
    src.add_argument("--pipeline", required=True, help="pipeline folder (released or generic layout) or Hub repo id")
    src.add_argument("--device", default="cpu", help="torch device (default cpu)")
    src.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="transformer/decoder precision")
    src.add_argument("--lora", action="append", default=[], metavar="FOLDER",
                     help="LoRA adapter folder to load into the transformer (repeatable)")

    io = parser.add_argument_group("input and output")
    io.add_argument("--image", action="append", default=[], required=True, metavar="IMAGE",
                    help="input image (repeatable)")
    io.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                    help="output image file (one output) or folder")
    io.add_argument("--overwrite", action="store_true", help="replace existing output files")

    s = parser.add_argument_group("sampling (defaults: the pipeline's settings)")
    if prompt_default is None:
        s.add_argument("--prompt", required=True, help="text for the regenerated content")
    else:
        s.add_argument("--prompt", default=prompt_default, help=f"text for the sampled scales (default {prompt_default!r})")
    s.add_argument("--negative-prompt", help="negative prompt")
    s.add_argument("--seed", type=int, default=0, help="output i uses seed + i")
    s.add_argument("--num-images", type=int, default=1, help="outputs per input image")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    s.add_argument("--tau", type=float, help="temperature")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--resolution", help="0.06M, 0.25M, 0.60M, 1M or a pixel size (default: the pipeline's)")


# -- validation --------------------------------------------------------------------------------
def fail(command: str, message: str) -> SystemExit:
    """The error for a bad argument (``<command>: <message>`` on stderr, exit code 1), as ``generate``."""
    return SystemExit(f"{command}: {message}")


def _looks_like_repo_id(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None


def check_common(command: str, args: argparse.Namespace) -> None:
    """Checks of the shared options that need no model; raises :func:`fail`'s SystemExit."""
    pipeline = Path(args.pipeline).expanduser()
    if pipeline.exists() and not pipeline.is_dir():
        raise fail(command, f"--pipeline {args.pipeline} is a file; give the pipeline folder")
    if not pipeline.exists() and not _looks_like_repo_id(args.pipeline):
        raise fail(command, f"--pipeline folder not found: {args.pipeline}")
    missing = [p for p in args.image if not Path(p).is_file()]
    if missing:
        raise fail(command, f"image file(s) not found: {', '.join(missing)}")
    missing = [p for p in args.lora if not Path(p).is_dir()]
    if missing:
        raise fail(command, f"--lora folder(s) not found: {', '.join(missing)} (an adapter is a folder with "
                            "adapter_config.json and adapter_model.safetensors)")
    if args.num_images < 1:
        raise fail(command, f"--num-images must be >= 1, got {args.num_images}")
    if args.tau is not None and not args.tau > 0:
        raise fail(command, f"--tau must be > 0, got {args.tau}")
    if args.cfg is not None and not args.cfg >= 0:
        raise fail(command, f"--cfg must be >= 0, got {args.cfg}")
    if args.top_k is not None and args.top_k < 0:
        raise fail(command, f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        raise fail(command, f"--top-p must be in [0, 1], got {args.top_p}")
    if args.resolution is not None:
        args.resolution = parse_resolution(command, args.resolution)
    outputs = output_paths(command, args)
    if not args.overwrite:
        existing = [str(p) for group in outputs for p in group if p.exists()]
        if existing:
            raise fail(command, f"output file(s) exist (pass --overwrite to replace them): {', '.join(existing[:5])}")
    args._outputs = outputs


def parse_resolution(command: str, value: str) -> Any:
    from ..scales import PIXEL_BUDGETS

    if value in PIXEL_BUDGETS:
        return value
    try:
        size = int(value.lower().removesuffix("px"))
    except ValueError:
        raise fail(command, f"--resolution {value!r}: expected one of {sorted(PIXEL_BUDGETS)} or a pixel size") from None
    if size <= 0:
        raise fail(command, f"--resolution {value!r}: the pixel size must be positive")
    return size


def output_paths(command: str, args: argparse.Namespace) -> List[List[Path]]:
    """Per input image, its output files (``--num-images`` of them)."""
    out = Path(args.out)
    n_out = len(args.image) * args.num_images
    if out.suffix.lower() in IMAGE_SUFFIXES:
        if n_out > 1:
            raise fail(command, f"--out {args.out} is a file, but the call writes {n_out} images; give a folder")
        return [[out]]
    if out.exists() and not out.is_dir():
        raise fail(command, f"--out {args.out} exists and is not a folder")
    used: Dict[str, int] = {}
    paths = []
    for image in args.image:
        stem = Path(image).stem or "image"
        used[stem] = used.get(stem, 0) + 1
        if used[stem] > 1:
            stem = f"{stem}-{used[stem]}"
        names = [f"{stem}.png"] if args.num_images == 1 else [f"{stem}_{j}.png" for j in range(args.num_images)]
        paths.append([out / n for n in names])
    return paths


# -- running -----------------------------------------------------------------------------------
def load_pipeline(args: argparse.Namespace):
    from ..pipeline import InfinityPipeline

    return InfinityPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype,
                                            lora=list(args.lora) or None)


def check_keep_scales(command: str, args: argparse.Namespace, pipe: Any) -> None:
    """``--keep-scales`` against the longest schedule at ``--resolution`` (any aspect ratio); an
    image whose own schedule is shorter is skipped with the range in the report."""
    import warnings

    from .. import scales

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            longest = max(len(pipe.schedule_for(r, args.resolution)) for r in scales.TEMPLATE_RATIOS)
    except ValueError as e:
        raise fail(command, f"--resolution: {e}") from None
    if args.keep_scales > longest:
        raise fail(command, f"--keep-scales {args.keep_scales} is out of range: the schedules at this resolution have "
                            f"at most {longest} scales (0..{longest})")


def save_outputs(paths: Sequence[Path], images: Sequence[Any], records: Sequence[Dict[str, Any]]) -> List[str]:
    """Write each image (PNG/JPEG/WebP by suffix) and a ``.json`` record beside it, atomically."""
    from ..io import atomic_write

    written = []
    for path, image, record in zip(paths, images, records):
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format=fmt))
        atomic_write(path.with_suffix(".json"),
                     lambda tmp, r=record: Path(tmp).write_text(json.dumps(r, indent=1, default=str)))
        written.append(str(path))
    return written


def process(command: str, args: argparse.Namespace, edit: Callable[[int, str, int], Any]) -> int:
    """Run ``edit(index, image_path, seed)`` -> :class:`~infinity_lightning.editing.EditOutput` for
    every image; skip and report the ones that fail with a ``ValueError``/``OSError``; print the
    JSON summary; exit code 1 when any image was skipped."""
    written: List[str] = []
    skipped: List[Dict[str, str]] = []
    for i, image in enumerate(args.image):
        seed = args.seed + i * args.num_images
        try:
            out = edit(i, image, seed)
        except (ValueError, OSError) as e:
            print(f"infinity-lightning {command}: skipped {image}: {e}", file=sys.stderr)
            skipped.append({"image": image, "error": str(e)})
            continue
        sampling = out.sampling.to_dict(only=("cfg", "tau", "top_k", "top_p"))
        records = [dict(out.settings, command=command, image=image, prompt=args.prompt, seed=s,
                        negative_prompt=args.negative_prompt, pipeline=args.pipeline, sampling=sampling,
                        schedule=[list(g)[-2:] for g in out.schedule], lora=list(args.lora)) for s in out.seeds]
        for r in records:
            r.update(extra_record(args, i))
        written += save_outputs(args._outputs[i], out.images, records)
    print(json.dumps({"written": written, "skipped": skipped, "out": str(args.out)}))
    return 1 if skipped else 0


def extra_record(args: argparse.Namespace, index: int) -> Dict[str, Any]:
    if getattr(args, "mask", None):
        return {"mask": args.mask[index if len(args.mask) > 1 else 0]}
    if getattr(args, "outpaint", None) is not None:
        return {"outpaint": args.outpaint, "anchor": args.anchor}
    return {}


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, load the pipeline once, inpaint (or outpaint) every image."""
    from ..editing import OUTPAINT_ANCHORS

    command = "inpaint"
    check_common(command, args)
    if bool(args.mask) == (args.outpaint is not None):
        raise fail(command, "give --mask MASK (white = regenerate) or --outpaint RATIO, not both or neither")
    if args.mask:
        if len(args.mask) not in (1, len(args.image)):
            raise fail(command, f"{len(args.mask)} --mask for {len(args.image)} --image: give one mask, or one per image")
        missing = [m for m in args.mask if not Path(m).is_file()]
        if missing:
            raise fail(command, f"mask file(s) not found: {', '.join(missing)}")
    else:
        from ..editing import template_ratio

        try:
            args.outpaint = template_ratio(args.outpaint)
        except ValueError as e:
            raise fail(command, f"--outpaint: {e}") from None
        if args.anchor not in OUTPAINT_ANCHORS:
            raise fail(command, f"--anchor {args.anchor!r}: expected one of {', '.join(OUTPAINT_ANCHORS)}")
    for name in ("grow", "feather", "keep_scales"):
        if getattr(args, name) < 0:
            raise fail(command, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.feather and not args.blend:
        raise fail(command, "--feather applies to --blend; add --blend")

    from .. import editing

    pipe = load_pipeline(args)
    check_keep_scales(command, args, pipe)
    common = dict(grow=args.grow, blend=args.blend, feather=args.feather, keep_scales=args.keep_scales,
                  negative_prompt=args.negative_prompt, cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                  top_p=args.top_p, resolution=args.resolution, num_images_per_prompt=args.num_images)

    def edit(i: int, image: str, seed: int):
        if args.mask:
            mask = args.mask[i if len(args.mask) > 1 else 0]
            return editing.inpaint(pipe, args.prompt, image, mask, seed=seed, **common)
        return editing.outpaint(pipe, args.prompt, image, args.outpaint, anchor=args.anchor, seed=seed, **common)

    return process(command, args, edit)

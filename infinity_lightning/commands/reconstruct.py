"""``infinity-lightning reconstruct``: encode and decode images with a tokenizer, report PSNR/SSIM.

    infinity-lightning reconstruct --tokenizer infinity_vae_d32_reg.pth photo.jpg --out recon/
    infinity-lightning reconstruct --tokenizer d32 *.png --out recon/ --resize template --pn 0.25M --progression

Sizing (``--resize``):

* ``crop`` (default): LANCZOS resize so the image covers ``--size`` x ``--size``, centre crop;
* ``template``: resize and crop to the nearest aspect-ratio template at pixel budget ``--pn``
  (the sizes Infinity generates);
* ``none``: no resampling; each side is centre-cropped down to a multiple of the tokenizer
  stride (e.g. 16), because the encoder halves the image ``log2(stride)`` times.

For every image, ``<name>_recon.png`` (and with ``--progression`` ``<name>_progression.png``: the
input, then the decoded image after 1, 2, ..., K scales) is written to ``--out``, plus
``metrics.json`` with per-image and mean PSNR / SSIM (torchmetrics, on [0, 1] images after uint8
truncation; SSIM with the usual 11x11 Gaussian window, so values differ slightly from
scikit-image's default window).

Arguments are checked before the tokenizer is loaded: a missing image or a folder given as an
image is an error naming it.  An image that cannot be read (or is too small for the tokenizer) is
skipped, reported on stderr and listed under ``skipped`` in ``metrics.json``; the others are
reconstructed and scored, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

import torch

if TYPE_CHECKING:  # Pillow is imported when the command runs
    import PIL.Image

STEPS_1M_SQUARE = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--tokenizer", required=True, metavar="PATH_OR_PRESET",
                        help="tokenizer weights (.pth/.safetensors) or a preset name (random weights)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--resize", choices=("crop", "template", "none"), default="crop",
                        help="how images are brought to a size the tokenizer accepts (default: crop)")
    parser.add_argument("--size", type=_positive, default=256, help="square side for --resize crop (default 256)")
    parser.add_argument("--pn", default="0.25M", choices=("0.06M", "0.25M", "0.60M", "1M"),
                        help="pixel budget for --resize template (default 0.25M, 512x512 for square images)")
    parser.add_argument("--schedule", choices=("dynamic", "dense", "single"), default="dynamic",
                        help="scale schedule of the quantizer (default: the Infinity schedule of the latent grid)")
    parser.add_argument("--progression", action="store_true",
                        help="also write <name>_progression.png: the image after 1, 2, ..., K scales")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 runs the convolutions under bf16 autocast; the quantizer stays fp32")


def proportional_schedule(latent_h: int, latent_w: int) -> List[Tuple[int, int, int]]:
    """A coarse-to-fine schedule for a latent grid that has no Infinity schedule: the square 1M
    template's steps (1, 2, 4, ..., 64 of 64) scaled to each side, deduplicated, ending at the grid."""
    out: List[Tuple[int, int, int]] = []
    last = STEPS_1M_SQUARE[-1]
    for s in STEPS_1M_SQUARE:
        grid = (1, max(1, round(latent_h * s / last)), max(1, round(latent_w * s / last)))
        if not out or (grid[1] >= out[-1][1] and grid[2] >= out[-1][2] and grid != out[-1]):
            out.append(grid)
    if out[-1] != (1, latent_h, latent_w):
        out.append((1, latent_h, latent_w))
    return out


def choose_schedule(vae, latent_h: int, latent_w: int, mode: str) -> List[Tuple[int, int, int]]:
    """The quantizer schedule for a latent grid; falls back to :func:`proportional_schedule` when
    the dynamic (or dense) table has no entry for the grid."""
    from infinity_lightning import scales

    if mode == "dynamic":
        try:
            return [tuple(s) for s in vae.default_schedule(latent_h, latent_w)]
        except ValueError:
            return proportional_schedule(latent_h, latent_w)
    if mode == "dense" and latent_h != latent_w:
        return proportional_schedule(latent_h, latent_w)
    return [tuple(s) for s in scales.latent_schedule(latent_h, latent_w, mode)]


def prepare_image(path: str, vae, args) -> Tuple["PIL.Image.Image", Tuple[int, int]]:
    """Load and size one image as ``--resize`` says; returns the PIL image and its original size."""
    from infinity_lightning import images

    img = images.load_image(path)
    original = img.size
    stride = vae.stride
    if args.resize == "crop":
        img = images.resize_cover_crop(img, args.size, args.size)
    elif args.resize == "template":
        tgt_h, tgt_w = images.template_size(img.size[1], img.size[0], args.pn)
        img = images.resize_cover_crop(img, tgt_h, tgt_w)
    img = images.crop_to_multiple(img, stride)
    return img, original


def _metrics(recon: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    # Both images as uint8 values scaled to [0, 1]: the reconstruction truncated exactly as it is
    # saved, the input (which came from uint8 pixels) rounded back to its pixel values.
    def to01(x, rounding):
        x = ((x.float().clamp(-1, 1) + 1) / 2).mul(255)
        return (x.round() if rounding else x).to(torch.uint8).float().div(255).unsqueeze(0)

    p, t = to01(recon, False), to01(target, True)
    return {"psnr": float(peak_signal_noise_ratio(p, t, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(p, t, data_range=1.0))}


def _unique_stem(path: str, used: set) -> str:
    stem = Path(path).stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no tokenizer: the images, ``--out`` and ``--device``."""
    missing = [p for p in args.images if not Path(p).exists()]
    if missing:
        raise SystemExit(f"reconstruct: image file(s) not found: {', '.join(missing)}")
    folders = [p for p in args.images if Path(p).is_dir()]
    if folders:
        raise SystemExit(f"reconstruct: {folders[0]} is a folder; give image files (e.g. {folders[0]}/*.png)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"reconstruct: --out {args.out} exists and is not a folder")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"reconstruct: --device {args.device!r}: this machine has no usable CUDA GPU; "
                             "use --device cpu")
    elif args.device not in ("cpu", "mps"):
        raise SystemExit(f"reconstruct: --device {args.device!r}: expected cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from infinity_lightning import images
    from infinity_lightning.checkpoints import load_tokenizer

    check_arguments(args)
    device = torch.device(args.device)
    vae = load_tokenizer(args.tokenizer).to(device)
    if args.resize == "crop" and args.size % vae.stride:
        raise SystemExit(f"reconstruct: --size {args.size} is not a multiple of the tokenizer stride {vae.stride}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    rows: List[Dict[str, object]] = []
    skipped: List[Dict[str, str]] = []
    used: set = set()
    for path in args.images:
        try:
            img, original = prepare_image(path, vae, args)
        except (ValueError, OSError) as e:  # unreadable, or smaller than the stride
            skipped.append({"image": str(path), "error": str(e)})
            print(f"reconstruct: skipped {path}: {e}", file=sys.stderr)
            continue
        x = images.pil_to_tensor(img).unsqueeze(0).to(device)
        with torch.no_grad(), autocast:
            raw = vae.encode_raw(x)
            schedule = choose_schedule(vae, raw.shape[-2], raw.shape[-1], args.schedule)
            summed, bit_labels = vae.quantize_multiscale(raw, schedule)
            recon = vae.decode(summed).float()
            steps = []
            if args.progression:
                # Images after 1 .. K-1 scales from the labels; after K scales it is the reconstruction.
                for k in range(1, len(schedule)):
                    steps.append(vae.decode_from_bits(bit_labels[:k], schedule).float())
                steps.append(recon)
        name = _unique_stem(path, used)
        recon_path = out_dir / f"{name}_recon.png"
        images.tensor_to_pil(recon[0]).save(recon_path)
        row: Dict[str, object] = {
            "image": str(path), "name": name, "original_size": [original[1], original[0]],
            "size": [img.size[1], img.size[0]], "schedule": [list(s) for s in schedule],
            "bits": int(sum(b[0].numel() for b in bit_labels)), "recon": recon_path.name,
        }
        row.update(_metrics(recon[0].cpu(), x[0].cpu()))
        if steps:
            strip = images.hstack([img] + [images.tensor_to_pil(s[0]) for s in steps], gap=2)
            prog_path = out_dir / f"{name}_progression.png"
            strip.save(prog_path)
            row["progression"] = prog_path.name
            row["psnr_per_scale"] = [_metrics(s[0].cpu(), x[0].cpu())["psnr"] for s in steps]
        rows.append(row)

    mean = ({k: sum(float(r[k]) for r in rows) / len(rows) for k in ("psnr", "ssim")} if rows
            else {"psnr": None, "ssim": None})
    report = {"tokenizer": str(args.tokenizer), "resize": args.resize, "dtype": args.dtype,
              "images": rows, "mean": mean, "skipped": skipped}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))

    if rows:
        width = max(len(str(r["name"])) for r in rows)
        print(f"{'image':<{width}}  {'size':>9}  {'psnr':>7}  {'ssim':>6}")
        for r in rows:
            size = "x".join(map(str, r["size"]))
            print(f"{str(r['name']):<{width}}  {size:>9}  {r['psnr']:7.2f}  {r['ssim']:6.4f}")
        print(f"{'mean':<{width}}  {'':>9}  {mean['psnr']:7.2f}  {mean['ssim']:6.4f}")
    print(f"wrote {len(rows)} reconstruction(s) and metrics.json to {out_dir}"
          + (f"; skipped {len(skipped)} image(s) that could not be used" if skipped else ""))
    if skipped or any(math.isnan(float(r["psnr"])) for r in rows):
        return 1
    return 0

"""Tokenizer encode/decode speed: exact fp32 against the fast paths, interleaved in one process.

Modes: ``exact`` (fp32, the released numerics), ``channels_last`` (fp32, channels-last
activations and weights), ``bf16`` (a cached bf16 copy), ``bf16_channels_last`` (both; the fast
default of ``generate``).  For each: images/s for encode (encoder only: the quantizer is a few ms)
and decode, the speed-up over the mode of the *same dtype* without the option (channels_last
over exact, bf16_channels_last over bf16) and, labelled ``cross_dtype``, the bf16 modes over
exact fp32, and the largest error against the exact result on the same input (images in
[-1, 1]).  Random weights of the preset (speed does not depend on them).  The matmul peaks (best
of long GEMMs, benchmarks/_common.py) of the same run and the machine's capabilities are printed
beside; the bf16 modes run by default only where bf16 is native (AVX-512 BF16 / AMX, GPUs).
``benchmarks/tokenizer.py`` measures fp32 against bf16 autocast with FLOP counts and per-row
memory; this script compares the fast paths of ``BSQVAE``.

    python benchmarks/tokenizer_speed.py                      # d32 at 256 px
    python benchmarks/tokenizer_speed.py --size 512 --batch 2 --repeats 5
    python benchmarks/tokenizer_speed.py --device cuda --batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

from infinity_lightning.checkpoints import load_tokenizer  # noqa: E402

MODES = {"exact": dict(), "channels_last": dict(channels_last=True), "bf16": dict(dtype=torch.bfloat16),
         "bf16_channels_last": dict(dtype=torch.bfloat16, channels_last=True)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--preset", default="d32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default=None, type=lambda s: s.split(","),
                   help="comma list of " + ", ".join(MODES) + " (default: all where bf16 is native, else the fp32 ones)")
    args = p.parse_args(argv)
    device = C.setup(args.device, args.threads)
    info = C.machine_info(device)
    if args.modes is None:
        args.modes = [m for m in MODES if info["bf16_native"] or "bf16" not in m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; expected {', '.join(MODES)}")
    vae = load_tokenizer(args.preset).to(device)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        raw = vae.encode_raw(images)
        ref_img = vae.decode(raw)
    times: Dict[str, Dict[str, List[float]]] = {m: {"encode": [], "decode": []} for m in args.modes}
    errors: Dict[str, Dict[str, float]] = {}
    with torch.no_grad():
        for m in args.modes:                       # warm-up, builds the cached copies
            enc = vae.encode_raw(images, **MODES[m])
            dec = vae.decode(raw, **MODES[m])
            errors[m] = {"encode_max_abs": (enc - raw).abs().max().item(),
                         "encode_max_rel": ((enc - raw).abs().max() / raw.abs().max()).item(),
                         "decode_max_abs": (dec - ref_img).abs().max().item(),
                         "decode_mean_abs": (dec - ref_img).abs().mean().item()}
        peaks = {name: C.PeakMeter(C.DTYPES[name], device) for name in ("fp32", "bf16")
                 if any((name == "bf16") == ("bf16" in m) for m in args.modes)}
        for _ in range(args.repeats):
            for meter in peaks.values():
                meter.sample()
            for m in args.modes:
                times[m]["encode"].append(C.timed(lambda: vae.encode_raw(images, **MODES[m]), device))
                times[m]["decode"].append(C.timed(lambda: vae.decode(raw, **MODES[m]), device))
    rows: List[Dict[str, Any]] = []
    same_dtype_base = {"exact": "exact", "channels_last": "exact", "bf16": "bf16", "bf16_channels_last": "bf16"}
    for m in args.modes:
        enc, dec = C.median(times[m]["encode"]), C.median(times[m]["decode"])
        row = {"mode": m, "dtype": "bf16" if "bf16" in m else "fp32", "options": {k: str(v) for k, v in MODES[m].items()},
               "encode_images_per_s": args.batch / enc, "decode_images_per_s": args.batch / dec,
               "encode_seconds_all": times[m]["encode"], "decode_seconds_all": times[m]["decode"], **errors[m]}
        base = same_dtype_base[m]
        if base in times:
            row[f"encode_speedup_vs_{base}_same_dtype"] = C.median(times[base]["encode"]) / enc
            row[f"decode_speedup_vs_{base}_same_dtype"] = C.median(times[base]["decode"]) / dec
        if "bf16" in m and "exact" in times:
            row["cross_dtype"] = {"encode_speedup_vs_exact_fp32": C.median(times["exact"]["encode"]) / enc,
                                  "decode_speedup_vs_exact_fp32": C.median(times["exact"]["decode"]) / dec}
        if "bf16" in m and not info["bf16_native"]:
            row["meaningful"] = False
            row["note"] = "bf16 is emulated on this device (no native bf16): not a bf16 measurement"
        rows.append(row)
    print(json.dumps({"command": "python benchmarks/tokenizer_speed.py " + " ".join(argv or sys.argv[1:]),
                      "machine": info, "preset": args.preset, "size": args.size, "batch": args.batch,
                      "matmul_peak": {k: v.summary() for k, v in peaks.items()},
                      "modes": rows}, indent=1))


if __name__ == "__main__":
    main()

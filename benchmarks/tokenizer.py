"""Throughput of the BSQ-VAE tokenizer: encode (encoder + multi-scale quantizer) and decode.

    python benchmarks/tokenizer.py                         # d32, 256 px; fp32 (+ bf16 where native)
    python benchmarks/tokenizer.py --sizes 256,512 --repeats 3 --batch 2
    python benchmarks/tokenizer.py --device cuda --sizes 256,512,1024 --batch 8

Random weights (speed does not depend on them).  Rows are (size, dtype); bf16 means bf16
autocast for the convolutions (the quantizer always runs in fp32).  The rows are timed
interleaved (every row once per repetition, medians reported), so drift on a shared machine hits
all rows alike.  Each row's peak memory is measured in its own fresh process (CPU: peak RSS of a
process that builds the tokenizer and runs that row's encode and decode once; CUDA:
``torch.cuda.max_memory_allocated``), never as one process-wide peak.  Encoder and decoder FLOPs
are counted on the meta device; ``*_utilisation`` divides their rate by the best matmul peak of
the row's dtype measured in the same process (benchmarks/_common.py; above 1 marks the row
invalid and the script exits 3).  Prints one JSON document with the machine's capabilities: bf16
is only meaningful where it is native (AVX-512 BF16 / AMX, GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

from infinity_lightning.models.bsq_vae import BSQVAE  # noqa: E402
from infinity_lightning.presets import tokenizer_config  # noqa: E402


def _gflop(cfg, batch: int, size: int):
    """Forward GFLOP of the encoder and the decoder, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = BSQVAE(cfg)
        x = torch.zeros(batch, 3, size, size)
        latent = size // cfg.patch_size
        z = torch.zeros(batch, cfg.codebook_dim, latent, latent)
    out = []
    for module, inp in ((meta.encoder, x), (meta.decoder, z)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(inp)
        out.append(counter.get_total_flops() / 1e9)
    return out


class Row:
    """One (size, dtype) row: its inputs and its encode / decode calls."""

    def __init__(self, vae: BSQVAE, size: int, dtype: str, batch: int, device: torch.device):
        if size % vae.stride:
            raise ValueError(f"size {size} is not a multiple of the tokenizer stride {vae.stride}")
        self.vae, self.size, self.dtype, self.device = vae, size, dtype, device
        g = torch.Generator().manual_seed(size)
        self.x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
        latent = size // vae.stride
        self.schedule = vae.default_schedule(latent, latent)
        self.summed = None

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")

    def encode(self):
        with torch.no_grad(), self._autocast():
            self.summed = self.vae.quantize_multiscale(self.vae.encode_raw(self.x), self.schedule)[0]
        return self.summed

    def decode(self):
        with torch.no_grad(), self._autocast():
            return self.vae.decode(self.summed)


def memory_probe(args) -> Dict[str, Any]:
    """Peak memory of one row (encode then decode) in this fresh process."""
    device = C.setup(args.device, args.threads)
    torch.manual_seed(0)
    vae = BSQVAE(tokenizer_config(args.preset)).to(device).eval().requires_grad_(False)
    row = Row(vae, int(args.sizes), args.dtypes, args.batch, device)
    start = C.peak_memory_start(device)
    row.encode()
    row.decode()
    C.sync(device)
    return C.peak_memory_end(device, start)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d32", help="tokenizer preset (default d32)")
    parser.add_argument("--sizes", default="256", help="comma-separated square image sides (default 256)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp32, bf16 (default: fp32, + bf16 if native)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of every row (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-n", type=int, default=None, help="fix the side of the peak GEMMs")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-row memory processes")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0

    device = C.setup(args.device, args.threads)
    info = C.machine_info(device)
    dtypes = [d.strip() for d in (args.dtypes or ("fp32,bf16" if info["bf16_native"] else "fp32")).split(",") if d.strip()]
    for d in dtypes:
        if d not in C.DTYPES:
            parser.error(f"unknown dtype {d!r}; expected fp32 or bf16")
    torch.manual_seed(0)
    cfg = tokenizer_config(args.preset)
    vae = BSQVAE(cfg).to(device).eval().requires_grad_(False)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    try:
        rows = [Row(vae, size, d, args.batch, device) for size in sizes for d in dtypes]
    except ValueError as e:
        parser.error(str(e))
    flops = {size: _gflop(cfg, args.batch, size) for size in sizes}
    meters = {d: C.PeakMeter(C.DTYPES[d], device, start_n=args.peak_n or 1024, max_n=args.peak_n or 4096)
              for d in dtypes}
    times: Dict[int, Dict[str, List[float]]] = {i: {"encode": [], "decode": [], "encode_cpu": [], "decode_cpu": []}
                                                for i in range(len(rows))}
    for _ in range(args.warmup):
        for row in rows:
            row.encode()
            row.decode()
    for _ in range(args.repeats):
        for meter in meters.values():
            meter.sample()
        for i, row in enumerate(rows):
            for part in ("encode", "decode"):
                c0 = time.process_time()
                times[i][part].append(C.timed(getattr(row, part), device))
                # CPU seconds of this process: on a busy machine, wall / CPU time shows the waiting
                times[i][part + "_cpu"].append(time.process_time() - c0)
    results = []
    for i, row in enumerate(rows):
        enc_s, dec_s = C.median(times[i]["encode"]), C.median(times[i]["decode"])
        enc_gflop, dec_gflop = flops[row.size]
        peak = meters[row.dtype].best
        out = {
            "size": row.size, "dtype": row.dtype, "batch": args.batch, "scales": len(row.schedule),
            "encode_images_per_s": args.batch / enc_s, "decode_images_per_s": args.batch / dec_s,
            "encode_s_per_batch": enc_s, "decode_s_per_batch": dec_s,
            "encode_seconds_all": times[i]["encode"], "decode_seconds_all": times[i]["decode"],
            "encode_cpu_s_per_batch": C.median(times[i]["encode_cpu"]),
            "decode_cpu_s_per_batch": C.median(times[i]["decode_cpu"]),
            "encoder_gflop_per_batch": enc_gflop, "decoder_gflop_per_batch": dec_gflop,
            "encode_gflop_per_s": enc_gflop / enc_s, "decode_gflop_per_s": dec_gflop / dec_s,
            "matmul_peak": meters[row.dtype].summary(),
            "encode_utilisation": enc_gflop * 1e9 / enc_s / peak, "decode_utilisation": dec_gflop * 1e9 / dec_s / peak,
        }
        if row.dtype == "bf16" and not info["bf16_native"]:
            out["meaningful"] = False
            out["note"] = "bf16 is emulated on this device (no native bf16): not a bf16 measurement"
        if args.memory:
            probe = ["--preset", args.preset, "--sizes", str(row.size), "--dtypes", row.dtype, "--batch",
                     str(args.batch), "--device", str(device)] + (["--threads", str(args.threads)] if args.threads else [])
            out["memory_own_process"] = C.memory_probe(os.path.abspath(__file__), probe)
        results.append(C.check_utilisation(out, ("encode_utilisation", "decode_utilisation")))
        print(f"# {row.size}px {row.dtype}: encode {out['encode_images_per_s']:.3f} img/s, "
              f"decode {out['decode_images_per_s']:.3f} img/s", file=sys.stderr)
    report = {"benchmark": "tokenizer", "preset": args.preset, "n_parameters": sum(p.numel() for p in vae.parameters()),
              "machine": info, "command": "python benchmarks/tokenizer.py " + " ".join(argv),
              "repeats": args.repeats, "warmup": args.warmup, "interleaved": True,
              "peak_memory": ("peak RSS of a fresh process per row (GB)" if device.type == "cpu"
                              else "torch.cuda.max_memory_allocated per row (GB)"),
              "results": results}
    return C.finish(report, results)


if __name__ == "__main__":
    sys.exit(main())

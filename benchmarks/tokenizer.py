"""Throughput of the BSQ-VAE tokenizer: encode (encoder + multi-scale quantizer) and decode.

    python benchmarks/tokenizer.py                         # d32, 256 px, fp32 and bf16, CPU
    python benchmarks/tokenizer.py --sizes 256,512 --repeats 2 --batch 2
    python benchmarks/tokenizer.py --device cuda --sizes 256,512,1024 --batch 8

Random weights (speed does not depend on them).  Prints one JSON object: images per second for
encode and decode per (size, dtype), median seconds per batch, and peak memory (process RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU).  bf16 means bf16 autocast for the convolutions; the
quantizer always runs in fp32.  Encoder and decoder FLOPs are counted on the meta device, so
``*_gflop_per_s`` can be compared with the machine's matmul peak.  The default run takes about a
minute on an idle 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.presets import tokenizer_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # ru_maxrss is in KiB on Linux (bytes on macOS); a process-wide, monotone peak.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def _time(fn, device, warmup: int, repeats: int):
    """Median wall seconds and median process CPU seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return out, statistics.median(wall), statistics.median(cpu)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d32", help="tokenizer preset (default d32)")
    parser.add_argument("--sizes", default="256", help="comma-separated square image sides (default 256)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        # Denormal inputs make fp32 convolutions several times slower at random otherwise.
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg = tokenizer_config(args.preset)
    vae = BSQVAE(cfg).to(device).eval().requires_grad_(False)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("fp32", "bf16"):
            parser.error(f"unknown dtype {d!r}; expected fp32 or bf16")

    results = []
    for size in sizes:
        if size % vae.stride:
            parser.error(f"size {size} is not a multiple of the tokenizer stride {vae.stride}")
        x = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
        latent = size // vae.stride
        schedule = vae.default_schedule(latent, latent)
        enc_gflop, dec_gflop = _gflop(cfg, args.batch, size)
        for dtype in dtypes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

            def encode():
                with torch.no_grad(), autocast:
                    return vae.quantize_multiscale(vae.encode_raw(x), schedule)[0]

            summed, enc_s, enc_cpu = _time(encode, device, args.warmup, args.repeats)

            def decode():
                with torch.no_grad(), autocast:
                    return vae.decode(summed)

            _, dec_s, dec_cpu = _time(decode, device, args.warmup, args.repeats)
            results.append({
                "size": size, "dtype": dtype, "batch": args.batch, "scales": len(schedule),
                "encode_images_per_s": round(args.batch / enc_s, 4),
                "decode_images_per_s": round(args.batch / dec_s, 4),
                "encode_s_per_batch": round(enc_s, 4), "decode_s_per_batch": round(dec_s, 4),
                # CPU seconds of this process: on a busy machine, wall time / CPU time shows how
                # much of the wall time was spent waiting for cores.
                "encode_cpu_s_per_batch": round(enc_cpu, 4), "decode_cpu_s_per_batch": round(dec_cpu, 4),
                "encoder_gflop_per_batch": round(enc_gflop, 2), "decoder_gflop_per_batch": round(dec_gflop, 2),
                "encode_gflop_per_s": round(enc_gflop / enc_s, 1), "decode_gflop_per_s": round(dec_gflop / dec_s, 1),
                "peak_memory_mb": round(_peak_memory_mb(device), 1),
            })
            print(f"# {size}px {dtype}: encode {args.batch / enc_s:.3f} img/s, decode {args.batch / dec_s:.3f} img/s",
                  file=sys.stderr)

    report = {
        "benchmark": "tokenizer", "preset": args.preset, "n_parameters": sum(p.numel() for p in vae.parameters()),
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats, "warmup": args.warmup,
        "peak_memory": "process max RSS (MiB)" if device.type == "cpu" else "torch.cuda.max_memory_allocated (MiB)",
        "results": results,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

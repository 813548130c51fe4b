"""Seconds per generated image, with and without text encoding; prints JSON.

Random weights of a transformer preset (default ``2b``) with its tokenizer preset, KV-cached
sampling with CFG (batch 2 inside the transformer), bf16 autocast by default.  The text encoder
is a random T5 with flan-t5-xl's layer shapes (d_model 2048, 32 heads, d_ff 5120, gated GELU);
on GPU it has flan-t5-xl's 24 layers, on CPU 4 layers unless ``--text-layers`` says otherwise
(the JSON states which).  Its vocabulary is a small sentencepiece model: the embedding lookup
costs nothing either way.

Defaults: on GPU the 256 px (0.06M) and 1024 px (1M) schedules; on CPU 256 px only (the 2B at
1024 px takes many minutes there: add ``--full`` or ``--resolutions 0.06M 1M``).

    python benchmarks/generate.py                       # CPU: 2b, 256 px, bf16
    python benchmarks/generate.py --preset layer12 --resolutions 0.06M 0.25M --dtype fp32
    python benchmarks/generate.py --device cuda         # 2b at 256 and 1024 px, flan-t5-xl-sized encoder
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    # ru_maxrss is in KiB on Linux: the peak resident set of the whole process
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(args, device: torch.device, folder: Path):
    from infinity_lightning.checkpoints import load_tokenizer, load_transformer
    from infinity_lightning.models.text_encoder import TextEncoder
    from infinity_lightning.pipeline import InfinityPipeline
    from infinity_lightning.presets import transformer_config
    from infinity_lightning.tiny import make_tiny_t5

    cfg = transformer_config(args.preset)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    transformer = load_transformer(args.preset, device=device)
    tokenizer = load_tokenizer(cfg.tokenizer or "d32")
    build_s = time.perf_counter() - t0
    layers = args.text_layers or (24 if device.type == "cuda" else 4)
    width = cfg.text_channels
    heads = max(1, width // 64)
    make_tiny_t5(folder / "text_encoder", d_model=width, num_layers=layers, num_heads=heads,
                 d_ff=int(width * 2.5), seed=0)
    encoder = TextEncoder.from_pretrained(folder / "text_encoder", device=device,
                                          dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    pipe = InfinityPipeline(transformer, tokenizer, encoder, device=device, dtype=args.dtype)
    text_info = {"architecture": f"T5 v1.1 encoder, d_model {width}, {layers} layers, {heads} heads of 64, "
                                 f"d_ff {int(width * 2.5)} gated-GELU",
                 "flan_t5_xl_sized": layers == 24 and width == 2048, "dtype": args.dtype}
    return pipe, build_s, text_info


def measure(pipe, resolution: str, args, device: torch.device) -> dict:
    from infinity_lightning.scales import resolve

    schedule = resolve(resolution, 1.0)
    prompts = ["a red apple on a wooden table"] * args.num_images
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up on the first scales (kernel selection, allocator), not counted
    pipe(prompts[:1], seed=0, resolution=16 * 4, output_type="tensor", progress=False)

    _sync(device)
    t0 = time.perf_counter()
    feats = pipe.encode_prompt(prompts)
    _sync(device)
    text_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    out = pipe(prompt_embeds=feats, seed=0, resolution=resolution, output_type="tensor", batch_size=args.batch_size,
               cfg=3.0, tau=1.0, progress=False)
    _sync(device)
    without_text, without_text_cpu = time.perf_counter() - t0, time.process_time() - c0

    if args.measure_with_text:
        t0 = time.perf_counter()
        pipe(prompts, seed=0, resolution=resolution, output_type="tensor", batch_size=args.batch_size, cfg=3.0,
             tau=1.0, progress=False)
        _sync(device)
        with_text, how = time.perf_counter() - t0, "measured"
    else:
        # encoding runs before and apart from sampling: the sum of the two measured parts
        with_text, how = without_text + text_s, "sum of text encoding and generation"

    # the decoder alone, on random codes of the final latent size (its cost does not depend on values)
    from infinity_lightning.models.bsq_vae import bits_to_codes

    _, vh, vw = schedule.with_patchify(pipe.transformer.config.apply_spatial_patchify).tokenizer_side[-1]
    d = pipe.tokenizer.codebook_dim
    codes = bits_to_codes(torch.randint(0, 2, (1, 1, vh, vw, d), device=device)).squeeze(2)
    with pipe.autocast():
        _sync(device)
        t0 = time.perf_counter()
        pipe.tokenizer.decode(codes)
        _sync(device)
        decode_s = time.perf_counter() - t0

    n = args.num_images
    L = schedule.num_tokens
    return {
        "resolution": resolution, "pixels": list(out.images.shape[-2:]), "scales": len(schedule), "tokens_per_image": L,
        "images": n, "batch_size": args.batch_size, "cfg": 3.0,
        "seconds_per_image_without_text": round(without_text / n, 3),
        "seconds_per_image_with_text": round(with_text / n, 3),
        "with_text_is": how,
        "process_cpu_seconds_per_image_without_text": round(without_text_cpu / n, 3),
        "text_encoding_seconds_per_image": round(text_s / n, 4),
        "decode_seconds_per_image": round(decode_s, 3),
        "transformer_tokens_per_second": round(L * n / max(without_text - decode_s * n, 1e-9), 1),
        "peak_memory_gb": round(_peak_memory_gb(device), 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b", help="transformer preset (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--resolutions", nargs="+", help="pixel budgets or sizes (default: see module docstring)")
    parser.add_argument("--full", action="store_true", help="on CPU also measure 1024 px (1M)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--text-layers", type=int, help="text encoder layers (default: 24 on GPU, 4 on CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--measure-with-text", action="store_true",
                        help="time a second full call that includes encoding (default on GPU; on CPU the sum)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)  # without it CPU steps jump 3-4x at random
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.measure_with_text = args.measure_with_text or device.type == "cuda"
    resolutions = args.resolutions or (["0.06M", "1M"] if device.type == "cuda" or args.full else ["0.06M"])
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        pipe, build_s, text_info = build_pipeline(args, device, Path(tmp))
        results = [measure(pipe, r, args, device) for r in resolutions]
    report = {
        "benchmark": "generate", "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "kv_cache": True, "torch": torch.__version__,
        "python": sys.version.split()[0], "build_seconds": round(build_s, 1), "text_encoder": text_info,
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calibration of the strict shapes checker: what it accepts and what it rejects.

    python benchmarks/evaluation_calibration.py                                   # renders only
    python benchmarks/evaluation_calibration.py --tokenizer runs/quickstart/tokenizer.pth
    python benchmarks/evaluation_calibration.py --protocol my_protocol.json --per-family 96

Prints one JSON object (:func:`infinity_lightning.evaluation.calibration.calibrate`): for every
item of the protocol, the fraction whose correct render passes clean, under each degradation
(JPEG, blur, noise, colour cast, half resolution) and, with ``--tokenizer``, after the
tokenizer's encode-quantize-decode round trip on the generation schedule (also per category);
and for every adversarial family (noise, blank, a grid of all pairs, wrong and off-palette
colours, specks, lines, flat ellipses, irregular blobs, extra objects, wrong counts, swapped
positions and colours), the fraction rejected.  A few reasons of every unexpected outcome are
listed under ``failures``.  About 2.5 minutes on an idle 2-core CPU with a tokenizer.
"""
from __future__ import annotations

import argparse
import json

import torch

from infinity_lightning.evaluation import load_protocol
from infinity_lightning.evaluation.calibration import calibrate


def tokenizer_round_trip(path: str, image_size: int):
    """``f(x) -> x'``: encode, quantize on the square generation schedule of the latent grid
    (1, 2, 4, 6, 8 for an 8 x 8 grid), decode; ``x`` in [-1, 1], fp32."""
    from infinity_lightning.checkpoints import load_tokenizer

    tok = load_tokenizer(path).eval()
    grid = image_size // tok.stride
    schedule = [(1, s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64) if s < grid] + [(1, grid, grid)]

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tok.decode(tok.quantize_multiscale(tok.encode_raw(x), schedule)[0])

    return reconstruct


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", help="protocol file (default: the shipped shapes_v1.json)")
    parser.add_argument("--tokenizer", help="trained tokenizer weights: also score its reconstructions")
    parser.add_argument("--per-family", type=int, default=48, help="adversarial cases per family (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = load_protocol(args.protocol)
    reconstruct = tokenizer_round_trip(args.tokenizer, protocol.image_size) if args.tokenizer else None
    result = calibrate(protocol, reconstruct=reconstruct, adversarial_per_family=args.per_family, seed=args.seed)
    if args.tokenizer:
        result["tokenizer"] = args.tokenizer
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What a tokenizer lets a transformer reach on a protocol: the protocol's own scenes, rendered,
passed through the tokenizer (encode, quantize over the generation schedule, decode) and judged by
the strict checker.  A transformer that predicted the encoder's bits of these scenes exactly would
score this.  It is not a hard bound (a model can draw a scene the encoder's bits of a render do
not: the hour's quick start scores 83% on colours against 79% here), but a category whose
reconstructions fail says the tokenizer, not the transformer, is what limits it.

    python benchmarks/tokenizer_ceiling.py --tokenizer runs/quickstart/tokenizer.pth
    python benchmarks/tokenizer_ceiling.py --tokenizer runs/quickstart/tokenizer.pth --protocol runs/tuning_protocol.json

Prints one JSON document: per category the share of reconstructions that pass (with its 95%
interval) beside the share of the clean renders that pass (the checker's own acceptance, which
should be 1.0), the overall score (mean of the categories, as the protocol's report card) and the
held-out pairs.  ``--tokenizer`` is a tokenizer file (a quick start's ``tokenizer.pth``) or a
pipeline folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


def _load_tokenizer(path: Path):
    from infinity_lightning.checkpoints import load_tokenizer
    from infinity_lightning.pipeline import InfinityPipeline

    if path.is_dir():
        return InfinityPipeline.from_pretrained(path, device="cpu").tokenizer.eval()
    return load_tokenizer(path).eval()


@torch.no_grad()
def reconstruct(tokenizer: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the tokenizer's reconstruction over the square template schedule."""
    from infinity_lightning.scales import latent_schedule

    h, w = image.shape[:2]
    stride = int(tokenizer.config.patch_size)
    schedule = latent_schedule(h // stride, w // stride, "template")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
    codes = tokenizer.quantize_multiscale(tokenizer.encode_raw(x), schedule)[0]
    rec = tokenizer.decoder(codes).clamp(-1, 1).add(1).mul(127.5).round()
    return rec[0].permute(1, 2, 0).numpy().astype(np.uint8)


def ceiling(tokenizer: Optional[torch.nn.Module], protocol: Any) -> Dict[str, Any]:
    """Per-category pass rates of reconstructions (``tokenizer`` None: of the renders themselves)."""
    from infinity_lightning.evaluation import StrictShapesChecker
    from infinity_lightning.evaluation.calibration import render_item
    from infinity_lightning.evaluation.report import wilson_interval

    checker = StrictShapesChecker()
    flags: Dict[str, list] = {}
    for item in protocol.items:
        image = np.asarray(render_item(item, protocol).convert("RGB"))
        if tokenizer is not None:
            image = reconstruct(tokenizer, image)
        flags.setdefault(item.category, []).append(bool(checker.check(image, item.spec).passed))
    rows = {}
    for category, f in flags.items():
        lo, hi = wilson_interval(sum(f), len(f))
        rows[category] = {"accuracy": round(sum(f) / len(f), 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(f)}
    groups = [c for c in rows if c != "held_out_pairs"]
    return {"categories": rows, "overall": round(float(np.mean([rows[c]["accuracy"] for c in groups])), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="strict-checker score of a tokenizer's reconstructions of a protocol's scenes")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or pipeline folder")
    p.add_argument("--protocol", default=None, help="protocol file (default: the shipped shapes_v1)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from infinity_lightning.evaluation import load_protocol

    protocol = load_protocol(args.protocol)
    tokenizer = _load_tokenizer(Path(args.tokenizer))
    result = {"tokenizer": args.tokenizer, "protocol": f"{protocol.name} v{protocol.version}",
              "reconstructions": ceiling(tokenizer, protocol), "renders": ceiling(None, protocol)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

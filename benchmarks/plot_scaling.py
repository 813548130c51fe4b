"""Plot the scaling run of benchmarks/transformer.py: training-step time, generation time and peak
memory against the tokens per image, exact vs fast, with the self-attention share.

    python benchmarks/transformer.py --pn 0.06M,0.25M,0.60M,1M --batch 1 --repeats 1 > scaling.json
    python benchmarks/plot_scaling.py scaling.json benchmarks/scaling.png

Needs matplotlib, which the package does not depend on (``pip install matplotlib`` into the
environment that runs this script).  Several JSON files may be given (e.g. one per budget); their
rows are merged.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Dict, List


def load_rows(paths: List[str]) -> Dict[str, List[Dict[str, Any]]]:
    rows: Dict[str, List[Dict[str, Any]]] = {"train": [], "generation": []}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for key in rows:
            rows[key] += doc.get(key, [])
    return rows


def series(rows, x_key: str, y_key, label_key: str, where=lambda r: True):
    out = defaultdict(list)
    for r in rows:
        y = y_key(r) if callable(y_key) else r.get(y_key)
        if where(r) and y is not None:
            out[r[label_key]].append((r[x_key], y))
    return {k: sorted(v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="JSON files of benchmarks/transformer.py, then the PNG path")
    args = p.parse_args(argv)
    *inputs, png = args.inputs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(inputs)
    train = [r for r in rows["train"] if r.get("checkpointing") == "none" and r.get("dtype") == "fp32"]
    gen = rows["generation"]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.2), dpi=80)
    ax = axes[0]
    for mode, pts in series(train, "tokens_per_sample", "seconds_per_step", "mode").items():
        ax.plot(*zip(*pts), marker="o", label=mode)
    for r in train:
        if "attention_share" in r:
            ax.annotate(f"{100 * r['attention_share']:.0f}%", (r["tokens_per_sample"], r["seconds_per_step"]),
                        textcoords="offset points", xytext=(4, -10 if r["mode"] == "exact" else 4), fontsize=7)
    ax.set(title="training step (fp32; % = self-attention)", xlabel="tokens per image", ylabel="seconds",
           xscale="log", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1]
    for option, pts in series(gen, "tokens_per_image", "seconds_per_image_with_decode", "option").items():
        ax.plot(*zip(*pts), marker="o", label=option)
    ax.set(title="generation, B=1, cfg 3, with decoding", xlabel="tokens per image", ylabel="seconds per image",
           xscale="log", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[2]
    mem = lambda r: r.get("memory", {}).get("peak_rss_gb", r.get("memory", {}).get("peak_gb"))  # noqa: E731
    for mode, pts in series(train, "tokens_per_sample", mem, "mode").items():
        ax.plot(*zip(*pts), marker="o", label=f"train {mode}")
    for option, pts in series(gen, "tokens_per_image", mem, "option",
                              where=lambda r: r["option"] in ("exact", "fast-fp32", "int8")).items():
        ax.plot(*zip(*pts), marker="s", linestyle="--", label=f"generate {option}")
    ax.set(title="peak memory (fresh process)", xlabel="tokens per image", ylabel="GB", xscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, optimize=True) if png.endswith((".jpg", ".jpeg")) else fig.savefig(png)
    print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

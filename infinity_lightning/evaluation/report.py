"""The report card of an evaluation: per-category accuracy with confidence intervals, JSON,
markdown, and a labelled image grid.

* Each category's accuracy carries a 95% Wilson score interval (exact enough at the small counts
  a protocol has, and never outside [0, 1] or empty at 0% or 100%).
* ``overall`` is the unweighted mean of the six categories' accuracies (as GenEval's overall
  score).  Its interval is the mean of the categories' Wilson bounds: the interval the mean would
  have if the categories' errors moved together, so it is conservative (wider than an interval
  that assumes them independent) and needs no resampling.
* ``held_out_pairs`` is reported apart (and per pair); it never enters ``overall``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infinity_lightning.io import atomic_write

from .checker import CATEGORIES, GROUPS, HELD_OUT_GROUP

__all__ = ["wilson_interval", "build_report", "report_markdown", "save_grid", "write_report"]


def wilson_interval(passed: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """Wilson score interval of a proportion ``passed / n`` (95% for the default ``z``);
    ``(0.0, 1.0)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _score(flags: Sequence[bool]) -> Dict[str, Any]:
    n, k = len(flags), int(sum(flags))
    lo, hi = wilson_interval(k, n)
    return {"n": n, "passed": k, "accuracy": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def _reason_kind(reason: str) -> str:
    # "found 3 objects (red circle, ...), expected 1" -> "found # objects, expected #"
    text = re.sub(r"\([^()]*\)", "", reason)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return " ".join(text.split())[:80]


def build_report(results: Sequence[Mapping[str, Any]], *, protocol: Mapping[str, Any],
                 settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The report dict from per-item results (``{"id", "category", "prompt", "seed", "passed",
    "reason", "objects": [...]}``, as :func:`~.runner.evaluate` makes them).

    ``protocol`` describes what was run (name, version, source, subset); ``settings`` the
    generation settings.  Keys: ``overall``, ``categories``, ``held_out_pairs``,
    ``failure_reasons``, ``items``, ``protocol``, ``settings``.
    """
    by_group: Dict[str, List[Mapping[str, Any]]] = {g: [] for g in GROUPS}
    for r in results:
        by_group[r["category"]].append(r)
    categories = {g: _score([r["passed"] for r in by_group[g]]) for g in CATEGORIES if by_group[g]}
    scored = list(categories)
    if scored:
        overall = {
            "accuracy": round(float(np.mean([categories[g]["accuracy"] for g in scored])), 4),
            "ci95": [round(float(np.mean([categories[g]["ci95"][i] for g in scored])), 4) for i in (0, 1)],
        }
    else:
        overall = {"accuracy": None, "ci95": [0.0, 1.0]}
    overall["categories_scored"] = scored
    overall["ci_method"] = "mean of the categories' 95% Wilson bounds (conservative)"
    held = by_group[HELD_OUT_GROUP]
    held_out = _score([r["passed"] for r in held])
    pairs: Dict[str, List[bool]] = {}
    for r in held:
        pairs.setdefault(r["prompt"], []).append(bool(r["passed"]))
    held_out["per_prompt"] = {p: _score(v) for p, v in sorted(pairs.items())}
    reasons = {g: dict(Counter(_reason_kind(r["reason"]) for r in by_group[g] if not r["passed"]).most_common(8))
               for g in GROUPS if by_group[g]}
    return {
        "protocol": dict(protocol),
        "settings": dict(settings or {}),
        "overall": overall,
        "categories": categories,
        "held_out_pairs": held_out,
        "failure_reasons": reasons,
        "items": [dict(r) for r in results],
    }


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report_markdown(report: Mapping[str, Any], max_examples: int = 5) -> str:
    """A markdown summary: the score table, held-out pairs, and example failures per category."""
    proto = report["protocol"]
    title = f"{proto.get('name', 'protocol')} v{proto.get('version', '?')}"
    lines = [f"# Evaluation: {title}", ""]
    if proto.get("subset"):
        lines += [f"Subset: {proto['subset']} items per category ({proto.get('items')} items).", ""]
    if report.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()), ""]
    lines += ["| category | n | passed | accuracy | 95% CI |", "|---|---:|---:|---:|---|"]
    for g, s in report["categories"].items():
        lines.append(f"| {g} | {s['n']} | {s['passed']} | {_pct(s['accuracy'])} | "
                     f"{_pct(s['ci95'][0])} - {_pct(s['ci95'][1])} |")
    o = report["overall"]
    lines.append(f"| **overall** (mean of {len(o['categories_scored'])}) | | | **{_pct(o['accuracy'])}** | "
                 f"{_pct(o['ci95'][0])} - {_pct(o['ci95'][1])} |")
    h = report["held_out_pairs"]
    if h["n"]:
        lines += ["", f"Held-out pairs (not in the overall score): {h['passed']}/{h['n']} = {_pct(h['accuracy'])} "
                      f"(95% CI {_pct(h['ci95'][0])} - {_pct(h['ci95'][1])})"]
        for prompt, s in h["per_prompt"].items():
            lines.append(f"- {prompt}: {s['passed']}/{s['n']}")
    failed = [r for r in report["items"] if not r["passed"]]
    if failed:
        lines += ["", "## Failures", ""]
        for g in GROUPS:
            rows = [r for r in failed if r["category"] == g]
            if not rows:
                continue
            lines.append(f"**{g}** ({len(rows)} failed)")
            lines += [f"- `{r['id']}` \"{r['prompt']}\" (seed {r['seed']}): {r['reason']}" for r in rows[:max_examples]]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def save_grid(images: Sequence[Any], captions: Sequence[str], passed: Sequence[bool],
              path: Union[str, os.PathLike], *, cell: int = 128, columns: Optional[int] = None) -> Path:
    """Write a PNG grid: each image (uint8 ``(H, W, 3)`` or PIL) scaled to ``cell`` pixels in a
    green (passed) or red (failed) frame, its caption printed under it.  Returns the path."""
    n = len(images)
    if not (n == len(captions) == len(passed)):
        raise ValueError(f"save_grid: {n} images, {len(captions)} captions and {len(passed)} verdicts differ")
    columns = columns or max(1, min(n, int(math.ceil(math.sqrt(n * 1.6)))))
    rows = max(1, int(math.ceil(n / columns)))
    font = ImageFont.load_default()
    chars = max(8, (cell + 8) // 6)
    text_h = 3 * 11 + 4
    frame = 4
    w, h = cell + 2 * frame, cell + 2 * frame + text_h
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (img, caption, ok) in enumerate(zip(images, captions, passed)):
        x, y = (k % columns) * w, (k // columns) * h
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
        draw.rectangle([x, y, x + w - 1, y + cell + 2 * frame - 1], fill=(30, 160, 60) if ok else (210, 40, 40))
        sheet.paste(pil.convert("RGB").resize((cell, cell), Image.NEAREST), (x + frame, y + frame))
        for j, line in enumerate(_wrap(caption, chars)[:3]):
            draw.text((x + 2, y + cell + 2 * frame + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_report(report: Mapping[str, Any], out_dir: Union[str, os.PathLike],
                 images: Optional[Sequence[Any]] = None) -> Dict[str, str]:
    """Write ``report.json``, ``report.md`` and (with ``images``, one per item) ``grid.png`` into
    ``out_dir``; returns the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = {"report.json": json.dumps(report, indent=1) + "\n", "report.md": report_markdown(report)}
    for name, content in text.items():
        atomic_write(out / name, lambda tmp, content=content: Path(tmp).write_text(content, encoding="utf-8"))
    files = {"json": str(out / "report.json"), "markdown": str(out / "report.md")}
    if images is not None:
        items = report["items"]
        files["grid"] = str(save_grid(images, [r["prompt"] for r in items], [r["passed"] for r in items],
                                      out / "grid.png"))
    return files

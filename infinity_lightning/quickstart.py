"""The quick start as a library function: tokenizer, transformer and a strict evaluation on CPU.

:func:`run_quickstart` is what ``infinity-lightning quickstart --out DIR`` runs.  One function per
phase, each timed in wall-clock and CPU seconds:

1. :func:`build_text_encoder`: a frozen tiny random T5 whose sentencepiece vocabulary is trained on
   the words of the shapes grammar and of the evaluation protocol (``DIR/text_encoder/``).
2. :func:`train_tokenizer`: the BSQ-VAE of ``recipes/tokenizer/quickstart.yaml`` on an endless
   stream of rendered scenes (``DIR/tokenizer.pth``), scored by PSNR on new scenes.
3. :func:`encode_scenes`: the transformer's training scenes (the ``data`` section of
   ``recipes/var/quickstart.yaml``) encoded once into latents and text features, plus a
   validation set of new scenes.
4. :func:`train_transformer`: the bitwise VAR of the VAR recipe on those latents; validation bit
   accuracy; the pipeline is exported to ``DIR`` (``InfinityPipeline.from_pretrained(DIR)``).
5. :func:`evaluate_pipeline`: the strict, GenEval-style protocol
   (:mod:`infinity_lightning.evaluation`, the shipped ``shapes_v1`` unless another is given):
   accuracy per category with 95% intervals, the overall score (mean of the six categories) and
   the held-out colour-shape pairs; ``DIR/eval/`` holds the report and a labelled grid.

The wall-clock budget: the two training phases get shares of what is left after the other
phases' estimated cost, and each trains under :class:`~infinity_lightning.callbacks.TimeBudget`,
so its learning-rate schedule follows elapsed time and ends complete at the budget even on a slow
machine.  ``summary.json`` says how many of the recipes' steps ran; targets are only judged for a
run that was not shortened.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

__all__ = ["run_quickstart", "PhaseContext", "load_recipes", "build_text_encoder", "train_tokenizer", "encode_scenes",
           "train_transformer", "export_pipeline", "evaluate_pipeline", "QUICK_OVERRIDES", "TARGETS", "format_summary",
           "psnr"]

#: What the full quick start aims for on an idle 2-core CPU (judged only for runs not shortened).
TARGETS = {"overall": 0.75, "min_category": 0.5, "single_object": 0.95, "held_out_pairs": 0.9}

#: Recipe overrides of ``--quick`` (a smoke run of a minute or two, for tests).
QUICK_OVERRIDES: Dict[str, List[str]] = {
    "tokenizer": ["trainer.max_steps=16", "data.batch_size=8", "data.num_samples=64", "optim.warmup_steps=4",
                  "optim.lr=0.005", "trainer.log_every_n_steps=10", "+model.overrides.base_ch=16",
                  "model.overrides.norm_groups=1"],
    "var": ["trainer.max_steps=8", "data.batch_size=8", "data.num_samples=64", "optim.warmup_steps=2",
            "trainer.log_every_n_steps=5", "callbacks.sample_logger=null"],
}
#: Sizes of the evaluation sets: full run and ``--quick``.
_FULL = dict(psnr_images=128, val_samples=256, subset=None)
_QUICK = dict(psnr_images=8, val_samples=16, subset=1)
#: Generator index ranges, disjoint from the training scenes (indices below ``num_samples``).
_PSNR_INDEX0 = 2_000_000
_VAL_INDEX0 = 3_000_000
#: Shares of the training time (after the other phases' reserve) for the tokenizer and transformer.
_TOKENIZER_SHARE = 0.3


# ----------------------------------------------------------------------------------------------
# run state
# ----------------------------------------------------------------------------------------------
@dataclass
class PhaseContext:
    """What every phase needs: where to write, the clock and the budget (scripts that reuse the
    phases, such as benchmarks/ablation_self_correction.py, build one)."""

    out: Path
    say: Callable[[str], None]
    device: torch.device
    budget_s: float
    quick: bool
    seed: int
    start: float = field(default_factory=time.perf_counter)
    phases: Dict[str, Dict[str, float]] = field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "cpu" if self.device.type == "cpu" else ("gpu" if self.device.type == "cuda" else self.device.type)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def timed(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, run: PhaseContext, name: str) -> None:
        self.run, self.name = run, name

    def __enter__(self) -> "_Phase":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.run.phases[self.name] = {"wall_s": round(time.perf_counter() - self.wall, 2),
                                      "cpu_s": round(time.process_time() - self.cpu, 2)}


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1]) over the whole set (one pooled MSE)."""
    mse = ((reconstructions.float().clamp(-1, 1) - targets.float().clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


# ----------------------------------------------------------------------------------------------
# recipes and the world
# ----------------------------------------------------------------------------------------------
def load_recipes(tokenizer_recipe: str, var_recipe: str, tokenizer_overrides: Sequence[str],
                 var_overrides: Sequence[str]):
    """The two recipes (checked), as plain dicts; both must train on the shapes world."""
    from .recipes import load_run_recipe, to_dict

    out = []
    for name, overrides in ((tokenizer_recipe, tokenizer_overrides), (var_recipe, var_overrides)):
        cfg, _, path = load_run_recipe(name, list(overrides))
        plain = to_dict(cfg, str(path))
        if (plain.get("data") or {}).get("name") != "shapes":
            raise ValueError(f"the quick start's recipes must train on data.name=shapes ({path} has "
                             f"{(plain.get('data') or {}).get('name')!r}); use `infinity-lightning fit` for other data")
        out.append(plain)
    return out[0], out[1]


def _shapes_world(var_cfg: Mapping[str, Any], protocol: Any):
    """The recipe's ShapesDataModule; its vocabulary and held-out pairs must be the protocol's."""
    from .datamodules.shapes import ShapesDataModule

    kwargs = {k: v for k, v in var_cfg["data"].items() if k != "name"}
    dm = ShapesDataModule(image_size=int(var_cfg["schedule"]["resolution"]), **kwargs)
    gen, world = dm.generator, protocol.world
    mine = (sorted(gen.colours), sorted(gen.shapes), sorted(f"{c} {s}" for c, s in gen.holdout))
    theirs = (sorted(world["colours"]), sorted(world["shapes"]), sorted(world["holdout_pairs"]))
    if mine != theirs:
        raise ValueError(f"the VAR recipe's shapes world (colours, shapes, held-out pairs) {mine} differs from the "
                         f"evaluation protocol's {theirs}; the protocol would test words the model never saw")
    return dm


# ----------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------
def build_text_encoder(run: PhaseContext, var_cfg: Mapping[str, Any], vocabulary: Sequence[str]):
    """Phase 1: the tiny T5 (``DIR/text_encoder``) with a vocabulary of ``vocabulary``'s words."""
    from .models.text_encoder import TextEncoder
    from .presets import transformer_config
    from .tiny import make_tiny_t5

    model = var_cfg["model"]
    width = int(transformer_config(model["transformer"], **dict(model.get("overrides") or {})).text_channels)
    folder = run.out / "text_encoder"
    with run.timed("text_encoder"):
        make_tiny_t5(folder, list(vocabulary), d_model=width, num_heads=max(1, width // 32), seed=run.seed)
        encoder = TextEncoder.from_pretrained(folder)
    run.say(f"[1/5] text encoder: tiny random T5 ({width} wide), vocabulary of the grammar and the protocol -> "
            f"{folder}")
    return encoder


def _fit(run: PhaseContext, built: Any, name: str, minutes: float, datamodule: Any = None):
    """Fit a built recipe under a :class:`TimeBudget`; returns (trainer, budget callback)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import TimeBudget

    budget = TimeBudget(minutes=max(minutes, 0.05))
    kw = dict(built.trainer_kwargs)
    # the recipe's checkpoint callback (if any) writes where the recipe says; none is added here
    checkpoints = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in built.callbacks)
    kw.update(logger=TensorBoardLogger(save_dir=str(run.out / "logs"), name=name, version=""),
              default_root_dir=str(run.out / "logs" / name), enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=checkpoints)
    trainer = pl.Trainer(callbacks=list(built.callbacks) + [budget, _Progress(run.say, name)], **kw)
    trainer.fit(built.module, datamodule=datamodule or built.datamodule)
    return trainer, budget


class _Progress(pl.Callback):
    """Prints the loss every tenth of the planned steps."""

    def __init__(self, say: Callable[[str], None], what: str) -> None:
        self.say, self.what = say, what

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, max(1, trainer.max_steps // 10)
        if step % every == 0:
            loss = trainer.callback_metrics.get("train/loss")
            self.say(f"  {self.what} step {step}/{trainer.max_steps}" + (f" loss {float(loss):.4f}" if loss is not None
                                                                        else ""))


def train_tokenizer(run: PhaseContext, tok_cfg: Mapping[str, Any], minutes: float):
    """Phase 2: the tokenizer recipe under a time budget; exported and scored on new scenes."""
    from .checkpoints import save_tokenizer
    from .recipes import build_run
    from .scales import latent_schedule

    with run.timed("tokenizer"):
        cfg = copy.deepcopy(dict(tok_cfg))
        cfg["trainer"] = {**cfg["trainer"], "accelerator": run.accelerator}
        built = build_run(cfg, run.out / "logs" / "tokenizer", source="tokenizer recipe")
        n_params = sum(p.numel() for p in built.module.tokenizer.parameters())
        run.say(f"[2/5] tokenizer: {n_params / 1e6:.2f}M parameters, up to {cfg['trainer']['max_steps']} steps of batch "
                f"{built.datamodule.batch_size} in {minutes:.1f} min")
        trainer, budget = _fit(run, built, "tokenizer", minutes)
        tokenizer = built.module.tokenizer.eval().requires_grad_(False).to(run.device)
        save_tokenizer(tokenizer, run.out / "tokenizer.pth", format="released")
        gen = built.datamodule.generator
        size = int(cfg["schedule"]["resolution"])
        grid = size // tokenizer.config.patch_size
        schedule = latent_schedule(grid, grid, "template")
        targets = _render(gen, range(_PSNR_INDEX0, _PSNR_INDEX0 + _sizes(run)["psnr_images"]), size)
        with torch.no_grad():
            recon = torch.cat([tokenizer.decode(tokenizer.quantize_multiscale(
                tokenizer.encode_raw(c.to(run.device)), schedule)[0]).float().cpu() for c in targets.split(64)])
    summary = {"parameters": n_params, **budget.summary(), "psnr_db": round(psnr(recon, targets), 2),
               "psnr_mean_image_baseline_db": round(psnr(targets.mean(0, keepdim=True).expand_as(targets), targets), 2),
               "schedule": [list(g) for g in schedule.grids], "norm_groups": tokenizer.config.norm_groups}
    run.say(f"      tokenizer PSNR {summary['psnr_db']:.2f} dB on {targets.shape[0]} new scenes (mean-image baseline "
            f"{summary['psnr_mean_image_baseline_db']:.2f} dB), {summary['steps']} steps -> {run.out / 'tokenizer.pth'}")
    return tokenizer, summary


def _sizes(run: PhaseContext) -> Dict[str, Any]:
    return dict(_QUICK if run.quick else _FULL)


def _render(generator: Any, indices: Sequence[int], size: int) -> torch.Tensor:
    """Rendered scenes of the generator's indices as (N, 3, size, size) in [-1, 1]."""
    import numpy as np

    from .datamodules.shapes import render_shapes

    arrays = [np.asarray(render_shapes(generator.spec(i), size, generator.background).convert("RGB"))
              for i in indices]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _scene_batches(generator: Any, indices: Sequence[int], size: int, batch: int = 128):
    indices = list(indices)
    for s in range(0, len(indices), batch):
        part = indices[s:s + batch]
        yield {"images": _render(generator, part, size), "captions": [generator.spec(i).caption for i in part],
               "h_div_w_template": 1.0}


def encode_scenes(run: PhaseContext, var_cfg: Mapping[str, Any], world: Any, tokenizer: Any, encoder: Any) -> Dict[str, Path]:
    """Phase 3: training and validation scenes as tokenizer latents and text features."""
    from .datamodules.latents import precompute_latents

    size, gen, n_train = int(var_cfg["schedule"]["resolution"]), world.generator, int(var_cfg["data"]["num_samples"])
    n_val = _sizes(run)["val_samples"]
    folder = run.out / "data"
    folder.mkdir(exist_ok=True)
    with run.timed("encode"):
        train = precompute_latents(tokenizer, _scene_batches(gen, range(n_train), size), folder / "train_latents.pt",
                                   text_encoder=encoder)
        val = precompute_latents(tokenizer, _scene_batches(gen, range(_VAL_INDEX0, _VAL_INDEX0 + n_val), size),
                                 folder / "val_latents.pt", text_encoder=encoder)
    run.say(f"[3/5] encoded {n_train} training and {n_val} validation scenes into latents and text features "
            f"({run.phases['encode']['wall_s']:.0f} s)")
    return {"train": train, "val": val}


def train_transformer(run: PhaseContext, var_cfg: Mapping[str, Any], files: Mapping[str, Path], tokenizer: Any, encoder: Any,
                      minutes: float):
    """Phase 4: the VAR recipe on the pre-encoded latents under a time budget; validation."""
    from .recipes import build_run

    with run.timed("transformer"):
        cfg = copy.deepcopy(dict(var_cfg))
        cfg["trainer"] = {**cfg["trainer"], "accelerator": run.accelerator}
        cfg["model"] = {**cfg["model"], "text_encoder": None, "cache_text_features": False}
        cfg["data"] = {"name": "latents", "path": str(files["train"]), "batch_size": cfg["data"]["batch_size"],
                       "seed": run.seed}
        built = build_run(cfg, run.out / "logs" / "transformer", source="VAR recipe", tokenizer=tokenizer)
        built.module.text_encoder = encoder  # for sample images; batches carry their text features
        n_params = sum(p.numel() for p in built.module.transformer.parameters())
        run.say(f"[4/5] transformer: {n_params / 1e6:.2f}M parameters, up to {cfg['trainer']['max_steps']} steps of "
                f"batch {cfg['data']['batch_size']} in {minutes:.1f} min")
        trainer, budget = _fit(run, built, "transformer", minutes)
        val = _validate(built.module, files["val"], int(cfg["data"]["batch_size"]))
    summary = {"preset": var_cfg["model"]["transformer"], "parameters": n_params, **budget.summary(),
               "batch_size": int(cfg["data"]["batch_size"]), "train_scenes": int(var_cfg["data"]["num_samples"]),
               "val_bit_accuracy": round(val["acc"], 4), "val_token_accuracy": round(val["token_acc"], 4),
               "val_loss": round(val["loss"], 4), "val_bit_accuracy_per_scale": [round(a, 4) for a in val["acc_scale"]]}
    run.say(f"      validation bit accuracy {val['acc']:.4f} (per scale "
            f"{', '.join(f'{a:.3f}' for a in val['acc_scale'])}), {summary['steps']} steps")
    return built.module.transformer.eval().requires_grad_(False), summary


@torch.no_grad()
def _validate(module: Any, path: Path, batch_size: int) -> Dict[str, Any]:
    """Teacher-forced loss and bit accuracies on a latents file (no flips, no text dropout)."""
    from .datamodules.latents import LatentsDataModule

    dm = LatentsDataModule(path, batch_size=batch_size, shuffle=False, drop_last=False)
    was_training = module.training
    module.eval()
    totals: Dict[str, Any] = {"loss": 0.0, "acc": 0.0, "token_acc": 0.0, "acc_scale": None}
    n = 0
    try:
        for i, batch in enumerate(dm.train_dataloader()):
            out = module.compute_loss(batch, "val", i)
            b = int(out["batch_size"])
            for key in ("loss", "acc", "token_acc"):
                totals[key] += float(out[key]) * b
            per = [float(a) * b for a in out["acc_scale"]]
            totals["acc_scale"] = per if totals["acc_scale"] is None else [x + y for x, y in zip(totals["acc_scale"], per)]
            n += b
    finally:
        module.train(was_training)
    return {"loss": totals["loss"] / n, "acc": totals["acc"] / n, "token_acc": totals["token_acc"] / n,
            "acc_scale": [x / n for x in totals["acc_scale"]]}


def export_pipeline(run: PhaseContext, transformer: Any, tokenizer: Any, encoder: Any, var_cfg: Mapping[str, Any]):
    """The trained components as a pipeline folder (``DIR``), loaded back as a user would."""
    from .pipeline import InfinityPipeline
    from .sampling import SamplingConfig

    sampling = SamplingConfig.from_dict(var_cfg.get("sampling"), "VAR recipe, section 'sampling'")
    pipe = InfinityPipeline(transformer, tokenizer, encoder, device=run.device,
                            resolution=int(var_cfg["schedule"]["resolution"]), sampling=sampling)
    pipe.save_pretrained(run.out, format="released")
    return InfinityPipeline.from_pretrained(run.out, device=run.device)


def evaluate_pipeline(run: PhaseContext, pipe: Any, protocol: Any) -> Dict[str, Any]:
    """Phase 5: the strict protocol through the exported pipeline; writes ``DIR/eval``."""
    from .evaluation import evaluate

    def generate(prompts: List[str], seeds: List[int]) -> torch.Tensor:
        return pipe(prompts, seed=seeds, output_type="pt", batch_size=64, progress=False).images

    with run.timed("evaluate"):
        report = evaluate(generate, protocol, subset=_sizes(run)["subset"], batch_size=64, out_dir=run.out / "eval",
                          settings=pipe.sampling.to_dict(["cfg", "tau", "top_k", "top_p"]))
    _tensorboard(run.out / "logs" / "eval", report)
    run.say(f"[5/5] judged {report['protocol']['items']} generated images with the strict checker -> "
            f"{run.out / 'eval'}")
    return report


def _tensorboard(folder: Path, report: Mapping[str, Any]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for name, row in report["categories"].items():
            writer.add_scalar(f"eval/{name}", float(row["accuracy"]), 0)
        writer.add_scalar("eval/overall", float(report["overall"]["accuracy"]), 0)
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------
# the quick start
# ----------------------------------------------------------------------------------------------
def run_quickstart(out: Union[str, Path] = "runs/quickstart", *, budget_minutes: float = 15.0, seed: int = 0,
                   device: str = "cpu", threads: Optional[int] = None, quick: bool = False,
                   tokenizer_recipe: str = "tokenizer/quickstart", var_recipe: str = "var/quickstart",
                   tokenizer_overrides: Sequence[str] = (), var_overrides: Sequence[str] = (),
                   protocol: Optional[Union[str, Path]] = None,
                   say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train a tokenizer and a transformer on the shapes world, evaluate strictly; returns the summary.

    Args:
        out: output folder (created).
        budget_minutes: wall-clock budget of the whole run; training follows it (module docstring).
        seed: seeds the recipes (``seed`` of both) and the networks; the evaluation seeds are the
            protocol's own (a range no recipe was tuned on).
        device: ``"cpu"`` (the design target) or e.g. ``"cuda"``.
        threads: ``torch.set_num_threads`` (default: torch's choice, one per core).
        quick: a smoke run (:data:`QUICK_OVERRIDES`, one protocol item per category).
        tokenizer_recipe, var_recipe: recipe names or files; ``*_overrides`` dot-lists on top.
        protocol: an evaluation protocol file (default: the shipped ``shapes_v1``).
        say: where progress lines go (default ``print``).

    Returns the dictionary written to ``<out>/summary.json``.
    """
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*`IterableDataset` has `__len__`.*",
                        ".*defined a `validation_step` but have no `val_dataloader`.*", ".*module\\(s\\) in eval mode.*"):
            warnings.filterwarnings("ignore", message=message)
        return _quickstart(Path(out), budget_minutes, seed, device, threads, quick, tokenizer_recipe, var_recipe,
                           tokenizer_overrides, var_overrides, protocol, say or (lambda s: print(s, flush=True)))


def _quickstart(out: Path, budget_minutes: float, seed: int, device: str, threads: Optional[int], quick: bool,
                tokenizer_recipe: str, var_recipe: str, tokenizer_overrides: Sequence[str],
                var_overrides: Sequence[str], protocol_path: Any, say: Callable[[str], None]) -> Dict[str, Any]:
    from .evaluation import load_protocol

    out.mkdir(parents=True, exist_ok=True)
    run = PhaseContext(out, say, torch.device(device), float(budget_minutes) * 60.0, bool(quick), int(seed))
    if threads:
        torch.set_num_threads(int(threads))
    if run.device.type == "cpu":
        torch.set_flush_denormal(True)  # fp32 steps slow down 3-4x at random without it
    protocol = load_protocol(protocol_path)
    seeds = [f"seed={run.seed}", f"data.seed={run.seed}"]
    tok_cfg, var_cfg = load_recipes(tokenizer_recipe, var_recipe,
                                    (QUICK_OVERRIDES["tokenizer"] if quick else []) + seeds + list(tokenizer_overrides),
                                    (QUICK_OVERRIDES["var"] if quick else []) + [f"seed={run.seed}"] + list(var_overrides))
    world = _shapes_world(var_cfg, protocol)
    say(f"quickstart: output in {out} (budget {budget_minutes:g} min, {torch.get_num_threads()} threads, "
        f"device {run.device}{', quick smoke run' if quick else ''})")
    vocabulary = [world.generator.spec(i).caption for i in range(2000)] + [it.prompt for it in protocol.items]
    encoder = build_text_encoder(run, var_cfg, vocabulary)
    reserve = _reserve_s(var_cfg, protocol, run)
    tokenizer, tok_summary = train_tokenizer(run, tok_cfg, _TOKENIZER_SHARE * (run.left_s() - reserve) / 60)
    files = encode_scenes(run, var_cfg, world, tokenizer, encoder)
    minutes = (run.left_s() - 0.6 * reserve) / 60
    transformer, tr_summary = train_transformer(run, var_cfg, files, tokenizer, encoder, minutes)
    pipe = export_pipeline(run, transformer, tokenizer, encoder, var_cfg)
    report = evaluate_pipeline(run, pipe, protocol)
    summary = _summary(run, tok_cfg, var_cfg, tok_summary, tr_summary, report, pipe)
    _save_recipes(out, tok_cfg, var_cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(format_summary(summary))
    return summary


def _reserve_s(var_cfg: Mapping[str, Any], protocol: Any, run: PhaseContext) -> float:
    """Seconds set aside for encoding, export and evaluation (measured rates of a 2-core CPU:
    about 10 ms per encoded scene and 0.25 s per judged image, with a margin)."""
    n_eval = len(protocol.items) if not run.quick else len(protocol.groups())
    return 20.0 + 0.01 * int(var_cfg["data"]["num_samples"]) + 0.25 * n_eval


def _summary(run: PhaseContext, tok_cfg: Mapping[str, Any], var_cfg: Mapping[str, Any], tok: Dict[str, Any],
             tr: Dict[str, Any], report: Mapping[str, Any], pipe: Any) -> Dict[str, Any]:
    categories = {k: dict(v) for k, v in report["categories"].items()}
    shortened = bool(tok["shortened"] or tr["shortened"])
    summary: Dict[str, Any] = {
        "command": "quickstart", "out": str(run.out), "quick": run.quick, "seed": run.seed,
        "budget_minutes": round(run.budget_s / 60, 2), "device": str(run.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "tokenizer": tok, "transformer": tr,
        "evaluation": {"protocol": report["protocol"], "overall": report["overall"], "categories": categories,
                       "held_out_pairs": report.get("held_out_pairs"), "report": str(run.out / "eval" / "report.json")},
        "sampling": pipe.sampling.to_dict(["cfg", "tau", "top_k", "top_p"]),
        "schedule": [list(g) for g in pipe.schedule.grids] if getattr(pipe, "schedule", None) is not None else None,
        "shortened": shortened,
        "times": {**run.phases, "total": {"wall_s": round(time.perf_counter() - run.start, 2)}},
    }
    summary["targets"] = _judge_targets(summary, shortened)
    return summary


def _judge_targets(summary: Mapping[str, Any], shortened: bool) -> Dict[str, Any]:
    """Each target with the measured value; ``met`` is None (not judged) for a shortened run."""
    ev = summary["evaluation"]
    cats = {k: v["accuracy"] for k, v in ev["categories"].items()}
    held = (ev.get("held_out_pairs") or {}).get("accuracy")
    measured = {"overall": ev["overall"]["accuracy"], "min_category": min(cats.values()) if cats else None,
                "single_object": cats.get("single_object"), "held_out_pairs": held}
    rows = {}
    for name, target in TARGETS.items():
        value = measured[name]
        met = None if (shortened or value is None) else bool(value >= target)
        rows[name] = {"target": target, "measured": value, "met": met}
    return {"judged": not shortened, "rows": rows,
            "note": ("not judged: training was shortened by the time budget" if shortened else "judged on a full run")}


def _save_recipes(out: Path, tok_cfg: Mapping[str, Any], var_cfg: Mapping[str, Any]) -> None:
    from .recipes import save_recipe

    folder = out / "recipes"
    folder.mkdir(exist_ok=True)
    save_recipe(dict(tok_cfg), folder / "tokenizer.yaml")
    save_recipe(dict(var_cfg), folder / "var.yaml")


def format_summary(summary: Mapping[str, Any]) -> str:
    """The final table of a quick-start summary (plain text)."""
    ev, rows = summary.get("evaluation", {}), []

    def pct(row: Mapping[str, Any]) -> str:
        if not row.get("n"):
            return "n/a"
        lo, hi = row.get("ci95", (None, None))
        ci = f" [{lo:.0%}, {hi:.0%}]" if lo is not None else ""
        return f"{row['accuracy']:.1%}{ci} of {row['n']}"

    if ev:
        rows.append(("overall (mean of the categories)", f"{ev['overall']['accuracy']:.1%}"))
        for name, row in ev.get("categories", {}).items():
            rows.append((name.replace("_", " "), pct(row)))
        if (ev.get("held_out_pairs") or {}).get("n"):
            rows.append(("held-out colour-shape pairs", pct(ev["held_out_pairs"])))
    for phase in ("tokenizer", "transformer"):
        part = summary.get(phase) or {}
        if part:
            extra = " (shortened by the time budget)" if part.get("shortened") else ""
            rows.append((f"{phase} steps", f"{part['steps']} of {part['planned_steps']}{extra}"))
    tok = summary.get("tokenizer") or {}
    if "psnr_db" in tok:
        rows.append(("tokenizer PSNR", f"{tok['psnr_db']:.2f} dB (mean-image baseline "
                                       f"{tok['psnr_mean_image_baseline_db']:.2f} dB)"))
    tr = summary.get("transformer") or {}
    if "val_bit_accuracy" in tr:
        rows.append(("transformer val bit accuracy", f"{tr['val_bit_accuracy']:.4f}"))
    times = summary.get("times", {})
    if "total" in times:
        rows.append(("time", f"{times['total']['wall_s'] / 60:.1f} min"))
    targets = summary.get("targets")
    if targets:
        if not targets["judged"]:
            rows.append(("targets", targets["note"]))
        else:
            for name, row in targets["rows"].items():
                rows.append((f"target {name}", f">= {row['target']:.0%}: {'met' if row['met'] else 'NOT met'}"))
    if not rows:
        return ""
    width = max(len(a) for a, _ in rows)
    line = "-" * (width + 3 + max(len(b) for _, b in rows))
    return "\n".join([line] + [f"{a.ljust(width)} | {b}" for a, b in rows] + [line])

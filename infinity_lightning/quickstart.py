"""The quick start as a library function: tokenizer, transformer, samples and scores on CPU.

:func:`run_quickstart` is what ``infinity-lightning quickstart --out DIR`` runs (notebooks and
tests call it directly).  Phases, each timed in wall-clock and CPU seconds:

1. ``text_encoder``: a frozen tiny random T5 whose sentencepiece vocabulary is trained on every
   caption of the shapes grammar (training, held-out and two-object prompts), saved as
   ``DIR/text_encoder/``.
2. ``tokenizer``: :class:`~infinity_lightning.lit.tokenizer_module.BSQTokenizerModule` trained
   from ``recipes/tokenizer/quickstart.yaml`` on an endless stream of rendered shapes; exported
   as ``DIR/tokenizer.pth`` (released layout) and scored by PSNR on new scenes.
3. ``encode``: the transformer's training scenes (the ``data`` section of
   ``recipes/var/quickstart.yaml``) encoded once into tokenizer latents, and the captions into
   text features (:func:`~infinity_lightning.lit.var_module.precompute_latents`), plus a
   validation set of new scenes.
4. ``transformer``: :class:`~infinity_lightning.lit.var_module.BitwiseVARModule` trained on the
   latents (the frozen encoder and T5 never run in the loop); validation bit accuracy;
   exported as ``DIR/transformer.pth`` (+ ``transformer.json``) with ``pipeline.json``.
5. ``evaluate``: :meth:`InfinityPipeline.from_pretrained(DIR) <infinity_lightning.InfinityPipeline.from_pretrained>`
   generates images for new seeds; :class:`~infinity_lightning.datamodules.shapes.ShapesChecker`
   scores colour and shape on in-distribution single-object prompts, on the held-out
   colour-shape pairs and on two-object prompts.  ``DIR/samples.png`` shows a captioned grid.

Everything lands in ``DIR``: ``summary.json`` (scores, settings, per-phase times),
``samples.png``, TensorBoard logs under ``logs/`` (``tokenizer``, ``transformer``, ``eval``), the
resolved recipes under ``recipes/``, and the weights, which
``InfinityPipeline.from_pretrained(DIR)`` loads.

The budget guard: before training, a few steps of each model are timed; when the recipes' step
counts would not fit into ``budget_minutes`` (with a reserve for encoding and evaluation), both
step counts are scaled down by the same factor, and the transformer's again after the tokenizer
finished.  A phase that still runs past its share stops early.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["run_quickstart", "fit_steps", "QUICK_OVERRIDES", "TARGET_ACCURACY", "format_summary", "psnr"]

#: In-distribution colour-and-shape accuracy the full quick start is designed to reach.
TARGET_ACCURACY = 0.85

#: Recipe overrides of ``--quick`` (a smoke run of well under a minute, for tests).
QUICK_OVERRIDES: Dict[str, List[str]] = {
    # a 4x cheaper tokenizer (16 base channels), so that enough steps fit to beat the mean image
    "tokenizer": ["trainer.max_steps=100", "data.batch_size=8", "data.num_samples=64", "optim.warmup_steps=10",
                  "optim.lr=0.005", "trainer.log_every_n_steps=10", "+model.overrides.base_ch=16",
                  "model.overrides.norm_groups=1"],
    "var": ["trainer.max_steps=12", "data.batch_size=8", "data.num_samples=64", "module.warmup_steps=3",
            "trainer.log_every_n_steps=5", "callbacks.sample_logger.every_n_steps=0"],
}
#: Evaluation sizes of ``--quick`` (in-distribution prompts come from ``num_eval_prompts``).
_QUICK_EVAL = dict(psnr_images=8, val_samples=16, holdout_per_pair=1, two_object_prompts=2)
_FULL_EVAL = dict(psnr_images=128, val_samples=256, holdout_per_pair=16, two_object_prompts=32)

#: Index ranges of the shapes generator, disjoint so that evaluation scenes are new scenes.
_PSNR_INDEX0 = 2_000_000
_VAL_INDEX0 = 3_000_000
#: Base of the generation seeds (training never samples with seeds in this range).
_EVAL_SEED0 = 1_000_000


# ----------------------------------------------------------------------------------------------
# timing and budget
# ----------------------------------------------------------------------------------------------
class _Clock:
    """Wall-clock and process CPU seconds of named phases."""

    def __init__(self) -> None:
        self.start_wall = time.perf_counter()
        self.start_cpu = time.process_time()
        self.phases: Dict[str, Dict[str, float]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_wall

    def phase(self, name: str) -> "_PhaseTimer":
        return _PhaseTimer(self, name)

    def totals(self) -> Dict[str, float]:
        return {"wall_s": round(self.elapsed(), 2), "cpu_s": round(time.process_time() - self.start_cpu, 2)}


class _PhaseTimer:
    def __init__(self, clock: _Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> "_PhaseTimer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clock.phases[self.name] = {"wall_s": round(time.perf_counter() - self.wall, 2),
                                        "cpu_s": round(time.process_time() - self.cpu, 2)}


#: Share of the budget planned for; the rest absorbs the step-time probes' error.
_BUDGET_SHARE = 0.92


def fit_steps(tokenizer_steps: int, transformer_steps: int, tokenizer_step_s: float, transformer_step_s: float,
              available_s: float, min_steps: int = 10) -> Tuple[int, int, float]:
    """The budget guard's plan: ``(tokenizer_steps, transformer_steps, scale)``.

    When ``tokenizer_steps * tokenizer_step_s + transformer_steps * transformer_step_s`` exceeds
    ``available_s``, both counts shrink by the same factor ``scale`` (at least ``min_steps``
    each); otherwise they are kept and ``scale`` is 1.
    """
    planned = tokenizer_steps * tokenizer_step_s + transformer_steps * transformer_step_s
    if planned <= available_s:
        return int(tokenizer_steps), int(transformer_steps), 1.0
    scale = max(float(available_s), 0.0) / planned
    return (max(min_steps, int(tokenizer_steps * scale)), max(min_steps, int(transformer_steps * scale)), scale)


def _deadline_callback(deadline: float, what: str, say: Callable[[str], None], every: int):
    """A Lightning callback that prints progress every ``every`` steps and stops training once
    ``time.perf_counter()`` passes ``deadline`` (the budget guard's last resort)."""
    import lightning.pytorch as pl

    class _Progress(pl.Callback):
        def __init__(self) -> None:
            self.stopped_at: Optional[int] = None
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if every and (step % every == 0 or step == trainer.max_steps):
                loss = trainer.callback_metrics.get("train/loss")
                acc = trainer.callback_metrics.get("train/acc")
                extra = f" loss {float(loss):.4f}" if loss is not None else ""
                extra += f" bit acc {float(acc):.3f}" if acc is not None else ""
                say(f"  {what} step {step}/{trainer.max_steps}{extra} ({time.perf_counter() - self.t0:.0f} s)")
            if time.perf_counter() > deadline and not trainer.should_stop:
                self.stopped_at = step
                say(f"  {what}: time budget reached at step {step}; stopping this phase early")
                trainer.should_stop = True

    return _Progress()


# ----------------------------------------------------------------------------------------------
# data helpers
# ----------------------------------------------------------------------------------------------
def _images_tensor(pil_images: Sequence[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in pil_images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _scene_batches(generator: Any, indices: Sequence[int], batch_size: int, image_size: int
                   ) -> Iterator[Dict[str, Any]]:
    """Batches ``{"images", "captions", "h_div_w_template"}`` of the generator's scenes."""
    from .datamodules.shapes import render_shapes

    indices = list(indices)
    for s in range(0, len(indices), batch_size):
        specs = [generator.spec(i) for i in indices[s:s + batch_size]]
        images = [render_shapes(spec, image_size, generator.background) for spec in specs]
        yield {"images": _images_tensor(images), "captions": [spec.caption for spec in specs],
               "h_div_w_template": 1.0}


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1]) over the whole set (one pooled MSE)."""
    mse = ((reconstructions.float().clamp(-1, 1) - targets.float().clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(colour: str, shape: str) -> str:
    return f"{_article(colour)} {colour} {shape}"


def _all_captions(generator: Any) -> List[str]:
    """Every single-object and two-object caption of the vocabulary (for the T5 vocabulary)."""
    singles = [_caption(c, s) for c in generator.colours for s in generator.shapes]
    pairs = [f"{a} and {b}" for a in singles[:8] for b in singles[-8:]]
    return singles + pairs


@dataclass
class _Prompt:
    caption: str
    targets: List[Tuple[str, str]]  # (colour, shape) per object the caption names
    group: str
    seed: int
    result: Dict[str, Any] = field(default_factory=dict)


def _eval_prompts(generator: Any, n_in: int, holdout_per_pair: int, n_two: int, seed: int) -> List[_Prompt]:
    """In-distribution prompts cycle over the training pairs (balanced); held-out pairs repeat
    ``holdout_per_pair`` times; two-object prompts pair two training pairs of different colours
    and shapes.  Seeds are new (``_EVAL_SEED0 + ...``) and distinct per image."""
    rng = np.random.default_rng([seed, 11])
    train = list(generator.train_pairs)
    order = [train[i] for i in rng.permutation(len(train))]
    prompts: List[_Prompt] = []
    for i in range(n_in):
        c, s = order[i % len(order)]
        prompts.append(_Prompt(_caption(c, s), [(c, s)], "in_distribution", 0))
    for c, s in sorted(generator.holdout):
        for _ in range(holdout_per_pair):
            prompts.append(_Prompt(_caption(c, s), [(c, s)], "held_out_pairs", 0))
    for _ in range(n_two):
        for _attempt in range(100):
            a, b = (train[int(k)] for k in rng.choice(len(train), size=2, replace=False))
            if a[0] != b[0] and a[1] != b[1]:
                break
        prompts.append(_Prompt(f"{_caption(*a)} and {_caption(*b)}", [a, b], "two_objects", 0))
    for k, p in enumerate(prompts):
        p.seed = _EVAL_SEED0 + 1000 * int(seed) + k
    return prompts


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------
def _load_recipes(tokenizer_recipe: str, var_recipe: str, tokenizer_overrides: Sequence[str],
                  var_overrides: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    from .lit.build import load_var_recipe
    from .lit.tokenizer_module import TOKENIZER_RECIPE_SCHEMA
    from .recipes import load_recipe, to_dict

    tok = to_dict(load_recipe(tokenizer_recipe, list(tokenizer_overrides), schema=TOKENIZER_RECIPE_SCHEMA),
                  str(tokenizer_recipe))
    var = to_dict(load_var_recipe(var_recipe, list(var_overrides)), str(var_recipe))
    for name, cfg in (("tokenizer", tok), ("var", var)):
        if (cfg.get("data") or {}).get("name") != "shapes":
            raise ValueError(f"the quick start's {name} recipe must train on data.name=shapes "
                             f"(got {(cfg.get('data') or {}).get('name')!r}); use `infinity-lightning fit` for other data")
    return tok, var


def _shapes_datamodule(data_cfg: Mapping[str, Any]):
    """The :class:`ShapesDataModule` of a recipe's ``data`` section (its ``generator`` draws the scenes)."""
    from .datamodules.shapes import ShapesDataModule
    from .recipes import check_kwargs

    kwargs = {k: v for k, v in data_cfg.items() if k != "name"}
    dm = ShapesDataModule(**check_kwargs(ShapesDataModule, kwargs, "recipe section 'data'"))
    return dm


def _steps(cfg: Mapping[str, Any]) -> int:
    steps = int((cfg.get("trainer") or {}).get("max_steps") or 0)
    if steps <= 0:
        raise ValueError("the quick start's recipes need trainer.max_steps > 0")
    return steps


# ----------------------------------------------------------------------------------------------
# step-time probes (for the budget guard)
# ----------------------------------------------------------------------------------------------
def _autocast(precision: Any, device: torch.device):
    enabled = "bf16" in str(precision)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _time_steps(step: Callable[[], None], n: int = 3) -> float:
    step()  # warm-up (allocations, kernel selection)
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def _probe_tokenizer_step(module: Any, batch: Mapping[str, Any], precision: Any, device: torch.device) -> float:
    """Seconds per tokenizer training step, measured on a copy (the real module is untouched)."""
    probe = copy.deepcopy(module).to(device)
    images = batch["images"].to(device)
    opt = torch.optim.AdamW([p for p in probe.tokenizer.parameters() if p.requires_grad], lr=1e-4)
    state = torch.random.get_rng_state()

    def step() -> None:
        with _autocast(precision, device):
            out = probe.reconstruct(images, train=True)
            loss = probe.generator_losses(images, out, adversarial=False)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        return _time_steps(step)
    finally:
        torch.random.set_rng_state(state)


def _probe_transformer_step(preset: str, overrides: Mapping[str, Any], batch_size: int, bits: int,
                            latent_hw: int, text_width: int, precision: Any, device: torch.device) -> float:
    """Seconds per transformer training step of the recipe's architecture on random latents."""
    from .lit.var_module import BitwiseVARModule
    from .models.infinity import InfinityTransformer
    from .presets import transformer_config

    state = torch.random.get_rng_state()
    try:
        model = InfinityTransformer(transformer_config(preset, **dict(overrides or {}))).to(device)
        module = BitwiseVARModule(model, None, None, pn=None, image_size=None, lr=1e-4).to(device)
        batch = {"latents": torch.randn(batch_size, bits, latent_hw, latent_hw),
                 "text_features": [torch.randn(5, text_width) for _ in range(batch_size)],
                 "h_div_w_template": 1.0, "captions": [""] * batch_size}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with _autocast(precision, device):
                loss = module.compute_loss(batch, "train")["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return _time_steps(step)
    finally:
        torch.random.set_rng_state(state)


# ----------------------------------------------------------------------------------------------
# grid
# ----------------------------------------------------------------------------------------------
def _samples_grid(items: Sequence[Tuple[torch.Tensor, str, Optional[bool]]], columns: int = 8, scale: int = 2):
    """A PIL grid of (image in [-1, 1], caption, correct) with the caption under each image and
    a green (right) or red (wrong) frame."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    size = int(items[0][0].shape[-1]) * scale
    pad, text_h = 4, 26
    cols = min(columns, len(items))
    rows = math.ceil(len(items) / cols)
    tile_w, tile_h = size + 2 * pad, size + 2 * pad + text_h
    canvas = Image.new("RGB", (cols * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (image, caption, ok) in enumerate(items):
        r, c = divmod(k, cols)
        x, y = c * tile_w, r * tile_h
        arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
        if ok is not None:
            draw.rectangle([x + 1, y + 1, x + tile_w - 2, y + size + 2 * pad - 2],
                           fill=(40, 160, 60) if ok else (210, 40, 40))
        canvas.paste(tile, (x + pad, y + pad))
        words, lines = caption.split(), [""]
        for w in words:  # wrap the caption into at most two lines of the tile's width
            trial = (lines[-1] + " " + w).strip()
            if draw.textlength(trial, font=font) <= tile_w - 4 or not lines[-1]:
                lines[-1] = trial
            else:
                lines.append(w)
        for j, line in enumerate(lines[:2]):
            draw.text((x + 2, y + size + 2 * pad + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
    return canvas


# ----------------------------------------------------------------------------------------------
# the quick start
# ----------------------------------------------------------------------------------------------
def run_quickstart(out: Union[str, Path] = "runs/quickstart", *, budget_minutes: float = 15.0, seed: int = 0,
                   num_eval_prompts: int = 128, device: str = "cpu", threads: Optional[int] = None,
                   quick: bool = False, tau: Optional[float] = None,
                   tokenizer_recipe: str = "tokenizer/quickstart", var_recipe: str = "var/quickstart",
                   tokenizer_overrides: Sequence[str] = (), var_overrides: Sequence[str] = (),
                   say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train a tokenizer and a transformer on the shapes set, generate, score; returns the summary.

    Args:
        out: output folder (created; files of an earlier run are overwritten).
        budget_minutes: wall-clock budget of the whole run; step counts shrink to fit it.
        seed: seeds the recipes (``seed`` of both), the networks and the evaluation seeds.
        num_eval_prompts: in-distribution single-object prompts to score (one image each).
        device: ``"cpu"`` (the design target) or e.g. ``"cuda"``.
        threads: ``torch.set_num_threads`` (default: torch's choice, one per core).
        quick: a smoke run of tiny step counts and evaluation sets (:data:`QUICK_OVERRIDES`).
        tau: sampling temperature (default: the VAR recipe's ``module.sample_kwargs.tau``).
        tokenizer_recipe, var_recipe: recipe names or files; ``*_overrides`` are dot-lists
            applied on top (after the ``quick`` ones).
        say: where progress lines go (default ``print``).

    Returns the dictionary written to ``<out>/summary.json``.
    """
    with warnings.catch_warnings():
        # Lightning's notes about single-process loading and the absent validation loader are
        # expected here (the data is in memory; validation runs after training).
        for message in (".*does not have many workers.*", ".*LeafSpec.*",
                        ".*defined a `validation_step` but have no `val_dataloader`.*",
                        ".*`IterableDataset` has `__len__` defined.*", ".*module\\(s\\) in eval mode.*"):
            warnings.filterwarnings("ignore", message=message)
        return _run(out, budget_minutes=budget_minutes, seed=seed, num_eval_prompts=num_eval_prompts, device=device,
                    threads=threads, quick=quick, tau=tau, tokenizer_recipe=tokenizer_recipe, var_recipe=var_recipe,
                    tokenizer_overrides=tokenizer_overrides, var_overrides=var_overrides, say=say)


def _run(out: Union[str, Path], *, budget_minutes: float, seed: int, num_eval_prompts: int, device: str,
         threads: Optional[int], quick: bool, tau: Optional[float], tokenizer_recipe: str, var_recipe: str,
         tokenizer_overrides: Sequence[str], var_overrides: Sequence[str],
         say: Optional[Callable[[str], None]]) -> Dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    say = say or (lambda s: print(s, flush=True))
    clock = _Clock()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    budget_s = float(budget_minutes) * 60.0
    dev = torch.device(device)
    accelerator = "cpu" if dev.type == "cpu" else ("gpu" if dev.type == "cuda" else dev.type)
    if threads:
        torch.set_num_threads(int(threads))
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # fp32 steps slow down 3-4x at random without it
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ev = dict(_QUICK_EVAL if quick else _FULL_EVAL)

    tok_over = (QUICK_OVERRIDES["tokenizer"] if quick else []) + [f"seed={int(seed)}", f"data.seed={int(seed)}"]
    var_over = (QUICK_OVERRIDES["var"] if quick else []) + [f"seed={int(seed)}"]
    tok_cfg, var_cfg = _load_recipes(tokenizer_recipe, var_recipe, tok_over + list(tokenizer_overrides),
                                     var_over + list(var_overrides))
    tok_cfg.setdefault("trainer", {})["accelerator"] = accelerator
    var_cfg.setdefault("trainer", {})["accelerator"] = accelerator
    sample_kwargs = dict(var_cfg["module"].get("sample_kwargs") or {})
    sample_kwargs.setdefault("cfg", 3.0)
    sample_kwargs.setdefault("top_k", 900)
    sample_kwargs.setdefault("top_p", 0.97)
    sample_kwargs.setdefault("tau", 1.0)
    if tau is not None:
        sample_kwargs["tau"] = float(tau)
        var_cfg["module"]["sample_kwargs"] = dict(sample_kwargs)

    var_dm = _shapes_datamodule(var_cfg["data"])
    gen = var_dm.generator
    image_size = int(var_cfg["data"].get("image_size") or 64)
    summary: Dict[str, Any] = {
        "command": "quickstart", "out": str(out), "quick": bool(quick), "seed": int(seed),
        "budget_minutes": float(budget_minutes), "device": str(dev), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    say(f"quickstart: output in {out} (budget {budget_minutes:g} min, {torch.get_num_threads()} threads, "
        f"device {dev}{', quick smoke run' if quick else ''})")

    # -- 1. text encoder ---------------------------------------------------------------------
    from .models.text_encoder import TextEncoder
    from .tiny import make_tiny_t5

    with clock.phase("text_encoder"):
        te_dir = out / "text_encoder"
        width = int(_transformer_text_width(var_cfg))
        make_tiny_t5(te_dir, _all_captions(gen), d_model=width, num_heads=max(1, width // 32), seed=int(seed))
        text_encoder = TextEncoder.from_pretrained(te_dir)
    say(f"[1/5] text encoder: tiny random T5 ({width} wide) with a caption vocabulary -> {te_dir}")

    # -- budget plan ---------------------------------------------------------------------------
    from .lit.tokenizer_module import build_tokenizer_training

    tok_module, tok_dm, tok_trainer_kw, tok_callbacks = build_tokenizer_training(tok_cfg)
    tok_dm.setup("fit")
    probe_batch = next(iter(tok_dm.train_dataloader()))
    tok_steps, var_steps = _steps(tok_cfg), _steps(var_cfg)
    with clock.phase("probe"):
        t_tok = _probe_tokenizer_step(tok_module, probe_batch, tok_cfg["trainer"].get("precision"), dev)
        bits = int(tok_module.tokenizer.config.codebook_dim)
        latent_hw = image_size // int(tok_module.tokenizer.config.patch_size)
        t_var = _probe_transformer_step(var_cfg["model"]["transformer"], var_cfg["model"].get("overrides") or {},
                                        int(var_cfg["data"]["batch_size"]), bits, latent_hw, width,
                                        var_cfg["trainer"].get("precision"), dev)
    n_train = int(var_cfg["data"]["num_samples"])
    n_eval_images = int(num_eval_prompts) + len(gen.holdout) * ev["holdout_per_pair"] + ev["two_object_prompts"]
    # Reserve for the untimed phases: encoding (about 3 ms per scene on 2 cores), evaluation
    # (generation + decoding + checking, about 50 ms per image), fixed costs.
    reserve = 20.0 + 0.003 * (n_train + ev["val_samples"] + ev["psnr_images"]) + 0.05 * n_eval_images
    available = _BUDGET_SHARE * budget_s - clock.elapsed() - reserve
    planned = t_tok * tok_steps + t_var * var_steps
    tok_steps, var_steps, scale = fit_steps(tok_steps, var_steps, t_tok, t_var, available)
    if scale < 1.0:
        say(f"budget guard: the recipes need about {planned / 60:.1f} min of training here "
            f"({t_tok:.2f} s/tokenizer step, {t_var:.2f} s/transformer step), {max(available, 0) / 60:.1f} min "
            f"are left; training {tok_steps} tokenizer and {var_steps} transformer steps")
    summary["budget"] = {"tokenizer_step_s": round(t_tok, 3), "transformer_step_s": round(t_var, 3),
                         "planned_training_s": round(planned, 1), "available_training_s": round(available, 1),
                         "scale": round(min(scale, 1.0), 3), "recipe_steps": {"tokenizer": _steps(tok_cfg),
                                                                              "transformer": _steps(var_cfg)}}

    # -- 2. tokenizer ----------------------------------------------------------------------------
    with clock.phase("tokenizer"):
        tok_cfg["trainer"]["max_steps"] = tok_steps
        tok_module.hparams.total_steps = tok_steps
        deadline = clock.start_wall + budget_s * _BUDGET_SHARE - reserve - t_var * var_steps
        progress = _deadline_callback(deadline, "tokenizer", say, every=max(1, tok_steps // 8))
        trainer_kw = dict(tok_trainer_kw)
        trainer_kw["max_steps"] = tok_steps
        trainer_kw.setdefault("enable_checkpointing", False)
        trainer_kw.setdefault("enable_progress_bar", False)
        trainer_kw.setdefault("enable_model_summary", False)
        trainer_kw["logger"] = TensorBoardLogger(save_dir=str(out / "logs"), name="tokenizer", version="")
        trainer_kw["default_root_dir"] = str(out / "logs" / "tokenizer")
        say(f"[2/5] tokenizer: {sum(p.numel() for p in tok_module.tokenizer.parameters()) / 1e6:.2f}M parameters, "
            f"{tok_steps} steps of batch {tok_dm.batch_size}")
        trainer = pl.Trainer(callbacks=list(tok_callbacks) + [progress], **trainer_kw)
        trainer.fit(tok_module, datamodule=tok_dm)
        tokenizer = tok_module.tokenizer.eval().requires_grad_(False).to(dev)
        from .checkpoints import save_tokenizer

        save_tokenizer(tokenizer, out / "tokenizer.pth", format="released")
        schedule = _token_schedule(image_size, int(tokenizer.config.patch_size))
        vae_schedule = [(1, h, w) for _, h, w in schedule]
        with torch.no_grad():
            scenes = list(_scene_batches(gen, range(_PSNR_INDEX0, _PSNR_INDEX0 + ev["psnr_images"]), 64, image_size))
            targets = torch.cat([b["images"] for b in scenes])
            recons = []
            for chunk in targets.split(64):
                codes, _ = tokenizer.quantize_multiscale(tokenizer.encode_raw(chunk.to(dev)), vae_schedule)
                recons.append(tokenizer.decode(codes).float().cpu())
            recon = torch.cat(recons)
        tok_psnr = psnr(recon, targets)
        base_psnr = psnr(targets.mean(0, keepdim=True).expand_as(targets), targets)
        # The checker on the tokenizer's own reconstructions bounds what generation can score.
        from .datamodules.shapes import ShapesChecker

        recon_scores = ShapesChecker(gen.colours, gen.shapes).score(list(recon), [c for b in scenes for c in b["captions"]])
        summary["tokenizer"] = {
            "parameters": sum(p.numel() for p in tokenizer.parameters()), "steps": int(trainer.global_step),
            "batch_size": int(tok_dm.batch_size), "psnr_db": round(tok_psnr, 2),
            "psnr_mean_image_baseline_db": round(base_psnr, 2), "psnr_images": int(targets.shape[0]),
            "checker_accuracy_on_reconstructions": round(recon_scores["accuracy"], 4),
            "checker_colour_accuracy_on_reconstructions": round(recon_scores["colour_accuracy"], 4),
            "schedule": [list(g[1:]) for g in vae_schedule], "norm_groups": tokenizer.config.norm_groups,
            "stopped_early": progress.stopped_at is not None,
        }
        _tb_scalars(out / "logs" / "tokenizer", {"eval/psnr_db": tok_psnr, "eval/psnr_baseline_db": base_psnr},
                    int(trainer.global_step))
    say(f"      tokenizer PSNR {tok_psnr:.2f} dB on {targets.shape[0]} new scenes (mean-image baseline "
        f"{base_psnr:.2f} dB); checker on its reconstructions {recon_scores['accuracy']:.1%} "
        f"-> {out / 'tokenizer.pth'}")
    del trainer, tok_module, tok_dm

    # -- 3. latents and text features ------------------------------------------------------------
    from .lit.var_module import precompute_latents

    with clock.phase("encode"):
        data_dir = out / "data"
        data_dir.mkdir(exist_ok=True)
        batch = int(var_cfg["data"]["batch_size"])
        train_file = precompute_latents(tokenizer, _scene_batches(gen, range(n_train), 128, image_size),
                                        data_dir / "train_latents.pt", text_encoder=text_encoder)
        val_file = precompute_latents(tokenizer, _scene_batches(
            gen, range(_VAL_INDEX0, _VAL_INDEX0 + ev["val_samples"]), 128, image_size),
            data_dir / "val_latents.pt", text_encoder=text_encoder)
    say(f"[3/5] encoded {n_train} training scenes and {ev['val_samples']} validation scenes into latents "
        f"and text features ({clock.phases['encode']['wall_s']:.0f} s)")

    # -- 4. transformer --------------------------------------------------------------------------
    from .lit.build import build_var_training

    with clock.phase("transformer"):
        left = clock.start_wall + _BUDGET_SHARE * budget_s - reserve - time.perf_counter()
        if t_var * var_steps > left and left > 0:
            var_steps = max(10, int(left / t_var))
            say(f"budget guard: {left / 60:.1f} min left for the transformer: {var_steps} steps")
        run_cfg = copy.deepcopy(var_cfg)
        run_cfg["output_dir"] = str(out / "logs" / "transformer")
        run_cfg["model"]["tokenizer"] = str(out / "tokenizer.pth")
        run_cfg["model"]["tokenizer_overrides"] = {}
        run_cfg["model"]["text_encoder"] = str(te_dir)
        run_cfg["data"] = {"name": "latents", "path": str(train_file), "batch_size": batch, "seed": int(seed)}
        run_cfg["trainer"]["max_steps"] = var_steps
        run_cfg["module"]["max_steps"] = var_steps
        run_cfg["callbacks"]["checkpoint"] = None  # the product is the exported weights, not a resumable run
        _save_recipes(out, tok_cfg, run_cfg)
        module, dm, trainer_kw, callbacks = build_var_training(run_cfg)
        module.to(dev)
        deadline = clock.start_wall + budget_s * _BUDGET_SHARE - reserve
        progress = _deadline_callback(deadline, "transformer", say, every=max(1, var_steps // 10))
        trainer_kw = dict(trainer_kw)
        trainer_kw.setdefault("enable_checkpointing", bool(var_cfg.get("callbacks", {}).get("checkpoint")))
        trainer_kw.setdefault("enable_progress_bar", False)
        trainer_kw.setdefault("enable_model_summary", False)
        trainer_kw["logger"] = TensorBoardLogger(save_dir=str(out / "logs"), name="transformer", version="")
        trainer_kw["default_root_dir"] = str(out / "logs" / "transformer")
        n_params = sum(p.numel() for p in module.transformer.parameters())
        say(f"[4/5] transformer: {n_params / 1e6:.2f}M parameters, {var_steps} steps of batch {batch} "
            f"on {n_train} scenes")
        trainer = pl.Trainer(callbacks=list(callbacks) + [progress], **trainer_kw)
        trainer.fit(module, datamodule=dm)
        val = _validate(module, val_file, batch)
        _tb_scalars(out / "logs" / "transformer", {f"eval/{k}": v for k, v in val.items() if not isinstance(v, list)},
                    int(trainer.global_step))
        from .checkpoints import save_transformer

        transformer = module.transformer.eval().requires_grad_(False)
        save_transformer(transformer, out / "transformer.pth", format="released")
        # A pixel size: the pipeline turns it into the 8x8 token grid with the tokenizer's stride.
        resolution = image_size
        (out / "pipeline.json").write_text(json.dumps({
            "format_version": 1, "default_resolution": resolution,
            "defaults": {k: sample_kwargs[k] for k in ("cfg", "tau", "top_k", "top_p")}}, indent=1))
        summary["transformer"] = {
            "preset": var_cfg["model"]["transformer"], "parameters": n_params, "steps": int(trainer.global_step),
            "batch_size": batch, "train_scenes": n_train, "lr": var_cfg["module"].get("lr"),
            "bsc_strength": var_cfg["module"].get("bsc_strength"), "val_scenes": ev["val_samples"],
            "val_bit_accuracy": round(val["acc"], 4), "val_token_accuracy": round(val["token_acc"], 4),
            "val_loss": round(val["loss"], 4), "val_bit_accuracy_per_scale": [round(a, 4) for a in val["acc_scale"]],
            "stopped_early": progress.stopped_at is not None,
        }
    say(f"      validation bit accuracy {val['acc']:.4f} (per scale {', '.join(f'{a:.3f}' for a in val['acc_scale'])})"
        f" -> {out / 'transformer.pth'}")
    del trainer, module, dm

    # -- 5. evaluation through the exported pipeline ------------------------------------------------
    from .datamodules.shapes import ShapesChecker
    from .pipeline import InfinityPipeline

    with clock.phase("evaluate"):
        pipe = InfinityPipeline.from_pretrained(out, device=dev)
        summary["pipeline_loads"] = True
        prompts = _eval_prompts(gen, int(num_eval_prompts), ev["holdout_per_pair"], ev["two_object_prompts"], seed)
        checker = ShapesChecker(gen.colours, gen.shapes)
        images = pipe([p.caption for p in prompts], seed=[p.seed for p in prompts], output_type="tensor",
                      batch_size=64, cfg=sample_kwargs["cfg"], tau=sample_kwargs["tau"],
                      top_k=int(sample_kwargs["top_k"]), top_p=float(sample_kwargs["top_p"]))
        for p, img in zip(prompts, images):
            checks = [checker.check(img, t) for t in p.targets]
            p.result = {"colour": checks[0]["colour"], "shape": checks[0]["shape"], "both": checks[0]["both"],
                        "all_objects": all(c["both"] for c in checks)}
        scores = {}
        for group in ("in_distribution", "held_out_pairs", "two_objects"):
            rs = [p.result for p in prompts if p.group == group]
            if not rs:
                continue
            n = len(rs)
            scores[group] = {"n": n, "accuracy": round(sum(r["both"] for r in rs) / n, 4),
                             "colour_accuracy": round(sum(r["colour"] for r in rs) / n, 4),
                             "shape_accuracy": round(sum(r["shape"] for r in rs) / n, 4)}
            if group == "two_objects":
                scores[group]["both_objects_accuracy"] = round(sum(r["all_objects"] for r in rs) / n, 4)
        per_pair: Dict[str, List[bool]] = {}
        for p in prompts:
            if p.group != "two_objects":
                per_pair.setdefault(p.caption, []).append(p.result["both"])
        scores["per_prompt_accuracy"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(per_pair.items())}
        summary["scores"] = scores
        summary["sampling"] = {k: sample_kwargs[k] for k in ("cfg", "tau", "top_k", "top_p")}
        summary["sampling"]["resolution_px"] = image_size
        summary["held_out_pairs"] = [_caption(c, s) for c, s in sorted(gen.holdout)]
        summary["eval_seeds"] = [prompts[0].seed, prompts[-1].seed]
        grid_items = _grid_selection(prompts, images)
        grid = _samples_grid(grid_items)
        grid.save(out / "samples.png")
        _tb_eval(out / "logs" / "eval", scores, grid)
    acc = scores["in_distribution"]["accuracy"]
    summary["target"] = {"in_distribution_accuracy": TARGET_ACCURACY, "met": bool(acc >= TARGET_ACCURACY)}
    summary["times"] = {**clock.phases, "total": clock.totals()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say("[5/5] " + f"generated {len(prompts)} images for new seeds -> {out / 'samples.png'}")
    say(format_summary(summary))
    return summary


# ----------------------------------------------------------------------------------------------
# helpers of run_quickstart
# ----------------------------------------------------------------------------------------------
def _transformer_text_width(var_cfg: Mapping[str, Any]) -> int:
    from .presets import transformer_config

    model = var_cfg["model"]
    return int(transformer_config(model["transformer"], **dict(model.get("overrides") or {})).text_channels)


def _token_schedule(image_size: int, stride: int) -> List[Tuple[int, int, int]]:
    from .lit.var_module import schedule_to_grid

    n = image_size // stride
    return schedule_to_grid(1.0, n, n)


@torch.no_grad()
def _validate(module: Any, path: Path, batch_size: int) -> Dict[str, Any]:
    """Teacher-forced loss and bit accuracies of the module on a latents file (no flips, no
    text dropout), averaged over all samples."""
    from .lit.var_module import LatentsDataModule

    dm = LatentsDataModule(path, batch_size=batch_size, shuffle=False, drop_last=False)
    was_training = module.training
    module.eval()
    totals: Dict[str, Any] = {"loss": 0.0, "acc": 0.0, "token_acc": 0.0, "acc_scale": None}
    n = 0
    try:
        for i, batch in enumerate(dm.train_dataloader()):
            out = module.compute_loss(batch, "val", i)
            b = int(out["batch_size"])
            totals["loss"] += float(out["loss"]) * b
            totals["acc"] += float(out["acc"]) * b
            totals["token_acc"] += float(out["token_acc"]) * b
            per = [float(a) * b for a in out["acc_scale"]]
            totals["acc_scale"] = per if totals["acc_scale"] is None else [x + y for x, y in zip(totals["acc_scale"], per)]
            n += b
    finally:
        module.train(was_training)
    return {"loss": totals["loss"] / n, "acc": totals["acc"] / n, "token_acc": totals["token_acc"] / n,
            "acc_scale": [x / n for x in totals["acc_scale"]]}


def _grid_selection(prompts: Sequence[_Prompt], images: torch.Tensor) -> List[Tuple[torch.Tensor, str, bool]]:
    """Up to 24 in-distribution images (one per prompt first), 8 held-out and 8 two-object ones."""
    chosen: List[Tuple[torch.Tensor, str, bool]] = []
    for group, limit in (("in_distribution", 24), ("held_out_pairs", 8), ("two_objects", 8)):
        idx = [k for k, p in enumerate(prompts) if p.group == group]
        seen, first, rest = set(), [], []
        for k in idx:
            (rest if prompts[k].caption in seen else first).append(k)
            seen.add(prompts[k].caption)
        if group == "held_out_pairs":  # interleave the pairs
            by = {}
            for k in idx:
                by.setdefault(prompts[k].caption, []).append(k)
            first = [k for ks in zip(*by.values()) for k in ks] if by else []
            rest = []
        for k in (first + rest)[:limit]:
            tag = "held out: " if group == "held_out_pairs" else ""
            key = "all_objects" if group == "two_objects" else "both"
            chosen.append((images[k], tag + prompts[k].caption, bool(prompts[k].result[key])))
    return chosen


def _tb_scalars(folder: Path, values: Mapping[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for k, v in values.items():
            writer.add_scalar(k, float(v), step)
    finally:
        writer.close()


def _tb_eval(folder: Path, scores: Mapping[str, Any], grid: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for group, s in scores.items():
            if group == "per_prompt_accuracy":
                continue
            for k, v in s.items():
                if k != "n":
                    writer.add_scalar(f"{group}/{k}", float(v), 0)
        writer.add_image("samples", np.asarray(grid), 0, dataformats="HWC")
    finally:
        writer.close()


def _save_recipes(out: Path, tok_cfg: Mapping[str, Any], var_cfg: Mapping[str, Any]) -> None:
    from .recipes import save_recipe

    folder = out / "recipes"
    folder.mkdir(exist_ok=True)
    save_recipe(dict(tok_cfg), folder / "tokenizer.yaml")
    save_recipe(dict(var_cfg), folder / "var.yaml")


def format_summary(summary: Mapping[str, Any]) -> str:
    """The final table of a quick-start summary (plain text)."""
    s = summary.get("scores", {})
    t = summary.get("times", {})
    rows = []

    def score(name: str, key: str, label: str) -> None:
        if key in s:
            g = s[key]
            extra = f", both objects {g['both_objects_accuracy']:.1%}" if "both_objects_accuracy" in g else ""
            rows.append((label, f"{g['accuracy']:.1%} of {g['n']} (colour {g['colour_accuracy']:.1%}, "
                                f"shape {g['shape_accuracy']:.1%}{extra})"))

    score("in", "in_distribution", "in-distribution prompts")
    score("ho", "held_out_pairs", "held-out colour-shape pairs")
    score("two", "two_objects", "two-object prompts (first object)")
    tok, tr = summary.get("tokenizer", {}), summary.get("transformer", {})
    if tok:
        rows.append(("tokenizer PSNR", f"{tok['psnr_db']:.2f} dB (mean-image baseline {tok['psnr_mean_image_baseline_db']:.2f} dB)"))
        if "checker_accuracy_on_reconstructions" in tok:
            rows.append(("checker on reconstructions", f"{tok['checker_accuracy_on_reconstructions']:.1%} "
                                                       "(the ceiling of the generation scores)"))
    if tr:
        rows.append(("transformer val bit accuracy", f"{tr['val_bit_accuracy']:.4f} (token {tr['val_token_accuracy']:.4f})"))
    sm = summary.get("sampling")
    if sm:
        rows.append(("sampling", f"cfg {sm['cfg']}, tau {sm['tau']}, top_k {sm['top_k']}, top_p {sm['top_p']}"))
    for name in ("text_encoder", "probe", "tokenizer", "encode", "transformer", "evaluate", "total"):
        if name in t:
            rows.append((f"time: {name}", f"{t[name]['wall_s']:.1f} s wall, {t[name]['cpu_s']:.1f} s CPU"))
    if "target" in summary:
        rows.append(("target", f">= {summary['target']['in_distribution_accuracy']:.0%} in-distribution: "
                               f"{'met' if summary['target']['met'] else 'NOT met'}"))
    w = max(len(r[0]) for r in rows)
    line = "-" * (w + 3 + max(len(r[1]) for r in rows))
    return "\n".join([line] + [f"{a.ljust(w)} | {b}" for a, b in rows] + [line])

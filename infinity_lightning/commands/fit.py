"""``infinity-lightning fit RECIPE [key=value ...]``: train from a recipe.

The recipe's top-level ``kind`` (``var``: the bitwise VAR transformer, ``tokenizer``: the
BSQ-VAE) picks what :func:`infinity_lightning.recipes.build_run` builds; recipes without
``kind`` are recognised by their folder (``var/``, ``tokenizer/``).

Outputs go to ``output_dir`` (recipe key, or ``--output-dir``): the resolved recipe
``recipe.yaml`` (every interpolation and override applied), TensorBoard logs under ``tb/``,
checkpoints under ``checkpoints/`` (``callbacks.checkpoint``), with ``last.ckpt`` written at the
end of training; a tokenizer recipe also exports ``tokenizer.pth`` (released layout) and
``tokenizer.safetensors``, the files VAR recipes take as ``model.tokenizer``.  ``--ckpt-path``
(or the recipe's ``ckpt_path``) resumes a run from a Lightning checkpoint; ``last`` picks the
newest complete checkpoint in ``<output_dir>/checkpoints`` (an error when there is none), ``auto``
the same but starts afresh when there is none.  Truncated or corrupt checkpoints are skipped
with a warning (:func:`infinity_lightning.reliability.find_resume_checkpoint`).

Checkpoints are written atomically and loaded with ``weights_only=True``
(:class:`infinity_lightning.reliability.AtomicCheckpointIO`, added to the trainer's plugins
unless the recipe gives a ``CheckpointIO``), and the training loader resumes mid-epoch at the
batch where the checkpoint was taken (:func:`infinity_lightning.reliability.make_data_resumable`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``fit`` subcommand."""
    parser.add_argument("recipe", help="recipe file or built-in name (e.g. var/quickstart, tokenizer/tiny_cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="OmegaConf dot-list overrides (trainer.max_steps=100; +new.key=1 adds a key)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    parser.add_argument("--ckpt-path", default=None,
                        help="resume from this Lightning checkpoint ('last': newest complete one in <output_dir>/checkpoints; "
                             "'auto': the same, or start afresh when there is none)")
    parser.add_argument("--logger", choices=("tensorboard", "csv", "none"), default="tensorboard",
                        help="experiment logger (default tensorboard)")
    parser.add_argument("--dry-run", action="store_true", help="build everything and stop before training")


def resolve_ckpt_path(ckpt_path: Optional[str], output_dir: Path) -> Optional[str]:
    """A checkpoint path to resume from.

    ``last``: the newest complete checkpoint under ``output_dir/checkpoints`` (an error when there
    is none); ``auto``: the same, or ``None`` (a fresh start) when there is none.  Broken
    checkpoints are skipped with a warning.  An explicit path must exist and be complete.
    """
    from ..io import CheckpointError
    from ..reliability import find_resume_checkpoint, verify_checkpoint

    if ckpt_path in (None, "", "none", "null"):
        return None
    if ckpt_path in ("last", "auto"):
        folder = output_dir / "checkpoints"
        found = find_resume_checkpoint(folder)
        if found is None:
            if ckpt_path == "auto":
                log.info("ckpt_path=auto: no complete checkpoint in %s; starting a new run", folder)
                return None
            raise FileNotFoundError(f"ckpt_path=last: no complete checkpoint in {folder}")
        return str(found)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt_path}")
    problem = verify_checkpoint(ckpt_path)
    if problem is not None:
        raise CheckpointError(f"checkpoint to resume from {ckpt_path} {problem}; give an older checkpoint or "
                              "use --ckpt-path auto to pick the newest complete one")
    return str(ckpt_path)


def prepare(recipe: str, overrides: Sequence[str] = (), output_dir: Optional[str] = None,
            ckpt_path: Optional[str] = None, logger: str = "tensorboard") -> Dict[str, Any]:
    """Load, build and set up a run without starting it.

    Returns ``{"kind", "cfg", "module", "datamodule", "trainer", "ckpt_path", "output_dir"}``;
    the resolved recipe is written to ``<output_dir>/recipe.yaml``.
    """
    import lightning.pytorch as pl

    from ..recipes import build_run, load_run_recipe, save_recipe, to_dict

    cfg, kind, path = load_run_recipe(recipe, list(overrides))
    out = Path(output_dir or cfg.get("output_dir") or f"runs/{path.stem}")
    cfg.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_ckpt_path(ckpt_path if ckpt_path is not None else cfg.get("ckpt_path"), out)
    run = build_run(cfg, out, source=f"recipe {path}")

    saved = to_dict(cfg, str(path))
    if ckpt is not None:
        saved["ckpt_path"] = ckpt
    save_recipe(saved, out / "recipe.yaml")

    from ..reliability import check_trainer_settings, make_data_resumable, use_atomic_checkpoints

    trainer_kwargs = dict(run.trainer_kwargs)
    check_trainer_settings(trainer_kwargs, f"recipe {path}")
    trainer_kwargs = use_atomic_checkpoints(trainer_kwargs)
    trainer_kwargs.setdefault("default_root_dir", str(out))
    make_data_resumable(run.datamodule)
    if "logger" not in trainer_kwargs:
        trainer_kwargs["logger"] = _logger(logger, out)
    callbacks = list(run.callbacks) + list(trainer_kwargs.pop("callbacks", None) or [])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
    return {"kind": kind, "cfg": cfg, "module": run.module, "datamodule": run.datamodule, "trainer": trainer,
            "ckpt_path": ckpt, "output_dir": out}


def _logger(name: str, out: Path) -> Any:
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name="tb", version="")
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="csv", version="")
    return False


def run(args: argparse.Namespace) -> int:
    """Entry point of ``infinity-lightning fit``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_ = prepare(args.recipe, args.overrides, args.output_dir, args.ckpt_path, args.logger)
    print(f"fit: {run_['kind']} recipe, outputs in {run_['output_dir']}, resolved recipe "
          f"{run_['output_dir'] / 'recipe.yaml'}" + (f", resuming from {run_['ckpt_path']}" if run_["ckpt_path"] else ""))
    if args.dry_run:
        return 0
    trainer = run_["trainer"]
    trainer.fit(run_["module"], datamodule=run_["datamodule"], ckpt_path=run_["ckpt_path"])
    save_final_checkpoint(trainer)
    if run_["kind"] == "tokenizer" and trainer.is_global_zero:
        for path in export_tokenizer(run_["module"], run_["output_dir"]):
            print(f"fit: tokenizer exported to {path}")
    return 0


def export_tokenizer(module: Any, out: Path) -> Sequence[Path]:
    """Write the trained tokenizer as ``<out>/tokenizer.pth`` (released layout) and
    ``<out>/tokenizer.safetensors``."""
    from ..checkpoints import save_tokenizer

    tokenizer = module.tokenizer
    return [save_tokenizer(tokenizer, out / "tokenizer.pth", format="released"),
            save_tokenizer(tokenizer, out / "tokenizer.safetensors", format="safetensors")]


def save_final_checkpoint(trainer: Any) -> Optional[Path]:
    """Write ``last.ckpt`` in the checkpoint folder after fit, so the final state is never lost
    (step-interval checkpoints miss the last steps; the original never saved at the end)."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "dirpath", None) or trainer.global_step == 0:
        return None
    path = Path(cb.dirpath) / "last.ckpt"
    if path.is_symlink():
        path.unlink()
    trainer.save_checkpoint(str(path))
    return path

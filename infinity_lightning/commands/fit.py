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

A folder that already holds a run (``recipe.yaml``, TensorBoard events, checkpoints, exports) is
refused unless the command resumes it or ``--overwrite`` replaces it (the earlier run's outputs
are removed first; the caches ``tiny_t5_*`` and ``text_cache`` are kept).  ``--dry-run`` builds
everything (networks, data, trainer) and writes nothing; ``--print-recipe`` prints the resolved
recipe and writes nothing.

Checkpoints are written atomically and loaded with ``weights_only=True``
(:class:`infinity_lightning.reliability.AtomicCheckpointIO`, added to the trainer's plugins
unless the recipe gives a ``CheckpointIO``), and the training loader resumes mid-epoch at the
batch where the checkpoint was taken (:func:`infinity_lightning.reliability.make_data_resumable`).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

log = logging.getLogger(__name__)

#: What a run writes into its folder (removed by ``--overwrite``); caches are not listed.
RUN_OUTPUTS = ("recipe.yaml", "tb", "csv", "checkpoints", "samples", "tokenizer.pth", "tokenizer.safetensors")

OVERRIDE_HELP = """\
overrides (applied in order):
  key=value              set a key of the recipe (trainer.max_steps=100); values are YAML
  +key=value             add a key the recipe does not have
  ~key                   delete a key (its default applies)
  'section={k: v, ...}'  replace a whole section or mapping (nothing of the old one is kept;
                         quoted, as the shell splits at spaces)
  data.name=NAME         another DataModule: the data keys it does not take are dropped (logged)
"""


def _epilog() -> str:
    from ..recipes.loader import SECTIONS

    width = max(len(k) for k in SECTIONS)
    lines = ["recipe sections (every key is checked against the class it configures; docs/recipes.md):"]
    lines += [f"  {name:<{width}}  {where}" for name, where in SECTIONS.items()]
    lines += ["", OVERRIDE_HELP, "built-in recipes: var/quickstart, var/emoji, var/finetune_2b, var/pretrain_layer12_256,",
              "  tokenizer/quickstart, tokenizer/tiny_cpu, tokenizer/d16_256, tokenizer/d32_256, "
              "tokenizer/finetune_d32_reg"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``fit`` subcommand."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _epilog()
    parser.add_argument("recipe", help="recipe file or built-in name (e.g. var/quickstart, tokenizer/tiny_cpu)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides: key=value, +new.key=value, ~key, section={...} (see below)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    parser.add_argument("--ckpt-path", default=None,
                        help="resume from this Lightning checkpoint ('last': newest complete one in <output_dir>/checkpoints; "
                             "'auto': the same, or start afresh when there is none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in the output folder (its recipe, logs, checkpoints, exports)")
    parser.add_argument("--logger", choices=("tensorboard", "csv", "none"), default="tensorboard",
                        help="experiment logger (default tensorboard)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build networks, data and trainer, then stop; writes nothing")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe (overrides applied) as YAML and stop; writes nothing")


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


# -- the run folder -------------------------------------------------------------------------------
def existing_run(out: Path) -> List[str]:
    """What of an earlier run ``out`` holds (empty: nothing)."""
    found = []
    if (out / "recipe.yaml").is_file():
        found.append("recipe.yaml")
    for logs in ("tb", "csv"):
        if (out / logs).is_dir() and any(p.is_file() for p in (out / logs).rglob("*")):
            found.append(f"{logs}/ logs")
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        found.append("checkpoints/")
    found += [name for name in ("tokenizer.pth", "tokenizer.safetensors") if (out / name).is_file()]
    return found


def _label(out: Path, flag: str) -> str:
    return f"--output-dir {out}" if flag == "--output-dir" else f"run folder {out} (the recipe's output_dir)"


def check_output_dir(out: Path, flag: str) -> None:
    """``out`` must be a folder, or creatable as one (``flag``: how the message names it)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{_label(out, flag)} exists and is not a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"{_label(out, flag)}: {parent} is a file, so the folder cannot be created")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{_label(out, flag)}: {parent} is not writable")


def check_fresh_run(out: Path, flag: str, overwrite: bool) -> List[str]:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite``; returns what is there."""
    found = existing_run(out)
    if found and not overwrite:
        raise FileExistsError(f"{_label(out, flag)} already holds a run ({', '.join(found)}); resume it with --ckpt-path last, "
                              "pick another folder with --output-dir, or replace it with --overwrite")
    return found


def remove_run_outputs(out: Path) -> None:
    """Delete what an earlier run wrote into ``out`` (:data:`RUN_OUTPUTS`)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), out)


@contextlib.contextmanager
def _scratch(out: Path, dry_run: bool) -> Iterator[Path]:
    """Where the build writes its caches: the run folder, or a temporary one for a dry run."""
    if not dry_run:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="infinity-lightning-dry-run-") as tmp:
        yield Path(tmp)


# -- building -------------------------------------------------------------------------------------
def prepare(recipe: str, overrides: Sequence[str] = (), output_dir: Optional[str] = None,
            ckpt_path: Optional[str] = None, logger: str = "tensorboard", *, dry_run: bool = False,
            overwrite: Optional[bool] = None) -> Dict[str, Any]:
    """Load, build and set up a run without starting it.

    Returns ``{"kind", "cfg", "module", "datamodule", "trainer", "ckpt_path", "output_dir"}``;
    the resolved recipe is written to ``<output_dir>/recipe.yaml``.  ``dry_run``: build in a
    temporary folder and write nothing.  ``overwrite``: ``None`` (library use) reuses the folder
    as it is; ``False`` refuses a folder holding a run unless resuming; ``True`` removes that
    run's outputs once the new run is built.
    """
    import lightning.pytorch as pl

    from ..recipes import build_run, load_run_recipe, save_recipe, to_dict

    cfg, kind, path = load_run_recipe(recipe, list(overrides))
    out = Path(output_dir or cfg.get("output_dir") or f"runs/{path.stem}")
    flag = "--output-dir" if output_dir else "run folder (the recipe's output_dir)"
    check_output_dir(out, flag)
    cfg.output_dir = str(out)
    ckpt = resolve_ckpt_path(ckpt_path if ckpt_path is not None else cfg.get("ckpt_path"), out)
    earlier = check_fresh_run(out, flag, bool(overwrite)) if overwrite is not None and ckpt is None else []
    saved = to_dict(cfg, str(path))
    if ckpt is not None:
        saved["ckpt_path"] = ckpt

    from ..reliability import check_trainer_settings, make_data_resumable, use_atomic_checkpoints

    with _scratch(out, dry_run) as where:
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
        run = build_run(cfg, where, source=f"recipe {path}")
    trainer_kwargs = dict(run.trainer_kwargs)
    check_trainer_settings(trainer_kwargs, f"recipe {path}")
    trainer_kwargs = use_atomic_checkpoints(trainer_kwargs)
    trainer_kwargs.setdefault("default_root_dir", str(out))
    make_data_resumable(run.datamodule)
    if "logger" not in trainer_kwargs:
        trainer_kwargs["logger"] = _logger(logger, out)
    callbacks = list(run.callbacks) + list(trainer_kwargs.pop("callbacks", None) or [])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
    if not dry_run:
        if earlier:
            remove_run_outputs(out)
        save_recipe(saved, out / "recipe.yaml")
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


def print_recipe(recipe: str, overrides: Sequence[str], output_dir: Optional[str] = None) -> str:
    """The resolved recipe (overrides and interpolations applied) as YAML; writes nothing."""
    from omegaconf import OmegaConf

    from ..recipes import load_run_recipe, to_dict

    cfg, _, path = load_run_recipe(recipe, list(overrides))
    if output_dir:
        cfg.output_dir = str(output_dir)
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg, str(path))))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``infinity-lightning fit``."""
    if args.print_recipe:
        sys.stdout.write(print_recipe(args.recipe, args.overrides, args.output_dir))
        return 0
    run_ = prepare(args.recipe, args.overrides, args.output_dir, args.ckpt_path, args.logger, dry_run=args.dry_run,
                   overwrite=args.overwrite)
    out = run_["output_dir"]
    if args.dry_run:
        n = sum(p.numel() for p in run_["module"].parameters())
        print(f"fit --dry-run: the {run_['kind']} recipe builds ({n / 1e6:.2f}M parameters, "
              f"{type(run_['datamodule']).__name__}); nothing was written, outputs would go to {out}"
              + (f", resuming from {run_['ckpt_path']}" if run_["ckpt_path"] else ""))
        return 0
    print(f"fit: {run_['kind']} recipe, outputs in {out}, resolved recipe {out / 'recipe.yaml'}"
          + (f", resuming from {run_['ckpt_path']}" if run_["ckpt_path"] else ""))
    trainer = run_["trainer"]
    trainer.fit(run_["module"], datamodule=run_["datamodule"], ckpt_path=run_["ckpt_path"])
    save_final_checkpoint(trainer)
    for path in (run_["module"].export(out) if run_["kind"] == "var" else []):  # every rank; rank 0 writes
        print(f"fit: transformer exported to {path}")
    if run_["kind"] == "tokenizer" and trainer.is_global_zero:
        for path in export_tokenizer(run_["module"], out):
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
    trainer.save_checkpoint(str(path), weights_only=False)
    return path

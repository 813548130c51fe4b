"""Every shell command the documentation shows runs as written.

The commands are collected from the ```bash blocks of README.md and docs/*.md and from the
``#   infinity-lightning ...`` lines of the recipe comments.  :data:`PLANS` says, for each
command (its exact text), how it is checked:

* ``Run(extra)``: the documented command runs in-process, in a working folder that holds tiny
  stand-ins at the paths the documents name (``weights/`` in the released layout with tiny random
  models, ``my_images/``, ``data/my_splits``, ...; see :func:`_workspace`), with ``extra``
  arguments appended (a few steps instead of thousands, fp32 on this CPU).  Commands of one
  document share one folder, in the document's order (a resume follows the run it resumes);
  the recipe comments share one folder (the emoji recipe uses the tokenizer ``tiny_cpu`` exports).
* ``Syntax(why)``: commands that need GPUs, several nodes or the whole test suite are checked
  without running: the subcommand and its flags parse, the recipe exists and every override key
  is in it (``load_run_recipe``); ``make`` targets are checked with ``make -n``.

A documented command without a plan, or a plan whose command is no longer documented, fails
:func:`test_every_documented_command_has_a_plan`, so a changed document changes this table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "assets" / "README.md"]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
#: Arguments that shrink a VAR run to two steps on this CPU.
FEW_STEPS = ("trainer.max_steps=2", "trainer.precision=32-true", "trainer.log_every_n_steps=1")


@dataclasses.dataclass(frozen=True)
class Run:
    """Run the command with ``extra`` arguments (overrides go before its ``--flags``)."""

    extra: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Syntax:
    """Check the command without running it, because ``why``."""

    why: str


Plan = Union[Run, Syntax]

#: Documented command (continuation lines joined, spaces collapsed) -> how it is checked.
PLANS: Dict[str, Plan] = {
    # README.md
    "make quickstart": Syntax("installs the package and trains for about 13 minutes; tests/test_quickstart.py runs the "
                              "quick start itself"),
    "make test": Syntax("runs this test suite"),
    'infinity-lightning generate --pipeline weights --variant 2b --prompt "a red apple" --seed 1 --out out/':
        Run(("--resolution", "0.06M")),
    "infinity-lightning reconstruct --tokenizer weights/infinity_vae_d32reg.pth photo.jpg --out out/":
        Run(("--size", "64")),
    "infinity-lightning fit var/quickstart model.tokenizer=runs/quickstart/tokenizer.pth trainer.max_steps=200":
        Run(FEW_STEPS + ("data.num_samples=64",)),
    "infinity-lightning fit var/finetune_2b model.weights=weights/infinity_2b_reg.pth "
    "model.tokenizer=weights/infinity_vae_d32reg.pth model.text_encoder=weights/flan-t5-xl data.name=folder "
    "data.data_dir=my_images/": Run(FEW_STEPS + ("data.batch_size=2", "callbacks.sample_logger.prompts=[a red square]",
                                                 "callbacks.sample_logger.seeds=[0]")),
    "infinity-lightning fit tokenizer/tiny_cpu": Run(("trainer.max_steps=2",)),
    "infinity-lightning fit var/quickstart model.tokenizer=runs/quickstart/tokenizer.pth --ckpt-path last":
        Run(("trainer.max_steps=3", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
             "data.num_samples=64")),
    "infinity-lightning evaluate --pipeline runs/quickstart --out runs/quickstart_eval": Run(("--subset", "1")),
    "infinity-lightning fit var/lora_quickstart model.weights=runs/quickstart/transformer.pth":
        Run(FEW_STEPS + ("data.num_samples=64",)),
    "infinity-lightning fit var/finetune_2b trainer.devices=8 trainer.strategy=fsdp2 ...":
        Syntax("needs 8 GPUs"),
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d "
    "--rdzv_endpoint=$MASTER_HOST:29500 -m infinity_lightning.cli fit var/finetune_2b trainer.devices=8 "
    "trainer.num_nodes=2 trainer.strategy=fsdp2 ...": Syntax("needs two nodes of 8 GPUs"),
    "srun infinity-lightning fit var/finetune_2b trainer.devices=8 trainer.num_nodes=2 trainer.strategy=fsdp2 ...":
        Syntax("needs a SLURM cluster"),
    "INFINITY_PARITY_DIR=/path/to/fixtures python -m pytest -q tests/parity":
        Syntax("runs the parity tests, part of this suite"),
    # docs/distributed.md
    "infinity-lightning fit var/finetune_2b trainer.devices=8 trainer.strategy=fsdp2 ... [docs/distributed.md]":
        Syntax("needs 8 GPUs"),
    "torchrun --standalone --nproc_per_node=8 -m infinity_lightning.cli fit var/finetune_2b trainer.devices=8 "
    "trainer.strategy=fsdp2": Syntax("needs 8 GPUs"),
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d "
    "--rdzv_endpoint=$MASTER_HOST:29500 -m infinity_lightning.cli fit var/finetune_2b trainer.devices=8 "
    "trainer.num_nodes=2 trainer.strategy=fsdp2": Syntax("needs two nodes of 8 GPUs"),
    "srun infinity-lightning fit var/finetune_2b trainer.devices=8 trainer.num_nodes=2 trainer.strategy=fsdp2":
        Syntax("needs a SLURM cluster"),
    # docs/experiments.md
    "infinity-lightning quickstart --out runs/quickstart [docs/experiments.md]":
        Syntax("trains for about 13 minutes; tests/test_quickstart.py runs the quick start itself"),
    "infinity-lightning quickstart --out runs/long --budget-minutes 60 --var-recipe var/shapes_long":
        Syntax("trains for about 48 minutes; tests/test_quickstart.py runs the quick start itself"),
    "python benchmarks/evaluation_calibration.py --tokenizer runs/long/tokenizer.pth --per-family 1":
        Syntax("needs the hour's run; tests/test_tokenizer_reconstruction_scores.py runs the script on the committed asset"),
    "python benchmarks/ablation_self_correction.py --from runs/quickstart --out runs/ablation_tuning --minutes 5 "
    "--strengths 0 0.2 --taus 0.5 --protocol runs/tuning_protocol.json": Syntax("trains two transformers of five minutes each"),
    # tests/assets/README.md
    "python tests/assets/build_edit_model.py --base runs/long --out tests/assets/shapes_long --measure":
        Syntax("needs the hour's run and rewrites the committed asset"),
    "python benchmarks/lora_concept.py --quickstart runs/quickstart --out runs/lora_concept":
        Syntax("trains a LoRA for nine minutes and judges 624 images"),
    "python benchmarks/ablation_self_correction.py --from runs/quickstart --out runs/ablation --minutes 5 "
    "--strengths 0 0.1 0.2 0.3 --taus 0.5 1.0": Syntax("trains four transformers of five minutes each"),
    # docs/recipes.md
    "infinity-lightning fit var/finetune_2b model.weights=weights/infinity_2b_reg.pth "
    "model.tokenizer=weights/infinity_vae_d32reg.pth model.text_encoder=weights/flan-t5-xl data.name=folder "
    "data.data_dir=my_images/ --print-recipe": Run(),
    "infinity-lightning fit tokenizer/quickstart trainer.max_steps=10 --dry-run": Run(),
    # recipe comments
    "infinity-lightning fit tokenizer/finetune_d32_reg model.weights=weights/infinity_vae_d32_reg.pth "
    "data.data_dir=my_photos/": Run(("trainer.max_steps=2", "trainer.precision=32-true", "data.num_workers=0",
                                     "data.batch_size=1", "module.perceptual_arch=tiny", "module.disc_channels=16")),
    "infinity-lightning fit tokenizer/quickstart trainer.max_steps=100": Run(("trainer.max_steps=2",)),
    "infinity-lightning fit tokenizer/tiny_cpu trainer.max_steps=100": Run(("trainer.max_steps=2",)),
    "infinity-lightning fit var/emoji model.tokenizer=runs/tokenizer_tiny_cpu/tokenizer.pth":
        Run(FEW_STEPS + ("data.max_emoji=16",)),
    "infinity-lightning fit var/finetune_2b model.weights=weights/infinity_2b_reg.pth "
    "model.tokenizer=weights/infinity_vae_d32_reg.pth model.text_encoder=weights/flan-t5-xl data.data_dir=data/my_splits":
        Run(FEW_STEPS + ("data.num_workers=0", "callbacks.sample_logger.prompts=[a red square]",
                         "callbacks.sample_logger.seeds=[0]")),
    "infinity-lightning fit var/pretrain_layer12_256 model.tokenizer=weights/infinity_vae_d32_reg.pth "
    "model.text_encoder=weights/flan-t5-xl data.data_dir=data/splits":
        # the recipe's hyper-parameters with the tiny transformer (a d32 one, as the 2B stand-in)
        Run(FEW_STEPS + ("model.transformer=tiny", "+model.overrides.codebook_dim=32", "data.num_workers=0",
                         "callbacks.sample_logger=null")),
    "infinity-lightning fit var/quickstart model.tokenizer=runs/quickstart/tokenizer.pth":
        Run(FEW_STEPS + ("data.num_samples=64",)),
    "infinity-lightning fit var/lora_quickstart": Run(FEW_STEPS + ("data.num_samples=64",)),
    "infinity-lightning fit var/lora_2b model.weights=weights/infinity_2b_reg.pth "
    "model.tokenizer=weights/infinity_vae_d32_reg.pth model.text_encoder=weights/flan-t5-xl data.data_dir=data/my_splits":
        Run(FEW_STEPS + ("schedule.resolution=0.06M", "data.num_workers=0",
                         "callbacks.sample_logger.prompts=[a red square]", "callbacks.sample_logger.seeds=[0]")),
}


# -- collecting -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Command:
    source: str  # path relative to the repository
    line: int
    text: str

    @property
    def key(self) -> str:
        """The :data:`PLANS` key: the text, or ``text [source]`` where that entry exists."""
        own = f"{self.text} [{self.source}]"
        return own if own in PLANS else self.text


def _join(lines: Sequence[Tuple[int, str]]) -> List[Tuple[int, str]]:
    """Join continuation lines (trailing backslash); drop blanks and comment lines."""
    out: List[Tuple[int, str]] = []
    pending: List[str] = []
    start = 0
    for number, raw in lines:
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        pending.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            out.append((start, " ".join(pending)))
            pending = []
    return out


def _strip_comment(text: str) -> str:
    """``text`` without a trailing shell comment (a ``#`` after a blank, outside quotes), spaces collapsed."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            text = text[:i]
            break
    return " ".join(text.split())


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def bash_commands(path: Path) -> List[Command]:
    """The commands in the ```bash blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, block, inside = [], [], False
    for number, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            if inside:
                found += _join(block)
                inside, block = False, []
            elif line.strip() == "```bash":
                inside = True
            continue
        if inside:
            block.append((number, line))
    return [Command(_relative(path), n, _strip_comment(text)) for n, text in found]


def recipe_commands(path: Path) -> List[Command]:
    """The ``#   infinity-lightning ...`` lines (with their continuation lines) of a recipe."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: List[Tuple[int, str]] = []
    i = 0
    while i < len(lines):
        m = re.match(r"#\s+(infinity-lightning\s.*)$", lines[i])
        if m:
            start, parts = i + 1, [m.group(1)]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                parts[-1] = parts[-1].rstrip().rstrip("\\")
                parts.append(re.sub(r"^#\s*", "", lines[i]))
            found.append((start, " ".join(p.strip() for p in parts)))
        i += 1
    return [Command(_relative(path), n, _strip_comment(text)) for n, text in found]


def documented_commands() -> List[Command]:
    out = [c for doc in DOCUMENTS for c in bash_commands(doc)]
    return out + [c for recipe in RECIPES for c in recipe_commands(recipe)]


# -- stand-ins ------------------------------------------------------------------------------------------
def _images(folder: Path, captions: bool, n: int = 4, size: Tuple[int, int] = (96, 96)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black"][:n]):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"a {colour} square")


def _jsonl_folder(folder: Path) -> None:
    """The original jsonl layout with four 256 px images."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (256, 256), colour).save(folder / f"{i}.png")
        lines.append(json.dumps({"image_path": str(folder / f"{i}.png"), "h_div_w": 1.0,
                                 "long_caption": f"a {colour} square", "text": colour}))
    (folder / "1.000_000000004.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """Tiny stand-ins at the paths the documents name, built once (copied into each workspace)."""
    import torch

    from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
    from infinity_lightning.tiny import make_tiny_t5

    root = tmp_path_factory.mktemp("stand_ins")
    weights = root / "weights"
    torch.manual_seed(0)
    # the released file names, holding tiny random d32 models (the 2B's tokenizer has d = 32)
    save_transformer(load_transformer("tiny", codebook_dim=32), weights / "infinity_2b_reg.pth", format="released")
    vae = load_tokenizer("tiny", codebook_dim=32)
    save_tokenizer(vae, weights / "infinity_vae_d32reg.pth", format="released")
    save_tokenizer(vae, weights / "infinity_vae_d32_reg.pth", format="released")
    make_tiny_t5(weights / "flan-t5-xl", ["a red square", "a red apple", "a photo of a dog", "a bowl of fruit",
                                          "a city street at night", "a red apple on a wooden table"], d_model=64)
    # what `infinity-lightning quickstart` exports: the "small" transformer, the tiny_f8 tokenizer with 8
    # GroupNorm groups and a tiny T5 of width 64
    quickstart = root / "runs" / "quickstart"
    save_transformer(load_transformer("small"), quickstart / "transformer.pth", format="released")
    save_tokenizer(load_tokenizer("tiny_f8", base_ch=16, num_res_blocks=0, norm_groups=4), quickstart / "tokenizer.pth")
    from infinity_lightning.datamodules.shapes import DEFAULT_COLOURS, ShapesDataModule

    shapes = ShapesDataModule(num_samples=1000, colours=["pink", *DEFAULT_COLOURS]).generator
    make_tiny_t5(quickstart / "text_encoder", [shapes.spec(i).caption for i in range(1000)], d_model=64)
    _images(root / "my_images", captions=True)
    _images(root / "my_photos", captions=False, n=6, size=(80, 64))
    _jsonl_folder(root / "data" / "my_splits")
    _jsonl_folder(root / "data" / "splits")
    Image.new("RGB", (90, 70), "orange").save(root / "photo.jpg")
    return root


@pytest.fixture
def workspace(stand_ins, tmp_path, monkeypatch) -> Path:
    """A fresh working folder with the stand-ins; the current folder while a test runs."""
    folder = tmp_path / "work"
    shutil.copytree(stand_ins, folder)
    monkeypatch.chdir(folder)
    return folder


# -- checking ---------------------------------------------------------------------------------------
def _argv(tokens: List[str], extra: Sequence[str]) -> List[str]:
    """``extra`` added to the arguments of ``infinity-lightning ...``: overrides before the first flag."""
    argv = tokens[1:]
    if argv and argv[0] == "fit":
        flag = next((i for i, t in enumerate(argv) if t.startswith("--")), len(argv))
        return argv[:flag] + [e for e in extra if not e.startswith("--")] + argv[flag:] + \
            [e for e in extra if e.startswith("--")]
    return argv + list(extra)


def run_command(command: Command, plan: Run) -> None:
    from infinity_lightning.cli import main

    tokens = shlex.split(command.text)
    assert tokens[0] == "infinity-lightning", f"{command.source}:{command.line}: only infinity-lightning commands run"
    argv = _argv(tokens, plan.extra)
    try:
        status = main(argv)
    except SystemExit as e:
        raise AssertionError(f"{command.source}:{command.line}: `{command.text}` (run as {argv}) failed: {e}") from e
    assert status == 0, f"{command.source}:{command.line}: `{command.text}` exited with {status}"


def check_syntax(command: Command) -> None:
    """The command parses, names an existing recipe and only keys that recipe has."""
    from infinity_lightning.cli import build_parser
    from infinity_lightning.recipes import load_recipe, load_run_recipe, missing_values, recipe_components

    where = f"{command.source}:{command.line}: `{command.text}`"
    tokens = [t for t in shlex.split(command.text) if t != "..."]
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # environment assignments
        tokens.pop(0)
    if tokens[0] == "make":
        for target in tokens[1:]:
            done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: make -n {target}: {done.stderr}"
        return
    if tokens[0] == "python" and tokens[1].startswith(("benchmarks/", "tests/assets/")):
        _check_benchmark_arguments(tokens[1], tokens[2:], where)
        return
    if tokens[:3] == ["python", "-m", "pytest"]:
        paths = [t for t in tokens[3:] if not t.startswith("-")]
        assert paths and all((ROOT / p).exists() for p in paths), f"{where}: no such test path"
        return
    if tokens[0] == "srun":
        tokens = tokens[1:]
    if tokens[0] == "torchrun":
        assert "-m" in tokens and tokens[tokens.index("-m") + 1] == "infinity_lightning.cli", where
        tokens = ["infinity-lightning"] + tokens[tokens.index("-m") + 2:]
    assert tokens[0] == "infinity-lightning", f"{where}: unknown program {tokens[0]!r}"
    args = build_parser(tokens[1]).parse_args(tokens[1:])
    if args.command == "fit":
        given = {o.split("=", 1)[0].lstrip("+") for o in args.overrides}
        dummies = [f"{k}=stand-in" for k in missing_values(load_recipe(args.recipe, components=recipe_components))
                   if k not in given]
        load_run_recipe(args.recipe, list(args.overrides) + dummies)  # every key exists and has the right type


class _Parsed(Exception):
    """Raised once a benchmark script has parsed its arguments (nothing is run)."""


def _check_benchmark_arguments(script: str, argv: List[str], where: str) -> None:
    """``python benchmarks/NAME.py ARGS`` (or a script of tests/assets): the script exists and its own
    parser accepts ARGS."""
    import argparse
    import importlib.util
    import sys

    path = ROOT / script
    assert path.is_file(), f"{where}: no such script"
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)  # exits 2 on an unknown or malformed argument
        raise _Parsed

    try:
        spec.loader.exec_module(module)
        argparse.ArgumentParser.parse_args = parse_only
        with pytest.raises(_Parsed):
            module.main(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: the script refuses its arguments (exit {e.code})") from e
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(str(path.parent))


def _check(commands: List[Command]) -> None:
    import time

    for command in commands:
        plan = PLANS[command.key]
        start = time.perf_counter()
        if isinstance(plan, Syntax):
            check_syntax(command)
        else:
            run_command(command, plan)
        print(f"{time.perf_counter() - start:6.1f} s  {command.source}:{command.line}")


# -- tests ------------------------------------------------------------------------------------------
def test_every_documented_command_has_a_plan():
    commands = documented_commands()
    keys = [c.key for c in commands]
    missing = [f"{c.source}:{c.line}: {c.text}" for c in commands if c.key not in PLANS]
    assert not missing, "documented commands without a plan in PLANS:\n" + "\n".join(missing)
    stale = [k for k in PLANS if k not in keys]
    assert not stale, "plans of commands no longer documented:\n" + "\n".join(stale)
    assert {c.source for c in commands} >= {"README.md", "docs/recipes.md", "docs/distributed.md"}
    assert any(c.source.startswith("recipes/") for c in commands)
    # nothing teaches a subcommand that does not exist
    from infinity_lightning.cli import COMMANDS

    for c in commands:
        tokens = shlex.split(c.text)
        if "infinity-lightning" in tokens:
            sub = tokens[tokens.index("infinity-lightning") + 1]
            assert sub in COMMANDS, f"{c.source}:{c.line}: `infinity-lightning {sub}` is no subcommand"


def test_the_collector_finds_commands_and_their_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\n# a comment\ninfinity-lightning fit a \\\n    b=1   # why\n\nmake test\n```\n"
                   "```python\nprint(1)\n```\n```\ninfinity-lightning not-bash\n```\n")
    assert [(c.line, c.text) for c in bash_commands(doc)] == [(4, "infinity-lightning fit a b=1"), (7, "make test")]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# intro\n#   infinity-lightning fit var/x a=1 \\\n#       b=2\nkind: var\n")
    assert [(c.line, c.text) for c in recipe_commands(recipe)] == [(2, "infinity-lightning fit var/x a=1 b=2")]


def test_syntax_checks_catch_broken_commands():
    for text, match in [("infinity-lightning fit var/finetune_2b trainer.devicse=8", "trainer.devicse"),
                        ("infinity-lightning fit var/no_such_recipe", "not found"),
                        ("srun infinity-lightning train var/finetune_2b", "train"),
                        ("make no-such-target", "no-such-target"),
                        ("python benchmarks/lora_concept.py --quickstrat runs/x", "refuses its arguments"),
                        ("python benchmarks/no_such_script.py", "no such script")]:
        with pytest.raises((AssertionError, SystemExit, ValueError), match=match):
            check_syntax(Command("x.md", 1, text))


def test_readme_commands(workspace):
    _check([c for c in documented_commands() if c.source == "README.md"])
    # what the commands wrote: the images, the fine-tuned run, the exported tokenizer, the resumed run
    assert (workspace / "out" / "000000.png").is_file() and (workspace / "out" / "photo_recon.png").is_file()
    assert (workspace / "runs" / "finetune_2b" / "checkpoints" / "last.ckpt").is_file()
    assert (workspace / "runs" / "tokenizer_tiny_cpu" / "tokenizer.safetensors").is_file()
    import torch

    state = torch.load(workspace / "runs" / "var_quickstart" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["global_step"] == 3  # two steps, then one more after the resume


def test_docs_folder_commands(workspace):
    _check([c for c in documented_commands() if c.source.startswith("docs/")])
    assert not (workspace / "runs" / "tokenizer_quickstart").exists()  # --dry-run and --print-recipe write nothing


def test_recipe_comment_commands(workspace):
    commands = [c for c in documented_commands() if c.source.startswith("recipes/")]
    assert all(not c.text.startswith("infinity-lightning train") for c in commands)
    _check(commands)
    assert (workspace / "runs" / "tokenizer_finetune_d32_reg" / "tokenizer.pth").is_file()  # from my_photos/, uncaptioned


def test_model_md_anchors_cited_in_the_repository_exist():
    """Code and documents cite docs/model.md#<section>; every cited section exists."""
    text = (ROOT / "docs" / "model.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    cited = set()
    for folder in ("infinity_lightning", "callbacks", "datamodules", "docs", "recipes", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml") and path.is_file():
                cited |= {(path.name, m) for m in re.findall(r"model\.md#([a-z0-9-]+)", path.read_text(errors="ignore"))}
    cited |= {("README.md", m) for m in re.findall(r"model\.md#([a-z0-9-]+)", (ROOT / "README.md").read_text())}
    assert cited, "nothing cites docs/model.md"
    unknown = sorted((name, a) for name, a in cited if a not in anchors)
    assert not unknown, f"citations of sections docs/model.md does not have: {unknown}"
    assert "glossary" in anchors


def test_no_citations_of_a_document_the_repository_does_not_have():
    pattern = re.compile(r"\(spec [0-9]|\bspec (section )?[0-9]+\.[0-9]")
    found = []
    for folder in ("callbacks", "datamodules", "docs", "recipes", "tests", "notebooks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".ipynb") and path.is_file():
                found += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text(errors="ignore")
                                                                                     .splitlines(), 1)
                          if pattern.search(line)]
    # models/ and evaluation/, sampling.py, quickstart.py, editing.py and lora.py are not scanned yet
    others = ("sampling.py", "scales.py", "editing.py", "lora.py", "quickstart.py")
    for path in (ROOT / "infinity_lightning").rglob("*.py"):
        rel = path.relative_to(ROOT / "infinity_lightning")
        if rel.parts[0] not in ("models", "evaluation") and rel.as_posix() not in others:
            found += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]
    assert not found, f"'spec X.Y' citations (cite docs/model.md#<section> instead): {found}"


def test_notebooks_are_saved_with_small_outputs():
    """A reader of notebooks/ sees what the code prints (scripts/execute_notebooks.py saves it)."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        if path.name in ("generate.ipynb", "tokenizer.ipynb", "finetune.ipynb"):
            assert all(c.get("outputs") for c in code if "display(" in "".join(c["source"])), path.name
            assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), path.name
        assert path.stat().st_size < 300 * 1024, f"{path.name} is {path.stat().st_size // 1024} KB"

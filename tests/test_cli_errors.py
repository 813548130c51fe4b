"""User errors of ``infinity-lightning`` are one line and exit status 2; bugs keep their traceback.

The table "User errors" of docs/faults.md lists bad inputs with the exact line each one prints.
:func:`test_user_error_table` runs every row's command in a folder holding the files the
commands name (:func:`error_workspace`) and compares the printed ``error:`` line with the table
(``<repo>`` stands for the repository folder), so the table and the messages cannot drift apart.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "docs" / "faults.md"


def error_rows() -> List[Tuple[str, str, str]]:
    """``(bad input, command, expected line)`` of the "User errors" table of docs/faults.md."""
    text = FAULTS.read_text(encoding="utf-8")
    section = text.split("## User errors", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        rows.append((cells[0], _code(cells[1]), _code(cells[2]).replace("\\|", "|")))
    return rows


def _code(cell: str) -> str:
    """The text of a Markdown code span (`x` or `` x ``)."""
    m = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell)
    assert m, f"not a code span: {cell!r}"
    return m.group(2)


class Evil:
    """A pickle that would run code when loaded."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.fixture(scope="module")
def error_workspace(tmp_path_factory) -> Path:
    """The files the commands of the table name."""
    import torch

    from infinity_lightning.checkpoints import load_tokenizer, save_tokenizer
    from infinity_lightning.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("errors")
    make_tiny_pipeline(root / "weights", layout="released")
    save_tokenizer(load_tokenizer("tiny_f8"), root / "weights" / "tok_auto.pth")
    Image.new("RGB", (64, 64), "red").save(root / "photo.png")
    (root / "photos").mkdir()
    (root / "prompts").mkdir()
    (root / "a_file").write_text("not a folder")
    (root / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint" * 10)
    torch.save(Evil(), root / "evil.pth")
    (root / "runs" / "old").mkdir(parents=True)
    (root / "runs" / "old" / "recipe.yaml").write_text("kind: var\n")
    (root / "taken").mkdir()
    Image.new("RGB", (8, 8)).save(root / "taken" / "000000.png")
    torch.save({"state_dict": {}}, root / "empty.ckpt")
    return root


def run_cli(argv: List[str], capsys) -> Tuple[int, List[str]]:
    """Exit status and the ``error:`` lines of ``infinity-lightning argv`` run in-process."""
    from infinity_lightning.cli import main

    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    return status, [line.replace(str(ROOT), "<repo>") for line in err.splitlines() if line.startswith("error:")]


def test_the_table_is_long_and_well_formed():
    rows = error_rows()
    assert len(rows) >= 30
    assert all(cmd.startswith("infinity-lightning ") and line.startswith("error: ") for _, cmd, line in rows)
    assert len({cmd for _, cmd, _ in rows}) == len(rows)  # one row per command


@pytest.mark.parametrize("bad_input,command,expected", error_rows(), ids=[r[0] for r in error_rows()])
def test_user_error_table(bad_input, command, expected, error_workspace, monkeypatch, capsys):
    monkeypatch.chdir(error_workspace)
    status, errors = run_cli(shlex.split(command)[1:], capsys)
    assert errors == [expected], f"{bad_input}: `{command}` printed {errors}"
    assert status == 2


def test_traceback_flag_adds_the_traceback(error_workspace, monkeypatch, capsys):
    monkeypatch.chdir(error_workspace)
    status, errors = run_cli(["--traceback", "reconstruct", "--tokenizer", "nope.pth", "photo.png", "--out", "o"],
                             capsys)
    assert status == 2 and len(errors) == 1
    from infinity_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["reconstruct", "--tokenizer", "nope.pth", "photo.png", "--out", "o", "--traceback"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reconstruct", "--tokenizer", "nope.pth", "photo.png", "--out", "o"])
    assert "Traceback" not in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    """An exception that is not a user error propagates unchanged (exit status 1, traceback)."""
    from infinity_lightning import errors
    from infinity_lightning.cli import main
    from infinity_lightning.commands import convert

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(convert, "convert", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["convert", "a.pth", "b.pth"])
    # the policy itself: the package's own ValueErrors are user errors, a library's are not
    try:
        raise ValueError("from here")
    except ValueError as e:
        assert not errors.is_user_error(e)  # raised in tests/, not in infinity_lightning
    try:
        import numpy

        numpy.zeros(-1)
    except ValueError as e:
        assert not errors.is_user_error(e)
    try:
        from infinity_lightning.scales import check_budget

        check_budget("2M")
    except ValueError as e:
        assert errors.is_user_error(e)


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          check=True).stdout


def test_help_and_version_import_no_torch():
    out = _python("import sys\nfrom infinity_lightning.cli import main\n"
                  "for argv in (['--help'], ['--version'], ['fit', '--help']):\n"
                  "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
                  "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    assert out.strip().endswith("NO TORCH")
    assert "infinity-lightning 0.1.0" in out
    # fit --help lists the recipe sections and the override forms
    for word in ("schedule", "optim", "callbacks", "OptimConfig", "~key", "'section={k: v, ...}'"):
        assert word in out, word


def test_log_lines_are_printed_once(tmp_path):
    """The command adds one handler for the package's loggers and none to the root logger."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import logging\nfrom infinity_lightning.cli import configure_output\nconfigure_output()\n"
         "import lightning.pytorch\n"
         "logging.getLogger('infinity_lightning.recipes').info('one line')\n"
         "logging.getLogger('lightning.pytorch').info('lightning line')\n"
         "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('💡 Tip: buy things')\n"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = out.stderr.splitlines()
    assert lines.count("INFO: one line") == 1
    assert sum("lightning line" in line for line in lines) == 1
    assert not any("Tip" in line for line in lines)
    assert not logging_root_configured(out.stderr)


def logging_root_configured(stderr: str) -> bool:
    return "INFO:infinity_lightning" in stderr or "INFO:root" in stderr

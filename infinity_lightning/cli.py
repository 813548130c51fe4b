"""The ``infinity-lightning`` command.

Each subcommand lives in ``infinity_lightning/commands/<name>.py`` and provides
``add_arguments(parser)`` and ``run(args) -> int``.  Only the module of the subcommand being run
is imported (``infinity-lightning --help`` and ``--version`` import no torch).

User errors (see :mod:`infinity_lightning.errors`) are printed as one line ``error: <message>``
on stderr and end the command with exit status 2; ``--traceback`` adds the traceback.  Other
exceptions are bugs and keep their traceback.  Exit status 1 means the command finished but
skipped some of its items (it says which).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from typing import List, NoReturn, Optional

from . import __version__
from .errors import is_user_error, user_message
from .quiet import silence_known_noise

PROG = "infinity-lightning"

#: subcommand -> (module, one-line help)
COMMANDS = {
    "quickstart": ("infinity_lightning.commands.quickstart",
                   "train a tokenizer and a transformer on the built-in shapes set (CPU), generate and score"),
    "fit": ("infinity_lightning.commands.fit", "train from a recipe: infinity-lightning fit RECIPE [key=value ...]"),
    "generate": ("infinity_lightning.commands.generate", "generate images from prompts"),
    "reconstruct": ("infinity_lightning.commands.reconstruct", "encode and decode images with a tokenizer; PSNR/SSIM"),
    "inpaint": ("infinity_lightning.commands.inpaint",
                "regenerate the masked region of images (or outpaint them) by forcing the image's bits elsewhere"),
    "variations": ("infinity_lightning.commands.variations",
                   "variations of images that keep their first scales' bits"),
    "convert": ("infinity_lightning.commands.convert",
                "convert between Lightning checkpoints, the released .pth layout and safetensors"),
    "evaluate": ("infinity_lightning.commands.evaluate",
                 "score a pipeline on a shapes evaluation protocol with the strict checker"),
}
#: Marker of "add the arguments of every subcommand" for :func:`build_parser`.
ALL = "*"
#: Exit status of a user error (the same as argparse's for a bad argument).
USER_ERROR_STATUS = 2


class UserExit(SystemExit):
    """How :func:`main` ends on a user error: exit status 2, ``str()`` is the message (already
    printed as ``error: <message>``)."""

    def __init__(self, message: str) -> None:
        super().__init__(USER_ERROR_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other user error of the command."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise UserExit(f"{self.prog}: {message}")


def _add_traceback_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--traceback", action="store_true", default=default,
                        help="on an error, print the full traceback as well as the one-line message")


def build_parser(command: Optional[str] = ALL) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and given its arguments (``ALL``: every
    subcommand's, ``None``: none, enough for the overview and ``--version``)."""
    parser = _Parser(prog=PROG, description="Train, fine-tune and run Infinity, bitwise visual autoregressive "
                                            "text-to-image models.",
                     epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_traceback_flag(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _add_traceback_flag(p, argparse.SUPPRESS)
        if command not in (ALL, name):
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not installed
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand named in ``argv`` (the first word that is one), or None."""
    for word in argv:
        if word == "--":
            return None
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def configure_output() -> None:
    """Log lines once and keep third-party noise out of the terminal.

    The package's loggers get one handler of their own, unless the application already
    configured the root logger (then its handlers print them); the root logger is left alone, so
    Lightning's own handler prints Lightning's lines exactly once.  Lightning's advertisement tip
    and Hugging Face's per-file progress bars for local loads are switched off.
    """
    pkg = logging.getLogger("infinity_lightning")
    if not logging.getLogger().hasHandlers() and not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False
    silence_known_noise()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    A user error prints ``error: <message>`` and raises :class:`UserExit` (a ``SystemExit`` with
    status 2 whose ``str()`` is the message); other exceptions propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv[: argv.index("--") if "--" in argv else len(argv)]
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        parser.error(f"subcommand {args.command!r} is not available in this installation")
    configure_output()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as e:  # noqa: B902 - SystemExit included: commands exit with a message
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        if not is_user_error(e):
            raise
        if show_traceback:
            traceback.print_exception(type(e), e, e.__traceback__)
        message = user_message(e)
        print(f"error: {message}", file=sys.stderr)
        raise UserExit(message) from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

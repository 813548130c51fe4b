"""Which errors are the user's to fix, and how the command line reports them.

A *user error* is bad input: a file that does not exist or cannot be read, an argument out of
range, a recipe key that does not exist, data that cannot be used.  ``infinity-lightning`` prints
it as ``error: <message>`` (one line; a few messages list details on the lines below) and exits
with status 2, without a traceback; ``--traceback`` shows the traceback too.  Everything else is a
bug and keeps Python's traceback (exit status 1).

The policy, in :func:`is_user_error`:

* :class:`UserError` and its subclasses (``RecipeError``, ``CheckpointError``,
  ``ComponentMismatchError``, ``TooManySkipsError``, ``NonFiniteLossError``, ...);
* ``SystemExit`` with a message (what a command raises after checking its arguments);
* ``FileNotFoundError``, ``NotADirectoryError``, ``IsADirectoryError``, ``FileExistsError`` and
  ``PermissionError``: a path the user gave;
* ``ValueError`` (and ``KeyError`` for preset names) raised by this package's own checks, that
  is, by a function of ``infinity_lightning`` itself rather than inside torch, numpy or another
  library (a ``ValueError`` from deep inside a library is more likely a bug);
* Lightning's ``MisconfigurationException``: a trainer setting of the recipe that Lightning refuses.

This module imports nothing heavy, so the command line can use it before torch is loaded.
"""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ["UserError", "is_user_error", "user_message", "PACKAGE"]

PACKAGE = "infinity_lightning"
#: OS errors about a path the user named.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class UserError(Exception):
    """Bad input that the user can fix; the message says what is wrong and what was expected."""


def _raised_by_package(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is a function of this package."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = str(tb.tb_frame.f_globals.get("__name__", ""))
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _is_misconfiguration(exc: BaseException) -> bool:
    # Checked by class name so that this module never imports Lightning.
    return any(cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning")
               for cls in type(exc).__mro__)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user error under the policy of the module docstring."""
    if isinstance(exc, UserError):
        return True
    if isinstance(exc, SystemExit):
        return isinstance(exc.code, str)
    if isinstance(exc, _PATH_ERRORS):
        return True
    if isinstance(exc, (ValueError, KeyError)) and _raised_by_package(exc):
        return True
    return _is_misconfiguration(exc)


def user_message(exc: BaseException) -> str:
    """The text printed after ``error: `` for a user error."""
    if isinstance(exc, SystemExit):
        return str(exc.code)
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) adds quotes
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return text.strip()


def report(exc: BaseException, stream: Optional[object] = None) -> None:
    """Print a user error as ``error: <message>`` on ``stream`` (default stderr)."""
    print(f"error: {user_message(exc)}", file=stream or sys.stderr)

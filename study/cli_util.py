"""Shared command-line plumbing: one-line errors with exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NoReturn

from study.config import ConfigError
from study.redact import redact, redacting_streams

EXIT_USAGE = 2
EXIT_FAULT = 1

#: OSErrors that are the machine's state, reported as one line rather than a traceback.
_ENVIRONMENT_FAULTS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                      "ENAMETOOLONG", "EMFILE", "ENFILE", "EFBIG")
    if hasattr(errno, name))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line to stderr (credentials redacted) and exit
    with code 2."""
    print(f"error: {redact(' '.join(str(message).split()))}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (underscores allowed, as in ``100_000``)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 1")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``error: prog: ...``) with exit code 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        fail(f"{self.prog}: {message}")

    def format_help(self) -> str:  # noqa: D102
        # Descriptions come from docstrings: show ``code`` as plain code in a terminal.
        return super().format_help().replace("``", "")


def is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C or SIGTERM in disguise: a KeyboardInterrupt raised
    while a compiled (numba) call returns surfaces as the cause of a SystemError."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_cli(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run a CLI body and return its exit code: user errors (ConfigError) become a
    one-line ``error:`` with code 2, and usage errors or ``--help`` (SystemExit) give
    their code back, so ``main(argv) -> int`` is callable from Python and tests.

    Everything the command prints passes through :func:`study.redact.redact`, and so does
    the traceback of an unexpected exception, which propagates (exit code 1): a storage
    password never reaches the terminal or a log captured from it."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _redacting_excepthook
    with redacting_streams():
        try:
            try:
                return body(argv)
            except ConfigError as e:
                fail(str(e))
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
            except SystemError as e:
                if not is_interrupt(e):
                    raise
                print("interrupted", file=sys.stderr)
                return 130
            except OSError as e:
                if e.errno not in _ENVIRONMENT_FAULTS:
                    raise
                # The machine, not the input or the code: one line, exit 1. What was
                # stored is complete (writes are atomic) and a re-run resumes.
                where = f"{e.filename}: " if e.filename else ""
                print(redact(f"error: {where}{e.strerror or e}; what finished is stored, "
                             f"re-run the command to resume"), file=sys.stderr)
                return EXIT_FAULT
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)


def _redacting_excepthook(kind: type[BaseException], value: BaseException,
                          tb: TracebackType | None) -> None:
    """Python's default traceback (chained exceptions included), credentials redacted."""
    text = "".join(traceback.format_exception(kind, value, tb))
    sys.stderr.write(redact(text))
    sys.stderr.flush()

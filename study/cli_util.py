"""Shared command-line plumbing: one-line errors with exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from study.config import ConfigError

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
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


def run_cli(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run a CLI body and return its exit code: user errors (ConfigError) become a
    one-line ``error:`` with code 2, and usage errors or ``--help`` (SystemExit) give
    their code back, so ``main(argv) -> int`` is callable from Python and tests."""
    try:
        try:
            return body(argv)
        except ConfigError as e:
            fail(str(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)

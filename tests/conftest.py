"""Fixtures shared by the suite's process tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _reap(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s whole process group (the driver and anything it started, orphaned
    or not) and collect it, never waiting on a pipe some stray process still holds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=30)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)  # the driver itself was killed: this reaps it


@pytest.fixture
def spawn_cli() -> Iterator[Callable[..., subprocess.Popen]]:
    """``spawn_cli("study.grid", arg, ...)`` starts ``python -m study.grid arg ...`` with
    piped text output in a session of its own (a job in a terminal: ``os.killpg`` reaches
    it and its workers). At teardown every process of every such session is killed and
    reaped, so a failing test can neither hang on a pipe nor leave a worker training."""
    started: list[subprocess.Popen] = []

    def start(module: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
            # A job a non-interactive shell started in the background (a CI runner may
            # be one) inherits an ignored SIGINT; a terminal's foreground job does not.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _reap(proc)

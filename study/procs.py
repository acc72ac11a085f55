"""Which process is which: identities that survive PID reuse, and whether one still runs.

A process is named by ``{"host", "boot", "pid", "start"}``: the host name, the kernel's
boot id, the PID and the process's start time in clock ticks since boot (from
``/proc/PID/stat``), so a PID reused after a reboot or by a later process is not taken
for the one recorded. Drivers record theirs in ``manifest.json`` (readers then tell a
store whose driver died from one that is running) and Optuna trials in their system
attributes (a trial whose owner died is failed at once).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["die_with_parent", "is_alive", "is_local", "me", "sigterm_as_interrupt"]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None if there is none.

    A zombie (killed, not yet reaped) counts as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def me() -> dict[str, Any]:
    """This process's identity."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid,
            "start": _proc_start(pid)}


def is_local(owner: Mapping[str, Any]) -> bool:
    """Whether ``owner`` ran on this machine since its last boot (so its liveness can be
    checked here)."""
    here = me()
    return owner.get("host") == here["host"] and owner.get("boot") == here["boot"]


def is_alive(owner: Mapping[str, Any]) -> bool:
    """Whether the process ``owner`` (a :func:`me` of this machine) still runs."""
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        start = _proc_start(pid)
        return start is not None and (owner.get("start") in (None, start))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_WATCHDOG_STARTED = False


def die_with_parent(poll_s: float = 0.5) -> None:
    """Exit this process (a worker) within ``poll_s`` seconds of its parent's death.

    A daemon thread watches ``os.getppid()``: when the parent dies the worker is
    re-parented (to init or a subreaper) and exits at once, even while its main thread is
    blocked writing a result into a pipe nobody reads. (``PR_SET_PDEATHSIG`` would be
    instant but fires when the parent *thread* that spawned the worker ends, which for a
    pool's manager thread is not the driver's death.) Idempotent; workers call it first.
    """
    import multiprocessing
    import threading

    global _WATCHDOG_STARTED
    if _WATCHDOG_STARTED:
        return
    _WATCHDOG_STARTED = True
    # The parent we were started by (a driver may itself be PID 1, in a container);
    # if it is gone already, we were re-parented before we looked.
    spawner = multiprocessing.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid else os.getppid()
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="study-die-with-parent", daemon=True).start()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises KeyboardInterrupt, so a driver
    stopped by ``kill`` or a job scheduler ends as after Ctrl-C: workers stopped, what
    finished kept, the manifest marked "interrupted"."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

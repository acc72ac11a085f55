"""The one executor layer of both sweep drivers: where chunks train (in this process, in
loky worker processes, on a Dask cluster), and the driver's progress bar.

An executor takes chunks (:func:`submit`) and hands back the finished ones
(:func:`wait`); workers only compute (:func:`study.sweeps.jobs.run_chunk`) and report
their env steps through a progress channel of the backend, the driver writes. Every
worker dies with its driver (``procs.die_with_parent``, ``kill -9`` included), and
:meth:`Executor.close` with ``abort=True`` stops the workers at once.

Backends are a registry (:data:`EXECUTORS`): name -> factory.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import struct
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from study import procs
from study.cli_util import is_interrupt
from study.config import ConfigError
from study.sweeps.jobs import Chunk, ChunkResult, LogHook, run_chunk

__all__ = [
    "EXECUTORS",
    "Done",
    "Executor",
    "Progress",
    "check_scheduler",
    "open_executor",
    "run_all",
]

#: Receives ``(chunk index, cumulative env steps)`` from the workers, in the driver.
OnProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Done:
    """A chunk that finished: its result, or the exception it raised."""

    chunk: Chunk
    result: ChunkResult | None
    error: BaseException | None = None

    def get(self) -> ChunkResult:
        """The result; raises the chunk's exception if it failed."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Executor:
    """Where chunks train. Subclasses implement :meth:`submit`, :meth:`wait` and
    :meth:`close`."""

    #: How many chunks a driver should keep submitted (None: all it has): an in-process
    #: executor trains a chunk as it is submitted, so a driver stores one before the next.
    window: int | None = None
    #: Whether chunks train in this process (a log hook may then call the driver directly).
    in_process: bool = False

    def __init__(self) -> None:
        self.pending = 0  # chunks submitted and not yet handed back by wait()

    def submit(self, chunk: Chunk, on_log: LogHook | None = None) -> None:
        """Train ``chunk`` (now, or when a worker is free).

        Args:
            chunk: what to train.
            on_log: passed to :func:`study.sweeps.jobs.run_chunk` (pickled to the worker).
        """
        raise NotImplementedError

    def wait(self) -> list[Done]:
        """Block until at least one submitted chunk finished; every chunk finished by
        then, in the order they were submitted."""
        raise NotImplementedError

    def close(self, abort: bool) -> None:
        """Release the workers; ``abort`` stops those still training (Ctrl-C, an error).

        Args:
            abort: kill the workers now instead of letting them go idle.
        """


class _Inline(Executor):
    """Trains each chunk in this process as it is submitted (``--n-jobs 1``: no worker
    start-up)."""

    window = 1
    in_process = True

    def __init__(self, on_progress: OnProgress | None) -> None:
        super().__init__()
        self._on_progress = on_progress
        self._done: list[Done] = []

    def submit(self, chunk: Chunk, on_log: LogHook | None = None) -> None:
        self.pending += 1
        try:
            self._done.append(Done(chunk, run_chunk(chunk, self._on_progress, on_log)))
        except Exception as e:  # handed to the driver by wait(), as a worker's would be
            if is_interrupt(e):
                raise KeyboardInterrupt from e
            self._done.append(Done(chunk, None, e))

    def wait(self) -> list[Done]:
        done, self._done = self._done, []
        self.pending -= len(done)
        return done

    def close(self, abort: bool) -> None:
        self._done = []


class _FileSink:
    """Worker side of the loky progress channel: slot ``chunk_index`` of a small file.

    A file needs no extra process and nothing inherited (loky workers are spawned), and
    an aligned 8-byte ``pwrite`` is never seen half-written by the driver's reader.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, chunk_index: int, steps_done: int) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<q", steps_done), 8 * chunk_index)
        finally:
            os.close(fd)


class _FilePoll:
    """Driver side of the loky progress channel: a thread that reads the file."""

    def __init__(self, on_progress: OnProgress) -> None:
        fd, self.path = tempfile.mkstemp(prefix="study-progress-", suffix=".bin")
        os.close(fd)
        self._size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(on_progress,),
                                        name="study-progress", daemon=True)
        self._thread.start()

    def slot(self, index: int) -> None:
        """Make room for chunk ``index`` (zeros: nothing reported yet)."""
        if 8 * (index + 1) > self._size:
            self._size = 8 * (index + 1)
            os.truncate(self.path, self._size)

    def _poll(self, on_progress: OnProgress) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(OSError, ValueError):
                for index, steps in enumerate(np.fromfile(self.path, dtype="<i8").tolist()):
                    if steps:
                        on_progress(index, steps)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


#: Workers compute with one thread each (parallelism comes from the workers; torch is set
#: to one thread per chunk as well): no BLAS or OpenMP pool oversubscribes the cores.
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                                      "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


def _start_worker() -> None:
    """A loky worker's start: it dies with its driver, and it ignores SIGINT. Ctrl-C in a
    terminal reaches the whole process group and the driver alone decides what it does; a
    worker inside a long compiled call (study.trainer.compiled_a2c) would otherwise print its
    own KeyboardInterrupt when the call returns, after the driver's last line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs.die_with_parent()


class _Loky(Executor):
    """loky's reusable process pool of ``n_jobs`` workers."""

    def __init__(self, n_jobs: int, on_progress: OnProgress | None) -> None:
        from joblib.externals.loky import get_reusable_executor

        super().__init__()
        self._poll = _FilePoll(on_progress) if on_progress is not None else None
        self._sink = _FileSink(self._poll.path) if self._poll is not None else None
        # Each worker starts its parent watchdog as it starts, not with its first chunk: a
        # driver killed while the pool is still starting must not leave idle workers behind.
        self._pool = get_reusable_executor(max_workers=n_jobs, timeout=60,
                                           initializer=_start_worker, env=_ONE_THREAD)
        self._futures: dict[cf.Future, Chunk] = {}

    def submit(self, chunk: Chunk, on_log: LogHook | None = None) -> None:
        if self._poll is not None:
            self._poll.slot(chunk.index)
        self._futures[self._pool.submit(run_chunk, chunk, self._sink, on_log)] = chunk
        self.pending += 1

    def wait(self) -> list[Done]:
        finished, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
        done = []
        for fut in [f for f in self._futures if f in finished]:
            chunk = self._futures.pop(fut)
            error = fut.exception()
            done.append(Done(chunk, None if error is not None else fut.result(), error))
        self.pending -= len(done)
        return done

    def close(self, abort: bool) -> None:
        if self._poll is not None:
            self._poll.close()
        if abort:
            _quiet_loky_shutdown_race()
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False, kill_workers=abort)


def _quiet_loky_shutdown_race() -> None:
    """Keep loky's manager thread from printing a traceback after an aborting shutdown.

    ``shutdown(kill_workers=True)`` empties loky's table of pending work while its manager
    thread may still be handing the next item to a worker: that thread then fails on the
    missing item (``KeyError: <work id>``, in loky's ``add_call_item_to_queue``) and
    prints the traceback after the driver's last line. The work was dropped on purpose, so
    that one error is not shown; any other error of any thread still is."""
    previous = threading.excepthook
    if getattr(previous, "quiets_loky", False):
        return

    def hook(args: Any) -> None:
        if (type(args.thread).__name__ == "_ExecutorManagerThread"
                and args.exc_type is KeyError):
            return
        previous(args)

    hook.quiets_loky = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class _DaskSink:
    """Worker side of the Dask progress channel: a worker event on a per-sweep topic."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def __call__(self, chunk_index: int, steps_done: int) -> None:
        from distributed import get_worker

        get_worker().log_event(self.topic, [chunk_index, steps_done])


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _connect(scheduler: str) -> Any:
    """A Dask client of the cluster at ``scheduler``, with Dask's own security settings
    (``distributed.comm.tls.*`` and ``require-encryption`` in the dask config, or the
    matching ``DASK_DISTRIBUTED__COMM__...`` variables). ConfigError (one line) when it
    cannot connect, saying what a ``tls://`` scheduler needs."""
    from distributed import Client

    try:
        return Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "ssl" in first.lower() or "tls" in first.lower() or "encryption" in first.lower():
            hint = ("; a tls:// scheduler needs this client's certificates in the dask config "
                    "(distributed.comm.tls.ca-file, .client.cert, .client.key; see README, "
                    "Clusters)")
        raise ConfigError(f"--scheduler {scheduler}: cannot connect: {first}{hint}") from None


def check_scheduler(scheduler: str) -> None:
    """ConfigError (one line) unless a client can connect to ``scheduler`` now: drivers
    call it before they write anything.

    Args:
        scheduler: the Dask scheduler's address, e.g. ``tcp://host:8786``.
    """
    _connect(scheduler).close()


class _Dask(Executor):
    """A Dask cluster: the one at ``scheduler``, else a local one of ``n_jobs`` worker
    processes."""

    def __init__(self, n_jobs: int, on_progress: OnProgress | None,
                 scheduler: str | None) -> None:
        from distributed import Client, LocalCluster, as_completed

        super().__init__()
        self._cluster = None
        if scheduler:
            self._client = _connect(scheduler)
        else:
            # Workers inherit an ignored SIGINT, so Ctrl-C in a terminal (sent to the whole
            # process group) is handled by the driver alone: it cancels and closes the
            # cluster instead of every worker printing its own KeyboardInterrupt traceback.
            with _sigint_ignored():
                self._cluster = LocalCluster(n_workers=n_jobs, threads_per_worker=1,
                                             processes=True, host="127.0.0.1",
                                             dashboard_address=None,
                                             silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
        self._topic = f"study-progress-{uuid.uuid4().hex}"
        self._sink = _DaskSink(self._topic) if on_progress is not None else None
        if on_progress is not None:
            self._client.subscribe_topic(self._topic, lambda event: on_progress(*event[1]))
        self._tag = uuid.uuid4().hex[:8]
        self._submitted = 0
        self._futures: dict[Any, Chunk] = {}
        self._completed = as_completed()

    def submit(self, chunk: Chunk, on_log: LogHook | None = None) -> None:
        # Earlier submissions first (the drivers submit their largest chunks first).
        fut = self._client.submit(run_chunk, chunk, self._sink, on_log,
                                  key=f"study-chunk-{chunk.key}-{self._tag}", pure=False,
                                  priority=-self._submitted)
        self._submitted += 1
        self._futures[fut] = chunk
        self._completed.add(fut)
        self.pending += 1

    def wait(self) -> list[Done]:
        finished = {next(self._completed), *self._completed.next_batch(block=False)}
        done = []
        for fut in [f for f in self._futures if f in finished]:
            chunk = self._futures.pop(fut)
            try:
                done.append(Done(chunk, fut.result()))
            except Exception as e:  # the chunk's own exception, raised by the driver
                done.append(Done(chunk, None, e))
        self.pending -= len(done)
        return done

    def close(self, abort: bool) -> None:
        with contextlib.suppress(Exception):
            self._client.cancel(list(self._futures))
        with contextlib.suppress(Exception):
            self._client.unsubscribe_topic(self._topic)
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def announce_compilation() -> None:
    """Say on stderr that the numba kernels compile now, when their cache is cold (the
    first run after an install or an upgrade), since the first progress figures include
    it."""
    from study.trainer.numba_cache import cold_cache

    if cold_cache():
        print("compiling the numba kernels (once after an install or upgrade; the first "
              "progress figures include it)", file=sys.stderr, flush=True)


class Bar:
    """The drivers' one progress bar (both use it): env steps done, their rate, and the
    ETA when the total is known, after a label the driver sets; lines a driver prints
    while it runs go above the bar (:meth:`note`)."""

    def __init__(self, total: int | None, enabled: bool, label: str = "") -> None:
        """
        Args:
            total: the env steps expected (None: unknown, e.g. a study that prunes).
            enabled: draw the bar (False: nothing is drawn).
            label: the text before the bar.
        """
        from tqdm import tqdm

        # Redraw often on a terminal; sparingly into a log file, where every redraw stays.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total, unit="step", unit_scale=True, file=sys.stderr,
                         disable=not enabled, smoothing=0.05, dynamic_ncols=interactive,
                         mininterval=0.2 if interactive else 10.0, desc=label)

    def advance(self, steps: int) -> None:
        """Count ``steps`` more env steps."""
        if steps > 0:
            self._bar.update(steps)

    def label(self, text: str, redraw: bool = True) -> None:
        """Set the text before the bar."""
        self._bar.set_description_str(text, refresh=redraw)

    def note(self, line: str) -> None:
        """Print ``line`` to stderr above the bar."""
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


class Progress:
    """The grid's progress: a :class:`Bar` of env steps with runs done/total as its label.

    Workers report cumulative env steps per chunk, so late or repeated reports are
    harmless; a finished chunk counts its full budget.
    """

    def __init__(self, chunks: Sequence[Chunk], enabled: bool) -> None:
        """
        Args:
            chunks: the chunks to run (their runs and env steps make the totals).
            enabled: draw the bar (False: count only).
        """
        self._budget = {c.index: c.env_steps for c in chunks}
        self._done: dict[int, int] = {}
        self._finished: set[int] = set()
        self._runs_total = sum(len(c.runs) for c in chunks)
        self._runs_done = 0
        self._lock = threading.Lock()
        self._bar = Bar(sum(self._budget.values()), enabled, self._desc())

    def _desc(self) -> str:
        return f"runs {self._runs_done}/{self._runs_total}"

    def _set(self, index: int, steps: int) -> None:
        steps = min(steps, self._budget.get(index, 0))
        delta = steps - self._done.get(index, 0)
        if delta > 0:
            self._done[index] = steps
            self._bar.advance(delta)

    def report(self, index: int, steps: int) -> None:
        """A worker's cumulative env steps for chunk ``index``."""
        with self._lock:
            if index not in self._finished:
                self._set(index, steps)

    def finish(self, index: int, n_runs: int) -> None:
        """Chunk ``index`` (of ``n_runs`` runs) is stored: count its whole budget."""
        with self._lock:
            self._set(index, self._budget.get(index, 0))
            self._finished.add(index)
            self._runs_done += n_runs
            self._bar.label(self._desc())

    def close(self) -> None:
        with self._lock:
            self._bar.close()


#: Backend name -> factory ``(n_jobs, on_progress, scheduler) -> Executor``.
EXECUTORS: dict[str, Callable[[int, OnProgress | None, str | None], Executor]] = {
    "inline": lambda n_jobs, on_progress, scheduler: _Inline(on_progress),
    "loky": lambda n_jobs, on_progress, scheduler: _Loky(n_jobs, on_progress),
    "dask": lambda n_jobs, on_progress, scheduler: _Dask(n_jobs, on_progress, scheduler),
}


def open_executor(backend: str, n_jobs: int, on_progress: OnProgress | None = None,
                  scheduler: str | None = None) -> Executor:
    """The executor of ``backend``; loky with one job trains in this process (no worker
    start-up).

    Args:
        backend: a name in :data:`EXECUTORS`.
        n_jobs: worker processes (a scheduler's cluster decides its own).
        on_progress: receives the workers' progress reports; None: no channel.
        scheduler: the Dask scheduler's address (None: a local cluster).
    """
    if backend not in EXECUTORS:
        raise ValueError(f"backend must be one of {tuple(EXECUTORS)}")
    if backend == "loky" and n_jobs == 1:
        backend = "inline"
    return EXECUTORS[backend](n_jobs, on_progress, scheduler)


def run_all(executor: Executor, chunks: Sequence[Chunk],
            on_done: Callable[[ChunkResult], None]) -> None:
    """Train ``chunks`` on ``executor``, keeping its window submitted, and hand each
    finished one to ``on_done`` (in the driver) as it comes; a chunk's exception is
    raised here. The caller closes the executor.

    Args:
        executor: from :func:`open_executor`.
        chunks: what to train, in the order to submit it.
        on_done: stores a finished chunk.
    """
    todo = list(chunks)
    while todo or executor.pending:
        while todo and (executor.window is None or executor.pending < executor.window):
            executor.submit(todo.pop(0))
        for done in executor.wait():
            on_done(done.get())

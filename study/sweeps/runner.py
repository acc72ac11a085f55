"""Planning a sweep into population chunks, and running the chunks in parallel.

Runs that share structural hyperparameters (``study.config.structural_key``) train as one
population; each structural group is cut into chunks of at most ``population_size`` runs.
Chunking depends only on the runs to do and the population size, never on ``n_jobs`` or
the backend, and a member's results do not depend on its population at all (the trainer
guarantees bit-identical members), so stored values are the same however a sweep is run,
resumed or distributed.

Chunks run in worker processes (joblib's loky, or Dask); workers only compute and send
their results back, and the driver writes each finished chunk to the store, so a crash
loses at most the chunks in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing
import os
import signal
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from study import procs, store
from study.config import SPECS, ConfigError, structural_key
from study.sweeps.spec import Run, Sweep, format_value

__all__ = [
    "BACKENDS",
    "Chunk",
    "ChunkResult",
    "Outcome",
    "Plan",
    "execute",
    "make_plan",
    "run_chunk",
]

BACKENDS = ("loky", "dask")
_PROGRESS_EVERY_S = 0.5  # how often a worker reports env steps to the driver


# --------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class Chunk:
    """A population to train in one worker call."""

    index: int
    key: str  # names the chunk's files in the store: hash of its run ids
    sweep: str
    env: str
    total_steps: int
    log_every: int
    eval_every: int
    eval_episodes: int
    save_policies: bool
    runs: tuple[Run, ...]
    #: ``(low, high)`` references of the env's score: the runs' ``normalized_return`` is
    #: ``(final_return - low) / (high - low)``; None leaves it empty.
    normalize: tuple[float, float] | None = None

    @property
    def env_steps(self) -> int:
        return len(self.runs) * self.total_steps


@dataclass(frozen=True)
class Plan:
    """What a sweep invocation will do: all runs, which are stored, and the chunks to run."""

    sweep: Sweep
    runs: tuple[Run, ...]
    stored: frozenset[str]
    chunks: tuple[Chunk, ...]
    population_size: int
    n_groups: int  # structural groups among the runs still to do

    @property
    def pending(self) -> int:
        return sum(len(c.runs) for c in self.chunks)

    @property
    def env_steps(self) -> int:
        """Env steps still to run (as asked; the trainer rounds up to whole updates)."""
        return sum(c.env_steps for c in self.chunks)

    def describe(self, out: Path | str) -> str:
        """The dry-run report."""
        s = self.sweep
        axes = ", ".join(f"{k} x{len(v)}" for k, v in s.grid.items()) or "none"
        seeds = ", ".join(str(x) for x in s.seeds[:6]) + (", ..." if len(s.seeds) > 6 else "")
        n_stored = sum(r.run_id in self.stored for r in self.runs)
        sizes = sorted((len(c.runs) for c in self.chunks), reverse=True)
        budgets = "; ".join(f"{e}: {s.budget(e)[0]:,} env steps per run, log every "
                            f"{s.budget(e)[1]:,}" for e in s.envs)
        lines = [
            f"sweep {s.name!r} ({s.source}): {budgets}"
            + (f", eval every {s.eval_every:,} ({s.eval_episodes} episodes)"
               if s.eval_every else ""),
            f"  configs:     {s.n_configs:,} (grid: {axes})"
            + (f" on each of {len(s.envs)} envs" if len(s.envs) > 1 else ""),
            f"  seeds:       {len(s.seeds):,} ({seeds})",
            f"  runs:        {len(self.runs):,} ({n_stored:,} already stored, "
            f"{self.pending:,} to run)",
            f"  populations: {len(self.chunks):,} from {self.n_groups:,} structural "
            f"group(s), at most {self.population_size} runs each"
            + (f" (sizes {_sizes(sizes)})" if sizes else ""),
            *(["  per env:     " + "; ".join(
                f"{e}: {sum(c.env == e for c in self.chunks)} population(s)" for e in s.envs)]
              if len(s.envs) > 1 else []),
            f"  env steps:   {self.env_steps:,} to run ({s.env_steps:,} in the whole sweep)",
            f"  results:     {out}",
        ]
        return "\n".join(lines)


def _sizes(sizes: Sequence[int]) -> str:
    parts: list[str] = []
    for size in sorted(set(sizes), reverse=True):
        n = sizes.count(size)
        parts.append(f"{n} x {size}" if n > 1 else str(size))
    return ", ".join(parts)


def _chunk_key(runs: Sequence[Run]) -> str:
    return hashlib.sha1(",".join(sorted(r.run_id for r in runs)).encode()).hexdigest()[:16]


def normalization(sweep: Sweep, env: str) -> tuple[float, float] | None:
    """The ``(low, high)`` score references of ``env``: the sweep's ``[normalize]`` entry,
    else the shipped ones (:data:`study.analysis.scores.REFERENCES`), else None."""
    from study.analysis.scores import REFERENCES

    return sweep.normalize.get(env) or REFERENCES.get(env)


def make_plan(sweep: Sweep, population_size: int = 64,
              stored: set[str] | frozenset[str] = frozenset()) -> Plan:
    """Group the sweep's runs not in ``stored`` by structural key and cut each group into
    the fewest chunks of at most ``population_size`` runs, sized evenly (60/60/60 rather
    than 64/64/52, so parallel workers finish together)."""
    if population_size < 1:
        raise ValueError("population_size must be >= 1")
    runs = tuple(sweep.runs())
    # A population shares its env (and so its budget) and its structural hyperparameters.
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.run_id not in stored:
            groups.setdefault((r.env, structural_key(r.hyperparameters)), []).append(r)
    chunks: list[Chunk] = []
    for (env, _), members in groups.items():
        total_steps, log_every = sweep.budget(env)
        n_chunks = math.ceil(len(members) / population_size)
        bounds = np.linspace(0, len(members), n_chunks + 1).round().astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = tuple(members[lo:hi])
            chunks.append(Chunk(
                index=len(chunks), key=_chunk_key(part), sweep=sweep.name, env=env,
                total_steps=total_steps, log_every=log_every,
                eval_every=sweep.eval_every, eval_episodes=sweep.eval_episodes,
                save_policies=sweep.save_policies, runs=part,
                normalize=normalization(sweep, env),
            ))
    return Plan(sweep=sweep, runs=runs, stored=frozenset(stored), chunks=tuple(chunks),
                population_size=population_size, n_groups=len(groups))


# --------------------------------------------------------------------------------------
# the worker function


@dataclass
class ChunkResult:
    """A finished chunk, ready for :func:`study.store.write_chunk`."""

    index: int
    key: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    policies: dict[str, dict[str, np.ndarray]] | None
    env_steps: int
    wall_s: float


class ProgressSink(Protocol):
    def __call__(self, chunk_index: int, steps_done: int) -> None: ...


def _hp_cell(name: str, value: Any) -> Any:
    # Int lists are stored as strings like "[64, 64]"; everything else keeps its type
    # (inf stays a float inf).
    return format_value(value) if SPECS[name].kind == "intlist" else value


def _normalized(score: float, refs: tuple[float, float] | None) -> float:
    if refs is None:
        return float("nan")
    low, high = refs
    return (float(score) - low) / (high - low)


def result_frames(chunk: Chunk, results: Sequence[Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs and curves rows of a trained chunk, in the store's schema (runs in the
    chunk's order; one curve row per run and log point)."""
    from study.trainer.population import CURVE_COLUMNS

    rows = []
    curves = []
    for run, res in zip(chunk.runs, results, strict=True):
        row: dict[str, Any] = {
            "run_id": run.run_id, "config_id": run.config_id, "seed": run.seed,
            "env": chunk.env, "total_steps": chunk.total_steps, "log_every": chunk.log_every,
        }
        row.update({n: _hp_cell(n, run.hyperparameters[n]) for n in SPECS})
        row.update({
            "final_return": float(res.final_return),
            "normalized_return": _normalized(res.final_return, chunk.normalize),
            "final_eval_return": float(res.final_eval_return),
            "status": str(res.status),
            "diverged_at_step": pd.NA if res.diverged_at_step is None
            else int(res.diverged_at_step),
            "diverged_reason": res.diverged_reason,
            "wall_s": float(res.wall_s),
            "sweep": chunk.sweep,
        })
        rows.append(row)
        n = len(res.curve["step"])
        curve: dict[str, Any] = {"run_id": [run.run_id] * n,
                                 "step": np.asarray(res.curve["step"]).astype(np.int64)}
        for col in CURVE_COLUMNS:
            if col != "step":
                curve[col] = np.asarray(res.curve.get(col, np.full(n, np.nan)), np.float64)
        curves.append(pd.DataFrame(curve))
    runs_df = pd.DataFrame(rows).astype({"diverged_at_step": "Int64"})
    return runs_df, pd.concat(curves, ignore_index=True)


def run_chunk(chunk: Chunk, progress: ProgressSink | None = None) -> ChunkResult:
    """Train one chunk as a population (the function workers run).

    One torch thread per worker: parallelism comes from the workers, and more threads
    per worker would only oversubscribe the cores.
    """
    import torch

    from study.trainer.population import Member, train_population

    if multiprocessing.parent_process() is not None:  # a worker process, not the driver
        procs.die_with_parent()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done = 0
    last = 0.0

    def on_progress(n: int) -> None:
        nonlocal done, last
        done += int(n)
        now = time.monotonic()
        if progress is not None and now - last >= _PROGRESS_EVERY_S:
            last = now
            # Progress is best effort: a closed channel must never fail a chunk.
            with contextlib.suppress(Exception):
                progress(chunk.index, done)

    t0 = time.perf_counter()
    try:
        members = [Member(dict(r.hyperparameters), r.seed) for r in chunk.runs]
        results = train_population(
            chunk.env, members, chunk.total_steps, log_every=chunk.log_every,
            eval_every=chunk.eval_every, eval_episodes=chunk.eval_episodes,
            save_policies=chunk.save_policies, on_progress=on_progress,
            check_memory=False,  # the driver checked the populations it starts together
        )
    finally:
        # Matters when the chunk ran in the driver process (n_jobs=1).
        torch.set_num_threads(threads)
    runs_df, curves_df = result_frames(chunk, results)
    policies = None
    if chunk.save_policies:
        policies = {r.run_id: res.policy_state for r, res in zip(chunk.runs, results, strict=True)
                    if res.policy_state is not None}
    return ChunkResult(
        index=chunk.index, key=chunk.key, runs=runs_df, curves=curves_df, policies=policies,
        env_steps=int(sum(res.env_steps for res in results)),
        wall_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------
# progress


class Progress:
    """The driver's progress bar: env steps (rate, ETA) with runs done/total as its label.

    Workers report cumulative env steps per chunk, so late or repeated reports are
    harmless; a finished chunk counts its full budget.
    """

    def __init__(self, plan: Plan, enabled: bool) -> None:
        from tqdm import tqdm

        self._budget = {c.index: c.env_steps for c in plan.chunks}
        self._done: dict[int, int] = {}
        self._finished: set[int] = set()
        self._runs_total = plan.pending
        self._runs_done = 0
        self._lock = threading.Lock()
        # Redraw often on a terminal; sparingly into a log file, where every redraw stays.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=plan.env_steps, unit="step", unit_scale=True, file=sys.stderr,
                         disable=not enabled, smoothing=0.05, dynamic_ncols=interactive,
                         mininterval=0.2 if interactive else 10.0, desc=self._desc())

    def _desc(self) -> str:
        return f"runs {self._runs_done}/{self._runs_total}"

    def _set(self, index: int, steps: int) -> None:
        steps = min(steps, self._budget.get(index, 0))
        delta = steps - self._done.get(index, 0)
        if delta > 0:
            self._done[index] = steps
            self._bar.update(delta)

    def report(self, index: int, steps: int) -> None:
        """A worker's cumulative env steps for chunk ``index``."""
        with self._lock:
            if index not in self._finished:
                self._set(index, steps)

    def finish(self, index: int, n_runs: int) -> None:
        with self._lock:
            self._set(index, self._budget.get(index, 0))
            self._finished.add(index)
            self._runs_done += n_runs
            self._bar.set_description_str(self._desc(), refresh=True)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


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


class _DaskSink:
    """Worker side of the Dask progress channel: a worker event on a per-sweep topic."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def __call__(self, chunk_index: int, steps_done: int) -> None:
        from distributed import get_worker

        get_worker().log_event(self.topic, [chunk_index, steps_done])


# --------------------------------------------------------------------------------------
# backends: each yields ChunkResults in completion order


def _ordered(chunks: Sequence[Chunk]) -> list[Chunk]:
    # Largest first: the stragglers at the end of a sweep are then the small chunks.
    return sorted(chunks, key=lambda c: (-len(c.runs), c.index))


def _inline(chunks: Sequence[Chunk], progress: Progress) -> Iterator[ChunkResult]:
    for c in _ordered(chunks):
        yield run_chunk(c, progress.report)


def _loky(chunks: Sequence[Chunk], n_jobs: int, progress: Progress) -> Iterator[ChunkResult]:
    from joblib import Parallel, delayed

    fd, path = tempfile.mkstemp(prefix="study-progress-", suffix=".bin")
    os.write(fd, bytes(8 * (max(c.index for c in chunks) + 1)))
    os.close(fd)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.25):
            with contextlib.suppress(OSError, ValueError):
                for index, steps in enumerate(np.fromfile(path, dtype="<i8").tolist()):
                    if steps:
                        progress.report(index, steps)

    thread = threading.Thread(target=poll, name="study-progress", daemon=True)
    thread.start()
    # Each worker starts its parent watchdog as it starts, not with its first chunk: a
    # driver killed while the pool is still starting must not leave idle workers behind.
    parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered",
                        batch_size=1, pre_dispatch="all", initializer=procs.die_with_parent)
    try:
        yield from parallel(delayed(run_chunk)(c, _FileSink(path)) for c in _ordered(chunks))
    finally:
        stop.set()
        thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.unlink(path)


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
    call it before they write anything."""
    _connect(scheduler).close()


def _dask(chunks: Sequence[Chunk], n_jobs: int, scheduler: str | None,
          progress: Progress) -> Iterator[ChunkResult]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = _connect(scheduler)
    else:
        # Workers inherit an ignored SIGINT, so Ctrl-C in a terminal (sent to the whole
        # process group) is handled by the driver alone: it cancels and closes the cluster
        # instead of every worker printing its own KeyboardInterrupt traceback.
        with _sigint_ignored():
            cluster = LocalCluster(n_workers=n_jobs, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None,
                                   silence_logs=logging.ERROR)
        client = Client(cluster)
    topic = f"study-progress-{uuid.uuid4().hex}"
    client.subscribe_topic(topic, lambda event: progress.report(*event[1]))
    tag = uuid.uuid4().hex[:8]
    futures = [
        client.submit(run_chunk, c, _DaskSink(topic), key=f"study-chunk-{c.key}-{tag}",
                      pure=False, priority=-i)
        for i, c in enumerate(_ordered(chunks))
    ]
    try:
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        with contextlib.suppress(Exception):
            client.cancel(futures)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------------------
# the driver loop


@dataclass
class Outcome:
    """What :func:`execute` did."""

    chunks_done: int = 0
    runs_done: int = 0
    env_steps: int = 0
    wall_s: float = 0.0
    interrupted: bool = False


def execute(plan: Plan, out: str | Path, n_jobs: int = 1, backend: str = "loky",
            scheduler: str | None = None, show_progress: bool = True,
            on_chunk: Callable[[ChunkResult], None] | None = None) -> Outcome:
    """Run the plan's chunks and store each one as it finishes.

    Ctrl-C stops the workers, drops the chunks in flight and returns with
    ``interrupted=True``; every chunk stored so far is complete, and re-running resumes.
    Any other exception from a chunk stops the sweep and propagates (stored chunks stay).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    outcome = Outcome()
    if not plan.chunks:
        return outcome
    n_jobs = max(1, min(n_jobs, len(plan.chunks)))
    if show_progress and backend != "dask":
        from study.trainer import kernels

        if kernels.cold_cache():
            print("compiling the numba kernels (once after an install; the first progress "
                  "figures include it)", file=sys.stderr, flush=True)
    progress = Progress(plan, show_progress)
    t0 = time.perf_counter()
    if backend == "dask":
        results = _dask(plan.chunks, n_jobs, scheduler, progress)
    elif n_jobs == 1:
        # One worker: train in this process and skip the worker start-up.
        results = _inline(plan.chunks, progress)
    else:
        results = _loky(plan.chunks, n_jobs, progress)
    try:
        # SIGTERM (kill, a job scheduler) ends the sweep as Ctrl-C does.
        with procs.sigterm_as_interrupt():
            for res in results:
                with store.deferred_sigint():  # a stored chunk is also counted
                    store.write_chunk(out, res.runs, res.curves, res.key, res.policies)
                    progress.finish(res.index, len(res.runs))
                    outcome.chunks_done += 1
                    outcome.runs_done += len(res.runs)
                    outcome.env_steps += res.env_steps
                if on_chunk is not None:
                    on_chunk(res)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        # Closing the generator stops the workers (joblib aborts, Dask cancels).
        with contextlib.suppress(BaseException):
            results.close()  # type: ignore[attr-defined]
        progress.close()
        outcome.wall_s = time.perf_counter() - t0
    return outcome

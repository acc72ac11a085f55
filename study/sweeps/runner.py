"""Planning a sweep into population chunks, and running the chunks in parallel.

Runs that share structural hyperparameters (``study.config.structural_key``) train as one
population; each structural group is cut into chunks of at most ``population_size`` runs.
Chunking depends only on the runs to do and the population size, never on ``n_jobs`` or
the backend, and a member's results do not depend on its population at all (the trainer
guarantees bit-identical members), so stored values are the same however a sweep is run,
resumed or distributed.

Chunks run in worker processes (loky, or Dask: :mod:`study.sweeps.executors`); workers
only compute and send their results back (:func:`study.sweeps.jobs.run_chunk`), and the
driver writes each finished chunk to the store, so a crash loses at most the chunks in
flight.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study import procs, store
from study.config import structural_key
from study.sweeps.executors import (
    Executor,
    Progress,
    announce_compilation,
    check_scheduler,
    open_executor,
    run_all,
)
from study.sweeps.jobs import (
    Chunk,
    ChunkResult,
    Outcome,
    chunk_key,
    normalization,
    result_frames,
    run_chunk,
)
from study.sweeps.spec import Run, Sweep

__all__ = [
    "BACKENDS",
    "Chunk",
    "ChunkResult",
    "Outcome",
    "Plan",
    "check_scheduler",
    "execute",
    "make_plan",
    "normalization",
    "result_frames",
    "run_chunk",
]

#: The backends a user chooses (``--backend``); loky with one job trains in the driver.
BACKENDS = ("loky", "dask")


# --------------------------------------------------------------------------------------
# planning


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
        budgets = "; ".join(f"{e}: {b.total_steps:,} env steps per run, log every "
                            f"{b.log_every:,}" for e in s.envs if (b := s.budget(e)))
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
        n_chunks = math.ceil(len(members) / population_size)
        bounds = np.linspace(0, len(members), n_chunks + 1).round().astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = tuple(members[lo:hi])
            chunks.append(Chunk(
                index=len(chunks), key=chunk_key(part), sweep=sweep.name, env=env,
                budget=sweep.budget(env), save_policies=sweep.save_policies, runs=part,
                normalize=normalization(sweep, env),
            ))
    return Plan(sweep=sweep, runs=runs, stored=frozenset(stored), chunks=tuple(chunks),
                population_size=population_size, n_groups=len(groups))


# --------------------------------------------------------------------------------------
# the driver loop


def _ordered(chunks: Sequence[Chunk]) -> list[Chunk]:
    # Largest first: the stragglers at the end of a sweep are then the small chunks.
    return sorted(chunks, key=lambda c: (-len(c.runs), c.index))


def execute(plan: Plan, out: str | Path, n_jobs: int = 1, backend: str = "loky",
            scheduler: str | None = None, show_progress: bool = True,
            on_chunk: Callable[[ChunkResult], None] | None = None) -> Outcome:
    """Run the plan's chunks and store each one as it finishes.

    Ctrl-C stops the workers, drops the chunks in flight and returns with
    ``interrupted=True``; every chunk stored so far is complete, and re-running resumes.
    Any other exception from a chunk stops the sweep and propagates (stored chunks stay).

    Args:
        plan: what to run (:func:`make_plan`).
        out: the results store.
        n_jobs: worker processes (1: train in this process).
        backend: one of :data:`BACKENDS`.
        scheduler: a Dask scheduler's address (``backend="dask"``; None: a local cluster).
        show_progress: draw the progress bar.
        on_chunk: called with each chunk's result after it is stored.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    outcome = Outcome()
    if not plan.chunks:
        return outcome
    n_jobs = max(1, min(n_jobs, len(plan.chunks)))
    if show_progress and backend != "dask":
        announce_compilation()
    progress = Progress(plan.chunks, show_progress)

    def store_chunk(res: ChunkResult) -> None:
        with store.deferred_sigint():  # a stored chunk is also counted
            store.write_chunk(out, res.runs, res.curves, res.key, res.policies)
            progress.finish(res.index, len(res.runs))
            outcome.chunks_done += 1
            outcome.runs_done += len(res.runs)
            outcome.env_steps += res.env_steps
        if on_chunk is not None:
            on_chunk(res)

    t0 = time.perf_counter()
    executor: Executor | None = None
    aborted = True
    try:
        # SIGTERM (kill, a job scheduler) ends the sweep as Ctrl-C does.
        with procs.sigterm_as_interrupt():
            executor = open_executor(backend, n_jobs, progress.report, scheduler)
            run_all(executor, _ordered(plan.chunks), store_chunk)
        aborted = False
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        # Closing the executor stops the workers still training (Ctrl-C, an error).
        if executor is not None:
            with contextlib.suppress(BaseException):
                executor.close(abort=aborted)
        progress.close()
        outcome.wall_s = time.perf_counter() - t0
    return outcome

"""The one job type of both sweep drivers: a :class:`Chunk` of runs trained as one
population under one :class:`Budget`, and :func:`run_chunk`, the function workers run.

A grid cuts its plan into chunks (:mod:`study.sweeps.runner`); the Optuna driver makes
one chunk per batch, structural group and env, and confirms its best configs in chunks
too. Workers only compute: a chunk comes back as a :class:`ChunkResult` whose frames are
already in the store's schema, and the driver writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from study import procs
from study.config import SPECS
from study.sweeps.spec import Budget, Run, Sweep, format_value

__all__ = [
    "Chunk",
    "ChunkResult",
    "LogHook",
    "Outcome",
    "ProgressSink",
    "chunk_key",
    "normalization",
    "result_frames",
    "run_chunk",
]

_PROGRESS_EVERY_S = 0.5  # how often a worker reports env steps to the driver


@dataclass(frozen=True)
class Chunk:
    """A population to train in one worker call."""

    #: the driver's number for it (progress reports name it)
    index: int
    #: names the chunk's files in the store (:func:`chunk_key` of its runs)
    key: str
    #: the sweep name (stored in every run row)
    sweep: str
    env: str
    budget: Budget
    save_policies: bool
    runs: tuple[Run, ...]
    #: ``(low, high)`` references of the env's score: the runs' ``normalized_return`` is
    #: ``(final_return - low) / (high - low)``; None leaves it empty.
    normalize: tuple[float, float] | None = None
    #: whether the trainer checks that the population fits in memory; False when the
    #: driver checked the populations it starts together
    check_memory: bool = False

    @property
    def env_steps(self) -> int:
        return len(self.runs) * self.budget.total_steps


def chunk_key(runs: Sequence[Run], prefix: str = "") -> str:
    """The store's name of a chunk of ``runs``: 16 hex chars of the sha1 of its sorted
    run ids, after ``prefix``.

    Args:
        runs: the chunk's runs (their order does not matter).
        prefix: e.g. ``"optuna-"`` for the Optuna driver's chunks.
    """
    return prefix + hashlib.sha1(",".join(sorted(r.run_id for r in runs)).encode()
                                 ).hexdigest()[:16]


def normalization(sweep: Sweep, env: str) -> tuple[float, float] | None:
    """The ``(low, high)`` score references of ``env``: the sweep's ``[normalize]`` entry,
    else the shipped ones (:data:`study.analysis.scores.REFERENCES`), else None.

    Args:
        sweep: the validated sweep file.
        env: the env id.
    """
    from study.analysis.scores import REFERENCES

    return sweep.normalize.get(env) or REFERENCES.get(env)


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


@dataclass
class Outcome:
    """What a driver's run of chunks did (:func:`study.sweeps.runner.execute`; the Optuna
    driver's :class:`study.sweeps.optuna.StudyOutcome` adds its trials)."""

    chunks_done: int = 0
    runs_done: int = 0  # runs stored
    env_steps: int = 0
    wall_s: float = 0.0
    interrupted: bool = False


class ProgressSink(Protocol):
    """Where a worker reports the cumulative env steps of a chunk (best effort)."""

    def __call__(self, chunk_index: int, steps_done: int, /) -> None: ...


class LogHook(Protocol):
    """Called in the worker at every log point with the population's curve row and the
    env steps done so far; returns a bool mask of members to stop now, or None."""

    def __call__(self, step: int, row: dict[str, np.ndarray],
                 env_steps: int) -> np.ndarray | None: ...


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
    chunk's order; one curve row per run and log point).

    Args:
        chunk: the chunk trained.
        results: its RunResults, in the order of ``chunk.runs``.
    """
    from study.trainer.population import CURVE_COLUMNS

    rows = []
    curves = []
    for run, res in zip(chunk.runs, results, strict=True):
        row: dict[str, Any] = {
            "run_id": run.run_id, "config_id": run.config_id, "seed": run.seed,
            "env": chunk.env, "total_steps": chunk.budget.total_steps,
            "log_every": chunk.budget.log_every,
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


class _Steps:
    """A worker's env-step count of its chunk, sent to a progress sink now and then."""

    def __init__(self, index: int, sink: ProgressSink | None) -> None:
        self.index, self.sink = index, sink
        self.done = 0
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += int(n)
        now = time.monotonic()
        if self.sink is not None and now - self._last >= _PROGRESS_EVERY_S:
            self._last = now
            # Progress is best effort: a closed channel must never fail a chunk.
            with contextlib.suppress(Exception):
                self.sink(self.index, self.done)


def run_chunk(chunk: Chunk, progress: ProgressSink | None = None,
              on_log: LogHook | None = None) -> ChunkResult:
    """Train one chunk as a population (the function workers run).

    One torch thread per worker: parallelism comes from the workers, and more threads
    per worker would only oversubscribe the cores.

    Args:
        chunk: what to train.
        progress: receives the chunk's cumulative env steps every half second or so.
        on_log: called at every log point (the Optuna driver's pruning); it may stop
            members. Its ``close()``, if any, is called when the chunk ends.
    """
    import torch

    from study.trainer.population import Member, train_population

    if multiprocessing.parent_process() is not None:  # a worker process, not the driver
        procs.die_with_parent()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = _Steps(chunk.index, progress)

    def log(step: int, row: dict[str, np.ndarray]) -> np.ndarray | None:
        return None if on_log is None else on_log(int(step), row, steps.done)

    t0 = time.perf_counter()
    try:
        members = [Member(dict(r.hyperparameters), r.seed) for r in chunk.runs]
        results = train_population(
            chunk.env, members, chunk.budget.total_steps, **chunk.budget.train_kwargs(),
            save_policies=chunk.save_policies, on_progress=steps,
            on_log=None if on_log is None else log, check_memory=chunk.check_memory,
        )
    finally:
        # Matters when the chunk ran in the driver process (n_jobs=1).
        torch.set_num_threads(threads)
        close = getattr(on_log, "close", None)
        if close is not None:
            close()
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

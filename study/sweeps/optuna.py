"""``python -m study.optuna SWEEP.toml``: seed-robust Optuna search with batched trials.

Each trial trains its config on every tuning seed (the same seeds for every trial, so
trials are compared pairwise) and is scored by an aggregate over seeds (IQM by default)
instead of one unseeded run. The driver asks Optuna for a batch of trials at once
(ask-and-tell) and trains all their (config, seed) runs as one population per structural
group, so a batch of trials costs about one population run::

    python -m study.optuna sweeps/cartpole_optuna.toml              # -> results/<name>/
    python -m study.optuna sweeps/cartpole_optuna.toml --confirm 5  # top 5 on test seeds
    python -m study.optuna S.toml --storage postgresql://u@host/db  # many processes/hosts

Pruning: at every log point each trial reports the objective over its seeds, computed on
the ``episode_return`` curve so far (the mean of the last 10% of log points for
``final_return``/``final_eval_return``, of all log points for ``auc``); when the pruner
says so the trial's runs stop training (they stay in the store with status "pruned") and
the trial is told PRUNED.

Across tasks: a sweep with several envs (``env = [...]``, ``[overrides."<env>"]``,
``[normalize]``) trains each trial's config on every env with the same tuning seeds (one
population per env and structural group of a batch) and scores it by the objective over
every (task, seed) pair of *normalized* scores, ``(x - low) / (high - low)`` with the
env's references (the sweep's ``[normalize]``, else :data:`study.analysis.scores.REFERENCES`; an
env with neither is refused); the IQM is :func:`study.analysis.stats.iqm`, as in study.aggregate.
Learning curves of different tasks are not comparable step by step, so such a study never
prunes within a task: with a pruner, a trial trains one env after the other (in the
order of ``env``) and after each env but the last reports its objective over the tasks
done so far, at step = their number; the pruner compares trials judged on the same tasks,
and a pruned trial trains no further env. With ``pruner = "none"`` every env of a batch
trains at once. A trial is stored and told when all its envs are done.

Diverged runs: a seed whose training diverged scores the lowest ``episode_return`` it
logged (or, if it logged none, the lowest of its trial), so divergence drags a trial
down instead of silently leaving the aggregate; a trial whose seeds *all* diverged is told
FAIL (user attribute ``failure = "diverged"``), which samplers treat as no information.

Storage and resuming: by default an Optuna JournalStorage file, ``<out>/optuna.journal``
(several processes on one machine may run the same study), given to Optuna by absolute
path with a write lock that a writer killed mid-write cannot wedge (:class:`_JournalLock`).
Re-running the command resumes the study until it holds ``n_trials`` trials. Trials left
RUNNING by a driver that died are told FAIL (``failure = "stale"``), each with a note
saying how it was left, and their params are re-queued once: at once when the driver ran
on this machine (or died while asking, see :meth:`_Asking.batch`), else once its
heartbeat is older than ``STALE_AFTER_S``. ``--storage`` takes an Optuna RDB URL
(``postgresql://...``) to share one study between machines. Trials that count towards
``n_trials``: every COMPLETE, PRUNED, RUNNING and WAITING trial, and FAIL trials that
failed on their own (diverged, invalid config); stale or interrupted ones do not (their
re-queued copy does). ``--n-trials 0 --confirm K`` confirms a study as it is.

Stopping: Ctrl-C and SIGTERM tell the trials in flight FAIL (``failure = "interrupted"``)
and re-queue them, keep every finished trial and its runs, mark the manifest
"interrupted", say in one line what was kept, and exit with 130. Worker processes
(``--n-jobs``) die with their driver, ``kill -9`` included. The driver holds the store's
driver lock shared: Optuna drivers of one study share a store, a grid driver excludes them.

Results: every run goes to the results store (``runs/``, ``curves/``) as for grids, with
the extra columns ``trial_number``, ``trial_state``, ``phase`` ("tune" or "confirm") and
``study_name``; ``trials.parquet`` holds one row per trial. Held-out confirmation
(``--confirm K``, and at the end of a study whose ``[optuna]`` sets ``test_seeds``) re-runs
the top K configs on test seeds disjoint from the tuning seeds, prints their seed table and
writes ``best.toml``, a grid sweep file of the winner over the test seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import sys
import threading
import time
import tomllib
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import FrozenTrial, TrialState

from study import procs, store
from study.cli_util import ArgumentParser, positive_int, run_cli
from study.config import ConfigError, resolve, structural_key, to_jsonable
from study.redact import redact, register_secret
from study.sweeps import optuna_storage
from study.sweeps.executors import Bar, Executor, open_executor, run_all
from study.sweeps.jobs import Chunk, ChunkResult, Outcome, chunk_key, normalization
from study.sweeps.manifest import EXIT_INTERRUPTED, Record
from study.sweeps.search_space import DEFAULT_TEST_SEEDS, OptunaSettings, parse_optuna
from study.sweeps.spec import Run, Sweep, load_sweep, parse_sweep, sweep_to_toml

__all__ = [
    "EXTRA_RUN_COLUMNS",
    "TRIALS_FILE",
    "derive_seeds",
    "load_optuna_sweep",
    "main",
    "seed_sets",
    "trials_frame",
]

JOURNAL_FILE = "optuna.journal"
TRIALS_FILE = "trials.parquet"
BEST_FILE = "best.toml"
#: Columns the Optuna driver adds to the store's runs files (grid runs read them as null).
EXTRA_RUN_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("trial_number", pa.int64()),
    ("trial_state", pa.string()),
    ("phase", pa.string()),
    ("study_name", pa.string()),
)
RUNS_SCHEMA = pa.schema([*store.RUNS_SCHEMA, *(pa.field(n, t) for n, t in EXTRA_RUN_COLUMNS)])

# Liveness of trials: the driver stamps each trial it runs with its owner (machine and
# process) and refreshes a heartbeat. A RUNNING trial is stale when its owner is on this
# machine and dead, or (other machines) its heartbeat is older than STALE_AFTER_S.
HEARTBEAT_S = 30.0
STALE_AFTER_S = float(os.environ.get("STUDY_OPTUNA_STALE_AFTER_S", 300))
_OWNER = "study:owner"
_HEARTBEAT = "study:heartbeat"
_SETTINGS = "study:settings"
_UID = "study:uid"
_CONFIRMED = "study:confirmed"
# A study attribute: the driver inside an ask session and the trials it may leave RUNNING
# without an owner if it is killed there (None between sessions).
_ASKING = "study:asking"
# Failures that are the trial's own (they count towards n_trials and are not retried).
_OWN_FAILURES = ("diverged", "invalid", "no value", "error")


# --------------------------------------------------------------------------------------
# the sweep and its seeds


def derive_seeds(name: str, n: int, exclude: Sequence[int] = ()) -> tuple[int, ...]:
    """``n`` distinct seeds in [0, 2**31) derived from ``name`` alone, none in ``exclude``.

    The stream is prefix-stable: asking for more seeds keeps the first ones.
    """
    out: list[int] = []
    taken = set(int(s) for s in exclude)
    entropy = zlib.crc32(name.encode("utf-8"))
    block = 0
    while len(out) < n:
        words = np.random.SeedSequence([entropy, block]).generate_state(64, np.uint32)
        for w in words.tolist():
            s = int(w) & 0x7FFFFFFF
            if s not in taken:
                taken.add(s)
                out.append(s)
                if len(out) == n:
                    break
        block += 1
    return tuple(out)


def load_optuna_sweep(path: str | Path) -> Sweep:
    """:func:`study.sweeps.spec.load_sweep`, except that ``seeds`` may be left out.

    Without ``seeds`` the tuning and test seeds are derived from the sweep name
    (:func:`derive_seeds`), so the file stays runnable as is. A sweep over several
    environments tunes across tasks (see the module docstring); every env then needs
    score references (its ``[normalize]`` entry or :data:`study.analysis.scores.REFERENCES`).
    """
    sweep = _load_optuna_sweep(path)
    if len(sweep.envs) > 1:
        for env in sweep.envs:
            if normalization(sweep, env) is None:
                raise ConfigError(
                    f"{sweep.source}: task {env!r} has no score references, and a study "
                    f"across tasks judges trials on normalized scores; add [normalize] "
                    f'"{env}" = [low, high] (e.g. a random and a solved score)')
    return sweep


def _load_optuna_sweep(path: str | Path) -> Sweep:
    try:
        return load_sweep(path)
    except ConfigError as e:
        error = e
    # Only a file that parses and lacks `seeds` gets a second chance; any other file keeps
    # load_sweep's one-line error (a missing file included).
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise error from None
    if "seeds" in data:
        raise error
    name = data.get("name", Path(path).stem)
    table: dict = data["optuna"] if isinstance(data.get("optuna"), dict) else {}
    n = table.get("seeds_per_trial", 5)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 5
    data = {**data, "seeds": list(derive_seeds(str(name), n))}
    return parse_sweep(data, source=str(path), default_name=Path(path).stem)


def seed_sets(sweep: Sweep, settings: OptunaSettings,
              n_test: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(tuning seeds, test seeds)``: disjoint, deterministic.

    Tuning seeds are the first ``seeds_per_trial`` of the sweep's ``seeds``. Test seeds are
    the next ``n_test`` of them when the sweep lists enough, else derived from the sweep
    name (excluding the tuning seeds).
    """
    spt = settings.seeds_per_trial
    if len(sweep.seeds) < spt:
        raise ConfigError(
            f"{sweep.source}: seeds lists {len(sweep.seeds)} seed(s): expected at least "
            f"[optuna] seeds_per_trial = {spt}"
        )
    tune = tuple(sweep.seeds[:spt])
    n_test = n_test or 0
    rest = tuple(sweep.seeds[spt:])
    if len(rest) >= n_test:
        test = rest[:n_test]
    else:
        test = derive_seeds(f"{sweep.name}/test", n_test, exclude=tune)
    return tune, test


def trial_hp(sweep: Sweep, settings: OptunaSettings, params: Mapping[str, Any], env: str,
             where: str = "") -> dict[str, Any]:
    """The resolved hyperparameters of a trial's ``params`` on ``env``: the sweep's fixed
    ones, that env's ``[overrides]`` (budget keys aside), then the searched ones."""
    own = {k: v for k, v in sweep.overrides.get(env, {}).items()
           if k not in ("total_steps", "log_every")}
    return resolve({**sweep.fixed, **own, **settings.overrides(params)}, where, env=env)


def _env_config_id(sweep: Sweep, env: str, hp: Mapping[str, Any]) -> str:
    return sweep.budget(env).config_id(env, hp)


def trial_config_id(sweep: Sweep, cids: Mapping[str, str]) -> str:
    """A trial's config id: its env's config id, or, across tasks, 16 hex chars of the
    sha1 of every env's config id in the sweep's env order."""
    if len(sweep.envs) == 1:
        return cids[sweep.env]
    text = ",".join(cids[e] for e in sweep.envs)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# storage and the study lock


class _FileLock:
    """An exclusive ``flock`` on a file: one holder per machine (journal and SQLite)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        import fcntl

        self._thread.acquire()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            # A Ctrl-C or SIGTERM inside __enter__ skips __exit__: release here, or the
            # driver's next use of the lock (storing the trials as it stops) waits forever.
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._thread.release()
            raise

    def __exit__(self, *exc: object) -> None:
        import fcntl

        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        self._thread.release()


class _SqlLock:
    """A named database lock (PostgreSQL advisory lock, MySQL GET_LOCK): one holder in all
    processes and machines sharing the database."""

    spans_machines = True

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self._engine = sa.create_engine(url, poolclass=NullPool)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._key = zlib.crc32(name.encode()) - 2**31  # a signed 32-bit advisory key
        self._name = name[:60]
        self._thread = threading.Lock()
        self._conn: Any = None

    def __enter__(self) -> None:
        import sqlalchemy as sa

        self._thread.acquire()
        try:
            self._conn = self._engine.connect()
            if self._postgres:
                self._conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            else:
                self._conn.execute(sa.text("SELECT GET_LOCK(:n, -1)"), {"n": self._name})
        except BaseException:  # as _FileLock: nothing left held (closing drops the lock)
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._thread.release()
            raise

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy as sa

        try:
            if self._postgres:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            else:
                self._conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": self._name})
        finally:
            self._conn.close()
            self._conn = None
            self._thread.release()


class _ThreadLock:
    """For databases without named locks: exclusive within this process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


#: The storage URL when ``--storage`` is not given: keeps a password out of shell history
#: and ``ps``.
STORAGE_ENV = "STUDY_OPTUNA_STORAGE"


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return redact(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not a URL SQLAlchemy can parse: mask its credentials by shape
        return redact(url)


def _storage_spec(arg: str | None) -> str | None:
    """``--storage``, else ``$STUDY_OPTUNA_STORAGE``, else None (the journal). The
    password of a URL is registered for redaction before anything can print it."""
    spec = arg if arg is not None else (os.environ.get(STORAGE_ENV) or None)
    if spec and "://" in spec:
        rest = spec.split("://", 1)[1]
        if "@" in rest and ":" in rest[: rest.rfind("@")]:  # as redact_url reads it
            register_secret(rest[: rest.rfind("@")].split(":", 1)[1])
        with contextlib.suppress(Exception):  # and as SQLAlchemy will ("?" allowed)
            from sqlalchemy.engine import make_url

            register_secret(make_url(spec).password)
    return spec


def _check_storage(spec: str | None) -> str | None:
    """Validate ``--storage`` before anything is written (one-line ConfigError).

    Returns the storage as given, except that a bare ``postgresql://`` (or Heroku-style
    ``postgres://``) URL names the psycopg2 driver when only psycopg2 is installed:
    SQLAlchemy 2.1 defaults to psycopg 3, the project's test extra installs psycopg2.
    """
    if spec is None or "://" not in spec:
        return spec
    import importlib.util

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(spec)
        if url.drivername in ("postgresql", "postgres"):
            psycopg3 = importlib.util.find_spec("psycopg") is not None
            psycopg2 = importlib.util.find_spec("psycopg2") is not None
            driver = "postgresql+psycopg2" if psycopg2 and not psycopg3 else "postgresql"
            url = url.set(drivername=driver)
        url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise ConfigError(
            f"--storage {_redact(spec)!r} is invalid: {str(e).splitlines()[0]}; expected a "
            f"database URL such as postgresql://user@host/db or sqlite:///study.db"
        ) from None
    return url.render_as_string(hide_password=False)


#: Seconds Optuna's journal write lock may stay unchanged before a waiting process takes
#: it for the lock of a writer that was killed, and breaks it (Optuna's own default).
JOURNAL_GRACE_S = float(os.environ.get("STUDY_OPTUNA_JOURNAL_GRACE_S", 30))


class _JournalLock:
    """Optuna's journal write lock, the symlink ``<journal>.lock`` (so every Optuna process
    on the journal agrees on it), that a writer killed while holding it cannot wedge.

    Optuna times a held lock by the mtime of the link's *target*: a link left dangling (a
    relative target, as Optuna writes for a relative journal path) never times out, and its
    wait loop retries at full CPU forever. This lock links to the absolute path and times
    the link itself (``lstat``): one unchanged for ``grace_s`` seconds is broken.
    """

    def __init__(self, journal: Path, grace_s: float) -> None:
        self.target = str(journal)
        self.path = f"{journal}.lock"  # Optuna's name for it
        self.grace_s = grace_s

    def acquire(self) -> bool:
        seen: tuple[int, int] | None = None
        since, pause = time.monotonic(), 0.001
        while True:
            try:
                os.symlink(self.target, self.path)
                return True
            except FileExistsError:
                pass
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: take it now
            if (st.st_ino, st.st_mtime_ns) != seen:
                seen, since = (st.st_ino, st.st_mtime_ns), time.monotonic()
            elif seen is not None and time.monotonic() - since > self.grace_s:
                self._break(seen)
                continue
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    def _break(self, seen: tuple[int, int]) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            st = os.lstat(self.path)
            if (st.st_ino, st.st_mtime_ns) == seen:  # not a lock taken since we timed it
                self.release()
                print(f"note: {self.path} was held for more than {self.grace_s:g} s (by a "
                      f"process killed while writing the journal?): broken", file=sys.stderr)

    def release(self) -> None:
        # A rename first, as Optuna does: of two processes releasing at once, one succeeds.
        tmp = f"{self.path}{uuid.uuid4().hex}.rename"
        try:
            os.rename(self.path, tmp)
        except OSError:
            raise RuntimeError(f"{self.path}: not held") from None
        os.unlink(tmp)


def _is_url(spec: str | None) -> bool:
    return spec is not None and "://" in spec


def _open_journal(spec: str | None, out: Path) -> tuple[Any, Any, str]:
    """``(optuna storage, study lock, description)`` of a journal file (default
    ``<out>/optuna.journal``)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # Absolute: Optuna's write lock is a symlink to the path given, and a relative one
    # dangles (see _JournalLock).
    path = (Path(spec) if spec else out / JOURNAL_FILE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = cast(Any, _JournalLock(path, JOURNAL_GRACE_S))  # Optuna's lock interface, by duck
    backend = JournalFileBackend(str(path), lock_obj=lock)
    study_lock = _FileLock(path.with_name(path.name + ".study-lock"))
    return JournalStorage(backend), study_lock, str(path)


def _open_rdb(spec: str, study_name: str) -> tuple[Any, Any, str]:
    """``(optuna storage, study lock, description)`` of a database URL; writes nothing
    locally (ConfigError, one line, if it cannot be opened)."""
    from optuna.storages import RDBStorage

    backend = spec.split(":", 1)[0].split("+", 1)[0]
    lock: Any
    init_lock: Any
    try:
        if backend in ("postgresql", "postgres", "mysql", "mariadb"):
            lock = _SqlLock(spec, f"study.optuna:{study_name}")
            init_lock = _SqlLock(spec, "study.optuna:tables")
        elif backend == "sqlite" and ":///" in spec:
            lock = init_lock = _FileLock(Path(spec.split(":///", 1)[1] + ".study-lock"))
        else:
            lock = init_lock = _ThreadLock()
        # Under a lock: workers starting together on a fresh database would otherwise
        # race to create Optuna's tables (and one of them fail on a duplicate key).
        with init_lock:
            storage = RDBStorage(spec, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # connection refused, bad credentials, missing driver, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--storage {_redact(spec)!r}: cannot open: {first}") from None
    return storage, lock, _redact(spec)


# --------------------------------------------------------------------------------------
# trial liveness


def _is_stale(t: FrozenTrial, now: float) -> bool:
    owner = t.system_attrs.get(_OWNER)
    if isinstance(owner, dict) and procs.is_local(owner):
        return not procs.is_alive(owner)
    beat = t.system_attrs.get(_HEARTBEAT)
    if not isinstance(beat, (int, float)):
        start = t.datetime_start
        beat = start.timestamp() if start is not None else now
    return now - float(beat) > STALE_AFTER_S


def _who(driver: Mapping[str, Any]) -> str:
    return f"pid {driver.get('pid')} on {driver.get('host')}"


def _asked_in(t: FrozenTrial, asking: Any) -> bool:
    """Whether ``t`` is a trial the ask session recorded in ``asking`` may have left (see
    :meth:`_Asking.batch`): a new one, or a waiting one it popped."""
    if not isinstance(asking, dict) or not isinstance(asking.get("first"), int):
        return False
    return t.number >= asking["first"] or t.number in asking.get("waiting", ())


def _params_state(t: FrozenTrial, names: Sequence[str]) -> str:
    if not t.params:
        return "without parameters"
    return "with its parameters" if set(t.params) == set(names) else "with some parameters"


def _counts(t: FrozenTrial) -> bool:
    """Whether the trial counts towards n_trials (see the module docstring)."""
    if t.state == TrialState.FAIL:
        return str(t.user_attrs.get("failure", "")).split(":")[0] in _OWN_FAILURES
    return True


# --------------------------------------------------------------------------------------
# the worker side: one population of trials x seeds


class _Tracker:
    """Per-member intermediate values from the ``episode_return`` curve so far.

    A learning member scores the mean of its last 10% of log points (all of them for
    ``auc``); a member that stopped learning (diverged) scores its lowest logged return.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.rows: list[np.ndarray] = []

    def update(self, row: Mapping[str, np.ndarray]) -> np.ndarray:
        self.rows.append(np.asarray(row["episode_return"], dtype=float))
        r = np.stack(self.rows, axis=1)
        k = r.shape[1] if self.metric == "auc" else max(1, math.ceil(0.1 * r.shape[1]))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN
            value = np.nanmean(r[:, -k:], axis=1)
            floor = np.nanmin(r, axis=1)
        learning = np.isfinite(np.asarray(row["entropy"], dtype=float))
        return np.where(learning, value, floor)


Reporter = Callable[[int, np.ndarray, int], "np.ndarray | None"]


class _RemoteReporter:
    """Worker side of the report channel: sends values, receives the prune mask."""

    def __init__(self, address: Any, authkey: bytes, uid: int) -> None:
        self.address, self.authkey, self.uid = address, authkey, uid
        self._conn: Any = None

    def __call__(self, step: int, values: np.ndarray, env_steps: int) -> np.ndarray | None:
        from multiprocessing.connection import Client

        if self._conn is None:
            self._conn = Client(self.address, authkey=self.authkey)
        self._conn.send((self.uid, step, values, env_steps))
        return self._conn.recv()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.address, "authkey": self.authkey, "uid": self.uid,
                "_conn": None}


class _Pruning:
    """The log hook of a tuning chunk (:func:`study.sweeps.jobs.run_chunk`, in the
    worker): turns each log point's curve row into the members' intermediate values and
    sends them to ``reporter`` (the driver's :meth:`Driver.report`, directly or through
    the report channel), which answers the members to stop."""

    def __init__(self, metric: str, reporter: Reporter) -> None:
        self.tracker = _Tracker(metric)
        self.reporter = reporter

    def __call__(self, step: int, row: dict[str, np.ndarray],
                 env_steps: int) -> np.ndarray | None:
        return self.reporter(step, self.tracker.update(row), env_steps)

    def close(self) -> None:
        if isinstance(self.reporter, _RemoteReporter):
            self.reporter.close()


class _ReportServer:
    """Driver side of the report channel for worker processes (``--n-jobs`` > 1).

    Workers only train; every Optuna call (report, should_prune) happens here, in the
    driver, through ``handler``.
    """

    def __init__(self, handler: Callable[[int, int, np.ndarray, int], np.ndarray]) -> None:
        from multiprocessing.connection import Listener

        self.handler = handler
        self.authkey = os.urandom(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=self.authkey)
        self.address = self.listener.address
        self.closed = False
        threading.Thread(target=self._accept, name="study-optuna-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn = self.listener.accept()
            except Exception:  # a failed handshake or the listener closing
                continue
            if self.closed:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        with conn:
            while True:
                try:
                    uid, step, values, env_steps = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self.handler(uid, step, values, env_steps))

    def close(self) -> None:
        from multiprocessing.connection import Client

        self.closed = True
        # accept() does not return when the socket closes under it: wake it up first.
        with contextlib.suppress(Exception):
            Client(self.address, authkey=self.authkey).close()
        self.listener.close()


# --------------------------------------------------------------------------------------
# the driver


@dataclass
class _TrialRun:
    trial: optuna.Trial
    number: int
    params: dict[str, Any]
    hps: dict[str, dict[str, Any]]  # env -> resolved hyperparameters
    cids: dict[str, str]  # env -> config id
    config_id: str  # the trial's config: its env's, or one over every env's
    pruned: bool = False
    state: TrialState | None = None
    value: float | None = None
    failure: str | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)  # env -> per-seed scores
    diverged: list[bool] = field(default_factory=list)  # per unit: all its seeds diverged


@dataclass
class _Group:
    """Trials of one batch that share structural hyperparameters: trained on each env
    as one unit, told when every env is done (or when pruned between tasks)."""

    trials: list[_TrialRun]
    stage: int = 0  # envs launched so far (in the sweep's order)
    in_flight: int = 0
    done: list[tuple[_UnitState, ChunkResult]] = field(default_factory=list)


@dataclass
class _UnitState:
    unit: Chunk
    trials: list[_TrialRun]
    member_trial: np.ndarray  # index into `trials` per member
    runs: tuple[Run, ...]
    group: _Group
    env_steps: int = 0


@dataclass
class StudyOutcome(Outcome):
    """What :meth:`Driver.run` did: :class:`study.sweeps.jobs.Outcome` (``runs_done``:
    the runs of the trials it kept), and its trials."""

    trials_run: int = 0
    trials_kept: int = 0  # finished by this run, their runs stored
    trials_dropped: int = 0  # in flight when interrupted: told FAIL
    timed_out: bool = False


def seed_values(sweep: Sweep, metric: str, env: str, runs: pd.DataFrame,
                returns: Sequence[np.ndarray]) -> np.ndarray:
    """Per-seed metric of one trial's runs on ``env`` (their rows of a chunk's runs
    frame, and each one's ``episode_return`` curve); diverged seeds get their lowest
    return; normalized with the env's score references in a study across tasks."""
    import warnings

    vals, floors = [], []
    for status, final, final_eval, ret in zip(runs["status"], runs["final_return"],
                                              runs["final_eval_return"], returns,
                                              strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            floors.append(np.nanmin(ret) if np.isfinite(ret).any() else np.nan)
            if status != "ok":
                vals.append(np.nan)
            elif metric == "final_return":
                vals.append(final)
            elif metric == "final_eval_return":
                vals.append(final_eval)
            else:
                vals.append(np.nanmean(ret) if np.isfinite(ret).any() else np.nan)
    v, f = np.asarray(vals, dtype=float), np.asarray(floors, dtype=float)
    diverged = runs["status"].eq("diverged").to_numpy()
    trial_floor = np.nanmin(f) if np.isfinite(f).any() else np.nan
    f = np.where(np.isfinite(f), f, trial_floor)
    return _scale(sweep, env, np.where(diverged, f, v))


class _StaleTrials:
    """Trials left RUNNING by a driver that is gone: found, told FAIL (failure "stale", so
    they do not count) and their parameters re-queued once. One of the Driver's jobs,
    kept apart: it reads the owners, heartbeats and asking records other drivers left."""

    def __init__(self, study: optuna.Study, lock: Any, names: Sequence[str]) -> None:
        self.study, self.lock, self.names = study, lock, tuple(names)

    def fail(self, trials: Sequence[FrozenTrial], mine: set[int]) -> int:
        """Tell FAIL to RUNNING trials (other than ``mine``, this driver's) whose driver is
        gone; re-queue each one's params once. The number failed.

        Called under the study lock. A trial is gone when its owner (stamped right after
        ask) died here or stopped its heartbeat elsewhere, or when it has no owner and the
        ask session that left it (the ``_ASKING`` record) belongs to a dead driver.
        """
        now = time.time()
        asking = optuna_storage.study_system_attr(self.study, _ASKING)
        n = 0
        for t in trials:
            if t.state == TrialState.RUNNING and t.number not in mine:
                note = self._note(t, now, asking)
                if note is not None and self._fail(t, note):
                    n += 1
        return n

    def _note(self, t: FrozenTrial, now: float, asking: Any) -> str | None:
        """How trial ``t`` was left behind by a driver that is gone, None if it may still
        run."""
        owner = t.system_attrs.get(_OWNER)
        if owner is None and _asked_in(t, asking) and self._gone(asking.get("driver")):
            return (f"was left RUNNING {_params_state(t, self.names)} by a driver "
                    f"that died while asking ({_who(asking['driver'])})")
        if not _is_stale(t, now):
            return None
        if not isinstance(owner, dict):
            return f"was left RUNNING without an owner for more than {STALE_AFTER_S:g} s"
        if procs.is_local(owner):
            return f"was left RUNNING by a driver that died ({_who(owner)})"
        return (f"was left RUNNING by a driver whose heartbeat stopped more than "
                f"{STALE_AFTER_S:g} s ago ({_who(owner)})")

    def _gone(self, driver: Any) -> bool:
        """Whether an asking driver is gone: dead (on this machine), or, where the study
        lock spans machines and we hold it, not asking anywhere."""
        if not isinstance(driver, dict):
            return False
        if procs.is_local(driver):
            return not procs.is_alive(driver)
        return bool(getattr(self.lock, "spans_machines", False))

    def _fail(self, t: FrozenTrial, note: str) -> bool:
        """Tell ``t`` FAIL (failure "stale": it does not count), re-queue its params once,
        and say so. False if it finished meanwhile."""
        try:
            optuna_storage.set_trial_user_attr(self.study, t, "failure", "stale")
            self.study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
            return False
        complete = set(t.params) == set(self.names)
        if complete and "requeued_from" not in t.user_attrs:
            self.study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})
            what = "marked FAIL, its params re-queued"
        elif complete:
            what = (f"marked FAIL, not re-queued (it was the re-queued copy of trial "
                    f"{t.user_attrs['requeued_from']})")
        else:
            what = "marked FAIL"
        print(f"note: trial {t.number} {note}; {what}", file=sys.stderr, flush=True)
        return True


class _Asking:
    """Asking Optuna for trials (one of the Driver's jobs, kept apart): under the study
    lock, each trial stamped with its owner and prepared (its hyperparameters per env and
    config ids), or failed at once when the trainer would refuse its combination."""

    def __init__(self, study: optuna.Study, lock: Any, sweep: Sweep,
                 settings: OptunaSettings, me: dict[str, Any]) -> None:
        self.study, self.lock, self.sweep, self.settings, self.me = (study, lock, sweep,
                                                                     settings, me)

    def batch(self, target: int, mine: set[int]) -> list[_TrialRun]:
        """Ask the next batch of trials towards ``target`` counted trials: waiting
        (re-queued) trials first, then new ones. ``mine``: the trials this driver runs.

        Under the study lock, so that concurrent drivers never overshoot n_trials and ask
        one at a time; with SIGINT/SIGTERM held, so that a stop never leaves a trial
        half-asked. Only ``kill -9`` can, between Optuna creating a trial and this driver
        stamping its owner: the ``_ASKING`` record names the asking driver and the trials
        it may leave, so that the next driver fails them at once (:class:`_StaleTrials`).
        """
        with self.lock, store.deferred_sigint():
            trials = self.study.get_trials(deepcopy=False)
            if _StaleTrials(self.study, self.lock, self.settings.names).fail(trials, mine):
                trials = self.study.get_trials(deepcopy=False)
            counted = sum(_counts(t) for t in trials)
            waiting = [t.number for t in trials if t.state == TrialState.WAITING]
            k = min(self.settings.trials_per_batch,
                    max(0, target - counted) + len(waiting))
            if k <= 0:
                return []
            # A sampler seeded by the number of trials so far: reproducible for one
            # process, and different for concurrent ones (they see different counts).
            seed = (self.settings.sampler_seed * 1_000_003 + len(trials)) % 2**32
            self.study.sampler = self.settings.make_sampler(seed)
            self._set_asking({"driver": self.me, "first": len(trials), "waiting": waiting})
            batch = [self._ask_one() for _ in range(k)]
            self._set_asking(None)
            return batch

    def _set_asking(self, record: dict[str, Any] | None) -> None:
        optuna_storage.set_study_system_attr(self.study, _ASKING, record)

    def _ask_one(self) -> _TrialRun:
        trial = self.study.ask(self.settings.distributions())
        optuna_storage.set_trial_system_attr(self.study, trial, _OWNER, self.me)
        optuna_storage.set_trial_system_attr(self.study, trial, _HEARTBEAT, time.time())
        return self._prepare(trial)

    def _prepare(self, trial: optuna.Trial) -> _TrialRun:
        params = dict(trial.params)
        try:
            hps = {env: trial_hp(self.sweep, self.settings, params, env,
                                 f"trial {trial.number}: ") for env in self.sweep.envs}
        except ConfigError as e:
            # A combination the space allows but the trainer does not (e.g. more
            # minibatches than samples): the trial fails on its own and counts.
            trial.set_user_attr("failure", redact(f"invalid: {e}"))
            self.study.tell(trial, state=TrialState.FAIL)
            tr = _TrialRun(trial, trial.number, params, {}, {}, "", state=TrialState.FAIL,
                           failure="invalid")
            return tr
        cids = {env: _env_config_id(self.sweep, env, hp) for env, hp in hps.items()}
        cid = trial_config_id(self.sweep, cids)
        trial.set_user_attr("config_id", cid)
        return _TrialRun(trial, trial.number, params, hps, cids, cid)


@dataclass
class Driver:
    """Runs a study: asks batches, trains them as populations, reports, tells, stores."""

    sweep: Sweep
    settings: OptunaSettings
    study: optuna.Study
    lock: Any
    out: Path
    tune_seeds: tuple[int, ...]
    study_name: str
    n_jobs: int = 1
    timeout: float | None = None
    quiet: bool = False
    _units: dict[int, _UnitState] = field(default_factory=dict)
    _next_uid: int = 0
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _me: dict[str, Any] = field(default_factory=procs.me)
    _t0: float = 0.0
    _steps_done: int = 0
    _bar: Bar | None = None  # the progress bar, while run() runs
    _best_line: str = ""
    _kept_trials: int = 0  # finished by this run (their runs stored)
    _kept_runs: int = 0

    # -- helpers -------------------------------------------------------------------------
    @property
    def target(self) -> int:
        grid = self.settings.grid_size()
        return self.settings.n_trials if grid is None else min(self.settings.n_trials, grid)

    def __post_init__(self) -> None:
        # The study's uid (set when it was created) enters every tuning run id.
        self.uid_token = str(self.study.user_attrs.get(_UID, ""))

    def _log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.note(msg)  # above the progress bar
        else:
            print(msg, file=sys.stderr, flush=True)

    def _run_id(self, env: str, hp: Mapping[str, Any], seed: int, number: int) -> str:
        # The grid's run id names (config, seed); a tuning run is also one trial's, and two
        # trials may share a config (re-queued, categorical spaces) with different fates
        # (pruned or not), so the study's uid and the trial number enter the id too.
        base = self.sweep.budget(env).run_id(env, hp, seed)
        text = f"{base}:{self.uid_token}:{number}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def across_tasks(self) -> bool:
        """Whether trials are judged on several envs (normalized scores, pruned between
        tasks)."""
        return len(self.sweep.envs) > 1

    def _groups_for(self, batch: Sequence[_TrialRun]) -> list[_Group]:
        """One group per structural group of the batch's (valid) trials (the same
        partition on every env: per-env tables are the same for every trial)."""
        groups: dict[tuple, list[_TrialRun]] = {}
        for tr in batch:
            if tr.state is None:
                groups.setdefault(structural_key(tr.hps[self.sweep.env]), []).append(tr)
        return [_Group(trials) for trials in groups.values()]

    def _launch(self, group: _Group) -> list[_UnitState]:
        """The group's next units: every env at once, or, when a study across tasks
        prunes, the next env only (trials pruned so far left out)."""
        envs = self.sweep.envs
        staged = self.across_tasks and self.settings.pruner != "none"
        todo = envs[group.stage:group.stage + 1] if staged else envs[group.stage:]
        group.stage += len(todo)
        units = [self._unit(group, env) for env in todo]
        group.in_flight += len(units)
        with self._mutex:
            self._units.update({u.unit.index: u for u in units})
        return units

    def _unit(self, group: _Group, env: str) -> _UnitState:
        """The population of the group's live trials x tuning seeds on ``env``."""
        trials = [tr for tr in group.trials if not tr.pruned]
        owner, runs = [], []
        for j, tr in enumerate(trials):
            hp = tr.hps[env]
            for seed in self.tune_seeds:
                owner.append(j)
                runs.append(Run(self._run_id(env, hp, seed, tr.number), tr.cids[env], seed,
                                hp, env))
        # The trainer checks its memory: the driver does not size its batches.
        unit = _chunk(self.sweep, self._next_uid, env, tuple(runs), check_memory=True)
        self._next_uid += 1
        return _UnitState(unit, trials, np.asarray(owner), tuple(runs), group)

    # -- reporting (a tuning chunk's log hook, in this process or via the report server)
    def report(self, uid: int, step: int, values: np.ndarray, env_steps: int) -> np.ndarray:
        """Report each trial's intermediate value; the members of pruned trials to stop."""
        with self._mutex:
            st = self._units.get(uid)
            if st is None:  # dropped by an interrupt while its worker still trains: stop it
                return np.ones(len(values), dtype=bool)
            self._count_steps(max(0, int(env_steps) - st.env_steps))
            st.env_steps = max(st.env_steps, int(env_steps))
            values = np.asarray(values, dtype=float)
            mask = np.zeros(len(values), dtype=bool)
            if self.across_tasks:  # one env's curve is not comparable to the others'
                return mask
            for j, tr in enumerate(st.trials):
                idx = st.member_trial == j
                if not tr.pruned:
                    v = self.settings.aggregate(values[idx])
                    if math.isfinite(v):
                        try:
                            tr.trial.report(v, int(step))
                            tr.pruned = tr.trial.should_prune()
                        except Exception as e:  # a storage hiccup must not kill training
                            self._log(f"[optuna] trial {tr.number}: report failed: {e}")
                mask[idx] = tr.pruned
            return mask

    # -- finishing ---------------------------------------------------------------------------
    def objective(self, tr: _TrialRun) -> float:
        """The trial's objective over its scores so far: per seed on one env; over every
        (task, seed) pair of normalized scores across tasks (the IQM is
        :func:`study.analysis.stats.iqm`, as study.aggregate's)."""
        x = np.concatenate([tr.values[e] for e in self.sweep.envs if e in tr.values])
        return objective_of(self.settings, self.across_tasks, x)

    def _unit_done(self, st: _UnitState, result: ChunkResult) -> list[_UnitState]:
        """Record a finished unit's scores; then launch its group's next env, or finish
        the group. Returns the units launched."""
        g = st.group
        g.done.append((st, result))
        g.in_flight -= 1
        returns = _returns(result)
        for j, tr in enumerate(st.trials):
            idx = np.flatnonzero(st.member_trial == j)
            rows = result.runs.iloc[idx]
            tr.values[st.unit.env] = seed_values(self.sweep, self.settings.metric,
                                                 st.unit.env, rows, [returns[i] for i in idx])
            tr.diverged.append(bool(rows["status"].eq("diverged").all()))
        with self._mutex:
            self._count_steps(max(0, result.env_steps - st.env_steps))
            del self._units[st.unit.index]
        if g.in_flight:
            return []
        if g.stage < len(self.sweep.envs) and self._prune_between_tasks(g):
            return self._launch(g)
        self._finish_group(g)
        return []

    def _prune_between_tasks(self, g: _Group) -> bool:
        """Report each live trial's objective over the tasks done so far (step = their
        number) and ask the pruner; whether any trial goes on to the next task."""
        step = g.stage
        for tr in g.trials:
            if tr.pruned or all(tr.diverged):
                continue
            v = self.objective(tr)
            if math.isfinite(v):
                try:
                    tr.trial.report(v, step)
                    tr.pruned = tr.trial.should_prune()
                except Exception as e:  # a storage hiccup must not stop the study
                    self._log(f"[optuna] trial {tr.number}: report failed: {e}")
        return any(not tr.pruned for tr in g.trials)

    def _finish_group(self, g: _Group) -> None:
        """Decide each trial's state and value, store the runs, then tell Optuna.

        The store is written first: a crash between the two leaves runs of a trial that
        is later marked stale, never a finished trial without its runs.
        """
        for tr in g.trials:
            if tr.pruned:
                tr.state = TrialState.PRUNED
                continue
            if all(tr.diverged):
                tr.state, tr.failure = TrialState.FAIL, "diverged"
                continue
            value = self.objective(tr)
            if math.isfinite(value):
                tr.state, tr.value = TrialState.COMPLETE, value
            else:
                tr.state, tr.failure = TrialState.FAIL, "no value"
        with store.deferred_sigint():  # stored, told and counted, or none of it
            for st, result in g.done:
                _store_tuning(self.out, self.study_name, st, result)
            for tr in g.trials:
                self._tell(tr)
            self._kept_trials += len(g.trials)
            self._kept_runs += sum(len(st.runs) for st, _ in g.done)

    def _tell(self, tr: _TrialRun) -> None:
        try:
            if tr.failure is not None:
                tr.trial.set_user_attr("failure", redact(tr.failure))
            if tr.state == TrialState.COMPLETE:
                self.study.tell(tr.trial, tr.value)
            else:
                self.study.tell(tr.trial, state=tr.state)
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
            # Another process took it for stale (our heartbeat was late): its runs are
            # stored, the study keeps the other process's verdict.
            self._log(f"[optuna] trial {tr.number}: could not tell {tr.state}: {e}")

    # -- progress ---------------------------------------------------------------------------
    def _count_steps(self, steps: int) -> None:
        """Count env steps trained (under the mutex)."""
        self._steps_done += steps
        if self._bar is not None:
            self._bar.advance(steps)

    def _update_best_line(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        states = [t.state for t in trials if _counts(t) and t.state.is_finished()]
        done = len(states)
        n_c = states.count(TrialState.COMPLETE)
        n_p = states.count(TrialState.PRUNED)
        n_f = states.count(TrialState.FAIL)
        line = (f"trials {done}/{self.target} done ({n_c} complete, {n_p} pruned, "
                f"{n_f} failed)")
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = max(complete, key=lambda t: float(t.values[0]))  # COMPLETE: one value
            line += (f" | best {best.value:.4g} (trial {best.number}: "
                     f"{_format_params(best.params)})")
        self._best_line = line
        if self._bar is not None:
            self._bar.label(f"[optuna] {line}")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> StudyOutcome:
        """Ask, train, tell until the study holds n_trials trials (or --timeout)."""
        outcome = StudyOutcome()
        self._t0 = time.monotonic()
        # Env steps, their rate and the trials' progress as its label; no total (pruning
        # ends trials early).
        self._update_best_line()
        self._bar = Bar(None, enabled=not self.quiet, label=f"[optuna] {self._best_line}")
        executor = open_executor("loky", self.n_jobs)
        # Workers only train: every Optuna call happens in this process, directly from an
        # in-process chunk, through the report channel from a worker's.
        server = None if executor.in_process else _ReportServer(self.report)
        stop_heartbeat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop_heartbeat,), daemon=True,
                                name="study-optuna-heartbeat")
        beat.start()
        in_flight: dict[int, _UnitState] = {}

        def submit(units: Sequence[_UnitState]) -> None:
            for u in units:
                uid = u.unit.index
                reporter: Reporter
                if server is None:
                    def reporter(step: int, values: np.ndarray, steps: int,
                                 uid: int = uid) -> np.ndarray:
                        return self.report(uid, step, values, steps)
                else:
                    reporter = _RemoteReporter(server.address, server.authkey, uid)
                in_flight[uid] = u
                executor.submit(u.unit, _Pruning(self.settings.metric, reporter))

        finished = False  # any other end (an interrupt, a chunk's error) stops the workers
        try:
            self._loop(outcome, executor, in_flight, submit)
            finished = True
        except KeyboardInterrupt:
            outcome.interrupted = True
            with store.deferred_sigint():
                outcome.trials_dropped = self._abandon()
        finally:
            stop_heartbeat.set()
            if server is not None:
                server.close()
            executor.close(abort=not finished)
            self._bar.close()
            self._bar = None
            outcome.wall_s = time.monotonic() - self._t0
            outcome.env_steps = self._steps_done
            outcome.trials_kept, outcome.runs_done = self._kept_trials, self._kept_runs
        with contextlib.suppress(Exception):
            self._write_trials()
        return outcome

    def _loop(self, outcome: StudyOutcome, executor: Executor,
              in_flight: dict[int, _UnitState],
              submit: Callable[[Sequence[_UnitState]], None]) -> None:
        """Ask batches while fewer than n_jobs units train, and finish the units that
        come back, until no trial is left to ask (or --timeout)."""
        asking = True
        while True:
            while asking and executor.pending < self.n_jobs:
                if self.timeout is not None and time.monotonic() - self._t0 > self.timeout:
                    asking, outcome.timed_out = False, True
                    break
                mine = {tr.number for st in self._units.values() for tr in st.trials}
                batch = _Asking(self.study, self.lock, self.sweep, self.settings,
                                self._me).batch(self.target, mine)
                if not batch:
                    asking = False
                    break
                outcome.trials_run += len(batch)
                groups = self._groups_for(batch)
                for g in groups:
                    submit(self._launch(g))
                if not groups:  # every trial of the batch was invalid
                    self._write_trials()
            if not executor.pending:
                return
            for done in executor.wait():
                st = in_flight.pop(done.chunk.index)
                if done.error is not None:
                    for tr in st.group.trials:
                        tr.state, tr.failure = TrialState.FAIL, f"error: {done.error}"
                        self._tell(tr)
                    with self._mutex:
                        self._units.pop(st.unit.index, None)
                    raise done.error
                submit(self._unit_done(st, done.get()))
            self._write_trials()
            self._update_best_line()

    def _abandon(self) -> int:
        """Ctrl-C or SIGTERM: tell FAIL to every trial this driver still runs (in flight,
        or asked just before the stop) and re-queue each one's params once for the next
        run. Returns how many."""
        with self._mutex:
            self._units.clear()
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.system_attrs.get(_OWNER) != self._me:
                continue
            with contextlib.suppress(Exception):
                optuna_storage.set_trial_user_attr(self.study, t, "failure", "interrupted")
                self.study.tell(t.number, state=TrialState.FAIL)
                n += 1
                if set(t.params) == set(self.settings.names) and (
                        "requeued_from" not in t.user_attrs):
                    self.study.enqueue_trial(dict(t.params),
                                             user_attrs={"requeued_from": t.number})
        return n

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            with self._mutex:
                trials = [tr.trial for st in self._units.values() for tr in st.trials]
            for t in trials:
                with contextlib.suppress(Exception):
                    optuna_storage.set_trial_system_attr(self.study, t, _HEARTBEAT,
                                                        time.time())

    def _write_trials(self) -> None:
        # Under the study lock: a concurrent driver must not overwrite a newer snapshot
        # with an older one.
        with self.lock, store.deferred_sigint():
            frame = trials_frame(self.study, self.settings, self.study_name)
            write_trials(self.out, frame)


def _format_params(params: Mapping[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def _returns(result: ChunkResult) -> list[np.ndarray]:
    """Each run's ``episode_return`` curve of a finished chunk, in its runs' order."""
    by_run = {rid: col.to_numpy(dtype=float) for rid, col in
              result.curves.groupby("run_id", sort=False)["episode_return"]}
    return [by_run.get(rid, np.empty(0)) for rid in result.runs["run_id"]]


def _chunk(s: Sweep, index: int, env: str, runs: tuple[Run, ...],
           check_memory: bool = False) -> Chunk:
    """A chunk of ``runs`` on ``env`` (tuning or confirmation), named ``optuna-<hash>``
    in the store."""
    return Chunk(index=index, key=chunk_key(runs, "optuna-"), sweep=s.name, env=env,
                 budget=s.budget(env), save_policies=s.save_policies, runs=runs,
                 normalize=normalization(s, env), check_memory=check_memory)


# --------------------------------------------------------------------------------------
# writing the store


def _state_name(state: TrialState | None) -> str:
    assert state is not None  # decided for every trial before its runs are stored
    return state.name


def _store_tuning(out: Path, study_name: str, st: _UnitState, result: ChunkResult) -> None:
    """Store a finished tuning unit's runs, each with its trial's number and final state
    (atomically, one chunk)."""
    runs_df = result.runs.copy()
    owner = st.member_trial
    runs_df["trial_number"] = [st.trials[j].number for j in owner]
    runs_df["trial_state"] = [_state_name(st.trials[j].state) for j in owner]
    runs_df["phase"] = "tune"
    runs_df["study_name"] = study_name
    store.write_chunk(out, runs_df, result.curves, result.key, result.policies,
                      runs_schema=RUNS_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _param_type(settings: OptunaSettings, name: str) -> pa.DataType:
    p = settings.param(name)
    if p.kind == "int":
        return pa.int64()
    if p.kind == "float":
        return pa.float64()
    kinds = {type(c) for c in p.choices}
    if kinds == {bool}:
        return pa.bool_()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def trials_frame(study: optuna.Study, settings: OptunaSettings,
                 study_name: str = "") -> pa.Table:
    """One row per trial: number, state, value, ``param_<name>``, intermediate values,
    duration and times, config id, failure reason, ``requeued_from``."""
    trials = study.get_trials(deepcopy=False)
    cols: dict[str, list[Any]] = {k: [] for k in (
        "number", "state", "value", "intermediate_steps", "intermediate_values",
        "duration_s", "datetime_start", "datetime_complete", "config_id", "failure",
        "requeued_from", "study_name")}
    params: dict[str, list[Any]] = {n: [] for n in settings.names}
    for t in trials:
        cols["number"].append(t.number)
        cols["state"].append(t.state.name)
        cols["value"].append(t.value if t.state == TrialState.COMPLETE or (
            t.state == TrialState.PRUNED and t.value is not None) else None)
        steps = sorted(t.intermediate_values)
        cols["intermediate_steps"].append([int(s) for s in steps])
        cols["intermediate_values"].append([float(t.intermediate_values[s]) for s in steps])
        dur = t.duration
        cols["duration_s"].append(dur.total_seconds() if dur is not None else None)
        cols["datetime_start"].append(t.datetime_start)
        cols["datetime_complete"].append(t.datetime_complete)
        cols["config_id"].append(t.user_attrs.get("config_id"))
        cols["failure"].append(t.user_attrs.get("failure"))
        rq = t.user_attrs.get("requeued_from")
        cols["requeued_from"].append(int(rq) if rq is not None else None)
        cols["study_name"].append(study_name)
        for n in settings.names:
            params[n].append(settings.param(n).column_value(t.params[n])
                             if n in t.params else None)
    arrays = {
        "number": pa.array(cols["number"], pa.int64()),
        "state": pa.array(cols["state"], pa.string()),
        "value": pa.array(cols["value"], pa.float64()),
        **{f"param_{n}": pa.array(v, _param_type(settings, n)) for n, v in params.items()},
        "intermediate_steps": pa.array(cols["intermediate_steps"], pa.list_(pa.int64())),
        "intermediate_values": pa.array(cols["intermediate_values"], pa.list_(pa.float64())),
        "duration_s": pa.array(cols["duration_s"], pa.float64()),
        "datetime_start": pa.array(cols["datetime_start"], pa.timestamp("us")),
        "datetime_complete": pa.array(cols["datetime_complete"], pa.timestamp("us")),
        "config_id": pa.array(cols["config_id"], pa.string()),
        "failure": pa.array(cols["failure"], pa.string()),
        "requeued_from": pa.array(cols["requeued_from"], pa.int64()),
        "study_name": pa.array(cols["study_name"], pa.string()),
    }
    return pa.table(arrays)


def write_trials(out: Path, table: pa.Table) -> None:
    """Write ``trials.parquet`` atomically."""
    store.atomic_write_bytes(out / TRIALS_FILE, _parquet_bytes(table))


# --------------------------------------------------------------------------------------
# held-out confirmation


def _top_configs(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The best COMPLETE trial of each of the ``k`` best distinct configs."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    complete.sort(key=lambda t: (-float(t.values[0]), t.number))
    seen: set[str] = set()
    out = []
    for t in complete:
        cid = str(t.user_attrs.get("config_id", t.number))
        if cid not in seen:
            seen.add(cid)
            out.append(t)
        if len(out) == k:
            break
    return out


def confirm(driver: Driver, k: int, test_seeds: Sequence[int],
            show: bool = True) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Re-run the top ``k`` configs on ``test_seeds`` (one population per structural
    group), store them with phase "confirm", print the seed table, write best.toml.

    Returns ``(per-config summary, winner hyperparameters)``, or None without a finished
    trial. Runs already stored (an earlier --confirm) are not run again.
    """
    s, settings = driver.sweep, driver.settings
    top = _top_configs(driver.study, k)
    if not top:
        print("confirm: no COMPLETE trial yet, nothing to confirm", file=sys.stderr)
        return None
    stored = store.stored_run_ids(driver.out)
    configs, runs = _confirm_runs(s, settings, top, test_seeds)
    todo = [(r, n) for r, n in runs if r.run_id not in stored]
    chunks = _confirm_chunks(s, todo)
    if chunks and show:
        print(f"confirm: re-running the top {len(top)} config(s) on {len(test_seeds)} held-out "
              f"test seeds ({len(todo)} runs, {len(chunks)} population(s))",
              file=sys.stderr, flush=True)
    _run_confirm(driver, chunks)

    ids = {r.run_id for r, _ in runs}
    all_runs = store.load_runs(driver.out)
    mine = all_runs[all_runs["run_id"].isin(ids)].copy()
    curves = store.load_curves(driver.out)
    curves = curves[curves["run_id"].isin(ids)]
    from study.analysis.tables import format_table, run_metric, seed_table

    metric = settings.metric
    # As in tuning, a diverged test run scores the lowest return it logged, not nothing.
    floor = mine["run_id"].map(curves.groupby("run_id")["episode_return"].min())
    mine["_value"] = np.where(mine["status"].eq("diverged").to_numpy(), floor.to_numpy(float),
                              run_metric(mine, curves, metric).to_numpy(float))
    summary = []
    for t, hps, cids, cid in configs:
        x = [_scale(s, env, mine.loc[mine["config_id"] == cids[env], "_value"])
             for env in hps]
        summary.append({"trial": t.number, "config_id": cid, "tuning": float(t.value),
                        "test": objective_of(settings, len(s.envs) > 1, np.concatenate(x)),
                        "test_seeds": len(x[0]),
                        **{f"param_{n}": t.params.get(n) for n in settings.names}})
    summary_df = pd.DataFrame(summary)
    order = summary_df["test"].fillna(-np.inf).to_numpy()
    win = int(np.argmax(order))
    winner_trial, winner_hps, _, _ = configs[win]
    winner_hp = winner_hps[s.env] if len(s.envs) == 1 else resolve(
        {**s.fixed, **settings.overrides(winner_trial.params)}, env=s.env)
    if show:
        print(f"\nheld-out test seeds ({len(test_seeds)}, disjoint from the "
              f"{len(driver.tune_seeds)} tuning seeds): seed table of the top {len(top)} "
              f"config(s) by tuning {settings.objective} of "
              f"{'normalized ' if len(s.envs) > 1 else ''}{metric}{_tasks_phrase(s)}")
        try:
            print(format_table(seed_table(mine.drop(columns="_value"), curves, metric=metric),
                               "markdown"))
        except ConfigError as e:  # e.g. every test run diverged: say so, keep going
            print(f"(no seed table: {e})")
        lines = [f"| trial | tuning {settings.objective} | test {settings.objective} | "
                 f"params |", "|---:|---:|---:|---|"]
        for row in summary:
            params = _format_params({n: row[f"param_{n}"] for n in settings.names})
            lines.append(f"| {row['trial']} | {row['tuning']:.4g} | {row['test']:.4g} | "
                         f"{params} |")
        print("\n".join(lines))
    path = write_best(driver, winner_trial, winner_hp, test_seeds, summary[win], len(top))
    if show:
        print(f"\nwinner on the test seeds: trial {winner_trial.number} "
              f"({settings.objective} {summary[win]['test']:.4g}); wrote {path}\n"
              f"  full seed-variance study: python -m study.grid {path}")
    return summary_df, winner_hp


def _run_confirm(driver: Driver, chunks: Sequence[tuple[Chunk, list[int]]]) -> None:
    """Train the confirmation chunks (in parallel with --n-jobs) and store each with its
    runs' trial numbers as it finishes."""
    numbers = {c.index: n for c, n in chunks}

    def store_chunk(res: ChunkResult) -> None:
        df = res.runs
        df["trial_number"] = numbers[res.index]
        df["trial_state"] = TrialState.COMPLETE.name
        df["phase"] = "confirm"
        df["study_name"] = driver.study_name
        store.write_chunk(driver.out, df, res.curves, res.key, res.policies,
                          runs_schema=RUNS_SCHEMA)

    executor = open_executor("loky", driver.n_jobs if len(chunks) > 1 else 1)
    finished = False
    try:
        run_all(executor, [c for c, _ in chunks], store_chunk)
        finished = True
    finally:
        executor.close(abort=not finished)


def _confirm_runs(s: Sweep, settings: OptunaSettings, top: Sequence[FrozenTrial],
                  test_seeds: Sequence[int]) -> tuple[list[tuple], list[tuple[Run, int]]]:
    """``(configs, runs)``: per top trial ``(trial, {env: hp}, {env: config id}, its
    config id)``, and its test runs on every env with their trial numbers."""
    configs: list[tuple] = []
    runs: list[tuple[Run, int]] = []
    for t in top:
        hps = {env: trial_hp(s, settings, t.params, env) for env in s.envs}
        cids = {env: _env_config_id(s, env, hp) for env, hp in hps.items()}
        configs.append((t, hps, cids, trial_config_id(s, cids)))
        for env, hp in hps.items():
            budget = s.budget(env)
            for seed in test_seeds:
                runs.append((Run(budget.run_id(env, hp, seed), cids[env], seed, hp, env),
                              t.number))
    return configs, runs


def _confirm_chunks(s: Sweep, todo: Sequence[tuple[Run, int]]
                    ) -> list[tuple[Chunk, list[int]]]:
    """One chunk (with its runs' trial numbers) per env and structural group."""
    groups: dict[tuple, list[tuple[Run, int]]] = {}
    for r, n in todo:
        groups.setdefault((r.env, structural_key(r.hyperparameters)), []).append((r, n))
    chunks = []
    for i, ((env, _), members) in enumerate(groups.items()):
        part = tuple(r for r, _ in members)
        chunks.append((_chunk(s, i, env, part), [n for _, n in members]))
    return chunks


def _scale(s: Sweep, env: str, values: Any) -> np.ndarray:
    """Scores of ``env`` as a study of ``s`` judges them: normalized across tasks."""
    x = np.asarray(values, dtype=float)
    if len(s.envs) == 1:
        return x
    low, high = normalization(s, env) or (0.0, 1.0)
    return (x - low) / (high - low)


def objective_of(settings: OptunaSettings, across_tasks: bool, x: np.ndarray) -> float:
    """The objective of scores ``x``: per seed on one env, or over every (task, seed)
    pair of normalized scores (the IQM then is :func:`study.analysis.stats.iqm`, as
    study.aggregate's)."""
    if across_tasks and settings.objective == "iqm":
        from study.analysis import stats

        return float(stats.iqm(x))
    return settings.aggregate(x)


def write_best(driver: Driver, trial: FrozenTrial, hp: Mapping[str, Any],
               test_seeds: Sequence[int], row: Mapping[str, Any], k: int) -> Path:
    """``best.toml``: a grid sweep file (for ``python -m study.grid``) of the winner's
    config over the held-out test seeds."""
    s = driver.sweep
    best = Sweep(
        name=f"{s.name}-best", env=s.env, total_steps=s.total_steps, log_every=s.log_every,
        seeds=tuple(int(x) for x in test_seeds), fixed=dict(hp), grid={},
        description=(f"winner of Optuna study {driver.study_name!r} (trial {trial.number}) "
                     f"on {len(test_seeds)} held-out test seeds"),
        save_policies=s.save_policies, eval_every=s.eval_every,
        eval_episodes=s.eval_episodes, source=f"{s.source} by study.optuna",
        envs=s.envs, overrides=s.overrides, normalize=s.normalize,
    )
    head = [
        f"# Best config of the Optuna study {driver.study_name!r}: trial {trial.number}, the "
        f"best of the top {k} on held-out test seeds.",
        f"# {driver.settings.objective} of {driver.settings.metric}: tuning seeds "
        f"{row['tuning']:.6g}, test seeds {row['test']:.6g}.",
        f"#   python -m study.grid {driver.out / BEST_FILE}",
    ]
    path = driver.out / BEST_FILE
    store.atomic_write_text(path, "\n".join(head) + "\n" + sweep_to_toml(best))
    return path


# --------------------------------------------------------------------------------------
# the command line


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected seconds > 0")
    return value


def _trial_count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 0")
    return value


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="study.optuna", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep file (TOML) with an [optuna] table")
    p.add_argument("--out", metavar="DIR", help="results directory (default results/<name>)")
    p.add_argument("--n-trials", type=_trial_count, metavar="N",
                   help="trials the study should hold (default: [optuna] n_trials); 0 with "
                        "--confirm K: confirm the study as it is, no new trial")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help="ask no new batch after this many seconds")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: an RDB URL (postgresql://...) shared by many "
                        "processes/machines, or a journal file path (default "
                        f"${STORAGE_ENV}, else <out>/optuna.journal); a password in it is "
                        "never written or printed")
    p.add_argument("--study-name", metavar="NAME", help="study name (default: the sweep name)")
    p.add_argument("--n-jobs", type=positive_int, default=1, metavar="N",
                   help="populations trained in parallel worker processes (default 1)")
    p.add_argument("--confirm", type=positive_int, metavar="K",
                   help="re-run the top K configs on the held-out test seeds and write "
                        "best.toml")
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="trials asked and trained together (default: [optuna] "
                        "trials_per_batch)")
    p.add_argument("--quiet", action="store_true", help="no progress or tables")
    return p


def _check_out(out: Path, env: str | Sequence[str]) -> None:
    """:func:`study.store.check_compatible`, also accepting a directory that holds only
    what a driver writes before its manifest (the driver lock, the journal and its locks,
    sweep.toml, temp files): another driver starting on the same study at the same moment,
    or a first run that died early."""
    if out.is_dir() and not store.is_store(out) and all(
            p.name.startswith((JOURNAL_FILE, ".tmp-"))
            or p.name in (store.SWEEP_FILE, store.DRIVER_LOCK) for p in out.iterdir()):
        return
    store.check_compatible(out, env)


def _check_same_storage(out: Path, spec: str | None) -> None:
    """ConfigError when ``out`` holds a study kept in another kind of storage or another
    database: resuming without ``--storage`` (or ``$STUDY_OPTUNA_STORAGE``) would
    otherwise start a second, unrelated study beside the first one's runs."""
    if not store.is_store(out):
        return
    old = str(store.read_manifest(out).get("optuna", {}).get("storage") or "")
    new = _redact(spec) if spec and "://" in spec else ""
    old_url = old if "://" in old else ""
    if old and old_url.split("?")[0] != new.split("?")[0]:  # options (sslmode) may differ
        raise ConfigError(
            f"{out}: its study is stored in {old}, this run would use "
            f"{new or 'a journal file'}; expected the same storage (pass --storage or set "
            f"{STORAGE_ENV})")


def _settings_record(sweep: Sweep, settings: OptunaSettings,
                     tune: Sequence[int]) -> dict[str, Any]:
    """What makes trials comparable; a study resumed with other values is refused."""
    rec = {
        "env": sweep.env, "total_steps": sweep.total_steps, "log_every": sweep.log_every,
        "eval": [sweep.eval_every, sweep.eval_episodes],
        "fixed": to_jsonable(sweep.fixed), "space": settings.space_jsonable(),
        "tuning_seeds": [int(x) for x in tune], "objective": settings.objective,
        "metric": settings.metric,
    }
    if len(sweep.envs) > 1:  # (absent for one env: studies made before stay resumable)
        rec["envs"] = list(sweep.envs)
        rec["overrides"] = {e: to_jsonable(dict(v)) for e, v in sweep.overrides.items()}
        rec["normalize"] = {e: list(normalization(sweep, e) or ()) for e in sweep.envs}
        rec["pruner"] = settings.pruner  # its steps are tasks in this order
    return json.loads(json.dumps(rec))


def _pruner_span(sweep: Sweep) -> tuple[int, int]:
    """``(log_every, total_steps)`` of the pruner: env steps for one env, tasks (1 to
    the number of envs) for a study across tasks."""
    if len(sweep.envs) > 1:
        return 1, len(sweep.envs)
    return sweep.log_every, sweep.total_steps


def _open_study(storage: Any, lock: Any, name: str, where: str, record: dict[str, Any],
                settings: OptunaSettings, log_every: int, total_steps: int) -> optuna.Study:
    with lock:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=settings.make_sampler(settings.sampler_seed),
                                    pruner=settings.make_pruner(log_every, total_steps),
                                    load_if_exists=True)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError(f"{where}: study {name!r} minimizes; expected a study made by "
                              f"study.optuna (pass --study-name NEW)")
        old = study.user_attrs.get(_SETTINGS)
        if old is None:
            study.set_user_attr(_SETTINGS, record)
            study.set_user_attr(_UID, uuid.uuid4().hex[:12])
        elif old != record:
            key = next(k for k in record if old.get(k) != record[k])
            raise ConfigError(
                f"{where}: study {name!r} was run with {key} = {json.dumps(old.get(key))}, "
                f"this sweep has {json.dumps(record[key])}; expected the same (pass "
                f"--study-name NEW or --out DIR to start another study)"
            )
    return study


def _manifest_fields(study_name: str, storage_desc: str, settings: OptunaSettings
                     ) -> dict[str, Any]:
    """The Optuna driver's own manifest fields (see
    :func:`study.sweeps.manifest.new_manifest`)."""
    return {"kind": "optuna",
            "optuna": {"study_name": study_name, "storage": storage_desc,
                       "n_trials": settings.n_trials,
                       "seeds_per_trial": settings.seeds_per_trial,
                       "objective": settings.objective, "metric": settings.metric,
                       "sampler": settings.sampler, "pruner": settings.pruner,
                       "trials_per_batch": settings.trials_per_batch}}


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every told trial at INFO; our progress line says it better."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _study_complete(driver: Driver) -> bool:
    trials = driver.study.get_trials(deepcopy=False)
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return not busy and sum(_counts(t) for t in trials) >= driver.target


def _summary(driver: Driver, outcome: StudyOutcome) -> str:
    trials = driver.study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    rate = outcome.env_steps / outcome.wall_s if outcome.wall_s > 0 else float("nan")
    lines = [
        f"results: {driver.out} (study {driver.study_name!r}: {len(trials)} trials, "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + ")",
    ]
    tasks = _tasks_phrase(driver.sweep)
    if outcome.trials_run:
        lines.append(f"ran {outcome.trials_run} trials x {len(driver.tune_seeds)} seeds"
                     f"{tasks}, {outcome.env_steps:,} env steps in {outcome.wall_s:.1f} s "
                     f"({rate:,.0f} env steps/s)")
    top = _top_configs(driver.study, 5)
    if top:
        s = driver.settings
        norm = "normalized " if driver.across_tasks else ""
        lines.append(f"best trials by {s.objective} of {norm}{s.metric} over the "
                     f"{len(driver.tune_seeds)} tuning seeds{tasks}:")
        for t in top:
            lines.append(f"  trial {t.number:>4}  {t.value:10.4g}  {_format_params(t.params)}")
    lines.append(f"trials: {driver.out / TRIALS_FILE}; runs: study.store.load(\"{driver.out}\")")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    """A validated command line: what this run will do, decided before anything is
    written."""

    args: argparse.Namespace
    sweep: Sweep
    settings: OptunaSettings
    tune_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    out: Path
    study_name: str
    storage_spec: str | None
    command: str


def _settings(args: argparse.Namespace, sweep: Sweep) -> OptunaSettings:
    settings = parse_optuna(sweep.optuna, source=sweep.source, fixed=sweep.fixed,
                            total_steps=sweep.total_steps, eval_every=sweep.eval_every)
    if args.n_trials == 0 and args.confirm is None:
        raise ConfigError("--n-trials 0 runs no trial: expected it with --confirm K (to "
                          "confirm the study as it is), or --n-trials N >= 1")
    if args.n_trials is not None:
        settings = dataclasses.replace(settings, n_trials=args.n_trials)
    if args.batch_size is not None:
        settings = dataclasses.replace(settings, trials_per_batch=args.batch_size)
    if len(sweep.envs) > 1:
        settings = _across_tasks(sweep, settings)
    return settings


def _across_tasks(sweep: Sweep, settings: OptunaSettings) -> OptunaSettings:
    """The settings of a study across tasks: its pruner steps are tasks, not env steps
    (so no env-step warm-up), and no per-env table may set a searched hyperparameter."""
    for env, own in sweep.overrides.items():
        clash = [k for k in own if k in settings.names]
        if clash:
            raise ConfigError(
                f"{sweep.source}: [overrides.{json.dumps(env)}] {clash[0]} is searched in "
                f"[optuna.space]; expected per-env values of fixed hyperparameters only")
    if "pruner_warmup_steps" in (sweep.optuna or {}):
        raise ConfigError(
            f"{sweep.source}: [optuna] pruner_warmup_steps is invalid for a study across "
            f"tasks: its trials are pruned between tasks (after each env in the order of "
            f"env), never within one; expected no pruner_warmup_steps (or one env)")
    return dataclasses.replace(settings, pruner_warmup_steps=0)


def _job(args: argparse.Namespace, argv: Sequence[str] | None) -> _Job:
    """Every check of the command line, the sweep and the output directory."""
    sweep = load_optuna_sweep(args.sweep)
    settings = _settings(args, sweep)
    if sweep.grid and not args.quiet:
        print(f"note: {sweep.source}: [grid] is ignored by study.optuna (it searches "
              f"[optuna.space])", file=sys.stderr)
    n_test = settings.test_seeds or (DEFAULT_TEST_SEEDS if args.confirm else 0)
    tune_seeds, test_seeds = seed_sets(sweep, settings, n_test)
    out = Path(args.out) if args.out else Path("results") / sweep.name
    study_name = args.study_name if args.study_name is not None else sweep.name
    if not study_name.strip():
        raise ConfigError("--study-name '' is invalid: expected a non-empty name")
    _check_out(out, sweep.envs)
    if settings.n_trials == 0 and not store.is_store(out):
        raise ConfigError(f"{out}: --n-trials 0 --confirm needs a study run before, and this "
                          f"is not its results store; expected the --out of that study")
    storage_spec = _check_storage(_storage_spec(args.storage))
    _check_same_storage(out, storage_spec)
    command = shlex.join(["python", "-m", "study.optuna",
                          *(sys.argv[1:] if argv is None else argv)])
    return _Job(args, sweep, settings, tune_seeds, test_seeds, out, study_name, storage_spec,
                command)


def _main(argv: Sequence[str] | None) -> int:
    job = _job(_parser().parse_args(argv), argv)
    # Validation is over: from here on the store (and the study) is written. A database
    # study is opened and checked first (that writes nothing here). Optuna drivers of one
    # study share the store, a grid driver excludes them. SIGTERM stops as Ctrl-C does.
    with _quiet_optuna():
        in_db = _study(job, *_open_rdb(str(job.storage_spec), job.study_name)) \
            if _is_url(job.storage_spec) else None
        with store.driver_lock(job.out, exclusive=False), procs.sigterm_as_interrupt():
            study, lock, desc = in_db or _study(job, *_open_journal(job.storage_spec, job.out))
            return _run(job, study, lock, desc)


def _study(job: _Job, storage: Any, lock: Any, desc: str) -> tuple[optuna.Study, Any, str]:
    s = job.settings
    study = _open_study(storage, lock, job.study_name, desc,
                        _settings_record(job.sweep, s, job.tune_seeds), s,
                        *_pruner_span(job.sweep))
    return study, lock, desc


def _run(job: _Job, study: optuna.Study, lock: Any, desc: str) -> int:
    """Start the manifest, then drive the study and confirm."""
    s = job.settings
    job.out.mkdir(parents=True, exist_ok=True)
    record = Record.start(job.out, job.sweep, job.command,
                          _manifest_fields(job.study_name, desc, s))
    driver = Driver(sweep=job.sweep, settings=s, study=study, lock=lock, out=job.out,
                    tune_seeds=job.tune_seeds, study_name=job.study_name,
                    n_jobs=job.args.n_jobs, timeout=job.args.timeout, quiet=job.args.quiet)
    if not job.args.quiet:
        _announce(job, driver, desc)

    def finish(status: str, outcome: StudyOutcome | None) -> None:
        record.finish(status, None if outcome is None else {
            "wall_s": round(outcome.wall_s, 3), "env_steps": outcome.env_steps,
            "trials_run": outcome.trials_run})

    try:
        return _drive(job, driver, finish)
    except KeyboardInterrupt:  # outside the trial loop, which handles its own
        finish("interrupted", None)
        print(f"interrupted: the trials finished so far are kept in {job.out} (and confirm "
              f"runs of finished populations, which are not run again); run the same "
              f"command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:
        finish("failed", None)
        raise


def _announce(job: _Job, driver: Driver, desc: str) -> None:
    s = job.settings
    done = sum(_counts(t) and t.state.is_finished() for t in driver.study.get_trials())
    plan = (f"{driver.target} trials ({done} done)" if s.n_trials else
            f"{done} trials done, none to run (--n-trials 0)")
    across = ""
    if len(job.sweep.envs) > 1:
        across = (f"; across tasks: normalized scores of every (task, seed) pair on "
                  f"{', '.join(job.sweep.envs)}"
                  + ("" if s.pruner == "none" else ", pruned between tasks in this order"))
    print(f"study {job.study_name!r} in {desc}: {plan}; {s.describe()}{across}; tuning "
          f"seeds {list(job.tune_seeds)}; {s.trials_per_batch} trials x "
          f"{len(job.tune_seeds)} seeds per population batch", file=sys.stderr, flush=True)


def _tasks_phrase(sweep: Sweep) -> str:
    return f" x {len(sweep.envs)} tasks" if len(sweep.envs) > 1 else ""


def _drive(job: _Job, driver: Driver,
           finish: Callable[[str, StudyOutcome | None], None]) -> int:
    """Run the trials (none with --n-trials 0), report, confirm; the exit code."""
    outcome = driver.run() if job.settings.n_trials else StudyOutcome()
    if outcome.interrupted:
        finish("interrupted", outcome)
        print(_interrupted_line(driver, outcome), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not job.settings.n_trials:
        driver._write_trials()
    if job.args.quiet:
        print(f"results: {job.out}")
    else:
        print(_summary(driver, outcome))
    k = _confirm_count(job, driver)
    if k is not None:
        confirm(driver, k, job.test_seeds, show=not job.args.quiet)
    finish("timeout" if outcome.timed_out else "complete", outcome)
    return 0


def _confirm_count(job: _Job, driver: Driver) -> int | None:
    """K of held-out confirmation: --confirm K, or once at the end of a study that sets
    test_seeds (by the driver that finds the study complete first)."""
    s = job.settings
    if job.args.confirm is not None or not s.test_seeds or not _study_complete(driver):
        return job.args.confirm
    with driver.lock:
        claim = f"{driver.target}:{len(job.test_seeds)}"
        if driver.study.user_attrs.get(_CONFIRMED) == claim:
            return None
        driver.study.set_user_attr(_CONFIRMED, claim)
    return s.confirm_top


def _interrupted_line(driver: Driver, outcome: StudyOutcome) -> str:
    trials = driver.study.get_trials(deepcopy=False)
    done = sum(_counts(t) and t.state.is_finished() for t in trials)
    return (f"interrupted: dropped {outcome.trials_dropped} trial(s) in flight (marked FAIL, "
            f"re-queued for the next run); kept {outcome.trials_kept} trial(s) finished by "
            f"this run ({outcome.runs_done} runs stored in {driver.out}); the study holds "
            f"{done} of {driver.target} trials; run the same command again to resume")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, 130 after Ctrl-C)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

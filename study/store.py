"""The results store of a sweep: ``results/<name>/``.

Layout::

    sweep.toml            the sweep as resolved (defaults filled in)
    manifest.json         versions, machine, command line, start/end times
    runs/*.parquet        one row per finished run          (one file per finished chunk)
    curves/*.parquet      one row per (run, log point)      (one file per finished chunk)
    policies/<run_id>.npz final policy parameters, when the sweep saves policies

Only the driver writes, and every file is written atomically (temp file in the same
directory, fsync, ``os.replace``), so readers never see a partial file; temp files start
with "." and are skipped by pyarrow/pandas dataset discovery as well as by this module.
A chunk's curves (and policies) are written before its runs file: the runs file is the
commit record, so a crash between the two leaves orphan curves (ignored, re-run later)
rather than a run without its curve. If a crash or a concurrent driver stores a run in two
chunk files, the readers here keep one copy, so every run appears exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from study import NUMERICS, procs
from study.config import SPECS, ConfigError
from study.redact import redact_json
from study.schema import CURVE_COLUMNS

__all__ = [
    "CURVE_SCHEMA",
    "FORMAT",
    "RUNS_SCHEMA",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_compatible",
    "corrupt_chunks",
    "driver_lock",
    "is_store",
    "load",
    "load_curves",
    "load_curves_with_hparams",
    "load_runs",
    "read_columns",
    "read_manifest",
    "remove_store",
    "set_aside",
    "status",
    "stored_run_ids",
    "write_chunk",
    "write_manifest",
]

FORMAT = "study-results/1"
MANIFEST = "manifest.json"
DRIVER_LOCK = ".driver.lock"
SWEEP_FILE = "sweep.toml"
RUNS_DIR = "runs"
CURVES_DIR = "curves"
POLICIES_DIR = "policies"

_CURVE_COLUMNS = CURVE_COLUMNS


class StoreError(ConfigError):
    """A path is not a results store, is empty, or cannot take this sweep (one line)."""


def _hp_type(name: str) -> pa.DataType:
    kind = SPECS[name].kind
    if kind == "int":
        return pa.int64()
    if kind == "float":
        return pa.float64()
    if kind == "bool":
        return pa.bool_()
    return pa.string()  # choices, and int lists written as "[64, 64]"


#: One schema for every runs file, so files written by different chunks (or by a later,
#: changed sweep under the same name) always concatenate.
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("seed", pa.int64()),
        ("env", pa.string()),
        ("total_steps", pa.int64()),
        ("log_every", pa.int64()),
        *[(name, _hp_type(name)) for name in SPECS],
        ("final_return", pa.float64()),
        # (final_return - low) / (high - low) with the env's score references (NaN: none)
        ("normalized_return", pa.float64()),
        ("final_eval_return", pa.float64()),
        ("status", pa.string()),
        ("diverged_at_step", pa.int64()),
        ("diverged_reason", pa.string()),  # what went non-finite first, and where
        ("wall_s", pa.float64()),
        ("sweep", pa.string()),
    ]
)

CURVE_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("step", pa.int64())]
    + [(c, pa.float64()) for c in _CURVE_COLUMNS if c != "step"]
)

#: Columns that measure time rather than results; they differ between identical re-runs.
TIMING_COLUMNS = ("wall_s",)


# --------------------------------------------------------------------------------------
# atomic writes


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them.

    A KeyboardInterrupt raised inside a write can land between creating a temp file and
    the ``try`` that removes it, or between storing a chunk and counting it; deferring it
    makes a chunk's write all-or-nothing. Off the main thread (where handlers cannot be
    set) the block runs as is. Nests.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in dict.fromkeys(signal.Signals(n) for n in caught):  # arrival order, once each
        handler = previous[sig]
        if handler is signal.SIG_IGN:
            continue
        if callable(handler):  # Python's SIGINT handler and ours raise; an outer deferral
            handler(sig, None)  # records
        elif sig == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            os.kill(os.getpid(), sig)  # the default action, now that the write is done


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Any]:
    """Yield a binary file object; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)  # names path
    try:
        # mkstemp creates 0600 files; give results the usual permissions (umask applies).
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno is None or e.filename is not None:
            raise
        # Name the file the store was writing (a full disk fails in write() or fsync(),
        # whose errors carry no file name).
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one)."""
    with _atomic(Path(path)) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_parquet(path: Path, table: pa.Table) -> None:
    with _atomic(path) as f:
        pq.write_table(table, f)


# --------------------------------------------------------------------------------------
# writing


#: Runs columns added after the first stores: writers that do not know them (older
#: callers, other tools) get nulls.
OPTIONAL_RUN_COLUMNS = ("diverged_reason", "normalized_return")


def _to_table(df: pd.DataFrame, schema: pa.Schema, what: str) -> pa.Table:
    absent = [n for n in OPTIONAL_RUN_COLUMNS if n in schema.names and n not in df.columns]
    if absent:
        df = df.assign(**{n: None for n in absent})
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}")
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def write_chunk(
    path: str | Path,
    runs_df: pd.DataFrame,
    curves_df: pd.DataFrame,
    chunk_key: str,
    policies: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    runs_schema: pa.Schema = RUNS_SCHEMA,
) -> None:
    """Store one finished chunk: its policies and curves first, then its runs (the commit).

    ``chunk_key`` names the files (``chunk-<key>.parquet``); writing the same key again
    replaces them, which is harmless because a chunk's values are deterministic.
    ``runs_schema`` extends the runs' schema (Optuna's trial columns); the readers fill
    columns a file lacks with nulls.
    """
    root = Path(path)
    # Nullable Int64 in the frame makes pandas' metadata in the file restore it as Int64
    # when a user reads the dataset with pandas.read_parquet directly.
    runs_df = runs_df.astype({"diverged_at_step": "Int64"})
    runs_table = _to_table(runs_df, runs_schema, "runs_df")
    curves_table = _to_table(curves_df, CURVE_SCHEMA, "curves_df")
    written: list[Path] = []
    with deferred_sigint():
        try:
            for rid, state in (policies or {}).items():
                written.append(root / POLICIES_DIR / f"{rid}.npz")
                atomic_write_bytes(written[-1], _npz_bytes(state))
            written.append(root / CURVES_DIR / f"chunk-{chunk_key}.parquet")
            _write_parquet(written[-1], curves_table)
            _write_parquet(root / RUNS_DIR / f"chunk-{chunk_key}.parquet", runs_table)
        except BaseException:
            # Disk full, say: a chunk is all or nothing, so remove what this call wrote
            # (no policy or curves without their runs); the chunk is trained again.
            for f in written:
                with contextlib.suppress(OSError):
                    f.unlink()
            raise


def _npz_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in state.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_manifest(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` atomically, every credential in it redacted (the command
    line of an earlier version may hold a storage password: history is redacted too)."""
    manifest = redact_json(json.loads(json.dumps(manifest, default=str)))
    atomic_write_text(Path(path) / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store ({} for a store written by other tools without one);
    StoreError if ``path`` is not a store."""
    if not is_store(path):
        raise StoreError(f"{path}: not a results store (no {MANIFEST} or {RUNS_DIR}/*.parquet)")
    if not _has_manifest(Path(path)):
        return {}
    return json.loads((Path(path) / MANIFEST).read_text())


def status(manifest: Mapping[str, Any]) -> str:
    """The store's status as readers should report it: the manifest's, except that a store
    still marked ``"running"`` whose driver (``manifest["driver"]``, a
    :func:`study.procs.me` of this machine) is gone was ``"interrupted"`` (killed, or a
    failed write left the manifest behind)."""
    recorded = str(manifest.get("status") or "unknown")
    driver = manifest.get("driver")
    if recorded == "running" and isinstance(driver, Mapping) and procs.is_local(driver) \
            and not procs.is_alive(driver):
        return "interrupted"
    return recorded


@contextlib.contextmanager
def driver_lock(path: str | Path, exclusive: bool = True) -> Iterator[None]:
    """Hold ``<store>/.driver.lock`` while a driver writes the store (``flock``: released
    by the kernel when the process dies, so no lock outlives its driver).

    ``exclusive`` (grids) admits one driver; shared (Optuna drivers of one study, which
    claim trials through Optuna's storage) admits any number of shared holders but no
    exclusive one. A driver that cannot take the lock gets a StoreError naming the driver
    recorded in the manifest: two grids on one store would train every run twice.
    """
    import fcntl

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{p}: another driver is writing this store ({_driver_desc(p)}); "
                         f"wait for it to finish, or pass another --out") from None
    except OSError as e:  # ENOLCK on some network file systems
        os.close(fd)
        raise StoreError(f"{p}: cannot lock {DRIVER_LOCK} ({e.strerror}); write results to a "
                         f"local file system") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def _driver_desc(p: Path) -> str:
    try:
        manifest = read_manifest(p) if is_store(p) else {}
    except (StoreError, OSError, ValueError):
        manifest = {}
    driver = manifest.get("driver")
    if not isinstance(driver, Mapping):
        return "its process id is not recorded yet"
    kind = manifest.get("kind", "grid")
    return (f"study.{kind} pid {driver.get('pid')} on {driver.get('host')}, started "
            f"{manifest.get('started', '?')}")


def _user_files(p: Path) -> list[Path]:
    """What a directory holds besides dot files (temp files, the driver lock)."""
    return [q for q in p.iterdir() if not q.name.startswith(".")]


def remove_store(path: str | Path) -> None:
    """Delete a store's contents (``--fresh``), keeping the driver lock its caller holds.
    Refuses directories that are not stores."""
    p = Path(path)
    if not p.exists() or not _user_files(p):
        return
    if not is_store(p):
        raise StoreError(f"{p}: refusing to delete, it is not a results store")
    for q in p.iterdir():
        if q.name == DRIVER_LOCK:
            continue
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q)
        else:
            q.unlink()
    if not any(p.iterdir()):
        p.rmdir()


# --------------------------------------------------------------------------------------
# reading


def _has_manifest(path: Path) -> bool:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("study-results/")


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a results store: a manifest written by this module, or a
    ``runs/`` Parquet dataset in the store's schema written by any other tool (data is
    the interface: a hand-made store can be analysed too)."""
    p = Path(path)
    return _has_manifest(p) or bool(_files(p, RUNS_DIR))


def _files(root: Path, sub: str) -> list[Path]:
    d = root / sub
    if not d.is_dir():
        return []
    # Sorted so that which duplicate is kept never depends on directory order; names
    # starting with "." or "_" are temp files and metadata, as pyarrow datasets treat them.
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith((".", "_")))


def _read_one(path: Path, columns: list[str] | None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise StoreError(
            f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:120]}); "
            f"re-running the sweep's command sets it aside and trains its runs again") from None


def _read(files: list[Path], columns: list[str] | None = None) -> pa.Table | None:
    tables = [_read_one(f, columns) for f in files]
    if not tables:
        return None
    # "default" promotion fills columns missing from older files with nulls.
    return pa.concat_tables(tables, promote_options="default")


def _require_store(path: str | Path) -> Path:
    p = Path(path)
    if not is_store(p):
        if not p.exists():
            raise StoreError(f"{p}: no such results store")
        raise StoreError(f"{p}: not a results store (no {MANIFEST} or {RUNS_DIR}/*.parquet)")
    return p


def corrupt_chunks(path: str | Path) -> list[str]:
    """Keys of the chunks with a runs or curves file that cannot be read (truncated,
    empty, not Parquet): a resume sets them aside (:func:`set_aside`) and trains their
    runs again."""
    p = Path(path)
    bad = set()
    for sub in (RUNS_DIR, CURVES_DIR):
        for f in _files(p, sub):
            try:
                pq.read_metadata(f)
            except (OSError, pa.ArrowException):
                bad.add(f.stem.removeprefix("chunk-"))
    return sorted(bad)


def set_aside(path: str | Path, chunk_keys: Sequence[str]) -> list[Path]:
    """Rename the runs and curves files of ``chunk_keys`` to ``.corrupt-<name>`` (hidden
    from the readers and from pyarrow datasets, kept for inspection); returns the new
    paths."""
    moved = []
    for key in chunk_keys:
        for sub in (RUNS_DIR, CURVES_DIR):
            f = Path(path) / sub / f"chunk-{key}.parquet"
            if f.exists():
                target = f.with_name(f".corrupt-{f.name}")
                os.replace(f, target)
                moved.append(target)
    return moved


def stored_run_ids(path: str | Path, skip_chunks: Sequence[str] = ()) -> set[str]:
    """Ids of the runs a store holds (empty if ``path`` does not exist yet), not counting
    the chunks ``skip_chunks`` (corrupt ones a resume will set aside)."""
    p = Path(path)
    skip = {f"chunk-{k}.parquet" for k in skip_chunks}
    table = _read([f for f in _files(p, RUNS_DIR) if f.name not in skip], ["run_id"])
    return set() if table is None else set(table.column("run_id").to_pylist())


def load_runs(path: str | Path, allow_empty: bool = False) -> pd.DataFrame:
    """Every stored run, once each, sorted by (config_id, seed).

    StoreError if ``path`` is not a store, or holds no runs and ``allow_empty`` is false.
    """
    p = _require_store(path)
    table = _read(_files(p, RUNS_DIR))
    if table is None:
        if allow_empty:
            return _runs_frame(RUNS_SCHEMA.empty_table())
        raise StoreError(f"{p}: the store holds no finished runs yet")
    missing = [c for c in ("run_id", "config_id", "seed") if c not in table.column_names]
    if missing:
        raise StoreError(
            f"{p}/{RUNS_DIR}: missing column(s) {', '.join(missing)}; a store's "
            f"runs need at least run_id, config_id, seed and a metric"
        )
    df = _runs_frame(table)
    df = df.drop_duplicates(subset="run_id", keep="first")
    return df.sort_values(["config_id", "seed"], kind="stable").reset_index(drop=True)


def _runs_frame(table: pa.Table) -> pd.DataFrame:
    # ignore_metadata: build dtypes from the Arrow types, whatever pandas wrote in the file.
    df = table.to_pandas(ignore_metadata=True)
    # diverged_at_step is nullable: keep it integer (pandas Int64) rather than float NaN.
    steps = (
        table.column("diverged_at_step").to_pylist()
        if "diverged_at_step" in table.column_names
        else [None] * len(df)
    )
    df["diverged_at_step"] = pd.array(steps, dtype="Int64")
    # Columns a hand-written store may leave out.
    for column, default in (
        ("status", "ok"),
        ("final_return", np.nan),
        ("final_eval_return", np.nan),
        ("wall_s", np.nan),
    ):
        if column not in df:
            df[column] = default
    return df


def load_curves(path: str | Path, allow_empty: bool = False) -> pd.DataFrame:
    """Curve points of every stored run, once each, sorted by (run_id, step).

    Curves whose run was never committed to ``runs/`` (a crash between the two writes)
    are left out; their runs are re-run by the next invocation.
    """
    p = _require_store(path)
    ids = stored_run_ids(p)
    table = _read(_files(p, CURVES_DIR))
    if table is None or not ids:
        if allow_empty:
            return CURVE_SCHEMA.empty_table().to_pandas()
        raise StoreError(f"{p}: the store holds no finished runs yet")
    df = table.to_pandas()
    df = df[df["run_id"].isin(ids)]
    # A run stored twice has identical curves in both files; keep the first of each point.
    df = df.drop_duplicates(subset=["run_id", "step"], keep="first")
    return df.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)


def load(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` of a store: :func:`load_runs` and :func:`load_curves`."""
    return load_runs(path), load_curves(path)


def load_curves_with_hparams(path: str | Path) -> pd.DataFrame:
    """Curves with each run's config_id, seed, env and hyperparameter columns joined on."""
    runs, curves = load(path)
    keep = ["run_id", "config_id", "seed", "env", *[n for n in SPECS if n in runs.columns]]
    return curves.merge(runs[keep], on="run_id", how="inner", validate="many_to_one")


def read_columns(path: str | Path, columns: list[str],
                 skip_chunks: Sequence[str] = ()) -> pd.DataFrame:
    """Some columns of every stored run (an empty frame for a new store), not counting the
    chunks ``skip_chunks``."""
    skip = {f"chunk-{k}.parquet" for k in skip_chunks}
    table = _read([f for f in _files(Path(path), RUNS_DIR) if f.name not in skip], columns)
    return pd.DataFrame(columns=columns) if table is None else table.to_pandas()


def check_compatible(path: str | Path, env: str | Sequence[str],
                     skip_chunks: Sequence[str] = ()) -> None:
    """StoreError unless the store at ``path`` (if any) may take runs of ``env`` (one id,
    or the ids of a sweep over several environments: the store may hold any of them).

    A missing or empty directory is fine; a non-store directory with files, a store whose
    runs were made on another environment, or one trained with other numerics
    (:data:`study.NUMERICS`) is refused (``--fresh`` deletes it).
    """
    p = Path(path)
    if not p.exists():
        return
    if not p.is_dir():
        raise StoreError(f"{p}: exists and is not a directory")
    if not is_store(p):
        if _user_files(p):
            raise StoreError(
                f"{p}: exists and is not a results store; choose another --out directory"
            )
        return
    manifest = read_manifest(p)
    mine = [env] if isinstance(env, str) else list(env)
    recorded = manifest.get("env", mine[0])
    envs = set(recorded) if isinstance(recorded, list) else {str(recorded)}
    skip = {f"chunk-{k}.parquet" for k in skip_chunks}
    table = _read([f for f in _files(p, RUNS_DIR) if f.name not in skip], ["env"])
    if table is not None:
        envs.update(table.column("env").unique().to_pylist())
    other = sorted(envs - set(mine))
    env = ", ".join(mine)
    if other:
        raise StoreError(
            f"{p}: holds results for env {other[0]!r}, but this sweep uses {env!r}; "
            f"pass --fresh to delete them, or --out DIR to write elsewhere"
        )
    had = manifest.get("numerics", 1)  # stores from before it was recorded: 1
    if manifest and table is not None and had != NUMERICS:
        raise StoreError(
            f"{p}: its runs were trained with study numerics {had}, this version trains with "
            f"numerics {NUMERICS}, so resumed runs would not match them; pass --fresh to "
            f"retrain them all, or --out DIR to write elsewhere"
        )

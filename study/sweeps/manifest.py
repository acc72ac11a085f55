"""The store's ``manifest.json`` as both drivers write it: what ran, how, where, with which
versions, and how it ended (readers: :func:`study.store.status`)."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from study import procs, store
from study.sweeps.spec import Sweep, sweep_to_toml
from study.trust import sign_env

#: The exit code of a driver stopped by Ctrl-C or SIGTERM (what finished is kept).
EXIT_INTERRUPTED = 130

#: The distributions whose versions a manifest records (None when not installed).
_DISTRIBUTIONS = ("torch", "gymnasium", "numpy", "numba", "pandas", "pyarrow", "joblib",
                  "distributed", "optuna")


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def new_manifest(sweep: Sweep, command: str, previous: dict[str, Any] | None,
                 fields: Mapping[str, Any]) -> dict[str, Any]:
    """A "running" manifest for ``sweep`` started by ``command``, with the driver's own
    ``fields`` (its settings and counts); ``previous`` (the store's manifest before this
    run, if any) goes into ``history``, oldest first."""
    import study

    history = []
    if previous:
        history = list(previous.pop("history", []))
        history.append(previous)
    return {
        "format": store.FORMAT,
        "sweep": sweep.name,
        "env": sweep.env if len(sweep.envs) == 1 else list(sweep.envs),
        "sweep_file": sweep.source,
        "command": command,
        "cwd": os.getcwd(),
        "started": now(),
        "finished": None,
        "status": "running",
        "driver": procs.me(),  # readers call a "running" store whose driver died interrupted
        "numerics": study.NUMERICS,
        **fields,
        "versions": {"python": platform.python_version(), "study": study.__version__,
                     **{name: _version(name) for name in _DISTRIBUTIONS}},
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "history": history,
        # Lets study.render import the env's module from this store without --trust.
        **({"env_signature": sig} if (sig := sign_env(sweep.env)) else {}),
        **({"env_signatures": sigs} if (sigs := {e: sg for e in sweep.envs[1:]
                                                  if (sg := sign_env(e))}) else {}),
    }


class Record:
    """A driver's manifest in a store: started by :meth:`start`, ended by :meth:`finish`.

    Every write is atomic (a reader never sees half a manifest)."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out, self.data = out, data

    @classmethod
    def start(cls, out: Path, sweep: Sweep, command: str,
              fields: Mapping[str, Any]) -> Record:
        """Write the resolved ``sweep.toml`` and a "running" manifest into ``out``."""
        previous = store.read_manifest(out) if store.is_store(out) else None
        record = cls(out, new_manifest(sweep, command, previous, fields))
        store.atomic_write_text(out / store.SWEEP_FILE, sweep_to_toml(sweep))
        store.write_manifest(out, record.data)
        return record

    def finish(self, status: str, values: Mapping[str, Any] | None = None) -> None:
        """End the run as ``status`` ("complete", "interrupted", "failed") with the
        outcome's ``values`` (wall time, env steps, counts)."""
        self.data["finished"] = now()
        self.data["status"] = status
        self.data.update(values or {})
        store.write_manifest(self.out, self.data)

"""The results store: atomic chunk files, readers that dedupe and skip temp/orphan files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import study
from study import store
from study.config import SPECS, defaults
from study.sweeps.spec import format_value


def _make_store(path: Path, env: str = "CartPole-v1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    store.write_manifest(path, {"format": store.FORMAT, "env": env, "sweep": "t",
                                "numerics": study.NUMERICS})
    return path


def _frames(run_ids: list[str], env: str = "CartPole-v1", n_points: int = 3,
            diverged: dict[str, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    diverged = diverged or {}
    hp = defaults()
    rows, curves = [], []
    for i, rid in enumerate(run_ids):
        row = {"run_id": rid, "config_id": f"c{i % 2}", "seed": i, "env": env,
               "total_steps": 300, "log_every": 100}
        row.update({k: format_value(v) if SPECS[k].kind == "intlist" else v
                    for k, v in hp.items()})
        row.update({"final_return": float(i), "final_eval_return": float("nan"),
                    "status": "diverged" if rid in diverged else "ok",
                    "diverged_at_step": diverged.get(rid), "wall_s": 0.5, "sweep": "t"})
        rows.append(row)
        c = {"run_id": [rid] * n_points, "step": np.arange(1, n_points + 1) * 100}
        for col in store.CURVE_SCHEMA.names[2:]:
            c[col] = np.full(n_points, float(i))
        curves.append(pd.DataFrame(c))
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


def test_write_and_read_back(tmp_path):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a", "b"], diverged={"b": 200})
    store.write_chunk(root, runs, curves, "k1")
    runs2, curves2 = _frames(["c"])
    store.write_chunk(root, runs2, curves2, "k2",
                      policies={"c": {"w": np.ones((2, 2), np.float32)}})

    assert store.is_store(root)
    assert store.stored_run_ids(root) == {"a", "b", "c"}
    got = store.load_runs(root)
    assert list(got["run_id"]) == ["a", "c", "b"]  # sorted by (config_id, seed)
    assert str(got["diverged_at_step"].dtype) == "Int64"
    assert got.set_index("run_id")["diverged_at_step"].to_dict()["b"] == 200
    assert pd.isna(got.set_index("run_id")["diverged_at_step"]["a"])
    assert got.loc[0, "policy_hidden_sizes"] == "[64, 64]"
    assert got.loc[0, "max_grad_norm"] == 0.5
    assert len(store.load_curves(root)) == 9

    # plain pandas reads the datasets too, with the nullable integer column intact
    direct = pd.read_parquet(root / "runs")
    assert sorted(direct["run_id"]) == ["a", "b", "c"]
    assert str(direct["diverged_at_step"].dtype) == "Int64"
    assert len(pd.read_parquet(root / "curves")) == 9

    joined = store.load_curves_with_hparams(root)
    assert {"seed", "config_id", "policy_lr", "episode_return"} <= set(joined.columns)
    assert len(joined) == 9
    with np.load(root / "policies" / "c.npz") as z:
        assert z["w"].shape == (2, 2)
    r, c = store.load(root)
    assert len(r) == 3 and len(c) == 9


def test_inf_is_stored_as_float_inf(tmp_path):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a"])
    runs["max_grad_norm"] = float("inf")
    store.write_chunk(root, runs, curves, "k")
    assert store.load_runs(root)["max_grad_norm"].iloc[0] == float("inf")


def test_temp_and_partial_files_are_ignored(tmp_path):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a"])
    store.write_chunk(root, runs, curves, "k1")
    # what a crash in the middle of a write leaves behind: a truncated temp file
    good = (root / "runs" / "chunk-k1.parquet").read_bytes()
    for sub in ("runs", "curves"):
        (root / sub / ".tmp-chunk-k9.parquet.x1y2").write_bytes(good[: len(good) // 2])
    assert store.stored_run_ids(root) == {"a"}
    assert len(store.load_runs(root)) == 1
    assert len(pd.read_parquet(root / "runs")) == 1  # pyarrow skips dot-files as well
    assert len(pd.read_parquet(root / "curves")) == 3


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a"])

    def explode(table, where, **kw):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", explode)
    with pytest.raises(OSError, match="disk full"):
        store.write_chunk(root, runs, curves, "k1")
    leftovers = [p.name for p in root.rglob("*") if p.is_file()]
    assert leftovers == ["manifest.json"]


def test_runs_are_the_commit_record(tmp_path, monkeypatch):
    """A crash after the curves file but before the runs file: the run is not stored, and
    its orphan curve is not shown; re-running then stores it once."""
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a", "b"])
    real = store._write_parquet

    def crash_on_runs(path, table):
        if path.parent.name == "runs":
            raise KeyboardInterrupt
        real(path, table)

    monkeypatch.setattr(store, "_write_parquet", crash_on_runs)
    with pytest.raises(KeyboardInterrupt):
        store.write_chunk(root, runs, curves, "k1")
    monkeypatch.undo()
    assert store.stored_run_ids(root) == set()
    assert store.load_curves(root, allow_empty=True).empty
    # the re-run forms a different chunk containing "a"
    r2, c2 = _frames(["a"])
    store.write_chunk(root, r2, c2, "k2")
    curves_back = store.load_curves(root)
    assert set(curves_back["run_id"]) == {"a"} and len(curves_back) == 3


def test_duplicates_are_read_once(tmp_path):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a", "b"])
    store.write_chunk(root, runs, curves, "k1")
    r2, c2 = _frames(["b", "c"])
    store.write_chunk(root, r2.assign(seed=[1, 2]), c2, "k2")
    for sub in ("runs", "curves"):  # a whole chunk stored twice
        shutil.copy(root / sub / "chunk-k1.parquet", root / sub / "chunk-k0.parquet")
    got = store.load_runs(root)
    assert sorted(got["run_id"]) == ["a", "b", "c"]
    curves_back = store.load_curves(root)
    assert len(curves_back) == 9
    assert not curves_back.duplicated(["run_id", "step"]).any()


def test_not_a_store_and_empty_store(tmp_path):
    with pytest.raises(store.StoreError, match="no such results store"):
        store.load_runs(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    assert not store.is_store(tmp_path / "plain")
    with pytest.raises(store.StoreError, match="not a results store"):
        store.load_runs(tmp_path / "plain")
    with pytest.raises(store.StoreError, match="not a results store"):
        store.check_compatible(tmp_path / "plain", "CartPole-v1")
    with pytest.raises(store.StoreError, match="refusing to delete"):
        store.remove_store(tmp_path / "plain")
    assert (tmp_path / "plain" / "notes.txt").exists()
    root = _make_store(tmp_path / "empty")
    with pytest.raises(store.StoreError, match="no finished runs"):
        store.load_runs(root)
    assert store.load_runs(root, allow_empty=True).empty
    assert store.stored_run_ids(root) == set()


def test_env_mismatch_is_refused(tmp_path):
    root = _make_store(tmp_path / "s")
    runs, curves = _frames(["a"])
    store.write_chunk(root, runs, curves, "k1")
    store.check_compatible(root, "CartPole-v1")
    store.check_compatible(tmp_path / "new", "CartPole-v1")
    with pytest.raises(store.StoreError, match="holds results for env 'CartPole-v1'.*--fresh"):
        store.check_compatible(root, "Acrobot-v1")
    store.remove_store(root)
    assert not root.exists()


def test_manifest_round_trip_and_permissions(tmp_path):
    root = _make_store(tmp_path / "s")
    assert store.read_manifest(root)["env"] == "CartPole-v1"
    json.loads((root / "manifest.json").read_text())
    mode = (root / "manifest.json").stat().st_mode & 0o777
    assert mode & 0o044  # readable by others, unlike mkstemp's default 0600


def test_deferred_sigint_holds_ctrl_c_until_the_block_ends():
    import os
    import signal

    # As in a terminal (a background job of a non-interactive shell starts with SIGINT
    # ignored, and then Ctrl-C is rightly ignored here too).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        events = []
        with pytest.raises(KeyboardInterrupt):
            with store.deferred_sigint():
                with store.deferred_sigint():
                    os.kill(os.getpid(), signal.SIGINT)
                    events.append("inner body finished")
                events.append("outer body finished")
        assert events == ["inner body finished", "outer body finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with store.deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_store_trained_with_other_numerics_is_refused(tmp_path):
    store.write_chunk(tmp_path, *_frames(["r1"]), "c0")
    manifest = {"format": store.FORMAT, "env": "CartPole-v1", "numerics": study.NUMERICS}
    store.write_manifest(tmp_path, manifest)
    store.check_compatible(tmp_path, "CartPole-v1")
    for old in ({**manifest, "numerics": study.NUMERICS - 1},
                {k: v for k, v in manifest.items() if k != "numerics"}):
        store.write_manifest(tmp_path, old)
        with pytest.raises(store.StoreError, match="trained with study numerics .* --fresh"):
            store.check_compatible(tmp_path, "CartPole-v1")


def test_analysis_imports_stay_light():
    """Reading a store and the analysis commands never import torch, gymnasium or numba
    (seconds of start-up each, and no trainer code runs when analysing)."""
    import subprocess
    import sys

    code = ("import sys, study.store, study.tables, study.failures, study.report, "
            "study.aggregate, study.render; "
            "print(sorted(m for m in ('torch', 'gymnasium', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

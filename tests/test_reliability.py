"""Reliability of training (Chan et al. 2020) and mid-training drops, on curves whose
answers are known by construction, and their sections of the failure report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from study.analysis import reliability as rel
from study.analysis.failures import failure_report

STEPS = np.arange(1, 21) * 1000.0


def test_metrics_on_known_curves():
    flat = np.full((3, 20), 100.0)
    m = rel.reliability(flat, np.array([100.0, 100.0, 100.0]))
    assert (m["dt"], m["srt"], m["lrt"], m["dr"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["rr"] == 100.0
    ramp = np.tile(np.arange(20, dtype=float) * 5, (4, 1))  # steady learning: no risk
    ramp[0, 10:] -= 40  # one run falls by 40 at point 10 and stays there
    m = rel.reliability(ramp, np.array([10.0, 20.0, 30.0, 40.0]), alpha=0.05)
    d = np.diff(ramp, axis=1)
    assert m["srt"] == pytest.approx(np.sort(d.ravel())[: int(np.ceil(0.05 * d.size))].mean())
    # the falling run is 35 below its best of 45 at the fall, then climbs back 5 a point:
    # drawdowns 35, 30, 25, 20, ...; the worst 5% of the 80 points are the first four
    assert m["srt"] < 0 and m["lrt"] == pytest.approx(-np.mean([35, 30, 25, 20]))
    assert m["dr"] == pytest.approx(15.0) and m["rr"] == 10.0


def test_a_mid_training_drop_is_found_with_its_step_depth_and_recovery():
    rise = np.linspace(0, 300, 10)
    curve = np.concatenate([rise, [10.0, 12.0, 9.0], np.full(7, 300.0)])
    steady = np.linspace(0, 300, 20) + np.random.default_rng(0).normal(0, 3, 20)
    brief = np.concatenate([rise, [50.0], np.full(9, 300.0)])  # one point only: noise
    # the defaults smooth with a rolling median of 3 and want 3 points below: same verdict
    assert [c.run for c in rel.collapses(STEPS, np.stack([curve, steady, brief]))] == [0]
    found = rel.collapses(STEPS, np.stack([curve, steady, brief]), smooth=1, min_points=2)
    assert len(found) == 1
    c = found[0]
    assert (c.run, c.peak, c.peak_step, c.step) == (0, 300.0, 10_000.0, 11_000.0)
    assert (c.trough, c.depth, c.points_below, c.recovered) == (9.0, 291.0, 3, True)
    stays = np.concatenate([rise, np.full(10, 20.0)])
    (c,) = rel.collapses(STEPS, stays[None, :], smooth=1)
    assert not c.recovered and c.points_below == 10


def _store(kinds: dict[str, list[np.ndarray]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, curves = [], []
    for cid, rows in kinds.items():
        for s, y in enumerate(rows):
            rid = f"{cid}-{s}"
            runs.append({"run_id": rid, "config_id": cid, "seed": s, "env": "Toy-v0",
                         "total_steps": 20_000, "policy_lr": 0.01 if cid == "a" else 0.001,
                         "final_return": float(y[-2:].mean()), "final_eval_return": np.nan,
                         "status": "ok", "diverged_at_step": None, "wall_s": 1.0})
            curves.append(pd.DataFrame({"run_id": rid, "step": STEPS.astype(int),
                                        "episode_return": y, "entropy": 0.5}))
    return pd.DataFrame(runs), pd.concat(curves, ignore_index=True)


def test_the_failure_report_lists_drops_and_reliability():
    rng = np.random.default_rng(1)
    good = [np.linspace(0, 300, 20) + rng.normal(0, 2, 20) for _ in range(4)]
    dropping = np.concatenate([np.linspace(0, 300, 10), [10.0, 12.0, 9.0], np.full(7, 300.0)])
    runs, curves = _store({"a": good, "b": [*good[:3], dropping]})
    rep = failure_report(runs, curves)
    assert rep.drops["run_id"].tolist() == ["b-3"]
    assert set(rep.reliability["config_id"]) == {"a", "b"}
    lrt = rep.reliability.set_index("config_id")["lrt"]
    assert lrt["b"] < lrt["a"]  # b's dropping run is the worse long-term risk
    md = rep.markdown()
    assert "## Runs that lost most of their level mid-training" in md
    assert "## Reliability of training (Chan et al. 2020)" in md


def test_a_diverged_run_names_its_cause_in_the_report():
    rng = np.random.default_rng(2)
    runs, curves = _store({"a": [np.linspace(0, 300, 20) + rng.normal(0, 2, 20)
                                 for _ in range(4)]})
    runs.loc[0, ["status", "final_return", "diverged_at_step"]] = ["diverged", np.nan, 60]
    runs["diverged_reason"] = [
        "the environment returned a non-finite reward at env step 60", None, None, None]
    rep = failure_report(runs, curves)
    why = rep.per_run.set_index("run_id").loc["a-0"]
    text = " ".join(str(v) for v in why.to_numpy())
    assert "diverged: the environment returned a non-finite reward at env step 60" in text

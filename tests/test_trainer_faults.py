"""What the trainer reports when a run cannot be summarised the usual way: a divergence
caused by the environment (named as such, with the env step), and a final return for runs
whose episodes are longer than the last 10% of their steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from study.config import resolve
from study.trainer.population import Member, train_population

ENVMODS = Path(__file__).resolve().parent / "envmods"


@pytest.fixture(autouse=True)
def _envmods(monkeypatch):
    monkeypatch.syspath_prepend(str(ENVMODS))


def test_an_environment_that_returns_nan_is_named_as_the_cause():
    hp = resolve({"num_envs": 2, "n_steps": 5})
    results = train_population("marker_env:NaNReward-v0", [Member(hp, 1), Member(hp, 2)],
                               2000, log_every=500)
    for r in results:
        assert r.status == "diverged"
        # the 30th step of each environment: env step 60 with two environments
        assert r.diverged_reason == "the environment returned a non-finite reward at env step 60"
        assert r.diverged_at_step == 60


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow this test provokes
def test_a_learner_divergence_is_named_as_such():
    hp = resolve({"policy_lr": 1e30, "value_lr": 1e30, "max_grad_norm": "inf",
                  "value_max_grad_norm": "inf", "policy_optimizer": "adam"})
    results = train_population("Pendulum-v1", [Member(hp, 1)], 20_000, log_every=1000)
    r = results[0]  # Adam at lr 1e30 overflows the weights within a few updates
    assert r.status == "diverged"
    assert r.diverged_reason == (f"non-finite loss, gradient or weights in the update at env "
                                 f"step {r.diverged_at_step}")


def test_final_return_falls_back_to_the_last_finished_episodes():
    # One environment with 1000-step episodes and 1500 steps: no episode ends in the last
    # 10% (steps 1351-1500); the final return is the return of the one finished episode.
    hp = resolve({"num_envs": 1, "n_steps": 5})
    r = train_population("marker_env:LongPendulum-v0", [Member(hp, 3)], 1500,
                         log_every=500)[0]
    assert r.status == "ok" and np.isfinite(r.final_return)
    assert r.curve["step"].tolist() == [500.0, 1000.0, 1500.0]
    assert r.final_return == r.curve["episode_return"][1]


@pytest.mark.slow
def test_the_first_run_says_it_compiles_the_kernels(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "study.train", "--seeds", "0", "--total-steps", "200"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "compiling the numba kernels (once after an install" in first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "compiling" not in again.stderr

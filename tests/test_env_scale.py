"""The generic gymnasium path at scale: memory estimates refused before anything is built,
warnings once per population, namespaces (ALE, MinAtar) imported on demand with a hint,
and 32-bit reset seeds where an env needs them."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from study.config import ConfigError, resolve
from study.hyperparameters import Structure
from study.trainer import envs
from study.trainer.envs import make_population_env
from study.trainer.envs.generic import instance_seed, seed_bits
from study.trainer.envs.memory import check_fits, instance_bytes, population_bytes
from study.trainer.rng import STREAM_RESET

ROOT = Path(__file__).resolve().parents[1]
ENVMODS = ROOT / "tests" / "envmods"


def test_population_bytes_counts_networks_buffers_and_envs() -> None:
    hp = resolve({"num_envs": 4, "n_steps": 5, "policy_hidden_sizes": [8],
                  "value_hidden_sizes": [8, 8]})
    est = population_bytes("CartPole-v1", Structure.of(hp), 3, obs_shape=4, n_outputs=2)
    params = (4 + 1) * 8 + (8 + 1) * 2 + (4 + 1) * 8 + (8 + 1) * 8 + (8 + 1) * 1
    assert est.networks == 4 * 3 * params * 4  # weights, grads, two moments; float32
    assert est.buffers == 2 * 3 * (5 + 1) * 4 * (4 + 8 + 2 + 8 + 8 + 1) * 4
    assert est.envs == 3 * 4 * instance_bytes("CartPole-v1")


def test_a_population_that_cannot_fit_is_refused_naming_the_keys() -> None:
    hp = resolve({"policy_hidden_sizes": [60_000, 60_000]})
    with pytest.raises(ConfigError) as info:
        check_fits([("CartPole-v1", hp, 64)], "s.toml: ")
    msg = str(info.value)
    assert msg.startswith("s.toml: a population of 64 members x 8 envs of 'CartPole-v1' "
                          "needs about ")
    assert "GiB available" in msg and "policy_hidden_sizes" in msg and "\n" not in msg
    # what fits passes, and says how much it needs
    assert "population(s) at once" in check_fits([("CartPole-v1", resolve({}), 64)])
    # populations of different envs trained together add up
    half = resolve({"policy_hidden_sizes": [20_000, 20_000]})  # about 6 GiB each
    for env in ("CartPole-v1", "Acrobot-v1"):
        check_fits([(env, half, 1)])  # each fits alone
    with pytest.raises(ConfigError, match="6 populations trained at once need about"):
        check_fits([("CartPole-v1", half, 1), ("Acrobot-v1", half, 1)] * 3)


def test_grid_refuses_an_oversized_population_before_writing(tmp_path) -> None:
    from study.sweeps.grid import main

    sweep = tmp_path / "big.toml"
    sweep.write_text('name = "big"\nenv = "Acrobot-v1"\ntotal_steps = 1000\n'
                     'seeds = { count = 64 }\n[hyperparameters]\n'
                     'value_hidden_sizes = [40000, 40000]\n')
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--n-jobs", "2"]) == 2
    assert not out.exists()


def test_instance_warnings_are_shown_once_per_population(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ENVMODS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop = make_population_env("marker_env:Warny-v0", [0, 1], 4)
        pop.reset()
        pop.step(np.zeros((2, 4), dtype=np.int64))
        pop.close()
    mine = [w for w in caught if "Warny-v0 is deprecated" in str(w.message)]
    assert len(mine) == 1


def test_a_missing_namespace_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(envs.NAMESPACES, "Nope", ("study_no_such_package", "nope"))
    for call in (lambda: make_population_env("Nope/Game-v1", [0], 1),
                 lambda: envs.env_spaces("Nope/Game-v1")):
        with pytest.raises(ConfigError) as info:
            call()
        msg = str(info.value)
        assert "'study_no_such_package'" in msg and "pip install -e '.[nope]'" in msg


@pytest.mark.parametrize(("env_id", "package"), [("ALE/Breakout-v5", "ale_py"),
                                                 ("MinAtar/Breakout-v1", "minatar")])
def test_namespaces_are_imported_on_demand(env_id: str, package: str) -> None:
    pytest.importorskip(package)
    code = ("import sys, gymnasium as gym\n"
            f"assert {env_id!r} not in gym.registry\n"
            "from study.trainer.envs import env_spaces\n"
            f"obs, act = env_spaces({env_id!r})\n"
            "print(obs.shape, act)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr


def test_minatar_gets_32_bit_seeds_and_members_stay_independent() -> None:
    pytest.importorskip("minatar")
    assert seed_bits("MinAtar/Breakout-v1") == 32 and seed_bits("CartPole-v1") == 63
    big = 2**40 + 7  # member seeds of any size
    s32 = instance_seed(big, 1, STREAM_RESET, 32)
    assert 0 <= s32 < 2**32 and s32 == instance_seed(big, 1, STREAM_RESET) >> 31

    def rollout(seeds: list[int]) -> list[np.ndarray]:
        pop = make_population_env("MinAtar/Breakout-v1", seeds, 2)
        i = seeds.index(big)
        rows = [pop.reset()[i]]
        for t in range(150):
            out = pop.step(np.full((len(seeds), 2), t % 3, dtype=np.int64))
            rows += [out.obs[i], out.reward[i], out.terminated[i]]
        return rows

    alone, inside = rollout([big]), rollout([3, big])
    for x, y in zip(alone, inside, strict=True):
        np.testing.assert_array_equal(x, y)

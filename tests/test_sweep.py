"""Sweep files: validation messages, expansion, deterministic ids, resolved TOML, chunking."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from study.config import ConfigError, structural_key
from study.sweeps.runner import make_plan
from study.sweeps.spec import config_id, load_sweep, parse_sweep, run_id, sweep_to_toml

ROOT = Path(__file__).resolve().parents[1]

BASE = """
name = "t"
env = "CartPole-v1"
total_steps = 2000
log_every = 500
seeds = [1, 2]
[grid]
policy_lr = [0.01, 0.001]
"""


def _load(tmp_path: Path, text: str):
    p = tmp_path / "s.toml"
    p.write_text(text)
    return load_sweep(p)


def test_shipped_sweeps_are_valid():
    grid = load_sweep(ROOT / "sweeps" / "cartpole_grid.toml")
    assert (grid.name, grid.env, grid.total_steps, grid.log_every) == (
        "cartpole-grid", "CartPole-v1", 100_000, 1_000)
    assert grid.n_configs == 36 and len(grid.seeds) == 5 and grid.n_runs == 180
    assert grid.env_steps == 18_000_000
    hp = grid.configs()[0]
    assert hp["num_envs"] == 8 and hp["n_steps"] == 5
    quick = load_sweep(ROOT / "sweeps" / "quickstart.toml")
    assert quick.n_runs >= 2


def test_expansion_order_and_ids(tmp_path):
    s = _load(tmp_path, BASE + "gamma = [0.99, 0.9]\n")
    runs = s.runs()
    assert len(runs) == 2 * 2 * 2
    # config-major, last grid axis fastest, seeds innermost
    assert [(r.hyperparameters["policy_lr"], r.hyperparameters["gamma"], r.seed)
            for r in runs[:3]] == [(0.01, 0.99, 1), (0.01, 0.99, 2), (0.01, 0.9, 1)]
    assert len({r.run_id for r in runs}) == 8
    assert len({r.config_id for r in runs}) == 4
    assert all(len(r.run_id) == 16 and int(r.run_id, 16) >= 0 for r in runs)


def test_run_id_is_stable():
    from study.config import ID_OMIT_AT_DEFAULT, SPECS, resolve, to_jsonable

    hp = resolve({"policy_lr": 0.01, "gamma": 0.99})
    rid = run_id("CartPole-v1", hp, 7, 100_000, 1_000)
    assert rid == "733aca8e767751d8"  # the id it had before normalize_reward existed
    # The documented scheme, computed independently: sha1 of canonical JSON, 16 hex chars,
    # without the keys added later while they are at their defaults.
    kept = {k: v for k, v in hp.items()
            if not (k in ID_OMIT_AT_DEFAULT and v == SPECS[k].default)}
    payload = {"env": "CartPole-v1", "hyperparameters": to_jsonable(kept), "seed": 7,
               "total_steps": 100_000, "log_every": 1_000}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert rid == hashlib.sha1(text.encode()).hexdigest()[:16]
    del payload["seed"]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert config_id("CartPole-v1", hp, 100_000, 1_000) == hashlib.sha1(
        text.encode()).hexdigest()[:16]
    # The same in a fresh interpreter with another hash seed (no dict-order dependence).
    code = ("from study.config import resolve; from study.sweeps.spec import run_id; "
            "print(run_id('CartPole-v1', resolve({'gamma': 0.99, 'policy_lr': 0.01}), 7, "
            "100_000, 1_000))")
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == rid
    # canonical: how a value is spelled does not matter, what it is does
    assert run_id("CartPole-v1", resolve({"policy_lr": "1e-2", "gamma": 0.99}), 7, 100_000,
                  1_000) == rid
    # every input counts
    assert run_id("CartPole-v0", hp, 7, 100_000, 1_000) != rid
    assert run_id("CartPole-v1", resolve({"policy_lr": 0.011}), 7, 100_000, 1_000) != rid
    assert run_id("CartPole-v1", hp, 8, 100_000, 1_000) != rid
    assert run_id("CartPole-v1", hp, 7, 100_001, 1_000) != rid
    assert run_id("CartPole-v1", hp, 7, 100_000, 999) != rid
    assert run_id("CartPole-v1", hp, 7, 100_000, 1_000, eval_every=10_000) != rid


def test_resolved_toml_round_trips(tmp_path):
    text = BASE.replace("[grid]", """
description = "a \\"quoted\\" description"
save_policies = true
[hyperparameters]
max_grad_norm = "inf"
policy_hidden_sizes = [32]
[eval]
every = 1000
[optuna]
trials = 3
[optuna.sampler]
kind = "tpe"
[grid]""") + "value_hidden_sizes = [[16], [16, 16]]\n"
    s = _load(tmp_path, text)
    resolved = sweep_to_toml(s)
    data = tomllib.loads(resolved)
    assert data["hyperparameters"]["max_grad_norm"] == float("inf")
    assert data["hyperparameters"]["n_steps"] == 5  # defaults filled in
    assert data["optuna"] == {"trials": 3, "sampler": {"kind": "tpe"}}
    again = parse_sweep(data, "resolved")
    assert [r.run_id for r in again.runs()] == [r.run_id for r in s.runs()]
    assert again.description == 'a "quoted" description' and again.save_policies


def test_seed_table_and_defaults(tmp_path):
    s = _load(tmp_path, BASE.replace("seeds = [1, 2]", "seeds = { count = 3, base = 10 }")
              .replace('name = "t"\n', ""))
    assert s.seeds == (10, 11, 12)
    assert s.name == "s"  # defaults to the file name
    assert s.eval_every == 0 and s.eval_episodes == 10 and not s.save_policies


def test_no_grid_is_one_config(tmp_path):
    s = _load(tmp_path, BASE.split("[grid]")[0])
    assert s.n_configs == 1 and len(s.runs()) == 2


GRID = "[grid]\npolicy_lr = [0.01, 0.001]\n"
HEAD = BASE.replace(GRID, "")

# case -> (sweep file text, substrings the one-line error must contain)
BAD: dict[str, tuple[str, tuple[str, ...]]] = {
    "unknown top-level key": (HEAD + "totl_steps = 5\n" + GRID,
                              ("unknown key 'totl_steps'", "did you mean 'total_steps'")),
    "unknown hyperparameter": (HEAD + "[hyperparameters]\npolicy_l = 0.1\n" + GRID,
                               ("policy_l", "did you mean 'policy_lr'", "known:")),
    "unknown grid axis": (BASE + "gama = [0.9]\n", ("[grid]", "gama", "did you mean")),
    "wrong type": (BASE.replace("total_steps = 2000", 'total_steps = "2000"'),
                   ("total_steps", "expected an integer")),
    "empty axis": (BASE + "value_lr = []\n", ("[grid] value_lr", "non-empty list")),
    "axis not a list": (BASE + "value_lr = 0.1\n", ("[grid] value_lr", "non-empty list")),
    "out of range": (BASE + "gamma = [0.99, 1.5]\n", ("gamma = 1.5", "(0, 1]")),
    "duplicate seed": (BASE.replace("seeds = [1, 2]", "seeds = [1, 2, 1]"),
                       ("seeds", "appears twice")),
    "negative seed": (BASE.replace("seeds = [1, 2]", "seeds = [-1]"), ("seeds", ">= 0")),
    "unknown env": (BASE.replace('"CartPole-v1"', '"CartPol-v1"'),
                    ("env", "CartPol-v1", "did you mean 'CartPole-v1'")),
    "in both tables": (HEAD + "[hyperparameters]\npolicy_lr = 0.1\n" + GRID,
                       ("policy_lr", "at most one of [hyperparameters] and [grid]")),
    "duplicate axis value": (BASE + "value_lr = [0.1, 1e-1]\n", ("value_lr", "twice")),
    "cross-key constraint": (BASE + "n_minibatches = [1, 100]\n",
                             ("n_minibatches = 100", "at most")),
    "bad eval key": (HEAD + "[eval]\nevery = 10\nepisode = 3\n" + GRID,
                     ("[eval]", "did you mean 'episodes'")),
    "bad seeds table": (BASE.replace("seeds = [1, 2]", "seeds = { base = 3 }"),
                        ("seeds", "count")),
    "bad name": (BASE.replace('name = "t"', 'name = "../escape"'), ("name", "letters")),
    "log_every > total_steps": (BASE.replace("log_every = 500", "log_every = 5000"),
                                ("log_every = 5000", "at most total_steps")),
    "missing env": (BASE.replace('env = "CartPole-v1"\n', ""), ("missing", "env")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_file_and_key(tmp_path, case):
    text, needles = BAD[case]
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    for needle in needles:
        assert needle in msg, msg


def test_malformed_and_missing_files(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text('name = "x"\nenv = \n')
    with pytest.raises(ConfigError, match="broken.toml: malformed TOML"):
        load_sweep(p)
    with pytest.raises(ConfigError, match="nope.toml: no such sweep file"):
        load_sweep(tmp_path / "nope.toml")


def test_optuna_table_is_accepted(tmp_path):
    s = _load(tmp_path, BASE + "[optuna]\nn_trials = 10\n")
    assert s.optuna == {"n_trials": 10}


def test_chunks_depend_only_on_the_sweep(tmp_path):
    s = _load(tmp_path, BASE.replace("seeds = [1, 2]", "seeds = { count = 45 }")
              + "policy_hidden_sizes = [[64, 64], [32]]\n")
    plan = make_plan(s, population_size=64)
    # two structural groups of 90 runs -> 2 chunks of 45 each (even sizes), ids preserved
    assert plan.n_groups == 2 and sorted(len(c.runs) for c in plan.chunks) == [45] * 4
    assert sorted(r.run_id for c in plan.chunks for r in c.runs) == sorted(
        r.run_id for r in s.runs())
    for c in plan.chunks:
        assert len({structural_key(r.hyperparameters) for r in c.runs}) == 1
    assert [c.key for c in make_plan(s, 64).chunks] == [c.key for c in plan.chunks]
    # resume: chunks are formed from what is missing
    done = {r.run_id for r in s.runs()[:100]}
    rest = make_plan(s, 64, done)
    assert rest.pending == 80 and not done & {r.run_id for c in rest.chunks for r in c.runs}


def test_the_typed_hyperparameters_are_generated_from_the_specs():
    # study/hyperparameters.py is generated from config.SPECS; a stale file fails here.
    import dataclasses
    from pathlib import Path

    from study import config
    from study.hyperparameters import Hyperparameters, Structure

    path = Path(config.__file__).parent / "hyperparameters.py"
    assert path.read_text() == config.hyperparameters_source(), (
        "study/hyperparameters.py is stale: regenerate it with "
        "study.config.write_hyperparameters()")
    assert [f.name for f in dataclasses.fields(Hyperparameters)] == list(config.NAMES)
    assert [f.name for f in dataclasses.fields(Structure)] == list(config.STRUCTURAL)
    hp = config.resolve({"policy_lr": 3e-4, "policy_hidden_sizes": [32]})
    typed = Hyperparameters.of(hp)
    assert typed.policy_lr == 3e-4 and typed.policy_hidden_sizes == (32,)
    assert typed.to_dict() == hp and Hyperparameters() == Hyperparameters.of(config.defaults())
    assert typed.structure() == Structure.of(hp) and typed.structure().policy_hidden_sizes == (32,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.policy_lr = 1.0  # type: ignore[misc]

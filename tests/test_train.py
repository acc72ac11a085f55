"""``python -m study.train``: output, JSON, seed parsing and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from study.sweeps.train import main, parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("0-2,10") == [0, 1, 2, 10]


def test_trains_seeds_as_one_population_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(
        [
            "--seeds",
            "0-2,7",
            "--total-steps",
            "2000",
            "--log-every",
            "500",
            "--quiet",
            "--set",
            "policy_lr=1e-3",
            "--set",
            "gamma=0.98",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "final_return over" in text and "median" in text and "IQR" in text
    data = json.loads(out.read_text())
    assert data["env"] == "CartPole-v1" and data["total_steps"] == 2000
    assert data["hyperparameters"]["gamma"] == 0.98
    assert data["env_steps_per_s"] > 0 and data["wall_s"] > 0
    assert [r["seed"] for r in data["runs"]] == [0, 1, 2, 7]
    for r in data["runs"]:
        assert r["status"] == "ok"
        assert [p[0] for p in r["curve"]] == [520, 1000, 1520, 2000]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--set", "gama=0.9"], "did you mean 'gamma'"),
        (["--set", "gamma=1.5"], "gamma"),
        (["--set", "policy_lr=0"], "policy_lr"),
        (["--set", "n_steps=0"], "n_steps"),
        (["--set", "activation=sigmoid"], "tanh, relu"),
        (["--env", "CartPol-v1"], "CartPole-v1"),
        (["--seeds", "3-1"], "--seeds"),
        (["--seeds", "1,1"], "duplicate"),
        (["--total-steps", "abc"], "--total-steps"),
        (["--no-such-option"], "unrecognized"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "study.train", *argv, "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()

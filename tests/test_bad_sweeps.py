"""Validation is total: every bad sweep file or option is one ``error:`` line, exit 2, and
nothing written; never a traceback, a hang or a store written before the failure.

Named cases from the hardening issue, then a seeded fuzzer: 160 mutations of a valid
sweep file (values swapped for hostile ones, keys dropped, renamed or added, text cut or
garbled, structures nested deeply), each through ``study.sweeps.grid --dry-run`` and, when
refused, through a real run.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from study.sweeps.grid import main as grid_main
from study.sweeps.train import main as train_main

VALID = """\
name = "fuzz"
description = "a valid sweep the fuzzer mutates"
env = "CartPole-v1"
total_steps = 2000
log_every = 500
seeds = [1, 2, 3]
save_policies = false

[hyperparameters]
num_envs = 4
n_steps = 5
gamma = 0.99
policy_hidden_sizes = [16]

[grid]
policy_lr = [0.01, 0.001]
lam = [0.9, 1.0]

[eval]
every = 1000
episodes = 3
"""


def _refused(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(("text", "expect"), [
    ("name = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("x = " + "{a = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
    (VALID.replace("seeds = [1, 2, 3]", "seeds = { count = 1000000000000000000 }"),
     "seeds.count"),
    (VALID.replace("lam = [0.9, 1.0]", "lam = [0.9, 1.0]\n" + "\n".join(
        f"{k} = [{', '.join(str(0.1 + i / 1000) for i in range(60))}]"
        for k in ("gamma", "entropy_coef", "value_coef", "max_grad_norm"))).replace(
        "gamma = 0.99\n", ""), "runs; expected at most 1,000,000"),
    (VALID.replace("num_envs = 4", "num_envs = 1e308"), "num_envs"),
    (VALID.replace("num_envs = 4", "num_envs = 1000000000000"), "num_envs"),
    (VALID.replace("[16]", "[10000000000]"), "policy_hidden_sizes"),
    (VALID.replace("[16]", "[" + ", ".join(["8"] * 40) + "]"), "policy_hidden_sizes"),
    (VALID.replace("total_steps = 2000", "total_steps = 99999999999999999999"),
     "total_steps"),
    (VALID.replace('name = "fuzz"', f'name = "{"n" * 300}"'), "name"),
    (VALID.replace("every = 1000", "every = 5000"), "eval.every"),
])
def test_named_bad_sweeps(tmp_path, capsys, text, expect):
    sweep = tmp_path / "bad.toml"
    sweep.write_text(text)
    out = tmp_path / "out"
    line = _refused(capsys, grid_main([str(sweep), "--out", str(out)]))
    assert expect in line, line
    assert not out.exists()


def test_huge_or_endless_sweep_files_are_capped(tmp_path, capsys):
    big = tmp_path / "big.toml"
    big.write_text(VALID + "# " + "x" * (2 << 20) + "\n")
    line = _refused(capsys, grid_main([str(big), "--out", str(tmp_path / "o")]))
    assert "larger than 1024 KiB" in line
    line = _refused(capsys, grid_main(["/dev/zero", "--out", str(tmp_path / "o")]))
    assert "/dev/zero" in line
    assert not (tmp_path / "o").exists()


def test_train_seed_ranges(capsys):
    line = _refused(capsys, train_main(["--seeds", "5-2", "--quiet"]))
    assert "the range 5-2 is reversed; expected 2-5" in line
    line = _refused(capsys, train_main(["--seeds", "0-10000000", "--quiet"]))
    assert "more than 100,000 seeds" in line
    line = _refused(capsys, train_main(["--total-steps", "1" + "0" * 20, "--quiet"]))
    assert "--total-steps" in line


# --------------------------------------------------------------------------------------
# the fuzzer

HOSTILE = ["-1", "0", "1e308", "-1e308", "nan", "inf", "-inf", "1.5", "true", "false", '""',
           '"x"', '"CartPole-v1"', "[]", "[[]]", "[1, 1]", "[-5]", "[0]", "{}",
           "{ count = -1 }", "{ count = 0 }", "{ base = 3 }", "9223372036854775807",
           "18446744073709551616", '"' + "é" * 50 + '"', "[1.5, 2]", '["a", 1]', "0x10",
           "1_000_000_000_000", "2000-01-01", '"../../etc"', "[" * 40 + "]" * 40]


def _mutate(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    kind = rng.randrange(8)
    assignments = [i for i, ln in enumerate(lines) if "=" in ln]
    i = rng.choice(assignments)
    key = lines[i].split("=", 1)[0].strip()
    if kind <= 2:  # a hostile value
        lines[i] = f"{key} = {rng.choice(HOSTILE)}"
    elif kind == 3:  # a key dropped
        del lines[i]
    elif kind == 4:  # a typo, or an unknown key
        typo = key[:-1] if len(key) > 2 and rng.random() < 0.5 else key + "x"
        lines[i] = lines[i].replace(key, typo, 1)
    elif kind == 5:  # a table header garbled, moved or duplicated
        headers = [j for j, ln in enumerate(lines) if ln.startswith("[")]
        j = rng.choice(headers)
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(
            [lines[j], lines[j].strip("[]"), "[grid.inner]", "[[grid]]", "[optuna]"]))
    elif kind == 6:  # the text cut short, or bytes garbled
        cut = rng.randrange(len(text))
        garbled = text[:cut] + rng.choice(["", "\x00", "\ufffd", "= =", '"""', "\\"])
        return garbled + text[cut + rng.randrange(3):] if rng.random() < 0.5 else garbled
    else:  # a value nested deeply
        depth = rng.choice([50, 500, 5000])
        lines[i] = f"{key} = " + "[" * depth + "1" + "]" * depth
    return "\n".join(lines) + "\n"


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ANN202
    raise _Timeout


def test_fuzzed_sweeps_are_refused_cleanly_or_planned(tmp_path, capsys):
    rng = random.Random(20261129)
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"refused": 0, "planned": 0}
    try:
        for n in range(160):
            text = _mutate(rng, _mutate(rng, VALID) if rng.random() < 0.3 else VALID)
            sweep = tmp_path / f"m{n}.toml"
            sweep.write_text(text, errors="surrogatepass")
            out = tmp_path / f"out{n}"
            signal.alarm(20)  # validation must never hang
            try:
                rc = grid_main([str(sweep), "--out", str(out), "--dry-run"])
            finally:
                signal.alarm(0)
            captured = capsys.readouterr()
            assert rc in (0, 2), f"mutation {n}: exit {rc}\n{text}\n{captured.err}"
            assert not out.exists(), f"mutation {n} wrote {out}"
            if rc == 0:
                outcomes["planned"] += 1
                continue
            outcomes["refused"] += 1
            err = captured.err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: "), (n, text, captured.err)
            # refused for real too: the same line, nothing written
            assert grid_main([str(sweep), "--out", str(out)]) == 2
            assert capsys.readouterr().err.strip() == err[0]
            assert not out.exists()
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(outcomes)
    assert outcomes["refused"] >= 100 and outcomes["planned"] >= 5, outcomes


def test_the_valid_sweep_is_valid(tmp_path, capsys):
    sweep = tmp_path / "ok.toml"
    sweep.write_text(VALID)
    assert grid_main([str(sweep), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "configs:     4" in capsys.readouterr().out
    assert Path(sweep).exists()


@pytest.mark.parametrize("module", ["grid", "train", "optuna", "tables", "failures", "report",
                                    "render"])
def test_help_has_no_rst_markup(module, capsys):
    import importlib

    main = importlib.import_module(f"study.{module}").main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage:" in text and "``" not in text

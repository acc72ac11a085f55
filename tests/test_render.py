"""``python -m study.render``: filmstrip PNG and GIF of a saved policy, bad input, and the
report's trapped-vs-successful figure. One tiny real store (CartPoleSwingUp-v1, 2 configs
x 2 seeds, 6,000 env steps each) serves every test."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from PIL import Image

from study import store
from study.analysis import failures
from study.config import ConfigError
from study.hyperparameters import Structure
from study.report import build as report
from study.report import figures, render
from study.sweeps import grid
from study.trainer.nets import mlp

SWEEP = """
name = "tiny-render"
env = "CartPoleSwingUp-v1"
total_steps = 6000
log_every = 1000
seeds = {{ count = 2, base = 0 }}
save_policies = {save}

[hyperparameters]
num_envs = 2
n_steps = 100
policy_hidden_sizes = [8]
value_hidden_sizes = [8]
activation = "{activation}"

[grid]
normalize_obs = [false, true]
"""


def _make_store(root: Path, name: str, save: bool = True, activation: str = "tanh") -> Path:
    sweep = root / f"{name}.toml"
    sweep.write_text(SWEEP.format(save=str(save).lower(), activation=activation))
    out = root / name
    assert grid.main([str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """The store, the ids of its replayable runs (normalize_obs false), one other id."""
    out = _make_store(tmp_path_factory.mktemp("render"), "store")
    runs = store.load_runs(out)
    plain = runs[~runs["normalize_obs"]]["run_id"].tolist()
    normed = runs[runs["normalize_obs"]]["run_id"].tolist()
    assert len(plain) == 2 and len(normed) == 2
    assert all((out / "policies" / f"{r}.npz").is_file() for r in runs["run_id"])
    return out, plain, normed[0]


def _expected_png_shape(n_frames: int) -> tuple[int, int]:
    ncols = render.columns_for(n_frames)
    w, h, _ = figures.filmstrip_size([n_frames], ncols, render.PANEL_PX / render.DPI,
                                     400 / 600, render.DPI)
    return round(h * render.DPI), round(w * render.DPI)


@pytest.mark.parametrize(("n_frames", "ncols"), [(4, 4), (8, 4)])
def test_png_filmstrip(tiny, tmp_path, capsys, n_frames, ncols):
    out, plain, _ = tiny
    target = tmp_path / "strip.png"
    rc = render.main([str(out), "--run", plain[0], "--frames", str(n_frames), "--out",
                      str(target)])
    assert rc == 0, capsys.readouterr().err
    assert render.columns_for(n_frames) == ncols
    img = mpimg.imread(target)
    assert img.shape[:2] == _expected_png_shape(n_frames)
    assert img.shape[1] == ncols * render.PANEL_PX
    assert img[..., :3].std() > 0.01  # something was drawn


def test_default_output_path(tiny, capsys):
    out, plain, _ = tiny
    assert render.main([str(out), "--run", plain[1], "--max-steps", "30"]) == 0
    path = out / "render" / f"{plain[1]}.png"
    assert f"wrote {path}" in capsys.readouterr().out
    assert mpimg.imread(path).shape[:2] == _expected_png_shape(render.DEFAULT_FRAMES[".png"])


def test_gif(tiny, tmp_path):
    out, plain, _ = tiny
    target = tmp_path / "agent.gif"
    path = render.render_filmstrip(out, plain[0], target, frames=5, max_steps=40)
    assert path == target
    with Image.open(target) as im:
        assert im.format == "GIF"
        assert im.n_frames == 5
        assert im.size == (render.GIF_WIDTH, round(400 * render.GIF_WIDTH / 600))


def test_episode_and_frames(tiny):
    out, plain, _ = tiny
    strip = render.filmstrip(out, plain[0], n_frames=5, max_steps=40)
    assert strip.steps == [0, 10, 20, 30, 40]
    assert strip.episode.length == 40 and strip.episode.truncated
    assert len(strip.frames) == 5 and strip.frames[0].shape == (400, 600, 3)
    assert strip.labels[0] == "step 0\nreturn 0.0"
    assert strip.labels[-1].startswith("step 40\nreturn ")
    # Deterministic: the same seed replays the same episode; another seed differs.
    again = render.filmstrip(out, plain[0], n_frames=5, max_steps=40)
    assert np.array_equal(again.episode.rewards, strip.episode.rewards)
    other = render.filmstrip(out, plain[0], n_frames=5, max_steps=40, seed=1)
    assert not np.array_equal(other.episode.rewards, strip.episode.rewards)
    assert render.frame_steps(3, 8) == [0, 1, 2, 3]


@pytest.mark.parametrize("share_trunk", [False, True])
def test_policy_is_the_trainer_network_of_that_member(share_trunk):
    """A saved member's weights, loaded into a one-member network, give what the member
    computed inside its population (the render does not re-implement the network)."""
    import gymnasium as gym

    from study import config as cfg
    from study.trainer.envs import env_spaces
    from study.trainer.networks import ActorCritic

    hp = cfg.resolve({"share_trunk": share_trunk, "policy_hidden_sizes": [16, 8],
                      "value_hidden_sizes": [16, 8]})
    obs_space, act_space = env_spaces("CartPoleSwingUp-v1")
    agent = ActorCritic(Structure.of(hp), [4, 5, 6], obs_space, act_space,
                        torch.tensor([0.0, 0.1, -0.2]), torch.device("cpu"))
    assert isinstance(act_space, gym.spaces.Box)
    policy = render.SavedPolicy("r", "CartPoleSwingUp-v1", 5, "ok", 0.0, hp,
                                agent.member_state(1))
    obs = np.random.default_rng(0).normal(size=5).astype(np.float32)
    x = torch.from_numpy(np.stack([obs] * 3))[:, None]
    want = agent.policy_out(x)[1, 0].detach().numpy()
    np.testing.assert_array_equal(policy.policy_fn()(obs), want.astype(np.float64))
    broken = render.SavedPolicy("r", "CartPoleSwingUp-v1", 5, "ok", 0.0, hp,
                                {k: v for k, v in agent.member_state(1).items() if k != "pi.1"})
    with pytest.raises(ConfigError, match="pi.1"):
        broken.policy_fn()


def _listing(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _without_obs_stats(out: Path, run_id: str, dest: Path) -> Path:
    """A copy of the store whose policy for ``run_id`` lacks the observation statistics
    (as stores written before they were saved)."""
    shutil.copytree(out, dest)
    path = dest / "policies" / f"{run_id}.npz"
    with np.load(path) as data:
        kept = {k: data[k] for k in data.files if not k.startswith("obs_")}
    assert len(kept) < len(data.files)
    np.savez(path, **kept)
    return dest


def test_a_run_with_normalized_observations_replays_with_its_statistics(tiny):
    out, plain, normed = tiny
    with np.load(out / "policies" / f"{normed}.npz") as data:
        mean, var = data["obs_mean"], data["obs_var"]
    with np.load(out / "policies" / f"{plain[0]}.npz") as data:
        assert "obs_mean" not in data.files
    assert mean.shape == var.shape == (5,) and (var > 0).all() and np.abs(mean).max() > 0
    policy = render.load_policy(out, normed)
    obs = np.array([0.3, -0.2, 0.9, 0.4, 1.5])
    x = np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32)
    t = [torch.from_numpy(policy.weights[f"pi.{j}"])[None] for j in range(4)]
    want = mlp(torch.from_numpy(x)[None, None], t, "tanh")[0, 0].numpy()
    np.testing.assert_allclose(policy.policy_fn()(obs), want, rtol=1e-5, atol=1e-5)
    assert render.main([str(out), "--run", normed, "--frames", "2", "--out",
                        str(out.parent / "normed.png")]) == 0


def test_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys):
    out, plain, normed = tiny
    old = _without_obs_stats(out, normed, tmp_path / "old")
    bare = _make_store(tmp_path, "bare", save=False)
    bare_id = store.load_runs(bare)["run_id"].iloc[0]
    cases = [
        ([str(tmp_path / "missing"), "--run", plain[0]], "no such results store"),
        ([str(tmp_path), "--run", plain[0]], "not a results store"),
        ([str(out), "--run", plain[0][:-1] + "x"], f"did you mean {plain[0]}"),
        ([str(out), "--run", "nope"], "no run 'nope'"),
        ([str(bare), "--run", bare_id], "has no saved policy"),
        ([str(old), "--run", normed], "normalize_obs = true"),
        ([str(out), "--run", plain[0], "--out", str(tmp_path / "x.jpg")],
         "unknown extension '.jpg'"),
        ([str(out), "--run", plain[0], "--out", str(tmp_path / "x")], "no extension"),
        ([str(out), "--run", plain[0], "--frames", "0"], "--frames 0 is invalid"),
        ([str(out)], "one of the arguments --run --list is required"),
        ([str(out), "--list", "--run", plain[0]], "not allowed with argument --list"),
        ([str(tmp_path / "missing"), "--list"], "no such results store"),
    ]
    before = _listing(tmp_path) | _listing(out)
    for argv, message in cases:
        assert render.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, (argv, err)
    assert _listing(tmp_path) | _listing(out) == before


def test_list_shows_every_run_and_whether_it_can_be_drawn(tiny, tmp_path, capsys):
    out, plain, normed = tiny
    assert render.main([str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run_id", "config", "seed", "final_return", "status", "policy"]
    runs = store.load_runs(out)
    assert len(lines) == 1 + len(runs) + 1 and lines[-1] == "4 runs, 4 with a saved policy"
    for r in runs.itertuples():
        row = next(line for line in lines if line.startswith(r.run_id))
        assert f"normalize_obs={'true' if r.normalize_obs else 'false'}" in row
        assert row.split()[-2:] == ["ok", "saved"] and f" {r.seed} " in row
        assert f"{r.final_return:.2f}".rstrip("0").rstrip(".") in row
    bare = _make_store(tmp_path, "bare", save=False)
    capsys.readouterr()
    assert render.main([str(bare), "--list"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("0 with a saved policy; run the sweep with "
                                  "save_policies = true to keep them")
    assert all(line.endswith(" -") for line in text.splitlines()[1:-1])


def _pretend_trapped(monkeypatch, trapped_id: str, ok_id: str) -> None:
    """Too few steps for a real trap: the failure report is told ``trapped_id`` is one."""
    real = failures.failure_report

    def with_a_trap(runs, curves, **kw):
        rep = real(runs, curves, **kw)
        pr = rep.per_run.copy()
        trapped = pr["run_id"] == trapped_id
        pr.loc[trapped, "classification"] = "trapped"
        pr.loc[trapped, "plateau_step"] = 3000
        pr.loc[trapped, "final_return"] = -1.0
        pr.loc[pr["run_id"] == ok_id, "classification"] = "ok"
        rep.per_run = pr
        return rep

    monkeypatch.setattr(report.failures, "failure_report", with_a_trap)


def test_report_shows_a_trapped_and_a_successful_agent(tiny, tmp_path, monkeypatch):
    out, plain, _ = tiny
    _pretend_trapped(monkeypatch, plain[0], plain[1])
    res = report.build_report(out, tmp_path / "report")
    md = (res.out / "report.md").read_text()
    assert "![a trapped and a successful agent](figures/agents.png)" in md
    assert f"trapped run `{plain[0]}` (left" in md and f"successful run `{plain[1]}`" in md
    # The figure sits in the failure section, before the per-run table links.
    assert md.index("figures/agents.png") < md.index("Per-run classifications")
    assert 'src="figures/agents.png"' in (res.out / "index.html").read_text()
    img = mpimg.imread(res.out / "figures" / "agents.png")
    w, h, _ = figures.filmstrip_size(
        [report.AGENT_FRAMES] * 2, math.ceil(report.AGENT_FRAMES / 2),
        (figures.TEXT_WIDTH - figures.FILMSTRIP_GAP_IN) / report.AGENT_FRAMES, 400 / 600,
        figures.PNG_DPI)
    assert img.shape[:2] == (round(h * figures.PNG_DPI), round(w * figures.PNG_DPI))


def test_report_without_traps_shows_the_lowest_and_the_top_mode(tiny, tmp_path, monkeypatch):
    out, plain, _ = tiny
    real = failures.failure_report

    def two_modes(runs, curves, **kw):
        rep = real(runs, curves, **kw)
        pr = rep.per_run.copy()
        pr["classification"] = "ok"
        pr.loc[pr["run_id"] == plain[0], ["mode", "final_return"]] = [0, -5.0]
        pr.loc[pr["run_id"] == plain[1], ["mode", "final_return"]] = [1, 50.0]
        pr.loc[~pr["run_id"].isin(plain), "mode"] = np.nan
        rep.per_run = pr
        return rep

    monkeypatch.setattr(report.failures, "failure_report", two_modes)
    res = report.build_report(out, tmp_path / "report")
    md = (res.out / "report.md").read_text()
    assert "![an agent of the lowest mode and one of the top mode](figures/agents.png)" in md
    assert f"lowest mode `{plain[0]}` (left" in md and f"top mode `{plain[1]}` (right" in md
    assert "median of its 9 greedy episodes" in md


def test_report_without_policies_or_traps_has_no_agents_figure(tiny, tmp_path):
    out, _, _ = tiny
    res = report.build_report(out, tmp_path / "report")
    assert "agents.png" not in (res.out / "report.md").read_text()


def test_report_notes_an_agent_it_cannot_replay(tiny, tmp_path, monkeypatch):
    out, plain, normed = tiny
    out = _without_obs_stats(out, normed, tmp_path / "old")
    _pretend_trapped(monkeypatch, normed, plain[1])
    res = report.build_report(out, tmp_path / "report")
    assert "agents.png" not in (res.out / "report.md").read_text()
    assert any("agents filmstrip not drawn" in n and "normalize_obs" in n for n in res.notes)

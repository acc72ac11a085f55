"""``python -m study.report`` and the figures: files, links, labels, bad input, Optuna."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from study import store
from study.analysis import curves as curves_mod
from study.analysis import failures
from study.config import SPECS, defaults
from study.report import build as report
from study.report import figures

# 3 configs x 8 seeds: A always learns to -5; B is bimodal (5 seeds reach -5, 3 plateau
# at -28 with collapsed entropy); C is a weak, unimodal config (-15). One seed of C
# diverges. Starting return -40, so the -28 plateau realises only a third of the progress.
CONFIGS = {
    "cA": {"policy_lr": 0.01, "gamma": 0.99},
    "cB": {"policy_lr": 0.003, "gamma": 0.99},
    "cC": {"policy_lr": 0.001, "gamma": 0.9},
}
N_SEEDS = 8
N_POINTS = 60
LOG_EVERY = 500
TRAPPED_B = (1, 4, 6)
FIGURES = ("learning_curves", "learning_curves_iqm", "small_multiples", "seed_curves",
           "final_distribution", "sensitivity")


def _hp_cell(name: str, value: object) -> object:
    if SPECS[name].kind == "intlist":
        return "[" + ", ".join(str(v) for v in value) + "]"  # type: ignore[union-attr]
    return value


def make_store(path: Path, with_eval: bool = True, name: str = "toy") -> Path:
    """Write the synthetic store with pandas (runs/ and curves/ Parquet, a manifest)."""
    rng = np.random.default_rng(7)
    steps = np.arange(1, N_POINTS + 1) * LOG_EVERY
    t = steps / steps[-1]
    run_rows, curve_frames = [], []
    for cid, hp in CONFIGS.items():
        for seed in range(N_SEEDS):
            rid = f"{cid}-s{seed}"
            trapped = cid == "cB" and seed in TRAPPED_B
            diverged = cid == "cC" and seed == 7
            level = {"cA": -5.0, "cB": -5.0, "cC": -15.0}[cid] + rng.normal(0, 0.8)
            tau = 0.15
            if trapped:
                level, tau = -28.0 + rng.normal(0, 0.8), 0.06
            ret = -40 + (level + 40) * (1 - np.exp(-t / tau)) + rng.normal(0, 0.8, N_POINTS)
            ret[rng.random(N_POINTS) < 0.05] = np.nan  # windows without a finished episode
            ent = (0.02 + 1.3 * np.exp(-t / 0.05) if trapped
                   else 0.7 + 0.6 * np.exp(-t / 0.5)) + rng.normal(0, 0.01, N_POINTS)
            n = N_POINTS
            if diverged:
                n = 30
                ret, ent = ret[:n], ent[:n]
            ev = np.full(n, np.nan)
            if with_eval:
                ev[9::10] = ret[9::10] + 0.5
            curve_frames.append(pd.DataFrame({
                "run_id": rid, "step": steps[:n], "episode_return": ret,
                "episode_length": 100.0, "entropy": ent, "policy_loss": 0.0,
                "value_loss": 1.0, "explained_variance": 0.5, "grad_norm": 0.5,
                "eval_return": ev,
            }))
            row = {"run_id": rid, "config_id": cid, "seed": seed, "env": "Toy-v0",
                   "total_steps": int(steps[-1]), "log_every": LOG_EVERY}
            row.update({k: _hp_cell(k, v) for k, v in defaults().items()})
            row.update(hp)
            row.update({
                "final_return": np.nan if diverged else float(np.nanmean(ret[-5:])),
                "final_eval_return": np.nan if diverged or not with_eval else float(ev[-1]),
                "status": "diverged" if diverged else "ok",
                "diverged_at_step": int(steps[n - 1]) if diverged else None,
                "wall_s": 1.0, "sweep": name,
            })
            run_rows.append(row)
    runs = pd.DataFrame(run_rows)
    runs["diverged_at_step"] = runs["diverged_at_step"].astype("Int64")
    path.mkdir(parents=True)
    store.write_manifest(path, {"format": store.FORMAT, "env": "Toy-v0", "sweep": name})
    (path / "sweep.toml").write_text(f'name = "{name}"\n')
    (path / "runs").mkdir()
    (path / "curves").mkdir()
    runs.to_parquet(path / "runs" / "chunk-0.parquet", index=False)
    pd.concat(curve_frames, ignore_index=True).to_parquet(
        path / "curves" / "chunk-0.parquet", index=False)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The toy store and a report of it (built once for the module: rendering is slow)."""
    base = tmp_path_factory.mktemp("report")
    root = make_store(base / "store")
    out = base / "out"
    assert report.main([str(root), "--out", str(out), "--top", "3"]) == 0
    return root, out


def _local_refs(html_text: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html_text)


# --------------------------------------------------------------------------------------
# the report on disk


def test_report_files_exist_and_pngs_open(built):
    _, out = built
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    for stem in FIGURES:
        png, svg = out / "figures" / f"{stem}.png", out / "figures" / f"{stem}.svg"
        assert png.is_file() and svg.is_file(), stem
        img = mpimg.imread(png)
        h, w = img.shape[:2]
        # 200 dpi: a 3.5 in wide figure is 700 px; nothing tiny, nothing absurd
        assert 300 <= w <= 3000 and 300 <= h <= 4000, (stem, img.shape)
        assert float(np.std(img[..., :3])) > 0.01, f"{stem} is blank"
        assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    for stem in ("seed_table", "failures_per_config"):
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{stem}.{ext}").stat().st_size > 0
    assert (out / "tables" / "failures_per_run.csv").is_file()
    tex = (out / "tables" / "seed_table.tex").read_text()
    assert "\\begin{tabular}" in tex and "policy\\_lr" in tex
    # nothing left over from the temp-dir-and-rename publication
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def test_html_is_offline_and_references_existing_files(built):
    _, out = built
    text = (out / "index.html").read_text()
    refs = _local_refs(text)
    assert refs, "no figures or tables referenced"
    for ref in refs:
        assert not re.match(r"^[a-z]+:|^//|^/", ref), f"non-local reference {ref}"
        assert (out / ref).is_file(), f"{ref} does not exist"
    assert "<script" not in text and "http://" not in text and "https://" not in text
    for stem in FIGURES:
        assert f'src="figures/{stem}.png"' in text
    assert "<table>" in text  # tables inlined, not linked only
    assert "<figcaption>" in text
    # Column-width figures take half the page (paired, or beside their caption); the
    # text-width grid of small multiples takes all of it.
    assert ('<div class="pair"><figure class="col"><img src="figures/learning_curves.png"'
            in text)
    assert '<figure><img src="figures/small_multiples.png"' in text


def test_markdown_has_seed_table_and_failure_report(built):
    root, out = built
    md = (out / "report.md").read_text()
    assert "## Seed table" in md
    assert "## Across tasks" not in md  # one env: no aggregate section
    assert not list((out / "tables").glob("aggregate*"))
    # the seed table is the tables module's own Markdown (same header, same rows)
    from study.analysis import tables

    runs, curves = store.load(root)
    tab = tables.seed_table(runs, curves)
    expected = tables.format_table(tab, "markdown").strip().splitlines()
    assert expected[0] in md and all(line in md for line in expected)
    assert (out / "tables" / "seed_table.md").read_text().strip() == "\n".join(expected)
    # the failure report, one heading level down, with the trapped mode near -28
    assert "## Failure analysis" in md and "### Trapped runs" in md
    assert re.search(r"\*\*-2[6-9]\.\d \+/- \d+\.\d: 3 of 8 seeds \(trapped\)\*\*", md), md
    # figures with captions, best configs named by their hyperparameters
    for stem in FIGURES:
        assert f"](figures/{stem}.png)" in md
    assert "gamma=0.99, policy_lr=0.003" in md
    assert "the config with the most trapped runs (3)" in md


@pytest.mark.slow
def test_default_out_dir_and_replacement(tmp_path, capsys):
    root = make_store(tmp_path / "store", with_eval=False)
    assert report.main([str(root)]) == 0
    out = root / "report"
    assert (out / "index.html").is_file()
    assert "wrote" in capsys.readouterr().out
    (out / "stale.txt").write_text("from an older report")
    # a second run replaces the whole report (and the store reader ignores report/)
    assert report.main([str(root), "--metric", "auc", "--top", "1"]) == 0
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    assert "ranks configs by the **IQM of auc**" in (out / "report.md").read_text()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_failed_report_leaves_previous_report_intact(built, tmp_path, monkeypatch):
    root, done = built
    out = tmp_path / "rep"
    shutil.copytree(done, out)  # a previous report (cheaper than building another)
    before = (out / "index.html").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "learning_curves_figure", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        report.build_report(root, out)
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temp dir left


# --------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _fails(argv: list[str], capsys, match: str) -> str:
    assert report.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert re.search(match, err), err
    return err


def test_bad_input(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi")
    _fails([str(plain)], capsys, "not a results store")
    _fails([str(tmp_path / "missing")], capsys, "no such results store")

    empty = tmp_path / "empty"
    empty.mkdir()
    store.write_manifest(empty, {"format": store.FORMAT, "env": "Toy-v0", "sweep": "e"})
    _fails([str(empty)], capsys, "no finished runs")

    root = make_store(tmp_path / "store", with_eval=False)
    _fails([str(root), "--metric", "final_eval_return"], capsys, "final_eval_return")
    _fails([str(root), "--metric", "bogus"], capsys, "invalid choice")
    _fails([str(root), "--frobnicate"], capsys, "unrecognized arguments")
    _fails([str(root), "--top", "0"], capsys, "--top")
    _fails([str(root), "--out", str(plain)], capsys, "not a report")
    _fails([str(root), "--out", str(tmp_path)], capsys, "the results store itself")

    assert not (root / "report").exists() and not (empty / "report").exists()
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "plain", "store"]


# --------------------------------------------------------------------------------------
# the Figure objects


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


def _legend_texts(fig: Figure) -> list[str]:
    out = []
    for lg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        out += [t.get_text() for t in lg.get_texts()]
        if lg.get_title().get_text():
            out.append(lg.get_title().get_text())
    return out


@pytest.fixture(scope="module")
def data(built):
    root, _ = built
    runs, curves = store.load(root)
    rep = failures.failure_report(runs, curves)
    labels = failures.config_labels(runs)
    return runs, curves, rep, labels


def _check_paper_style(fig: Figure) -> None:
    assert all(t.get_fontsize() >= 8 for t in _texts(fig)), "text below 8 pt"
    w, _ = fig.get_size_inches()
    assert w in (figures.COLUMN_WIDTH, figures.TEXT_WIDTH)


def test_learning_curve_figures_label_axes_and_name_hyperparameters(data):
    runs, curves, _, labels = data
    agg = curves_mod.learning_curves(runs, curves, n_boot=1)
    fig = figures.learning_curves_figure(agg, ["cA", "cB"], labels)
    _check_paper_style(fig)
    assert fig.axes[-1].get_xlabel() == "environment steps"
    assert len(fig.axes) == 2  # episode return and evaluation return
    assert "episode return" in fig.axes[0].get_ylabel()
    assert "evaluation return" in fig.axes[1].get_ylabel()
    legend = _legend_texts(fig)
    assert legend == ["gamma=0.99, policy_lr=0.01", "gamma=0.99, policy_lr=0.003"]
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].lines}
    assert colours <= {c.lower() for c in figures.OKABE_ITO}
    # the median line is the median over seeds at each step
    cb = agg[(agg.metric == "episode_return") & (agg.config_id == "cB")]
    y = fig.axes[0].lines[1].get_ydata()
    np.testing.assert_allclose(y, cb["median"].to_numpy(), equal_nan=True)

    sm = figures.small_multiples_figure(agg, ["cA", "cB", "cC"], labels, max_panels=2)
    _check_paper_style(sm)
    titles = [ax.get_title(loc="left") for ax in sm.axes if ax.get_visible() and ax.axison]
    assert [t.replace("\n", " ") for t in titles] == ["gamma=0.99, policy_lr=0.01",
                                                      "gamma=0.99, policy_lr=0.003"]
    assert any("2 of 3 configs" in t.get_text() for t in _texts(sm))
    assert all(ax.get_xlabel() == "environment steps" for ax in sm.axes if ax.axison)


def test_seed_curves_highlight_trapped_runs(data):
    _, curves, rep, labels = data
    sub = rep.per_run[rep.per_run["config_id"] == "cB"]
    assert sorted(sub.loc[sub.classification == "trapped", "seed"]) == list(TRAPPED_B)
    fig = figures.seed_curves_figure(curves, sub, labels["cB"])
    _check_paper_style(fig)
    legend = _legend_texts(fig)
    assert "trapped (3)" in legend and "ok (5)" in legend
    assert "gamma=0.99, policy_lr=0.003" in legend  # the legend title names the config
    assert [ax.get_ylabel() for ax in fig.axes] == ["episode return", "policy entropy (nats)"]
    assert fig.axes[-1].get_xlabel() == "environment steps"
    # one LineCollection per class per panel, trapped in vermillion
    colls = [c for c in fig.axes[0].collections
             if isinstance(c, matplotlib.collections.LineCollection)]
    assert len(colls) == 2
    trapped = [c for c in colls if matplotlib.colors.to_hex(c.get_colors()[0])
               == figures.CLASS_COLORS["trapped"].lower()]
    assert len(trapped) == 1 and len(trapped[0].get_segments()) == 3


def test_distribution_and_sensitivity_figures(data):
    runs, _, rep, labels = data
    vals = pd.DataFrame({"config_id": runs["config_id"], "value": runs["final_return"],
                         "run_id": runs["run_id"]}).merge(
        rep.per_run[["run_id", "classification"]], on="run_id")
    trapped = [(t.config_id, t.mode.index) for t in rep.trapped_levels]
    assert ("cB", 0) in trapped
    fig = figures.final_distribution_figure(vals, ["cA", "cB", "cC"], labels,
                                            modes=rep.modes, trapped_modes=trapped)
    _check_paper_style(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "final return"
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["gamma=0.9, policy_lr=0.001 (1 non-finite)",
                     "gamma=0.99, policy_lr=0.003", "gamma=0.99, policy_lr=0.01"]
    assert "trapped mode" in _legend_texts(fig)
    # the jittered points: every finite final return, once
    pts = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections
                          if c.get_offsets().shape[0] > 5])
    np.testing.assert_allclose(np.sort(pts), np.sort(vals["value"].dropna().to_numpy()))

    sv = runs[["config_id", "policy_lr", "gamma"]].assign(value=runs["final_return"])
    fig = figures.sensitivity_figure(sv, ["policy_lr", "gamma"])
    _check_paper_style(fig)
    axes = [a for a in fig.axes if a.axison]
    assert [a.get_xlabel() for a in axes] == ["policy_lr", "gamma"]
    assert axes[0].get_xscale() == "log" and axes[1].get_xscale() == "linear"
    assert "final return" in axes[0].get_ylabel()
    # marginal median over all runs with policy_lr = 0.001 (config C, diverged seed skipped)
    med = axes[0].lines[0].get_ydata()
    c = runs.loc[runs.policy_lr == 0.001, "final_return"].dropna()
    assert math.isclose(med[0], float(np.median(c)))


def test_small_multiple_titles_stay_within_their_panel():
    # Regression: labels with a budget and three hyperparameters ran into the next panel.
    steps = np.arange(1, 11) * 100.0
    ids = [f"c{i}" for i in range(8)]
    agg = pd.concat([pd.DataFrame({"config_id": c, "step": steps, "median": steps / 100,
                                   "q25": 0.0, "q75": 1.0}) for c in ids])
    labels = {c: f"total_steps={2000 + 1000 * (i % 2)}, "
                 + ("gamma=0.99, policy_lr=0.01" if i % 3 else "gamma=0.9, policy_lr=0.001")
              for i, c in enumerate(ids)}
    fig = figures.small_multiples_figure(agg, ids, labels)
    fig.draw_without_rendering()
    axes = [ax for ax in fig.axes if ax.axison]
    for i, ax in enumerate(axes):
        title = ax.title if ax.title.get_text() else ax._left_title
        right = title.get_window_extent().x1
        limit = axes[i + 1].get_window_extent().x0 if (i + 1) % 4 else fig.bbox.x1
        assert right <= limit, (title.get_text(), right, limit)
        above = axes[i - 4].get_window_extent().y0 if i >= 4 else fig.bbox.y1
        assert title.get_window_extent().y1 <= above, title.get_text()


def test_sensitivity_ticks_every_grid_value_but_not_sampled_ones():
    # Regression: values an Optuna sampler drew (two of them 3% apart) each got a tick,
    # and their labels overlapped.
    sampled = [0.00141359, 0.00205476, 0.00431171, 0.00443038]
    for xs, exact in ((sampled, False), ([0.001, 0.01, 0.1], True)):
        sv = pd.DataFrame({"config_id": [f"c{i}" for i in range(len(xs))], "policy_lr": xs,
                           "value": np.arange(len(xs), dtype=float)})
        ax = figures.sensitivity_figure(sv, ["policy_lr"]).axes[0]
        ticked = np.allclose(sorted(ax.get_xticks()), xs) if len(ax.get_xticks()) == len(
            xs) else False
        assert ticked == exact, (xs, ax.get_xticks())


# --------------------------------------------------------------------------------------
# Markdown -> HTML


def test_markdown_to_html_subset():
    md = ("# T\n\nSome **bold** and `code`, a [link](tables/x.csv).\n\n"
          "| a | b \\| c |\n|---|---:|\n| 1 | <2> |\n\n![alt](figures/f.png)\n\n"
          "*Figure 1.* Cap.\n\n- one\n- two\n\n> **careful**: this\n> matters\n")
    h = report.markdown_to_html(md)
    assert '<h1 id="t">T</h1>' in h
    assert "<strong>bold</strong>" in h and "<code>code</code>" in h
    assert '<a href="tables/x.csv">link</a>' in h
    assert '<th class="num">b | c</th>' in h and '<td class="num">&lt;2&gt;</td>' in h
    assert "<th>a</th>" in h and "<td>1</td>" in h
    assert ('<figure><img src="figures/f.png" alt="alt"><figcaption><em>Figure 1.</em> '
            "Cap.</figcaption></figure>") in h
    assert "<ul><li>one</li><li>two</li></ul>" in h
    assert '<blockquote class="note"><strong>careful</strong>: this matters</blockquote>' in h
    h = report.markdown_to_html(md, {"figures/f.png": "col"})
    assert '<figure class="col"><img src="figures/f.png"' in h


def test_wide_tables_fit_the_page_by_wrapping_before_intervals():
    # Regression: the 13-column seed table was clipped at the page's right edge. Cells now
    # wrap between a value and its interval, never inside it, and +/- reads as a sign.
    h = report.markdown_to_html("| IQM [95% CI] | mean +/- sd | failed |\n|---:|---:|---:|\n"
                                "| -14.63 [-45.47, -12.39] | 1.5 +/- 0.2 | 0/6 = 0% [0%, 39%] |")
    assert "-14.63 [-45.47,&nbsp;-12.39]" in h
    assert "1.5&nbsp;±&nbsp;0.2" in h and "0/6&nbsp;=&nbsp;0% [0%,&nbsp;39%]" in h
    css = report._CSS
    assert "white-space:nowrap" not in css and ".table{overflow-x:auto" in css
    assert "figure.col{display:flex" in css and "figure img{display:block;width:100%" in css


# --------------------------------------------------------------------------------------
# Optuna


@pytest.mark.slow
def test_optuna_journal_and_trials_parquet(tmp_path):
    optuna = pytest.importorskip("optuna")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    root = make_store(tmp_path / "store", with_eval=False, name="opt")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    study = optuna.create_study(study_name="opt", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("policy_lr", 1e-4, 1e-1, log=True)
        gamma = trial.suggest_categorical("gamma", [0.9, 0.99])
        for step in range(3):
            trial.report(-abs(math.log10(lr) + 2.5) * (3 - step) + gamma, step)
        return -abs(math.log10(lr) + 2.5) + gamma

    study.optimize(objective, n_trials=5)
    rows = [{"number": t.number, "state": t.state.name,
             **{f"param_{k}": v for k, v in t.params.items()},
             "value": t.value, "intermediate_values": str(
                 {str(k): v for k, v in t.intermediate_values.items()}).replace("'", '"'),
             "duration_s": 0.1} for t in study.trials]
    pd.DataFrame(rows).to_parquet(root / "trials.parquet", index=False)
    size = (root / "optuna.journal").stat().st_size

    out = tmp_path / "rep"
    assert report.main([str(root), "--out", str(out)]) == 0
    assert (root / "optuna.journal").stat().st_size == size  # only read
    md = (out / "report.md").read_text()
    assert "## Optuna study" in md and "study 'opt'" in md
    for stem in ("optuna_history", "optuna_importances", "optuna_intermediate"):
        assert (out / "figures" / f"{stem}.png").is_file(), md
        assert mpimg.imread(out / "figures" / f"{stem}.png").shape[1] >= 300

    # Without the journal the study is rebuilt from trials.parquet; with a single
    # completed trial there are no importances, and a note says why.
    first = study.trials[0]  # read before its journal goes
    (root / "optuna.journal").unlink()
    pd.DataFrame(rows[:1]).to_parquet(root / "trials.parquet", index=False)
    rebuilt, source = report._optuna_study(root)
    assert source == "`trials.parquet`" and len(rebuilt.trials) == 1
    assert rebuilt.trials[0].params == first.params
    assert rebuilt.trials[0].value == pytest.approx(first.value)
    assert rebuilt.trials[0].intermediate_values == pytest.approx(first.intermediate_values)
    figs, notes = figures.optuna_figures(rebuilt)
    try:
        assert "optuna_history" in figs and "optuna_importances" not in figs
        assert "needs at least 2 completed trials" in notes["optuna_importances"]
    finally:
        import matplotlib.pyplot as plt

        for f in figs.values():
            plt.close(f)


def test_optuna_figures_are_drawn_in_the_report_style():
    # Regression: Optuna's own plots came with their ggplot theme (grey panels, grid,
    # titles), at another size, and with the importances' axis label cut off.
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        lr = trial.suggest_float("policy_lr", 1e-4, 1e-1, log=True)
        lam = trial.suggest_categorical("lam", [0.9, 1.0])
        for step in range(1, 4):
            trial.report(-abs(math.log10(lr) + 2.5) / step, step * 1000)
        return -abs(math.log10(lr) + 2.5) + lam

    study.optimize(objective, n_trials=6)
    figs, notes = figures.optuna_figures(study)
    assert set(figs) == {"optuna_history", "optuna_importances", "optuna_intermediate"}, notes
    for stem, fig in figs.items():
        _check_paper_style(fig)
        for ax in fig.axes:
            assert matplotlib.colors.to_hex(ax.get_facecolor()) == "#ffffff", stem
            assert not ax.get_title() and not ax.xaxis.get_gridlines()[0].get_visible(), stem
            assert ax.get_xlabel() and ax.get_ylabel() or stem == "optuna_importances"
        fig.draw_without_rendering()  # lays it out: every label inside the canvas
        box = fig.bbox
        labels = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, *ax.texts,
                                                 *ax.get_yticklabels()) if t.get_text()]
        for t in labels:
            ext = t.get_window_extent()
            assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, (stem, t.get_text())
    assert [t.get_text() for t in figs["optuna_importances"].axes[0].get_yticklabels()] == [
        "lam", "policy_lr"]


@pytest.mark.parametrize("module", ["tables", "failures", "report", "render"])
def test_help_shows_no_raw_markup(module, capsys):
    # --help text taken from docstrings must not show reStructuredText (``code``, roles).
    import importlib

    mod = importlib.import_module(f"study.{module}")
    assert mod.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":data:" not in text
    if module == "failures":
        assert "collapsed  it ended clearly below the return of an untrained policy" in text
    if module == "tables":
        assert "ranked by IQM" in text
        assert "A run fails when study.analysis.failures.classify_runs" in text


def test_report_header_says_how_runs_without_a_final_return_count(tmp_path):
    root = make_store(tmp_path / "store", with_eval=False)
    runs = pd.read_parquet(root / "runs" / "chunk-0.parquet")
    runs.loc[runs["run_id"] == "cA-s0", "final_return"] = np.nan  # status stays ok
    runs.to_parquet(root / "runs" / "chunk-0.parquet", index=False)
    res = report.build_report(root, tmp_path / "report", top=1)
    md = (res.out / "report.md").read_text()
    assert "1 run with status ok has no final return" in md
    assert "it counts among its config's seeds" in md
    assert "ranks configs by the **IQM of final_return**" in md
    pc = pd.read_csv(res.out / "tables" / "failures_per_config.csv").set_index("config_id")
    assert pc.loc["cA", "n_diverged"] == 0
    st = pd.read_csv(res.out / "tables" / "seed_table.csv").set_index("config_id")
    assert (st.loc["cA", "n"], st.loc["cA", "n_seeds"], st.loc["cA", "n_failed"]) == (7, 8, 0)

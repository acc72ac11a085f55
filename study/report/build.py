"""``python -m study.report RESULTS_DIR``: the whole analysis of a sweep as HTML and Markdown.

Writes, under ``--out DIR`` (default ``RESULTS_DIR/report``)::

    index.html        opens offline: no scripts or CDN, figures beside it, tables inline
    report.md         the same content as Markdown
    figures/*.png     200 dpi, for screens
    figures/*.svg     text kept as text, for papers
    tables/*.csv|md|tex

with: median/IQR (and IQM) learning curves of the top configs and small multiples of the
grid; every seed of one config with trapped/diverged runs highlighted; the final-return
distribution per config with its modes; hyperparameter sensitivity (marginal medians and
IQRs); the seed table; the failure report, with (where the sweep saved policies)
filmstrips of a trapped and a successful agent side by side, or without traps of an agent
of a config's lowest mode and one of its top mode (:mod:`study.report.render`); and, for Optuna
studies, the optimisation history, parameter importances and intermediate values. A store
of several envs also gets a section across tasks: :mod:`study.analysis.aggregate`'s table of
normalized scores (IQM, median, mean, optimality gap with stratified bootstrap CIs; of an
Optuna store, its held-out and tuning runs apart), performance profiles and
sample-efficiency curves (``tables/aggregate*.csv|md|tex``).

Configs are ranked by the IQM of the metric everywhere (ties: median). The page says first
what a reader must know before trusting it: an incomplete store (an interrupted sweep,
with the command that resumes it), budgets that differ between runs, how runs without a
final return count, and for an Optuna study which runs are tuning and which held-out
(the figures show the tuning runs; the seed tables rank the two apart).

Every number comes from the store's Parquet files (:mod:`study.store`), the statistics from
:mod:`study.analysis.curves`, :mod:`study.analysis.tables` and
:mod:`study.analysis.failures`, the figures from :mod:`study.report.figures`. The report is
built in a temporary directory beside ``DIR`` and renamed into place at the end, so a failed
run never leaves a half-written report (and an earlier report stays as it was). Bad input
(not a store, an empty store, a metric without data, unknown options) is one ``error:`` line
and exit code 2, with nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import math
import os
import re
import shutil
import tempfile
import time
import tomllib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study import store
from study.analysis import curves as curves_mod
from study.analysis import failures, tables
from study.config import NAMES, ConfigError
from study.report import figures
from study.text import BOOKTABS_NOTE, format_value, latex_tabular, markdown_table
from study.trust import env_module

__all__ = ["METRICS", "ReportResult", "build_report", "main", "markdown_to_html"]

#: What configs can be ranked by (``--metric``); ``auc`` is the mean of the return curve.
METRICS: tuple[str, ...] = ("final_return", "final_eval_return", "auc")
#: Written into every report directory: only directories holding it are ever replaced.
MARKER = ".study-report"
#: At most this many configs in the final-return distribution figure.
MAX_DISTRIBUTION_ROWS = 30
#: Bootstrap resamples behind the IQM band of the top configs' learning curves.
IQM_BOOT = 1000


@dataclass
class ReportResult:
    """What :func:`build_report` wrote, how long each stage took, and what it skipped."""

    out: Path
    files: list[Path]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Timer:
    """Accumulates wall time per named stage (for the benchmark's breakdown)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[stage] = self.t.get(stage, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# inputs


def _check_out(results: Path, out: Path) -> None:
    """Refuse an output directory whose replacement would destroy something else."""
    r, o = results.resolve(), out.resolve()
    if r == o or r.is_relative_to(o):
        raise ConfigError(f"--out {out}: is or contains the results store itself; "
                          "refusing to replace it")
    if o.exists():
        if not o.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        if any(o.iterdir()) and not (o / MARKER).exists():
            raise ConfigError(f"--out {out}: exists and is not a report written by "
                              "study.report; choose another directory")


# --------------------------------------------------------------------------------------
# small writers (Markdown, LaTeX) for the failure tables


def _cell(v: Any, decimals: int = 3) -> str:
    """A failure-table cell: floats to ``decimals`` places (significant digits below 0.01),
    integral ones without a point, NaN as "-"; other values by :func:`format_value`."""
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "-"
        if f.is_integer() and abs(f) < 1e15:
            return str(int(f))
        return f"{f:.{decimals}g}" if abs(f) < 1e-2 else f"{f:.{decimals}f}"
    return format_value(v)


def _cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """A failure table's header and rows as text (:func:`_cell` per value)."""
    return ([str(c) for c in df.columns],
            [[_cell(v) for v in row] for row in df.itertuples(index=False)])


def _df_markdown(df: pd.DataFrame) -> str:
    """A failure table in Markdown, every column left-aligned."""
    return markdown_table(*_cells(df))


def _df_latex(df: pd.DataFrame) -> str:
    """A failure table as a booktabs ``tabular`` (no pandas Styler, so no jinja2)."""
    header, rows = _cells(df)
    return latex_tabular(header, [(None, rows)], "l" * len(header), comments=[BOOKTABS_NOTE])


def _shift_headings(md: str, by: int = 1) -> str:
    """Demote Markdown headings (a module's ``#`` report becomes a ``##`` section)."""
    return re.sub(r"^(#{1,5}) ", lambda m: "#" * (len(m.group(1)) + by) + " ", md,
                  flags=re.MULTILINE)


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        s = pat.sub(rep, s)
    return s


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|") if line.strip() != "|" else "")
    return [c.strip().replace("\\|", "|") for c in cells]


_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")


def markdown_to_html(md: str, figure_classes: Mapping[str, str] | None = None) -> str:
    """The small Markdown subset the report uses, as HTML body content.

    Headings, paragraphs, ``- `` lists, ``> `` quotes (the report's warnings), pipe tables
    (columns aligned ``---:`` are right-aligned), images on their own line, and inline
    code, bold, italics and links. ``figure_classes`` maps an image's ``src`` to the class
    of its ``<figure>`` ("col" for a column-width figure, set beside its caption). Enough
    for this report (and the failure report and seed table it embeds); not a general
    Markdown implementation.
    """
    lines = md.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        kind = _block_kind(line)
        if kind != "para" and para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if kind == "para":
            para.append(line.strip())
            i += 1
        elif kind == "blank":
            i += 1
        else:
            html_block, i = _BLOCKS[kind](lines, i, figure_classes or {})
            out.append(html_block)
    if para:
        out.append("<p>" + _inline(" ".join(para)) + "</p>")
    return "\n".join(_pair_figures(out))


def _pair_figures(blocks: list[str]) -> list[str]:
    """Two column-width figures in a row stand side by side, each with its caption below
    (a lone one keeps its caption beside it)."""
    out: list[str] = []
    for b in blocks:
        if (b.startswith('<figure class="col">') and out
                and out[-1].startswith('<figure class="col">')):
            out[-1] = f'<div class="pair">{out[-1]}{b}</div>'
        else:
            out.append(b)
    return out


def _block_kind(line: str) -> str:
    stripped = line.lstrip()
    if not stripped:
        return "blank"
    if re.match(r"^#{1,6} ", line):
        return "heading"
    if _IMAGE.match(line.strip()):
        return "image"
    for prefix, kind in (("|", "table"), ("- ", "list"), ("> ", "quote")):
        if stripped.startswith(prefix):
            return kind
    return "para"


def _heading(lines: list[str], i: int, _c: Mapping[str, str]) -> tuple[str, int]:
    m = re.match(r"^(#{1,6}) (.*)$", lines[i].rstrip())
    assert m is not None
    level, text = len(m.group(1)), m.group(2)
    anchor = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return f'<h{level} id="{anchor}">{_inline(text)}</h{level}>', i + 1


def _image(lines: list[str], i: int, classes: Mapping[str, str]) -> tuple[str, int]:
    im = _IMAGE.match(lines[i].strip())
    assert im is not None
    alt, src = im.group(1), im.group(2)
    i += 1
    # A following "*Figure n.* ..." paragraph is the image's caption.
    j = i
    while j < len(lines) and not lines[j].strip():
        j += 1
    caption = []
    if j < len(lines) and lines[j].lstrip().startswith("*Figure"):
        while j < len(lines) and lines[j].strip():
            caption.append(lines[j].strip())
            j += 1
        i = j
    cap = f"<figcaption>{_inline(' '.join(caption))}</figcaption>" if caption else ""
    cls = f' class="{html.escape(classes[src])}"' if src in classes else ""
    return (f'<figure{cls}><img src="{html.escape(src)}" alt="{html.escape(alt)}">{cap}'
            "</figure>"), i


def _table(lines: list[str], i: int, _c: Mapping[str, str]) -> tuple[str, int]:
    block = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        block.append(lines[i])
        i += 1
    rows = [_split_row(b) for b in block]
    head, body, right = None, rows, [False] * len(rows[0])
    if len(rows) >= 2 and all(re.fullmatch(r":?-{3,}:?", c) for c in rows[1]):
        head, body, right = rows[0], rows[2:], [c.endswith(":") for c in rows[1]]

    def cell(tag: str, j: int, text: str) -> str:
        cls = ' class="num"' if j < len(right) and right[j] else ""
        return f"<{tag}{cls}>{_cell_html(text)}</{tag}>"

    t = ['<div class="table"><table>']
    if head:
        t.append("<thead><tr>" + "".join(cell("th", j, c) for j, c in enumerate(head))
                 + "</tr></thead>")
    t.append("<tbody>" + "".join("<tr>" + "".join(cell("td", j, c) for j, c in enumerate(r))
                                 + "</tr>" for r in body) + "</tbody></table></div>")
    return "".join(t), i


def _cell_html(text: str) -> str:
    """A table cell that wraps only between a value and its interval: "-14.63 [-45.47,
    -12.39]" may break before the bracket, never inside it; "+/-" reads as "±"."""
    s = _inline(text)
    s = re.sub(r"\[[^\]<>]*\]", lambda m: m.group(0).replace(" ", "&nbsp;"), s)
    s = s.replace(" +/- ", "&nbsp;±&nbsp;").replace(" = ", "&nbsp;=&nbsp;")
    return s


def _list(lines: list[str], i: int, _c: Mapping[str, str]) -> tuple[str, int]:
    items = []
    while i < len(lines) and lines[i].lstrip().startswith("- "):
        items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
        i += 1
    return "<ul>" + "".join(items) + "</ul>", i


def _quote(lines: list[str], i: int, _c: Mapping[str, str]) -> tuple[str, int]:
    text = []
    while i < len(lines) and lines[i].lstrip().startswith("> "):
        text.append(lines[i].lstrip()[2:].strip())
        i += 1
    return f'<blockquote class="note">{_inline(" ".join(text))}</blockquote>', i


_BLOCKS = {"heading": _heading, "image": _image, "table": _table, "list": _list,
           "quote": _quote}

# Figures are 200 dpi PNGs with 8 pt text: shown at 3/4 of their pixel size, their text
# matches the page's. A text-width figure fills the column; a column-width one takes half
# of it, with its caption beside it (below it on a narrow screen). Tables wrap between a
# value and its interval; one still too wide scrolls, a shadow at the edge saying so.
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}h3{font-size:1.1em}
figure{margin:1.2em 0}figure img{display:block;width:100%;max-width:100%;height:auto;border:0}
figure.col{display:flex;gap:1.5em;align-items:flex-start}
figure.col img{flex:0 0 50%;width:50%}figure.col figcaption{flex:1;margin-top:1em}
.pair{display:flex;gap:1.5em;align-items:flex-start}.pair figure.col{display:block;flex:1}
.pair figure.col img{width:100%}.pair figure.col figcaption{margin-top:.3em}
@media (max-width:800px){figure.col,.pair{display:block}figure.col img{width:100%}}
.table{overflow-x:auto;margin:.5em 0 1em;max-width:100%;background:
linear-gradient(to right,#fff 30%,#fff0) left/3em 100% no-repeat local,
linear-gradient(to left,#fff 30%,#fff0) right/3em 100% no-repeat local,
radial-gradient(farthest-side at 0 50%,#0003,#0000) left/12px 100% no-repeat scroll,
radial-gradient(farthest-side at 100% 50%,#0003,#0000) right/12px 100% no-repeat scroll}
table{border-collapse:collapse;font-size:.8em;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e3e3;padding:.25em .5em;text-align:left;vertical-align:top}
th{border-bottom:2px solid #999}th.num,td.num{text-align:right}
code{background:#f4f4f4;padding:0 .2em}
figcaption{font-size:.9em;color:#444;margin-top:.3em}
blockquote.note{margin:1em 0;padding:.6em 1em;background:#fff4e0;border-left:4px solid #E69F00}
"""


def _html_page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------
# Optuna


def _optuna_study(root: Path) -> tuple[Any | None, str]:
    """The Optuna study of a store and where it came from, or ``(None, why not)``.

    The journal (``optuna.journal``, an Optuna JournalFileBackend file) is preferred: it
    has the exact search space. It is only read (loading a study appends nothing). The
    study name is the sweep's name (``sweep.toml``, else the manifest's ``sweep``); a
    journal holding one study is read whatever its name. Without a journal the study is
    rebuilt in memory from ``trials.parquet``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = root / "optuna.journal"
    errors = []
    if journal.is_file():
        try:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(str(journal)))
            names = optuna.get_all_study_names(storage)
            want = _sweep_name(root)
            name = want if want in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise ValueError(f"no study named {want!r} among {names}")
            return optuna.load_study(study_name=name, storage=storage), \
                f"`optuna.journal` (study {name!r})"
        except Exception as e:  # noqa: BLE001 - a broken journal is a note, not a crash
            errors.append(f"optuna.journal unreadable ({type(e).__name__}: {e})")
    trials = root / "trials.parquet"
    if trials.is_file():
        try:
            return _study_from_trials(pd.read_parquet(trials)), "`trials.parquet`"
        except Exception as e:  # noqa: BLE001
            errors.append(f"trials.parquet unreadable ({type(e).__name__}: {e})")
    return None, "; ".join(errors)


def _sweep_name(root: Path) -> str | None:
    try:
        return str(tomllib.loads((root / "sweep.toml").read_text())["name"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return str(store.read_manifest(root).get("sweep"))
    except (OSError, ValueError):
        return None


def _intermediate(v: Any, steps: Any = None) -> dict[int, float]:
    """Intermediate values from a trials.parquet cell: ``study.sweeps.optuna`` writes two list
    columns, ``intermediate_values`` with its ``intermediate_steps``; a mapping, a list of
    (step, value) pairs or JSON text of either is read too. Non-finite values are dropped.
    """
    import json

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return {}
    if isinstance(v, str):
        v = json.loads(v) if v.strip() else {}
    if isinstance(v, Mapping):
        items = list(v.items())
    else:
        seq = list(v)
        if seq and all(np.ndim(x) == 0 and not isinstance(x, Mapping) for x in seq):
            if steps is None or len(list(steps)) != len(seq):
                raise ValueError("intermediate_values is a list of numbers without an "
                                 "intermediate_steps list of the same length")
            items = list(zip(list(steps), seq, strict=True))
        else:
            items = [(p["step"], p["value"]) if isinstance(p, Mapping) else tuple(p)
                     for p in seq]
    return {int(k): float(x) for k, x in items if x is not None and np.isfinite(float(x))}


def _study_from_trials(df: pd.DataFrame) -> Any:
    """An in-memory Optuna study (maximising) rebuilt from ``trials.parquet`` rows.

    The search space is not stored there, so each parameter's distribution is inferred
    from the values seen: numbers span their observed range (log scale when positive over
    two decades or more), anything else is categorical.
    """
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    from optuna.trial import TrialState, create_trial

    pcols = [c for c in df.columns if c.startswith("param_")]
    dists: dict[str, Any] = {}
    for c in pcols:
        s = df[c].dropna()
        name = c[len("param_"):]
        if s.empty:
            continue
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            dists[name] = CategoricalDistribution(sorted({str(x) for x in s}))
        else:
            lo, hi = float(s.min()), float(s.max())
            log = lo > 0 and hi / lo >= 100
            if pd.api.types.is_integer_dtype(s):
                dists[name] = IntDistribution(int(lo), max(int(hi), int(lo) + 1), log=log)
            else:
                dists[name] = FloatDistribution(lo, hi if hi > lo else lo + abs(lo) + 1.0,
                                                log=log)
    inter_col = next((c for c in ("intermediate_values", "intermediate") if c in df), None)
    study = optuna.create_study(direction="maximize")
    states = {s.name: s for s in TrialState}
    for row in df.sort_values("number").to_dict("records"):
        state = states.get(str(row.get("state", "COMPLETE")).upper(), TrialState.COMPLETE)
        params, pd_ = {}, {}
        for c in pcols:
            name = c[len("param_"):]
            v = row[c]
            if name not in dists or v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            if isinstance(dists[name], CategoricalDistribution):
                v = str(v)
            elif isinstance(dists[name], IntDistribution):
                v = int(v)
            else:
                v = float(v)
            params[name], pd_[name] = v, dists[name]
        value = row.get("value")
        ok = value is not None and np.isfinite(float(value))
        if state == TrialState.COMPLETE and not ok:
            state = TrialState.FAIL
        if state == TrialState.RUNNING or state == TrialState.WAITING:
            state = TrialState.FAIL  # a finished study file cannot hold live trials
        study.add_trial(create_trial(
            state=state, value=float(value) if state == TrialState.COMPLETE else None,
            params=params, distributions=pd_,
            intermediate_values=(_intermediate(row.get(inter_col), row.get("intermediate_steps"))
                                 if inter_col else {}),
        ))
    return study


# --------------------------------------------------------------------------------------
# the report


def _fig_block(n: int, stem: str, alt: str, caption: str) -> str:
    return (f"![{alt}](figures/{stem}.png)\n\n*Figure {n}.* {caption} "
            f"([SVG](figures/{stem}.svg), [PNG](figures/{stem}.png))\n")


def _downloads(stem: str, exts: Sequence[str]) -> str:
    return "Download: " + ", ".join(f"[{e.upper()}](tables/{stem}.{e})" for e in exts) + "."


def build_report(
    results_dir: str | Path,
    out: str | Path | None = None,
    *,
    top: int = 5,
    metric: str = "final_return",
    max_panels: int = 24,
) -> ReportResult:
    """Analyse the store at ``results_dir`` and write the report to ``out``.

    ``out`` defaults to ``results_dir/report``; an existing report there is replaced as a
    whole at the end (a directory that is not a report is refused). ``top`` configs get
    the learning-curve figures; ``metric`` ranks configs and is the y of the distribution
    and sensitivity figures; the small multiples show at most ``max_panels`` configs.
    Raises :class:`~study.config.ConfigError` (nothing written) for bad input.
    """
    timer = _Timer()
    root = Path(results_dir)
    out_dir = Path(out) if out is not None else root / "report"
    if top < 1:
        raise ConfigError(f"--top {top} is invalid: expected an integer >= 1")
    if max_panels < 1:
        raise ConfigError(f"--max-panels {max_panels} is invalid: expected an integer >= 1")
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is invalid: expected one of "
                          f"{', '.join(METRICS)}")
    with timer("load store"):
        runs = store.load_runs(root)  # StoreError (a ConfigError) if not a store or empty
        curves = store.load_curves(root, allow_empty=True)
    # The tables' run values: diverged and pruned runs have none, auc is the curve's mean.
    values = tables.run_metric(runs, curves if len(curves) else None, metric).to_numpy(float)
    if not np.isfinite(values).any():
        raise ConfigError(f"{root}: metric {metric} has no data (no run has a finite value)")
    _check_out(root, out_dir)

    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        with warnings.catch_warnings():
            # All-NaN steps and empty slices are expected (NaN means "no value" here).
            warnings.simplefilter("ignore", RuntimeWarning)
            result = _write_report(root, tmp, runs, curves, values, metric, top, max_panels,
                                   timer)
        with timer("publish"):
            _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(out_dir / p.relative_to(tmp) for p in result.files)
    return ReportResult(out_dir, files, timer.t, result.notes)


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished report into place: two renames, the old report kept until then."""
    (tmp / MARKER).write_text("written by python -m study.report; replaced as a whole\n")
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a report is meant to be shared
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class _Page:
    """The report being written: its Markdown, files, notes and figure counter."""

    out: Path
    timer: _Timer
    md: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fig_classes: dict[str, str] = field(default_factory=dict)
    nfig: int = 0

    def write(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        self.files.append(path)

    def figure(self, fig: Any, stem: str, alt: str, caption: str) -> None:
        """Save ``fig`` and add it, numbered and captioned, to the Markdown."""
        with self.timer(f"figure: {stem}"):
            paths = figures.save_figure(fig, self.out / "figures", stem)
        self.files.extend(paths)
        png = next(p for p in paths if p.suffix == ".png")
        if _png_width(png) < 0.75 * figures.TEXT_WIDTH * figures.PNG_DPI:
            self.fig_classes[f"figures/{stem}.png"] = "col"
        self.nfig += 1
        self.md.append(_fig_block(self.nfig, stem, alt, caption))


def _png_width(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[16:20], "big")  # the IHDR chunk's width


@dataclass
class _Data:
    """The store's runs and everything computed from them once."""

    root: Path
    name: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    values: np.ndarray
    metric: str
    hps: list[str]  # hyperparameters that differ (sensitivity)
    labels: dict[str, str]
    rep: failures.FailureReport
    table: pd.DataFrame
    rendered: dict[str, str]
    ranked: list[str]  # config ids, best first (the tuning table's order in Optuna stores)
    cls: pd.DataFrame
    fig_mask: np.ndarray  # the runs the figures show (tuning runs of an Optuna study)


def _write_report(root: Path, out: Path, runs: pd.DataFrame, curves: pd.DataFrame,
                  values: np.ndarray, metric: str, top: int, max_panels: int,
                  timer: _Timer) -> ReportResult:
    (out / "figures").mkdir()
    (out / "tables").mkdir()
    page = _Page(out, timer)
    data = _analyse(root, runs, curves, values, metric, page)  # timed stage by stage
    _header(page, data)
    if data.runs["env"].nunique() > 1:
        _aggregate_section(page, data)
    _curves_section(page, data, top, max_panels)
    _seeds_section(page, data)
    _distribution_section(page, data)
    _sensitivity_section(page, data)
    _tables_section(page, data)
    if (root / "trials.parquet").is_file() or (root / "optuna.journal").is_file():
        _optuna_section(page, root)
    md = page.md
    if page.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in page.notes] + [""]
    md.append(f"*Generated by `python -m study.report` from `{root.name}`.*")
    text = "\n".join(md).rstrip() + "\n"
    with timer("markdown and html"):
        page.write(out / "report.md", text)
        page.write(out / "index.html", _html_page(f"Sweep report: {data.name}",
                                                  markdown_to_html(text, page.fig_classes)))
    return ReportResult(out, page.files, timer.t, page.notes)


def _analyse(root: Path, runs: pd.DataFrame, curves: pd.DataFrame, values: np.ndarray,
             metric: str, page: _Page) -> _Data:
    """The failure report and seed table(s), written to tables/, and the ranking."""
    tab_dir = page.out / "tables"
    hps_all = failures.hyperparameter_columns(runs)
    name = _sweep_name(root) or root.name
    with page.timer("failure report"):
        rep = failures.failure_report(runs, curves if len(curves) else None, source=name)
        rep.per_run.to_csv(tab_dir / "failures_per_run.csv", index=False)
        page.files.append(tab_dir / "failures_per_run.csv")
        pc = rep.per_config
        page.write(tab_dir / "failures_per_config.csv", pc.to_csv(index=False))
        page.write(tab_dir / "failures_per_config.md", _df_markdown(pc))
        page.write(tab_dir / "failures_per_config.tex", _df_latex(pc))
        page.write(tab_dir / "trapped_by_hyperparameter.csv",
                   rep.by_hyperparameter.to_csv(index=False))
    with page.timer("seed table"):
        table = tables.seed_table(runs, curves if len(curves) else None, metric=metric,
                                  classification=rep.per_run)
        rendered = {ext: tables.format_table(table, fmt)
                    for ext, fmt in (("md", "markdown"), ("csv", "csv"), ("tex", "latex"))}
        for ext, text in rendered.items():
            page.write(tab_dir / f"seed_table.{ext}", text)
    fig_mask = np.ones(len(runs), dtype=bool)
    ranking = table
    if "phase" in table:  # an Optuna study with held-out runs: figures show the tuning
        fig_mask = (runs["phase"].fillna("").astype(str) == "tune").to_numpy()
        ranking = table[table["phase"] == "tune"]
    cfg_all = sorted(runs["config_id"].astype(str)[fig_mask].unique())
    ranked = [str(c) for c in ranking["config_id"] if str(c) in set(cfg_all)]
    ranked += [c for c in cfg_all if c not in set(ranked)]
    cls = rep.per_run.assign(classification=rep.per_run["classification"].astype(str))
    return _Data(root, name, runs, curves, values, metric, [h for h in hps_all if h in NAMES],
                 failures.config_labels(runs, hps_all), rep, table, rendered, ranked, cls,
                 fig_mask)


def _header(page: _Page, d: _Data) -> None:
    runs, metric = d.runs, d.metric
    env = ", ".join(sorted(runs["env"].astype(str).unique())) if "env" in runs else "?"
    seeds = runs[d.fig_mask].groupby("config_id").size()
    n_cfg = runs["config_id"].nunique()
    hps = d.hps
    md = page.md
    md += [f"# Sweep report: {d.name}", ""]
    note = failures.incomplete_note(d.root)
    if note:
        md += [f"> **{note}**", ""]
        page.notes.append(note)
    md += [f"{len(runs):,} runs of {env} in {n_cfg} configs "
           f"({seeds.min()}{'' if seeds.min() == seeds.max() else f'-{seeds.max()}'} seeds "
           f"each); every table and figure ranks configs by the **IQM of {metric}** "
           "(interquartile mean over seeds; ties: median), best first"
           + (f"; hyperparameters that differ: {', '.join(f'`{h}`' for h in hps)}."
              if hps else "; a single config."), ""]
    budget = failures.budget_note(runs)
    if budget:
        md += [f"> {budget}", ""]
    if "phase" in d.table:
        md += [_optuna_phases(d), ""]
    md += _no_final_sentence(runs)


def _no_final_sentence(runs: pd.DataFrame) -> list[str]:
    status = runs["status"].astype(str)
    fin = runs["final_return"].to_numpy(float)
    k = int(((~np.isfinite(fin)) & ~status.isin(["diverged", "pruned"]).to_numpy()).sum())
    if not k:
        return []
    return [f"{k} run{'s' if k > 1 else ''} with status ok ha{'ve' if k > 1 else 's'} no final "
            "return (no episode finished in the last 10% of steps). Such a run is not "
            "diverged (only the trainer's status says so): it counts among its config's "
            "seeds (\"4 of 5\") but in no statistic of the final return, and is labelled by "
            "its curve like any other.", ""]


def _optuna_phases(d: _Data) -> str:
    """What an Optuna report shows where, and which config best.toml names."""
    runs = d.runs
    phase = runs["phase"].fillna("").astype(str)
    tune, conf = runs[phase == "tune"], runs[phase == "confirm"]
    text = (f"An Optuna study: {len(tune):,} tuning runs ({tune['config_id'].nunique()} "
            f"configs on the tuning seeds) and {len(conf):,} held-out confirmation runs "
            f"({conf['config_id'].nunique()} configs on {conf['seed'].nunique()} test seeds). "
            "The figures show the tuning runs; the seed tables below rank tuning and held-out "
            "results apart, the confirmation by its held-out seeds only.")
    winner = _best_toml_trial(d.root)
    if winner is not None and "trial_number" in conf:
        cid = conf.loc[conf["trial_number"] == winner, "config_id"]
        if len(cid):
            c = str(cid.iloc[0])
            text += (f" `best.toml` names trial {winner} ({d.labels.get(c, c)}), the best on "
                     "the test seeds by the study's own objective (diverged test runs scored "
                     "at their lowest logged return); the confirmation table ranks by IQM with "
                     "diverged runs left out, so the two can differ only by the objective or "
                     "a diverged run.")
    return text


def _best_toml_trial(root: Path) -> int | None:
    try:
        head = (root / "best.toml").read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.search(r"trial (\d+)", head)
    return int(m.group(1)) if m else None


#: Bootstrap replicates of the cross-task table (study.aggregate's default); its figures
#: use at most 1000, as study.aggregate's do.
AGGREGATE_BOOT = 2000
#: Rows of the cross-task table shown on the page (all of them in its CSV).
AGGREGATE_ROWS = 20


def _aggregate_phases(runs: pd.DataFrame) -> list[str | None]:
    """The run sets to aggregate: the store's runs (a grid), or an Optuna study's
    held-out confirmation runs (if any) and its tuning runs."""
    if "phase" not in runs or not runs["phase"].notna().any():
        return [None]
    has_confirm = runs["phase"].fillna("").astype(str).eq("confirm").any()
    return ["confirm", "tune"] if has_confirm else ["tune"]


def _aggregate_section(page: _Page, d: _Data) -> None:
    """Across tasks (a store of several envs): study.aggregate's table with its CIs, the
    performance profiles and the sample-efficiency curves, from the store alone."""
    from study.analysis import aggregate

    page.md += ["## Across tasks", "",
                "Normalized scores, `(final_return - low) / (high - low)` with each env's "
                "score references (0 = a random policy, 1 = solved), aggregated over every "
                "(task, seed) pair per config as `python -m study.aggregate` does (Agarwal et "
                "al. 2021): IQM, median, mean and optimality gap with 95% stratified bootstrap "
                "CIs, strata = tasks.", ""]
    drawn = False
    for phase in _aggregate_phases(d.runs):
        with page.timer(f"aggregate: {phase or 'table'}"):
            try:
                sel, what = aggregate.study_runs(d.runs, phase)
                matrices, tasks, axes = aggregate.score_matrices(sel)
            except ConfigError as e:
                page.md += [f"Not aggregated ({phase or 'runs'}): {e}.", ""]
                page.notes.append(f"aggregate: {e}")
                continue
            table = aggregate.aggregate_table(matrices, axes, n_boot=AGGREGATE_BOOT)
            note = aggregate.table_note(matrices, tasks, table, AGGREGATE_BOOT, what)
        stem = "aggregate" if phase in (None, "tune") else f"aggregate_{phase}"
        for ext, fmt in (("csv", "csv"), ("md", "markdown"), ("tex", "latex")):
            page.write(page.out / "tables" / f"{stem}.{ext}", aggregate.render(table, fmt, note))
        shown = table.head(AGGREGATE_ROWS)
        more = (f" The top {AGGREGATE_ROWS} of {len(table)} configs; all in the CSV."
                if len(table) > AGGREGATE_ROWS else "")
        page.md += [aggregate.render(shown, "markdown", note + "." + more).rstrip(), "",
                    _downloads(stem, ("csv", "md", "tex")), ""]
        if not drawn and phase != "confirm":
            _aggregate_figures(page, d, sel, matrices, tasks, axes)
            drawn = True


def _aggregate_figures(page: _Page, d: _Data, runs: pd.DataFrame,
                       matrices: dict[tuple, np.ndarray], tasks: Sequence[str],
                       axes: Sequence[str]) -> None:
    """Performance profiles and sample-efficiency curves of the best configs."""
    import matplotlib

    from study.analysis import aggregate

    size = (figures.COLUMN_WIDTH, 2.6)
    n_boot = min(AGGREGATE_BOOT, 1000)
    with page.timer("aggregate: profiles"), matplotlib.rc_context(figures.STYLE):
        fig = aggregate.profile_figure(matrices, axes, n_boot, size=size)
    page.figure(fig, "aggregate_profiles", "performance profiles",
                "Performance profiles of the best configs by IQM: the fraction of runs (over "
                "tasks and seeds) whose normalized score exceeds tau, with 95% stratified "
                "bootstrap bands.")
    if d.curves.empty:
        return
    try:
        refs = aggregate.score_references(d.root, tasks)
    except ConfigError as e:
        page.notes.append(f"sample efficiency: {e}")
        return
    with page.timer("aggregate: efficiency"):
        eff = aggregate.efficiency_curves(runs, d.curves, axes, refs, n_boot)
    if eff.empty:
        page.notes.append("sample efficiency: no fraction of the budget is reached by every "
                          "(task, seed) pair of a config")
        return
    page.write(page.out / "tables" / "aggregate_efficiency.csv", eff.to_csv(index=False))
    with matplotlib.rc_context(figures.STYLE):
        fig = aggregate.efficiency_figure(eff, axes, size=size)
    page.figure(fig, "aggregate_efficiency", "sample-efficiency curves",
                "Sample efficiency: the IQM of the normalized training return (episode returns "
                "at log points) against the fraction of each env's budget, with 95% "
                "stratified bootstrap bands "
                "([CSV](tables/aggregate_efficiency.csv)).")


def _curves_section(page: _Page, d: _Data, top: int, max_panels: int) -> None:
    md = page.md
    md += ["## Learning curves", ""]
    if d.curves.empty:
        md += ["The store has no curves: no learning-curve figures.", ""]
        page.notes.append("no curves in the store")
        return
    top_ids = d.ranked[:top]
    runs = d.runs[d.fig_mask]
    with page.timer("curve aggregation"):
        # Median and IQR only: one bootstrap replicate, since the IQM band is not drawn
        # for the whole grid (a full bootstrap of every config would dominate the report's
        # run time); the top configs get a real one below.
        agg = curves_mod.learning_curves(runs, d.curves, n_boot=1)
        top_runs = runs[runs["config_id"].astype(str).isin(top_ids)]
        agg_iqm = curves_mod.aggregate_curves(top_runs, d.curves, "episode_return",
                                              n_boot=IQM_BOOT)
    with page.timer("figure: learning_curves"):
        fig = figures.learning_curves_figure(agg, top_ids, d.labels)
    evals = "; evaluation returns below" if (agg["metric"] == "eval_return").any() else ""
    page.figure(fig, "learning_curves", "median learning curves of the top configs",
                f"The {len(top_ids)} best configs by IQM of {d.metric}: median episode return "
                f"over seeds (line) and inter-quartile range (band) against environment "
                f"steps{evals}.")
    with page.timer("figure: learning_curves_iqm"):
        fig = figures.learning_curves_figure(agg_iqm, top_ids, d.labels, center="iqm")
    page.figure(fig, "learning_curves_iqm", "IQM learning curves of the top configs",
                "The same configs: interquartile mean over seeds with a 95% stratified "
                f"bootstrap interval ({IQM_BOOT:,} resamples of whole curves, seeded).")
    with page.timer("figure: small_multiples"):
        fig = figures.small_multiples_figure(agg, d.ranked, d.labels, max_panels=max_panels)
    shown = min(len(d.ranked), max_panels)
    page.figure(fig, "small_multiples", "learning curves of every config",
                f"Median and IQR of the episode return per config, best first by IQM "
                f"({shown} of {len(d.ranked)} configs"
                + ("; raise --max-panels to see more" if shown < len(d.ranked) else "")
                + "); grey: the best config, for reference.")
    md.append("")


def _seeds_section(page: _Page, d: _Data) -> None:
    page.md += ["## Seeds of one config", ""]
    shown = d.cls[d.cls["config_id"].isin(d.ranked)]
    rank_of = {c: i for i, c in enumerate(d.ranked)}
    pick, why = d.ranked[0], "the best config (no config has trapped or collapsed runs)"
    for label in ("trapped", "collapsed"):  # a trap tells the most; then a collapse
        n = (shown["classification"] == label).groupby(shown["config_id"]).sum()
        if (n > 0).any():
            pick = min(n[n == n.max()].index, key=lambda c: rank_of.get(c, 0))
            why = f"the config with the most {label} runs ({int(n[pick])})"
            break
    if d.curves.empty:
        page.md += ["No curves to draw.", ""]
        return
    sub = d.cls[d.cls["config_id"] == pick]
    with page.timer("figure: seed_curves"):
        fig = figures.seed_curves_figure(d.curves, sub, d.labels.get(pick, pick))
    page.figure(fig, "seed_curves", "every seed of one config",
                f"Every seed of {d.labels.get(pick, pick)}, {why}, coloured by its failure "
                "class (study.failures); open circles: where a trapped run plateaued. The "
                "lower panel shows policy entropy, which collapses in trapped runs.")
    page.md.append("")


def _distribution_section(page: _Page, d: _Data) -> None:
    page.md += ["## Final-return distributions", ""]
    rep, metric = d.rep, d.metric
    trapped_modes = [(t.config_id, t.mode.index) for t in rep.trapped_levels]
    rows = _distribution_rows(d.ranked, {c for c, _ in trapped_modes})
    runs = d.runs[d.fig_mask]
    vals = pd.DataFrame({"config_id": runs["config_id"].astype(str).to_numpy(),
                         "run_id": runs["run_id"].astype(str).to_numpy(),
                         "value": d.values[d.fig_mask]})
    vals = vals.merge(d.cls[["run_id", "classification"]], on="run_id", how="left")
    with page.timer("figure: final_distribution"):
        fig = figures.final_distribution_figure(vals, rows, d.labels, modes=rep.modes,
                                                trapped_modes=trapped_modes, metric=metric)
    page.figure(
        fig, "final_distribution", f"{metric} per config",
        f"{metric} of every seed (points, coloured by failure class) with a box plot "
        "(median, quartiles, whiskers at 1.5 IQR) per config, best by IQM at the top"
        + (f" ({len(rows)} of {len(d.ranked)} configs: the best, and every config with a "
           "trapped mode)" if len(rows) < len(d.ranked) else "")
        + ". Shaded bands: the modes found in configs with more than one (range of their "
        "seeds, tick at the level); vermillion: trapped modes.")
    page.md.append("")


def _sensitivity_section(page: _Page, d: _Data) -> None:
    page.md += ["## Hyperparameter sensitivity", ""]
    if not d.hps:
        page.md += ["No hyperparameter varies in this store.", ""]
        return
    runs = d.runs[d.fig_mask]
    sv = runs[["config_id", *d.hps]].assign(value=d.values[d.fig_mask])
    with page.timer("figure: sensitivity"):
        fig = figures.sensitivity_figure(sv, d.hps, metric=d.metric)
    page.figure(fig, "sensitivity", "hyperparameter sensitivity",
                f"{d.metric} against each hyperparameter that varies: median (markers) and "
                "IQR (error bars) over every run with that value, i.e. over seeds and all "
                "other hyperparameters; grey dots: each config's median. Learning rates on a "
                "log axis.")
    page.md.append("")


def _tables_section(page: _Page, d: _Data) -> None:
    md = page.md
    md += ["## Seed table", "", d.rendered["md"].rstrip(), "",
           _downloads("seed_table", ("csv", "md", "tex")), ""]
    # Its notes (budgets) are already at the top of the page.
    md += [_shift_headings(dataclasses.replace(d.rep, notes=[]).markdown()).rstrip(), ""]
    if (d.root / store.POLICIES_DIR).is_dir():
        with page.timer("figure: agents"):
            agents = _agent_filmstrips(d.root, d.runs, d.cls, d.ranked, d.labels, page.notes)
        if agents is not None:
            fig, caption, alt = agents
            page.figure(fig, "agents", alt, caption)
    md += ["Per-run classifications: [CSV](tables/failures_per_run.csv); per config: "
           + ", ".join(f"[{e.upper()}](tables/failures_per_config.{e})"
                       for e in ("csv", "md", "tex"))
           + "; trapped rate by hyperparameter value: "
           "[CSV](tables/trapped_by_hyperparameter.csv).", ""]


_OPTUNA_CAPTIONS = {
    "optuna_history": "Optimisation history: each completed trial's objective (dots) and "
                      "the best so far (line).",
    "optuna_importances": "Hyperparameter importances (Optuna's default evaluator, fANOVA): "
                          "each parameter's share of the objective's variance.",
    "optuna_intermediate": "Intermediate values reported by each trial (the objective over "
                           "its seeds at each log point), as seen by the pruner, coloured by "
                           "how the trial ended.",
}


def _optuna_section(page: _Page, root: Path) -> None:
    page.md += ["## Optuna study", ""]
    with page.timer("optuna: load"):
        study, source = _optuna_study(root)
    if study is None:
        page.md += [f"The Optuna results could not be read: {source}.", ""]
        page.notes.append(f"optuna: {source}")
        return
    with page.timer("optuna: figures"):
        figs, fnotes = figures.optuna_figures(study)
    page.md += [f"Read from {source}: {len(study.trials)} trials.", ""]
    for stem, cap in _OPTUNA_CAPTIONS.items():
        if stem in figs:
            page.figure(figs[stem], stem, stem.replace("_", " "), cap)
        else:
            page.md += [f"*{cap.split(':')[0]}: not drawn* ({fnotes[stem]}).", ""]
            page.notes.append(f"{stem}: {fnotes[stem]}")
    page.md.append("")


#: Frames per agent in the side-by-side agents figure (two rows of three).
AGENT_FRAMES = 6
#: Greedy episodes (resets 0..N-1) played per agent; the figure shows the median one.
AGENT_RESETS = 9


def _pick_agents(root: Path, cls: pd.DataFrame,
                 ranked: Sequence[str]) -> tuple[str, pd.Series, pd.Series] | None:
    """Two runs with saved policies to show side by side: ``("trapped", trapped, ok)``,
    else ``("modes", lower, top)``, else None.

    A trapped and a successful run come from the same config when one has both (the one
    with the most trapped runs, best ranked first); else from the best-ranked config with
    a trapped run and the best-ranked one with a success. The trapped run is the median of
    its config's trapped runs by final return (a typical trap), the successful one the
    config's best ok run. Without traps, the best-ranked config whose ok runs fall into
    several modes gives the median run of its lowest mode and the best of its top mode
    (a plateau half-way, next to the runs that went further).
    """
    saved = {p.stem for p in (root / store.POLICIES_DIR).glob("*.npz")}
    c = cls[cls["run_id"].astype(str).isin(saved)]
    trapped = c[c["classification"] == "trapped"]
    untrapped = c[(c["classification"].isin(["ok", "learning"]))
                  & np.isfinite(c["final_return"].astype(float))]
    ok = untrapped[untrapped["classification"] == "ok"]
    rank = {cid: i for i, cid in enumerate(ranked)}

    def first(cids: Iterable[str]) -> str:
        return min(cids, key=lambda k: (rank.get(k, len(rank)), k))

    def median_of(df: pd.DataFrame) -> pd.Series:
        df = df.sort_values(["final_return", "seed"], kind="stable")
        return df.iloc[(len(df) - 1) // 2]

    def best_of(df: pd.DataFrame) -> pd.Series:
        return df.sort_values(["final_return", "seed"], ascending=[False, True],
                              kind="stable").iloc[0]

    if not trapped.empty and not ok.empty:
        n_trapped = trapped["config_id"].astype(str).value_counts()
        both = set(n_trapped.index) & set(ok["config_id"].astype(str))
        if both:
            cid = min(both, key=lambda k: (-n_trapped[k], rank.get(k, len(rank)), k))
            t_cid = o_cid = cid
        else:
            t_cid = first(n_trapped.index)
            o_cid = first(set(ok["config_id"].astype(str)))
        return ("trapped", median_of(trapped[trapped["config_id"].astype(str) == t_cid]),
                best_of(ok[ok["config_id"].astype(str) == o_cid]))
    moded = untrapped[untrapped["mode"].notna()]
    n_modes = moded.groupby(moded["config_id"].astype(str))["mode"].nunique()
    several = n_modes[n_modes >= 2].index
    if len(several) == 0:
        return None
    mine = moded[moded["config_id"].astype(str) == first(several)]
    modes = mine["mode"].astype(int)
    return ("modes", median_of(mine[modes == modes.min()]), best_of(mine[modes == modes.max()]))


def _agent_filmstrips(root: Path, runs: pd.DataFrame, cls: pd.DataFrame,
                      ranked: Sequence[str], labels: Mapping[str, str],
                      notes: list[str]) -> tuple[Any, str, str] | None:
    """The filmstrips of two agents side by side (see :func:`_pick_agents`), a caption and
    the figure's alt text.

    None if the store has no such pair of runs with saved policies, or (with a note) if
    their episodes cannot be replayed (e.g. a store whose policies lack the observation
    statistics of a normalize_obs run).
    """
    from study.report import render

    for env in sorted({str(e) for e in runs["env"].unique()}):
        if (module := env_module(env)) is not None:
            # The report reads data only: replaying would import (run) the store's module.
            notes.append(f"agents filmstrip not drawn: the env {env!r} imports the module "
                         f"{module!r}, and study.report never imports code a store names; "
                         f"draw a run with python -m study.render {root} --run RUN_ID")
            return None
    picked = _pick_agents(root, cls, ranked)
    if picked is None:
        return None
    kind, left, right = picked
    names = ("trapped", "successful") if kind == "trapped" else ("lowest mode", "top mode")
    strips = []
    spans: list[str] = []
    try:
        for what, row in zip(names, (left, right), strict=True):
            policy = render.load_policy(root, str(row["run_id"]))
            # A policy can succeed from one start and fail from another: show its median
            # episode over AGENT_RESETS starts, and say how the others went.
            returns = [float(render.play_episode(policy, seed=k).rewards.sum())
                       for k in range(AGENT_RESETS)]
            order = sorted(range(AGENT_RESETS), key=lambda k: (returns[k], k))
            reset = order[(AGENT_RESETS - 1) // 2]
            strip = render.episode_filmstrip(policy, AGENT_FRAMES, seed=reset)
            strip.title = (f"{what}: seed {policy.seed}, reset {reset}, return "
                           f"{returns[reset]:.1f}")
            strips.append(strip)
            spans.append(f"{min(returns):.1f} to {max(returns):.1f}")
    except Exception as e:  # noqa: BLE001 - a replay that fails is a note, not a crash
        notes.append(f"agents filmstrip not drawn: {' '.join(str(e).split())}")
        return None
    ncols = math.ceil(AGENT_FRAMES / 2)
    panel = (figures.TEXT_WIDTH - figures.FILMSTRIP_GAP_IN) / (2 * ncols)
    left_color = figures.CLASS_COLORS["trapped" if kind == "trapped" else "learning"]
    fig = figures.filmstrip_figure([(s.title, s.frames, s.labels) for s in strips], ncols,
                                   panel_width=panel,
                                   colors=[left_color, figures.CLASS_COLORS["ok"]])
    same = str(left["config_id"]) == str(right["config_id"])

    def cfg(row: pd.Series) -> str:
        return labels.get(str(row["config_id"]), str(row["config_id"]))

    def run(row: pd.Series, side: str) -> str:
        return (f"`{row['run_id']}` ({side}, seed {row['seed']}, final training return "
                f"{failures.fmt_number(float(row['final_return']), 1)})")

    tail = (f"each the median of its {AGENT_RESETS} greedy episodes from resets 0-"
            f"{AGENT_RESETS - 1} (returns {spans[0]} on the left, {spans[1]} on the right); "
            f"{AGENT_FRAMES} frames evenly spaced over each episode, labelled with the step "
            "and the return so far. "
            f"`python -m study.render RESULTS_DIR --run {left['run_id']} --out agent.gif` "
            "animates it.")
    if kind == "trapped":
        where = (f"of the same config ({cfg(left)})" if same
                 else f"(configs {cfg(left)} and {cfg(right)}; no config has both)")
        caption = (f"What a trapped agent does: one episode of the final deterministic "
                   f"policy of a trapped run {run(left, 'left')} and of a successful run "
                   f"{run(right, 'right')} {where}: {tail}")
        return fig, caption, "a trapped and a successful agent"
    caption = (f"No run is trapped, but the seeds of config {cfg(left)} end in several "
               f"modes. One episode of the final deterministic policy of a typical run of "
               f"its lowest mode {run(left, 'left')} and of the best run of its top mode "
               f"{run(right, 'right')}: {tail}")
    return fig, caption, "an agent of the lowest mode and one of the top mode"


def _distribution_rows(ranked: Sequence[str], trapped: set[str]) -> list[str]:
    """Configs for the distribution figure: all, or the best plus every trapped one."""
    if len(ranked) <= MAX_DISTRIBUTION_ROWS:
        return list(ranked)
    keep = [c for c in ranked if c in trapped][: MAX_DISTRIBUTION_ROWS // 2]
    for c in ranked:
        if len(keep) >= MAX_DISTRIBUTION_ROWS:
            break
        if c not in keep:
            keep.append(c)
    order = {c: i for i, c in enumerate(ranked)}
    return sorted(keep, key=order.__getitem__)


# --------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.report RESULTS_DIR [--out DIR] [--top K] [--metric M]``."""
    from study.cli_util import ArgumentParser, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = ArgumentParser(
            prog="python -m study.report",
            description="Write an offline HTML + Markdown report (figures, seed table, "
                        "failure analysis) of a results store; configs ranked by IQM.")
        ap.add_argument("results_dir", help="a results store written by a sweep")
        ap.add_argument("--out", metavar="DIR",
                        help="report directory (default RESULTS_DIR/report)")
        ap.add_argument("--top", metavar="K", type=int, default=5,
                        help="configs in the learning-curve figures (default 5)")
        ap.add_argument("--metric", choices=METRICS, default="final_return",
                        help="the metric whose IQM ranks configs (default final_return)")
        ap.add_argument("--max-panels", metavar="N", type=int, default=24,
                        help="at most N configs in the small multiples (default 24)")
        args = ap.parse_args(args_in)
        res = build_report(args.results_dir, args.out, top=args.top, metric=args.metric,
                           max_panels=args.max_panels)
        n_fig = sum(1 for p in res.files if p.suffix == ".png")
        print(f"wrote {res.out / 'index.html'} ({n_fig} figures, "
              f"{sum(1 for p in res.files if p.parent.name == 'tables')} tables)")
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

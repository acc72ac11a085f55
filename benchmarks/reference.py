"""Run one replication sweep and write its reference files into results/reference/<stem>/.

    python benchmarks/reference.py sweeps/gae_cartpole_v1.toml [study.grid options ...]
    python benchmarks/reference.py sweeps/gae_cartpole_v1.toml --analyse-only

Runs ``python -m study.grid SWEEP --fresh [options]`` (timed), then writes the seed table
(Markdown and CSV), the failure report and the report's key figures next to
``timing.json`` (wall time, env steps, options). The Parquet store stays in
``results/<sweep name>/`` (git-ignored). ``--analyse-only`` redoes the tables, report and
figures from that store and keeps ``timing.json``.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

FIGURES = ("learning_curves", "seed_curves", "sensitivity", "agents")


def _run(*args: str, stdout: Path | None = None) -> None:
    cmd = [sys.executable, "-m", *args]
    with open(stdout, "w") if stdout else open("/dev/null", "w") as out:
        subprocess.run(cmd, check=True, stdout=out if stdout else None)


def _analyse(store: Path, ref: Path) -> None:
    import pandas as pd

    if pd.read_parquet(store / "runs", columns=["env"])["env"].nunique() > 1:
        # A study across environments: the aggregate table is its seed table.
        _run("study.aggregate", str(store), "--importance", "--out", str(ref / "aggregate.md"),
             "--figure", str(ref / "performance_profiles.png"),
             "--efficiency", str(ref / "sample_efficiency.png"))
        _run("study.aggregate", str(store), "--format", "csv",
             "--out", str(ref / "aggregate.csv"))
    _run("study.tables", str(store), "--out", str(ref / "seed_table.md"))
    _run("study.tables", str(store), "--format", "csv", "--out", str(ref / "seed_table.csv"))
    _run("study.failures", str(store), stdout=ref / "failures.md")
    report = store / "report"
    _run("study.report", str(store), "--out", str(report))
    for stem in FIGURES:
        src = report / "figures" / f"{stem}.png"
        if src.exists():
            shutil.copyfile(src, ref / f"{stem}.png")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sweep_path = Path(sys.argv[1])
    extra = sys.argv[2:]
    analyse_only = extra == ["--analyse-only"]
    try:
        sweep = tomllib.loads(sweep_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        print(f"error: {sweep_path}: {e}", file=sys.stderr)
        sys.exit(2)
    store = Path("results") / sweep.get("name", "")
    ref = Path("results/reference") / sweep_path.stem

    try:
        if not analyse_only:
            t0 = time.perf_counter()
            _run("study.grid", str(sweep_path), "--fresh", "--quiet", *extra)
            wall = time.perf_counter() - t0
        ref.mkdir(parents=True, exist_ok=True)
        _analyse(store, ref)
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)  # the study command printed its one-line error
    if analyse_only:
        return
    import pandas as pd

    runs = pd.read_parquet(store / "runs")
    timing = {
        "command": f"python -m study.grid {sweep_path} " + " ".join(extra),
        "wall_s": round(wall, 1),
        "runs": len(runs),
        "env_steps": int(runs["total_steps"].sum()),
        "env_steps_per_s": round(float(runs["total_steps"].sum()) / wall),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "numerics": json.loads((store / "manifest.json").read_text())["numerics"],
    }
    (ref / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing))


if __name__ == "__main__":
    main()

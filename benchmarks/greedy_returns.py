"""Greedy (deterministic) returns of every saved policy in a store, next to its training
return: which runs fail with their exploration noise only, and which fail outright.

    python benchmarks/greedy_returns.py RESULTS_DIR [--resets 10] [--out FILE.md]

Each policy plays one episode from each of the resets 0..N-1 (study.report.render.play_episode).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from study import store
from study.cli_util import run_cli
from study.report import render


def greedy_table(root: str, resets: int) -> pd.DataFrame:
    runs = store.load_runs(root)
    rows = []
    for _, run in runs.iterrows():
        policy = render.load_policy(root, str(run["run_id"]))
        returns = np.array([render.play_episode(policy, seed=k).rewards.sum()
                            for k in range(resets)])
        rows.append({"run_id": run["run_id"], "seed": run["seed"],
                     "final_return": run["final_return"], "greedy_median": np.median(returns),
                     "greedy_min": returns.min(), "greedy_max": returns.max()})
    return pd.DataFrame(rows).sort_values(["final_return", "seed"]).reset_index(drop=True)


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Bad input (not a store, a run without a saved policy) is one ``error:`` line, exit 2."""
    return run_cli(_body, argv)


def _body(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir")
    p.add_argument("--resets", type=int, default=10)
    p.add_argument("--out", help="write the Markdown table here too")
    args = p.parse_args(argv)
    table = greedy_table(args.results_dir, args.resets)
    text = (f"Greedy returns over resets 0-{args.resets - 1} of every saved policy in "
            f"`{args.results_dir}` (training final_return: stochastic policy).\n\n"
            + _markdown(table) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

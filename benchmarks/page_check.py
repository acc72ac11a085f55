"""Look at the report page in a real browser: build a report, screenshot it with Chromium.

    python benchmarks/page_check.py                         # synthetic store -> /tmp/page_check
    python benchmarks/page_check.py --store results/quickstart --out /tmp/qs
    python benchmarks/page_check.py --width 800 --height 6000

Builds ``study.report.build`` for a small synthetic store (``benchmarks/analysis.make_store``:
a grid over three hyperparameters with trapped, diverged and still-learning runs, so the
seed table is wide) with an Optuna journal beside it (a small random-search study, so the
Optuna figures are drawn), or for ``--store``, then takes headless Chromium screenshots
of ``index.html``: the whole page at ``--width`` (``page.png``) and at ``--narrow``
(``narrow.png``), each cut into ``--height`` tall slices (``page-N.png``,
``narrow-N.png``). Nothing here checks the pictures: open them and look (wide tables
clipped, figures too small, labels cut off).

Needs Chromium (Debian: ``apt-get install chromium``); ``--chromium`` names another binary.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: The screenshot's height: pages taller than this are cut here.
MAX_HEIGHT = 30000
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars")


def _add_optuna_journal(root: Path, n_trials: int = 12) -> None:
    """A small Optuna study in ``root/optuna.journal`` named like the store's sweep."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("policy_lr", 1e-4, 1e-1, log=True)
        vlr = trial.suggest_float("value_lr", 1e-4, 1e-1, log=True)
        lam = trial.suggest_categorical("lam", [0.95, 1.0])
        target = -abs(math.log10(lr) + 2.5) - 0.3 * abs(math.log10(vlr) + 3) + lam
        for step in range(1, 11):
            trial.report(target - 3.0 / step, step * 1000)
        return target

    study.optimize(objective, n_trials=n_trials)


def _screenshot(chromium: str, url: str, png: Path, width: int, height: int) -> None:
    subprocess.run([chromium, *FLAGS, f"--screenshot={png}", f"--window-size={width},{height}",
                    url], check=True, capture_output=True, timeout=120)


def _slices(full: Path, height: int) -> list[Path]:
    """Cut the whole-page screenshot into ``height`` tall pictures (blank tail dropped)."""
    import numpy as np
    from PIL import Image

    img = Image.open(full).convert("RGB")
    a = np.asarray(img)
    used = np.flatnonzero((a < 250).any(axis=(1, 2)))
    bottom = int(used[-1]) + 20 if used.size else a.shape[0]
    out = []
    for i, top in enumerate(range(0, bottom, height)):
        p = full.with_name(f"{full.stem}-{i}.png")
        img.crop((0, top, a.shape[1], min(top + height, bottom))).save(p)
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", metavar="DIR", help="a results store (default: a synthetic one)")
    ap.add_argument("--out", metavar="DIR", default="/tmp/page_check",
                    help="where the store, report and screenshots go (default /tmp/page_check)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400, help="height of each slice")
    ap.add_argument("--narrow", type=int, default=700,
                    help="width of the second, narrow screenshot (a phone or a side pane)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = ap.parse_args(argv)

    from study.report.build import build_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.store:
        root = Path(args.store)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from analysis import make_store

        root = out / "store"
        if root.exists():
            shutil.rmtree(root)
        make_store(root, n_configs=20, n_seeds=6, n_points=200)
        _add_optuna_journal(root)
    report = build_report(root, out / "report")
    index = (report.out / "index.html").resolve()
    url = index.as_uri()
    shots = []
    for width, stem in ((args.width, "page"), (args.narrow, "narrow")):
        # One window taller than the page (the report runs no script that could tell its
        # height); the blank tail is cut off.
        full = out / f"{stem}.png"
        _screenshot(args.chromium, url, full, width, MAX_HEIGHT)
        shots += _slices(full, args.height)
    print(f"report: {index}")
    print("screenshots, top to bottom:")
    for p in shots:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

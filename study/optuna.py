"""``python -m study.optuna``: the command's entry point (the implementation is
:mod:`study.sweeps.optuna`)."""

import sys

from study.sweeps.optuna import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

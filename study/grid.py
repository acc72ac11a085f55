"""``python -m study.grid``: the command's entry point (the implementation is
:mod:`study.sweeps.grid`)."""

import sys

from study.sweeps.grid import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

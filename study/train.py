"""``python -m study.train``: the command's entry point (the implementation is
:mod:`study.sweeps.train`)."""

import sys

from study.sweeps.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

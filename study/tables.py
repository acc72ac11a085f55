"""``python -m study.tables``: the command's entry point (the implementation is
:mod:`study.analysis.tables`)."""

import sys

from study.analysis.tables import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

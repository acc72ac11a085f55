"""``python -m study.failures``: the command's entry point (the implementation is
:mod:`study.analysis.failures`)."""

import sys

from study.analysis.failures import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

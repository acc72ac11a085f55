"""``python -m study.aggregate``: the command's entry point (the implementation is
:mod:`study.analysis.aggregate`)."""

import sys

from study.analysis.aggregate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

"""``python -m study.render``: the command's entry point (the implementation is
:mod:`study.report.render`)."""

import sys

from study.report.render import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

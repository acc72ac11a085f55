"""Reports built from a results store: figures (``figures``), the HTML/Markdown report
(``build``; ``python -m study.report``) and policy filmstrips (``render``). Like the
analysis, importing it imports no trainer: ``render`` loads the trainer only to replay a
stored policy."""

from __future__ import annotations

from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Any:
    """``python -m study.report`` (see :func:`study.report.build.main`)."""
    from study.report.build import main as _main

    return _main(argv)

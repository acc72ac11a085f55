"""Text formats shared by every layer: values as people write them, Markdown tables, LaTeX.

One implementation of each:

:func:`format_value`
    a hyperparameter value as text: ``0.0007``, ``64``, ``true``, ``[64, 64]``, ``inf``,
    ``-`` for a missing value. It labels configs in tables, reports and messages, and it
    spells the int lists stored in ``runs.parquet`` and given to Optuna as categorical
    choices (``"[64, 64]"``): that spelling is data and must not change.
:func:`markdown_lines` / :func:`markdown_table`
    a pipe table (GitHub Markdown), ``|`` in cells escaped, columns left or right aligned.
:func:`latex_escape` / :func:`latex_tabular`
    a LaTeX table cell with every special character escaped, and a booktabs ``tabular``.

Standard library only at import time: :mod:`study.sweeps.spec` re-exports
:func:`format_value`, and a sweep file is read without loading numpy or pandas.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

__all__ = [
    "BOOKTABS_NOTE",
    "format_value",
    "latex_escape",
    "latex_tabular",
    "markdown_lines",
    "markdown_table",
]


# --------------------------------------------------------------------------------------
# values


def _numpy_scalar_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """numpy's (bool, integer, floating) scalar types, or empty tuples when numpy is not
    loaded: a numpy value cannot exist before numpy is imported, so looking it up in
    ``sys.modules`` tells every case apart without importing numpy here."""
    np = sys.modules.get("numpy")
    if np is None:
        return (), (), ()
    return (np.bool_,), (np.integer,), (np.floating,)


def _is_missing(v: object) -> bool:
    """None, a float NaN (numpy's float64 is a float) or pandas' NA."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    pd = sys.modules.get("pandas")
    return pd is not None and v is pd.NA


def format_value(v: object) -> str:
    """A value as people write it in a sweep file: 0.0007, 64, true, [64, 64], inf.

    Missing values (None, NaN, pandas' NA) are ``-``; booleans ``true``/``false`` (as TOML
    spells them); integers and integral floats below 1e15 without a decimal point; other
    floats with 6 significant digits (``%.6g``); lists and tuples as ``[a, b]`` with each
    item formatted alike (an int list ``(64, 64)`` is ``[64, 64]``, the spelling stored
    in ``runs.parquet``); anything else via ``str()``.
    """
    np_bool, np_int, np_float = _numpy_scalar_types()
    if _is_missing(v):
        return "-"
    if isinstance(v, (bool, *np_bool)):
        return "true" if v else "false"
    if isinstance(v, (int, *np_int)):
        return str(int(v))  # type: ignore[call-overload]
    if isinstance(v, (float, *np_float)):
        f = float(v)  # type: ignore[arg-type]
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


# --------------------------------------------------------------------------------------
# Markdown

#: Alignment row cell per column alignment: "l" leaves the default (rendered left), "r"
#: right-aligns (numbers).
_MD_ALIGN = {"l": "---", "r": "---:"}


def _md_row(cells: Sequence[object]) -> str:
    # An unescaped "|" inside a cell would end the cell and shift every column after it.
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown_lines(header: Sequence[object], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> list[str]:
    """The lines of a pipe table: header, alignment row, one line per row.

    Cells are ``str()``-ed and their ``|`` escaped as ``\\|``. ``align`` has one letter per
    column, ``l`` (the default ``---``) or ``r`` (``---:``); None aligns every column left.
    """
    align = align if align is not None else "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    return [_md_row(header), "|" + "|".join(_MD_ALIGN[a] for a in align) + "|",
            *[_md_row(r) for r in rows]]


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """:func:`markdown_lines` as one text ending in a newline."""
    return "\n".join(markdown_lines(header, rows, align)) + "\n"


# --------------------------------------------------------------------------------------
# LaTeX

_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # In LaTeX's default OT1 font encoding these three print as other glyphs (">" as an
    # inverted question mark): they need their text commands.
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}

#: The comment that says what a :func:`latex_tabular` needs (pass it in ``comments``).
BOOKTABS_NOTE = r"Needs \usepackage{booktabs} (\toprule, \midrule, \bottomrule)."


def latex_escape(s: str) -> str:
    """Text for a LaTeX table cell: every special character escaped, "+/-" as $\\pm$."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in s)
    # After escaping, so the "$" of the math is not escaped itself.
    return out.replace("+/-", r"$\pm$")


def _tex_row(cells: Sequence[object]) -> str:
    return " & ".join(latex_escape(str(c)) for c in cells) + r" \\"


def latex_tabular(header: Sequence[object],
                  sections: Sequence[tuple[str | None, Sequence[Sequence[object]]]],
                  align: str, comments: Sequence[str] = ()) -> str:
    """A booktabs ``tabular``: each of ``comments`` as a ``%`` line (say what it needs:
    :data:`BOOKTABS_NOTE`), the header, then each ``(caption, rows)`` section, ending in a
    newline.

    Cells are ``str()``-ed and escaped (:func:`latex_escape`). ``align`` is the column
    spec (``"llrr"``). Sections after the first start with a ``\\midrule``; a section with
    a caption opens with it as an italic row across every column (an Optuna table's
    held-out and tuning runs). One section ``[(None, rows)]`` is a plain table.
    """
    lines = [*(f"% {c}" for c in comments),
             r"\begin{tabular}{" + align + "}", r"\toprule", _tex_row(header), r"\midrule"]
    for i, (caption, rows) in enumerate(sections):
        lines += [r"\midrule"] if i else []
        if caption:
            # A row ends in "\\"; one backslash would be a control space and run the caption
            # into the first row of its section.
            lines.append(rf"\multicolumn{{{len(header)}}}{{l}}{{\textit{{"
                         rf"{latex_escape(caption)}}}}} \\")
        lines += [_tex_row(r) for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"

"""study.text: the one spelling of values, Markdown tables and LaTeX tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.text import (
    BOOKTABS_NOTE,
    format_value,
    latex_escape,
    latex_tabular,
    markdown_lines,
    markdown_table,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# format_value


@pytest.mark.parametrize("value, text", [
    (None, "-"), (float("nan"), "-"), (np.float64("nan"), "-"), (pd.NA, "-"),
    (True, "true"), (False, "false"), (np.bool_(True), "true"), (np.bool_(False), "false"),
    (64, "64"), (-3, "-3"), (np.int64(7), "7"), (np.int32(-2), "-2"),
    (0.0007, "0.0007"), (0.99, "0.99"), (1e-5, "1e-05"), (100.0, "100"), (-2.0, "-2"),
    (np.float32(0.5), "0.5"), (np.float64(250.0), "250"),
    (0.1234567, "0.123457"), (123456789.5, "1.23457e+08"),
    (1e15, "1e+15"), (float("inf"), "inf"), (float("-inf"), "-inf"),
    ("tanh", "tanh"), ("[64, 64]", "[64, 64]"),
])
def test_format_value_scalars(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("value, text", [
    ((64, 64), "[64, 64]"), ([64, 64], "[64, 64]"), ((256,), "[256]"), ((), "[]"),
    ([True, 0.5, None, "relu"], "[true, 0.5, -, relu]"), ([1.0, 2.5], "[1, 2.5]"),
    ([(32, 32), (64,)], "[[32, 32], [64]]"), (np.array([1, 2]).tolist(), "[1, 2]"),
])
def test_format_value_lists_format_each_item(value, text):
    assert format_value(value) == text


def test_int_lists_keep_the_stored_spelling():
    # runs.parquet stores int-list hyperparameters as this text and Optuna's categorical
    # choices are these strings: the spelling is data, the same through either import.
    from study.sweeps.spec import format_value as from_spec

    assert from_spec is format_value
    assert format_value((64, 64)) == "[64, 64]" == str([64, 64])


def test_study_text_loads_neither_numpy_nor_pandas():
    # study.sweeps.spec re-exports format_value; reading a sweep file stays light.
    code = ("import sys, study.text, study.sweeps.spec\n"
            "print(sorted(m for m in ('numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]"


# --------------------------------------------------------------------------------------
# Markdown


def test_markdown_table_header_alignment_and_rows():
    text = markdown_table(["config", "n", "median"], [["a1", 5, "1.50"], ["b2", 10, "-"]],
                          align="lrr")
    assert text == ("| config | n | median |\n"
                    "|---|---:|---:|\n"
                    "| a1 | 5 | 1.50 |\n"
                    "| b2 | 10 | - |\n")


def test_markdown_aligns_left_by_default():
    assert markdown_lines(["a", "b"], [])[1] == "|---|---|"


def test_markdown_escapes_pipes_in_header_and_cells():
    lines = markdown_lines(["a|b", "c"], [["x | y", "||"]])
    assert lines[0] == "| a\\|b | c |"
    assert lines[2] == "| x \\| y | \\|\\| |"
    # Each line still has exactly one cell boundary per column (unescaped pipes only).
    for line in lines:
        assert line.replace("\\|", "").count("|") == 3


def test_markdown_align_must_name_every_column():
    with pytest.raises(ValueError, match="2 letters for 3 columns"):
        markdown_lines(["a", "b", "c"], [], align="lr")


def test_markdown_lines_and_table_agree():
    header, rows = ["x", "y"], [["1", "2"], ["3", "4"]]
    assert markdown_table(header, rows) == "\n".join(markdown_lines(header, rows)) + "\n"


# --------------------------------------------------------------------------------------
# LaTeX


@pytest.mark.parametrize("char, escaped", [
    ("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
    ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
    ("^", r"\textasciicircum{}"), ("<", r"\textless{}"), (">", r"\textgreater{}"),
    ("|", r"\textbar{}"),
])
def test_latex_escapes_every_special_character(char, escaped):
    assert latex_escape(char) == escaped
    assert latex_escape(f"a{char}b") == f"a{escaped}b"


def test_latex_escape_leaves_plain_text_and_writes_plus_minus():
    assert latex_escape("CartPole-v1 0.99 [64, 64]") == "CartPole-v1 0.99 [64, 64]"
    assert latex_escape("1.0 +/- 0.2") == r"1.0 $\pm$ 0.2"
    # Escapes are not applied twice: the braces of \textbackslash{} stay as written.
    assert latex_escape("\\{") == r"\textbackslash{}\{"


def test_latex_tabular_one_section():
    text = latex_tabular(["policy_lr", "n"], [(None, [["0.001", 5], ["50%", 3]])], "lr",
                         comments=["A title.", BOOKTABS_NOTE])
    assert text == "\n".join([
        "% A title.",
        r"% Needs \usepackage{booktabs} (\toprule, \midrule, \bottomrule).",
        r"\begin{tabular}{lr}", r"\toprule",
        r"policy\_lr & n \\", r"\midrule",
        r"0.001 & 5 \\", r"50\% & 3 \\",
        r"\bottomrule", r"\end{tabular}",
    ]) + "\n"


def test_latex_tabular_sections_get_captions_and_rules():
    text = latex_tabular(["a", "b"], [("held-out & tuned", [["1", "2"]]), ("tune", [["3", "4"]])],
                         "ll")
    body = text.splitlines()
    assert body[:4] == [r"\begin{tabular}{ll}", r"\toprule", r"a & b \\", r"\midrule"]
    assert body[4:9] == [
        r"\multicolumn{2}{l}{\textit{held-out \& tuned}} \\", r"1 & 2 \\",
        r"\midrule", r"\multicolumn{2}{l}{\textit{tune}} \\", r"3 & 4 \\",
    ]
    assert body[9:] == [r"\bottomrule", r"\end{tabular}"]

"""Result tables: decimals per column, percent headers, and tables that fit 100 columns."""
from __future__ import annotations

import math

import pandas as pd
from rich.console import Console

from emactl.tables import column_decimals, describe_paths, formatted, header, markdown, print_table


def render(df: pd.DataFrame, width: int = 100) -> str:
    con = Console(width=width, record=True)
    print_table(df, "t", con)
    return con.export_text()


def test_one_number_of_decimals_per_column_and_percent_headers():
    df = pd.DataFrame({"mIoU": [84.7, 84.13, math.nan], "time_s": [0.5, 12.25, 1.0], "n": [1, 2, 3]})
    text = formatted(df)
    assert text["mIoU"].tolist() == ["84.70", "84.13", "–"]
    assert text["time_s"].tolist() == ["0.50", "12.25", "1.00"] and text["n"].tolist() == ["1", "2", "3"]
    assert column_decimals([0.6582, 0.1]) == 4 and column_decimals([1234.5]) == 0
    assert header("mIoU") == "mIoU %" and header("mIoU_std") == "mIoU_std %" and header("params") == "params"
    md = markdown(df)
    assert "mIoU %" in md and "84.70" in md and "nan" not in md


def test_a_wide_table_is_split_into_groups_that_fit_100_columns():
    df = pd.DataFrame({"method": ["EMANet(512) reduction + EMAU", "ResNet-101 backbone"],
                       **{f"eval_iters={t}": [80.0 + t, 81.0 + t] for t in range(1, 9)}})
    shown = render(df)
    assert "…" not in shown and max(len(line) for line in shown.splitlines()) <= 100
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in shown.splitlines() if line[:1] in "┏┃┡│└")  # not cropped
    assert all(f"eval_iters={t}" in shown for t in range(1, 9))
    assert shown.count("ResNet-101") == 2 and "t (continued)" in shown  # the label column is repeated
    narrow = pd.DataFrame({"a": [1.0], "b": ["x"]})
    assert "continued" not in render(narrow)


def test_describe_paths_names_every_file():
    text = describe_paths(["s/results.csv", "s/results.md", "s/figures/ablation_eval_iters.png"])
    assert text == "s/: results.{csv,md}, figures/ablation_eval_iters.png"


def test_whole_numbers_and_tiny_errors_keep_their_meaning():
    """A count with a missing value is a float column: shown without decimals; errors below
    1e-3 in scientific notation, not rounded to 0.0000."""
    df = pd.DataFrame({"threads": [1.0, 2.0, None], "rel. error": [6.5e-06, None, 1.1e-05]})
    text = formatted(df)
    assert list(text["threads"]) == ["1", "2", "–"]
    assert list(text["rel. error"]) == ["6.50e-06", "–", "1.10e-05"]


def test_a_small_value_beside_large_ones_is_never_shown_as_zero():
    """fp32 errors beside bf16 ones (1e-6 against 1e-1): the column goes scientific rather than
    printing 0.0000; a column whose smallest value shows with the usual decimals keeps them."""
    text = formatted(pd.DataFrame({"rel. error": [2.65e-06, 0.0958, None], "ms": [0.25, 512.0, 3.5]}))
    assert list(text["rel. error"]) == ["2.65e-06", "9.58e-02", "–"]
    assert list(text["ms"]) == ["0.2", "512.0", "3.5"]

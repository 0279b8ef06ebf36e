"""``--help`` reads the same in every command (Typer >= 0.26 otherwise prints Python types)."""
from __future__ import annotations

import re

import pytest
import typer

from emactl.cli import _commands, app, main, tidy_help
from emactl.options import DEVICE_HELP, RUN


def all_params():
    root = tidy_help(typer.main.get_command(app))
    for cmd in _commands(root)[1:]:
        for param in cmd.params:
            yield cmd, param


def test_every_value_option_names_an_upper_case_metavar_and_flags_none():
    for cmd, param in all_params():
        if getattr(param, "is_flag", False):
            assert param.metavar == "", (cmd.name, param.name)
        else:
            assert param.metavar and re.fullmatch(r"[A-Z][A-Z0-9_=,.]*", param.metavar), (cmd.name, param.name)


def test_runs_are_named_run_and_device_reads_the_same_everywhere():
    devices = 0
    for cmd, param in all_params():
        if param.name == "run":
            assert param.metavar == RUN, cmd.name
        if param.name == "device":
            assert param.help == DEVICE_HELP, cmd.name
            devices += 1
    assert devices >= 8


@pytest.mark.parametrize("argv", [["train", "--help"], ["eval", "--help"], ["visualize", "bases", "--help"],
                                  ["ablate", "--help"], ["profile", "--help"]])
def test_help_shows_no_python_types(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "Usage" in out
    assert not re.search(r"<(bool|str|int|float|list\[str\])>|\{[a-z_]+\}", out), out

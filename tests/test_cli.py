"""``--help`` reads the same in every command (Typer >= 0.26 otherwise prints Python types)."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
import typer

from emactl.cli import _commands, app, main, tidy_help
from emactl.errors import UserError
from emactl.lists import items, split_values
from emactl.options import DEVICE_HELP, OPTION, RUN


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


def test_root_help_imports_no_torch():
    """`emactl --help` lists the commands without building the library-derived options."""
    code = ("import sys\nfrom emactl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "profile" in proc.stdout and "ablate" in proc.stdout


def test_profile_options_are_the_settings_fields():
    from emactl.profile.settings import ProfileSettings

    command = typer.main.get_command(app).commands["profile"]
    fields = dataclasses.fields(ProfileSettings)
    assert [p.name for p in command.params] == [f.name for f in fields]
    assert all(p.help == f.metadata[OPTION].help for p, f in zip(command.params, fields)
               if not callable(f.metadata[OPTION].help))


def test_profile_sections_come_from_the_registry():
    from emactl.profile import report

    assert list(report.SECTIONS)[:7] == ["heads", "networks", "scaling", "published", "ema", "unit", "train"]
    assert report.DEFAULT_SECTIONS == tuple(list(report.SECTIONS)[:7]) and "export" in report.SECTIONS
    command = typer.main.get_command(app).commands["profile"]
    help = next(p.help for p in command.params if p.name == "sections")
    assert all(section.help in help for section in report.SECTIONS.values())
    assert "unit: the whole EMA unit" in help and "export (not by default; needs the export extra): the network" in help


def _help(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_ablate_help_lists_the_registered_choices(capsys, monkeypatch):
    from emactl.config import EMAConfig, choices
    from emactl.nn.heads import CONTEXTS

    out = _help(["ablate"], capsys, monkeypatch)
    assert ",".join(CONTEXTS.names()) + ": the context module." in out and "conv3x3" in out
    for name in ("bases_update", "norm", "grad"):
        assert ",".join(choices(EMAConfig, name)) in out, name


def test_one_comma_list_parser():
    assert split_values("a,[1,2],'x,y'") == ["a", "[1,2]", "'x,y'"]
    assert items(" a, ,b,") == ["a", "b"]


@pytest.mark.parametrize(
    "name, option, message",
    [
        ("tpu", "--device", "--device: got 'tpu'; choose one of auto, cpu, cuda, cuda:N"),
        ("cuda:x", "train.device", "train.device: got 'cuda:x'"),
    ],
)
def test_one_device_resolver_names_the_option(name, option, message):
    from emactl.device import resolve_device

    with pytest.raises(UserError) as info:
        resolve_device(name, option)
    assert str(info.value).startswith(message)
    assert resolve_device("CPU ") == torch.device("cpu")


def test_one_autocast_helper_and_dtype_table():
    from emactl.device import DTYPES, amp_dtype, autocast

    assert amp_dtype("none") is None and amp_dtype("bf16") is DTYPES["bf16"] is torch.bfloat16
    with pytest.raises(UserError, match="amp: got 'fp8'"):
        amp_dtype("fp8")
    cpu = torch.device("cpu")
    with autocast(cpu, DTYPES["bf16"]):
        assert torch.is_autocast_enabled("cpu")
    with autocast(cpu, DTYPES["fp32"]), autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")

"""Options and arguments shared by the subcommands, so that ``--help`` reads the same everywhere.

Every value option carries an upper-case metavar (``RUN``, ``KEY=VALUE``, ``DIR``, ``N``...):
without one, Typer >= 0.26 prints Python types (``<list[str]>``, ``{recipe}``). Flags get no
metavar at all (see :func:`emactl.cli.tidy_help`).
"""
from __future__ import annotations

from typing import Any

import typer

RUN = "RUN"
RUN_HELP = "Run directory (its newest checkpoint is used) or checkpoint file."
DEVICE_HELP = "auto, cpu, cuda or cuda:N; auto takes CUDA when it is available."
THREADS_HELP = "Torch CPU threads (default: torch's choice, one per core)."
PROGRESS_HELP = "Show a progress bar."


def run_argument(default: Any = ..., help: str = RUN_HELP) -> Any:
    """The ``RUN`` argument: a run directory or a checkpoint file."""
    return typer.Argument(default, help=help, metavar=RUN, show_default=False)


def device_option(default: str | None = "auto", default_text: str | None = None) -> Any:
    """``--device``: the same help in every command; ``default_text`` says where None comes from."""
    return typer.Option(default, "--device", help=DEVICE_HELP, metavar="DEVICE",
                        show_default=default_text if default_text is not None else True)


def set_option(help: str) -> Any:
    """``--set KEY=VALUE`` (repeatable)."""
    return typer.Option([], "--set", help=help, metavar="KEY=VALUE", show_default=False)


def progress_option() -> Any:
    return typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP)


def threads_option(help: str = THREADS_HELP) -> Any:
    return typer.Option(None, "--threads", help=help, metavar="N", show_default=False)


def out_option(help: str, short: bool = False) -> Any:
    names = ("--out", "-o") if short else ("--out",)
    return typer.Option(None, *names, help=help, metavar="DIR", show_default=False)

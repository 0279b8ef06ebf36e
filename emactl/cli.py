"""The ``emactl`` command line: a Typer app that only wires subcommands to library code.

Every user error (``UserError``, a bad CLI value) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import typer

try:  # typer >= 0.26 vendors Click as typer._click and has its own Exit/Abort
    from typer import _click as click
    from typer.exceptions import Abort, Exit
except ImportError:  # older typer depends on Click itself
    import click
    from click.exceptions import Abort, Exit

from .commands import ablate, data, evaluate, export, import_weights, predict, profile, train, visualize
from .errors import UserError
from .errors import one_line as _one_line
from .options import DerivedCommand, tidy_flags

app = typer.Typer(
    name="emactl",
    help="Train, evaluate, ablate, profile and look inside EMANet (EM attention networks).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    # A root callback keeps `emactl` a command group however many subcommands are registered
    # (Typer runs a lone command directly, and refuses an app with none).
    pass


# Every subcommand, in the order `emactl --help` lists them (Typer puts the groups last).
app.command("ablate", cls=ablate.AblateCommand)(ablate.ablate)
app.command("eval")(evaluate.evaluate)
app.command("export")(export.export)
app.command("import")(import_weights.import_weights)
app.command("predict")(predict.predict)
app.command("profile", cls=profile.ProfileCommand)(profile.profile)
app.command("train")(train.train)
app.add_typer(data.app, name="data")
app.add_typer(visualize.app, name="visualize")


def _commands(command: click.Command) -> list[click.Command]:
    """``command`` and every subcommand below it."""
    found = [command]
    for sub in getattr(command, "commands", {}).values():
        found += _commands(sub)
    return found


def tidy_help(command: click.Command) -> click.Command:
    """Give every flag of every command an empty metavar (see :func:`emactl.options.tidy_flags`).

    A :class:`DerivedCommand` tidies its own flags when it builds them: touching them here
    would build them, and ``emactl --help`` would import torch.
    """
    for cmd in _commands(command):
        if not isinstance(cmd, DerivedCommand):
            tidy_flags(cmd)
    return command


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and map errors to one line with exit code 2."""
    command = tidy_help(typer.main.get_command(app))
    try:
        rv = command.main(args=argv, prog_name="emactl", standalone_mode=False)
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:
        # the error already rendered the help: Rich prints it (and leaves the message empty),
        # plain Click keeps it as the message
        if e.format_message().strip():
            click.echo(e.format_message())
        sys.exit(0)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" ({ctx.command_path})" if ctx is not None else ""
        print(f"error{where}: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)

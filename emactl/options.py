"""Options and arguments shared by the subcommands, so that ``--help`` reads the same everywhere.

Every value option carries an upper-case metavar (``RUN``, ``KEY=VALUE``, ``DIR``, ``N``...):
without one, Typer >= 0.26 prints Python types (``<list[str]>``, ``{recipe}``). Flags get no
metavar at all (:func:`tidy_flags`).

Commands whose options come from the library (``profile``: the fields of ``ProfileSettings``;
``ablate``: the registered choices) are :class:`DerivedCommand`\\ s, built from
:func:`field_option` metadata or from the registries when they first run or show their help.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand

try:  # typer >= 0.26 vendors Click as typer._click
    from typer import _click as click
except ImportError:  # older typer depends on Click itself
    import click

RUN = "RUN"
RUN_HELP = "Run directory (its newest checkpoint is used) or checkpoint file."
DEVICE_HELP = "auto, cpu, cuda or cuda:N; auto takes CUDA when it is available."
THREADS_HELP = "Torch CPU threads (default: torch's choice, one per core)."
PROGRESS_HELP = "Show a progress bar."
OPTION = "emactl.option"  # the dataclass field metadata key of field_option


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


# ---------------------------------------------------------------------------------------------
# Options derived from the library


@dataclasses.dataclass(frozen=True)
class FieldOption:
    """How a dataclass field is given on the command line (see :func:`field_option`)."""

    help: str | Callable[[], str]
    metavar: str | None
    parse: Callable[[str], Any] | None
    default: Any


def field_option(help: str | Callable[[], str], metavar: str | None = None, *,
                 parse: Callable[[str], Any] | None = None, default: Any = dataclasses.MISSING) -> dict[str, Any]:
    """Field metadata that makes the field a ``--name`` option of a :class:`DerivedCommand`.

    ``help`` may be a function, for text that names what the library registers. A field with
    ``parse`` is given as text (a device name, a comma-separated list) and parsed into the field's
    value; ``default`` replaces the field's default on the command line (``--device auto``).
    """
    return {OPTION: FieldOption(help, metavar, parse, default)}


def _as_text(value: Any) -> Any:
    """A tuple default as the comma-separated text the option takes; anything else as it is."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def field_parameters(cls: type) -> list[inspect.Parameter]:
    """One option per field of the dataclass ``cls`` that has :func:`field_option` metadata, in order.

    An option's default is the field's (a tuple as its comma-separated text); it is shown in
    ``--help`` unless it is None.
    """
    hints = typing.get_type_hints(cls)
    parameters = []
    for f in dataclasses.fields(cls):
        spec: FieldOption | None = f.metadata.get(OPTION)
        if spec is None:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif f.default is not dataclasses.MISSING:
            default = _as_text(f.default)
        else:
            default = _as_text(f.default_factory())  # type: ignore[misc]
        annotation = str if spec.parse is not None else hints[f.name]
        if default is None:  # Typer reads an option that may stay unset from Optional[X], not X | None
            annotation = Optional[[a for a in typing.get_args(annotation) or (annotation,) if a is not type(None)][0]]
        help = spec.help() if callable(spec.help) else spec.help
        option = typer.Option(default, help=help, metavar=spec.metavar, show_default=default is not None)
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
    return parameters


def from_options(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from the values of its :func:`field_parameters` options."""
    specs = {f.name: f.metadata[OPTION] for f in dataclasses.fields(cls) if OPTION in f.metadata}
    parsed = {}
    for name, value in values.items():
        parse = specs[name].parse
        parsed[name] = parse(value) if parse is not None and value is not None else value
    return cls(**parsed)


def tidy_flags(command: click.Command) -> click.Command:
    """Give every flag of ``command`` (``--resume``, ``--help``) an empty metavar.

    Typer >= 0.26 shows ``<bool>`` beside flags, which take no value; value options name
    their metavar themselves.
    """
    params = list(command.params)
    helper = command.get_help_option(click.Context(command)) if hasattr(command, "get_help_option") else None
    if helper is not None:
        params.append(helper)
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return command


class DerivedCommand(TyperCommand):
    """A command whose options the library defines, built the first time they are needed.

    Building them imports the library, and torch with it (``ProfileSettings``, the registry of
    context modules); ``emactl --help`` lists a command by its name and docstring only, and stays
    fast. Subclasses return the options in :meth:`parameters`; the function registered with
    ``app.command(..., cls=...)`` is called with their values as keyword arguments.
    """

    def __init__(self, name: str | None, *, callback: Callable[..., Any] | None = None, **kwargs: Any) -> None:
        # Typer registers a wrapper around the function (functools.update_wrapper keeps it)
        self.function = getattr(callback, "__wrapped__", callback)
        kwargs.pop("params", None)
        super().__init__(name, **kwargs)

    def parameters(self) -> list[inspect.Parameter]:
        raise NotImplementedError

    @functools.cached_property
    def derived(self) -> click.Command:
        function = self.function

        @functools.wraps(function)
        def call(**values: Any) -> Any:
            return function(**values)

        call.__signature__ = inspect.Signature(self.parameters())  # type: ignore[attr-defined]
        app = typer.Typer(add_completion=False)
        app.command(self.name)(call)
        return tidy_flags(typer.main.get_command(app))

    # Click reads these while parsing, invoking and formatting help: all come from the derived command.
    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        return self.derived.params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        pass  # Click's constructor sets the params of the registered function: they are derived instead

    @property  # type: ignore[override]
    def callback(self) -> Callable[..., Any] | None:
        return self.derived.callback

    @callback.setter
    def callback(self, value: Callable[..., Any] | None) -> None:
        pass

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        return self.derived.get_help_option(ctx)

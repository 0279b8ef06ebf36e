"""``emactl profile``: benchmark EM attention against the other context modules and networks.

Its options are the fields of :class:`emactl.profile.settings.ProfileSettings`, with the help
their metadata gives, and its sections those registered in :mod:`emactl.profile.report`.
"""
from __future__ import annotations

import inspect
from typing import Any

from rich.console import Console

from ..options import DerivedCommand, field_parameters, from_options


class ProfileCommand(DerivedCommand):
    def parameters(self) -> list[inspect.Parameter]:
        from ..profile.settings import ProfileSettings  # torch: only when the command runs or shows its help

        return field_parameters(ProfileSettings)


def profile(**options: Any) -> None:
    """Measure params, MACs/FLOPs, memory, latency and throughput of EMA and the alternatives."""
    from ..io import ensure_dir
    from ..profile.report import run_profile
    from ..profile.settings import ProfileSettings, validate

    settings = from_options(ProfileSettings, options)
    validate(settings)
    ensure_dir(settings.out, "--out")  # before minutes of measuring, not after
    console = Console(log_path=False)  # progress lines say what runs, not where in emactl
    if not console.is_terminal:  # logs and pipes: keep wide tables whole
        console = Console(width=220, log_path=False)
    run_profile(settings, console)

"""Rich progress bars on stderr, shown only on a terminal so logs and pipes stay clean."""
from __future__ import annotations

from rich.console import Console
from rich.progress import Progress


def progress_bar(enabled: bool = True, transient: bool = False) -> Progress:
    console = Console(stderr=True)
    return Progress(console=console, disable=not (enabled and console.is_terminal),
                    transient=transient)

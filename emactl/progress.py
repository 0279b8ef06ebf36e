"""Progress-bar pieces shared by the long commands (train, ablate)."""
from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text


def hms(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``; ``-:--`` when unknown."""
    if seconds is None:
        return "-:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def mean_rate_eta(total: float, completed: float, start: float, elapsed: float | None) -> float | None:
    """Seconds left at the mean rate since the bar started (``start`` steps were done before it).

    Rich's own estimate averages the last 30 s only, and on a shared machine it swings with
    every other process's load; the mean over the whole run is steadier.
    """
    done = completed - start
    if elapsed is None or done <= 0:
        return None
    return max(0.0, total - completed) * elapsed / done


class MeanRateETA(ProgressColumn):
    """``ETA 4:05`` from :func:`mean_rate_eta`; a task gives its starting step as field ``first``."""

    def render(self, task: Task) -> Text:
        eta = mean_rate_eta(task.total or 0, task.completed, task.fields.get("first", 0), task.elapsed)
        return Text(f"ETA {hms(eta)}", style="progress.remaining")

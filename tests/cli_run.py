"""Shared helpers for tests that run the ``emactl`` command line in-process."""
from __future__ import annotations

import pytest

from emactl.cli import main


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``emactl ARGV``; return its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    """The one ``error…`` line of a run that exited 2 (failing the test otherwise)."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), err
    return lines[0]

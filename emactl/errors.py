"""User-facing errors.

Anything the user can fix (a bad recipe key, a missing dataset, a corrupt file, a bad CLI
value) raises :class:`UserError`. The CLI turns it into one line on stderr and exit code 2,
never a traceback.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """An error caused by user input; printed as one line, exit code 2."""

    exit_code = 2


# The ``module.Class: `` prefix a traceback's last line starts with, e.g. ``emactl.data.readers.DataFileError: ``.
_EXCEPTION_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): ")


def one_line(message: str) -> str:
    """The message of an error as one line.

    A UserError re-raised by a DataLoader worker carries the worker's traceback: its last line
    is the message, after the exception's qualified class name, which is dropped too.
    """
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return message.strip()
    return _EXCEPTION_PREFIX.sub("", lines[-1].strip(), count=1)

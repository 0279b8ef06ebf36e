"""User-facing errors.

Anything the user can fix (a bad recipe key, a missing dataset, a corrupt file, a bad CLI
value) raises :class:`UserError`. The CLI turns it into one line on stderr and exit code 2,
never a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; printed as one line, exit code 2."""

    exit_code = 2

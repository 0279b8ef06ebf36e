"""Iterating a DataLoader so that an error in a sample ends the iteration cleanly.

When a worker process fails (a truncated JPEG, a label out of range), the DataLoader re-raises
its exception in the main process. That exception's traceback holds the loader's iterator, so
its workers stay alive as long as the exception does: a process exiting with the error then
waits on them forever (they ignore SIGTERM, see ``emactl.engine.trainer``). Here the workers
are stopped at once and the exception is re-raised without the loader's frames, with the
worker's traceback reduced to its message.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..errors import UserError, one_line


def stop_workers(iterator: Any) -> None:
    """Shut down the worker processes of a DataLoader iterator now (a no-op without workers)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def clean_error(error: BaseException) -> BaseException:
    """``error`` without its traceback; a re-raised worker UserError gets its one-line message."""
    if isinstance(error, UserError) and "\n" in str(error):
        try:
            error = type(error)(one_line(str(error)))
        except TypeError:  # a subclass with another constructor
            error = UserError(one_line(str(error)))
    return error.with_traceback(None)


def next_batch(iterator: Iterator) -> Any:
    """``next(iterator)``; any error but StopIteration stops the workers and is cleaned first."""
    try:
        return next(iterator)
    except StopIteration:
        raise
    except BaseException as e:  # also KeyboardInterrupt: the workers must not outlive it
        error = e
    stop_workers(iterator)
    raise clean_error(error)


def batches(loader: Iterable) -> Iterator[Any]:
    """The batches of ``loader``, through :func:`next_batch`; workers stop when this ends."""
    iterator = iter(loader)
    try:
        while True:
            try:
                batch = next_batch(iterator)
            except StopIteration:
                return
            yield batch
    finally:
        stop_workers(iterator)

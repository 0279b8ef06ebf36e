"""Atomic file writing: nothing half-written survives a crash or a kill -9.

Every failure to write (a full disk, a read-only file system, ``ulimit -f``, a file where a
folder should be) becomes a one-line :class:`UserError` naming the path; the file being
replaced is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import UserError

# POSIX only: without fcntl there is no run-folder lock, without resource no file size limit to report.
try:
    import fcntl
except ImportError:
    fcntl = None  # type: ignore[assignment]
try:
    import resource
except ImportError:
    resource = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _free_space(folder: Path) -> str:
    """``"12.3 MB free"`` on the file system of ``folder`` (or of its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        try:
            return f"{_size(shutil.disk_usage(candidate).free)} free"
        except OSError:
            continue
    return "free space unknown"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def write_failure(path: Path, e: BaseException, needed: int | None = None) -> UserError:
    """The one-line error for a failed write of ``path``: the reason, the space, the fix."""
    need = f"needs {_size(needed)}, " if needed is not None else ""
    limit = ""
    soft = _file_size_limit()
    if soft is not None:
        limit = f", file size limit (ulimit -f) {_size(soft)}"
    return UserError(
        f"{path}: cannot write ({_reason(e)}; {need}{_free_space(path.parent)}{limit}); "
        "free space or choose a writable location, then run again"
    )


def _make_dir(folder: Path, fix: str) -> None:
    """``mkdir -p`` whose failures are one-line UserErrors ending in ``fix``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{folder}: exists and is not a folder; {fix}") from None
    except OSError as e:
        raise UserError(f"{folder}: cannot create this output folder ({_reason(e)}); {fix}") from None


def ensure_dir(folder: str | os.PathLike, option: str = "") -> Path:
    """Create ``folder`` (and its parents) and check a file can be created in it.

    Called before long work starts, so that an output that cannot be written (a file where the
    folder should be, a read-only file system, a folder under ``/proc``) is refused up front,
    not after the work is done. ``option`` (e.g. ``--out``) is named in the message.
    """
    folder = Path(folder)
    fix = f"choose another {option}" if option else "choose a writable location"
    _make_dir(folder, fix)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{folder}: cannot write here ({_reason(e)}); {fix}") from None
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, needed: Callable[[], int] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    An ``OSError`` while creating or writing the temporary file (or moving it into place)
    becomes a :class:`UserError` naming ``path`` and the free space (and the room the file
    needs, when ``needed`` can tell); ``path`` is untouched.
    """
    path = Path(path)
    _make_dir(path.parent, "choose a writable location")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_failure(path, e) from None
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, _file_mode())
            os.replace(tmp_path, path)
        except OSError as e:
            tmp_path.unlink(missing_ok=True)  # give the space back before measuring it
            raise write_failure(path, e, needed() if needed is not None else None) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class _ByteCounter:
    """A write-only sink that counts bytes: how much room ``torch.save`` of an object needs."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _saved_size(obj: Any) -> int:
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


# What torch's zip writer raises when the file under it cannot be written (disk full, EFBIG).
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter|inline_container|file write failed|unexpected pos")


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. A failed write (e.g. a full disk) is a one-line UserError that
    says how much room the file needs; the previous file at ``path`` is kept."""
    with atomic_path(path, needed=lambda: _saved_size(obj)) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if not _TORCH_WRITE_FAILED.search(str(e)):
                raise
            raise _torch_write_error(tmp.parent, _saved_size(obj)) from None
    return Path(path)


def _torch_write_error(folder: Path, needed: int) -> OSError:
    """The likely OSError behind torch's "file write failed", which carries no errno."""
    try:
        if shutil.disk_usage(folder).free < needed:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    soft = _file_size_limit()
    if soft is not None and soft < needed:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    return OSError(errno.EIO, "write failed")


def _file_size_limit() -> int | None:
    """This process's file size limit (``ulimit -f``) in bytes; None when unlimited or unknown."""
    if resource is None:
        return None
    try:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _load_refusal(e: Exception) -> str:
    """Why torch refused a file, without its advice to load it unsafely (never an option here)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds Python objects beyond tensors{what}, which only an unsafe load could "
                "build and which could run code; emactl reads only tensor checkpoints")
    first = text.strip().splitlines()
    return first[0] if first else type(e).__name__


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely (``weights_only=True``); unreadable files raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated or unsafe pickles all land here
        raise UserError(f"{path}: cannot load checkpoint ({_load_refusal(e)})") from None


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) while ``command`` works in it.

    A second process is refused with one line naming the holder (pid, host, command) and
    ``fix``. The lock is an ``flock``, which the kernel drops when its holder dies, even by
    ``kill -9``: the ``.lock`` file a dead process leaves is simply taken over. Without
    ``fcntl`` (not POSIX) there is no locking.
    """
    folder = ensure_dir(folder)
    if fcntl is None:
        yield
        return
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{folder}: in use by {holder}; {fix}") from None
        except OSError as e:  # a file system without locks: go on, but say so
            print(f"warning: {folder}: cannot lock ({_reason(e)}); make sure no other process uses it",
                  file=sys.stderr)
            yield
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} ({command})\n")
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format taken from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path

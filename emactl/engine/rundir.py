"""Run directories: layout, the environment record, and the JSON-lines metrics log.

``runs/<name>/`` holds::

    recipe.yaml          the resolved recipe (rewritten on every start, atomically)
    env.json             code version (git commit), versions, device, world size, AMP, argv, start time, host
    metrics.jsonl        one JSON object per line: {"kind": "train"|"val", "iter": ..., ...}
    checkpoints/         iter_XXXXXXX.pt (see :mod:`emactl.engine.checkpoint`)
    eval/                the final evaluation tables
    tb/, wandb/, mlflow.db, mlartifacts/, mlflow-run-id   the optional loggers' files (``train.loggers``, see :mod:`emactl.engine.loggers`)

Only rank 0 writes any of it.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torchvision

from .. import __version__
from ..config import Recipe, dump_yaml
from ..errors import UserError
from ..io import write_failure, write_json, write_text
from .checkpoint import CKPT_DIR, latest_checkpoint

METRICS_FILE = "metrics.jsonl"


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to train over an existing run unless resuming.

    ``resume`` with no checkpoint yet (e.g. killed before the first one) starts from scratch;
    which checkpoint it continues from is :func:`emactl.engine.checkpoint.load_newest`'s choice.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise UserError(
            f"{run_dir}: run already has checkpoints (latest {ckpt.name}); "
            "pass --resume to continue it or choose another --name"
        )


def remove_stale_temps(run_dir: Path) -> None:
    """Delete temporary files a killed run left behind in ``checkpoints/`` (see emactl.io)."""
    folder = Path(run_dir) / CKPT_DIR
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def write_recipe(run_dir: Path, recipe: Recipe) -> Path:
    return write_text(run_dir / "recipe.yaml", dump_yaml(recipe))


def code_version() -> dict[str, Any]:
    """emactl's version and, in a git checkout, its commit and whether files were modified."""
    out: dict[str, Any] = {"emactl": __version__, "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # an installed copy, not a checkout: no commit to name
        return out
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def capture_env(device: torch.device, world_size: int, amp: str, resumed_from: int | None = None) -> dict[str, Any]:
    """What ran this: versions, hardware, world size, AMP mode, command line, time and host."""
    cuda = torch.cuda.is_available()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": device_name,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_available": bool(torch.backends.cudnn.is_available()),
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "world_size": world_size,
        "amp": amp,
        "cpu_threads": torch.get_num_threads(),
        "argv": list(sys.argv),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "resumed_from": resumed_from,
    }


def write_env(run_dir: Path, env: dict[str, Any]) -> Path:
    return write_json(run_dir / "env.json", env)


class MetricsLogger:
    """Append JSON lines to ``metrics.jsonl``.

    Each line is flushed as it is written, so a killed run loses at most a partial last line;
    :meth:`truncate` removes that and anything logged after the checkpoint being resumed.
    A disabled logger (ranks other than 0) does nothing. :meth:`attach` adds the optional
    back-ends of ``train.loggers``, which get a copy of every record written.
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._extra: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def attach(self, loggers: Any) -> None:
        """Also send every record to ``loggers`` (an :class:`emactl.engine.loggers.Loggers`)."""
        if self.enabled:
            self._extra = loggers

    def truncate(self, iteration: int, keep_val_at: bool = True) -> None:
        """Keep only well-formed lines with ``iter <= iteration`` (atomically).

        ``keep_val_at=False`` also drops validation lines *at* ``iteration``: a run resumed at
        its last iteration evaluates again and would otherwise log that validation twice.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                it = int(record["iter"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if it < iteration or (it == iteration and (keep_val_at or record.get("kind") != "val")):
                kept.append(line)
        write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record, which must hold ``kind`` and ``iter``."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=False) + "\n")
                f.flush()
        except OSError as e:
            raise write_failure(self.path, e) from None
        if self._extra is not None:
            self._extra.log(record)

    def close(self) -> None:
        if self._extra is not None:
            self._extra.close()
            self._extra = None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records (JSON objects) of a run's ``metrics.jsonl``; any other line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):  # valid JSON that is not a record (a list, a number) is skipped too
            out.append(record)
    return out

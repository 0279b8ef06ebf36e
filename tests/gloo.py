"""Shared helpers for tests that start several gloo processes on the CPU."""
from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker: Callable[[int, int, int, str], None], out_dir: Path, world: int = 2,
                     timeout: float = 60) -> None:
    """Run ``worker(rank, world, port, out_dir)`` in ``world`` spawned processes; all must exit 0."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world

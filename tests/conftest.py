"""Shared test fixtures: the RNG state, one torch thread, a fake TensorBoard, and the tiny
trained run (trained once per session, copied for each test that writes into it)."""
from __future__ import annotations

import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from emactl.config import from_dict
from emactl.engine.trainer import train

from runs import tiny_recipe

# The trained run: two iterations of the tiny recipe, a checkpoint and an evaluation at the end.
TRAINED = ("name=r", "data.args.size=32", "data.args.val_length=3",
           "train.iters=2", "train.batch_size=2", "train.ckpt_every=2", "train.log_every=1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and does not spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class FakeTensorBoard:
    """What the trainer's TensorBoard writer was given: its log directories, the step from which
    each purges what an interrupted run wrote, and every scalar."""

    log_dirs: list[str] = field(default_factory=list)
    purge_steps: list[int | None] = field(default_factory=list)
    calls: list[tuple[str, float, int]] = field(default_factory=list)


@pytest.fixture
def fake_tensorboard(monkeypatch) -> FakeTensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` replaced by a recorder (no tensorboard needed)."""
    seen = FakeTensorBoard()

    class FakeWriter:
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            seen.log_dirs.append(log_dir)
            seen.purge_steps.append(purge_step)

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            seen.calls.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    return seen


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The tiny recipe trained for two iterations (``runs/r``). Read it only: a test that writes
    into a run takes :func:`trained_run_copy`."""
    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(from_dict(tiny_recipe(*TRAINED, f"out_dir={out}")), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out / "r"


@pytest.fixture
def trained_run_copy(trained_run, tmp_path) -> Path:
    """A copy of :func:`trained_run` of this test's own, at ``tmp_path/r``."""
    return Path(shutil.copytree(trained_run, tmp_path / "r"))

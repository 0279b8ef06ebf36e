"""Distributed training on the CPU: ``torchrun --nproc_per_node 2`` with gloo, and the helpers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from emactl.engine import distributed as D
from emactl.engine.checkpoint import checkpoint_path
from emactl.engine.rundir import read_metrics
from emactl.errors import UserError

from gloo import free_port
from runs import train_dict
from test_train import assert_same_state, ckpt


def torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m emactl ARGS``; retried once if the port was taken meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "emactl", *args, "--no-progress",
        ]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    return proc


def test_torchrun_two_ranks_train_evaluate_and_resume(tmp_path: Path) -> None:
    data = train_dict(tmp_path, "train.iters=4", "train.ckpt_every=2", "train.val_every=2", "train.log_every=1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    runs = tmp_path / "runs"

    proc = torchrun(tmp_path, "train", str(recipe), "--name", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = runs / "ddp"
    assert (run / "eval" / "summary.csv").exists() and (run / "eval" / "confusion.csv").exists()
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    lines = read_metrics(run)
    # only rank 0 logs: every iteration once
    assert [r["iter"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["iter"] for r in lines if r["kind"] == "val"] == [2, 4]

    final = ckpt(checkpoint_path(run, 4))
    assert final["world_size"] == 2 and final["loader"]["micro_batch"] == 2
    # the EMA bases are all-reduced by the unit itself: both replicas hold the same buffer
    digests = [r["bases"] for r in final["ranks"]]
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank keeps its own random stream (dropout), saved separately
    assert not torch.equal(final["ranks"][0]["rng"]["torch"], final["ranks"][1]["rng"]["torch"])

    # resume both ranks from iteration 2: the same final weights, bit for bit
    resumed = runs / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_path(run, 2), checkpoint_path(resumed, 2))
    proc = torchrun(tmp_path, "train", str(recipe), "--name", "resumed", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_state(final["model"], ckpt(checkpoint_path(resumed, 4))["model"])
    assert (resumed / "eval" / "summary.csv").read_text() == (run / "eval" / "summary.csv").read_text()

    # `emactl eval` under torchrun joins the group: each rank sees half the images, and the
    # all-reduced confusion matrix equals the one the training run wrote
    proc = torchrun(tmp_path, "eval", str(run), "--out", str(run / "eval_ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "eval_ddp" / "confusion.csv").read_text() == (run / "eval" / "confusion.csv").read_text()
    assert proc.stderr.count("wrote ") == 1  # only rank 0 writes; without the group both would


def test_single_process_helpers() -> None:
    assert not D.is_initialized()
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce(t, "mean") is t and t.tolist() == [1.0, 2.0]
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object(3) == 3
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert D.convert_sync_bn(model, torch.device("cpu"), True) is model  # SyncBN is CUDA-only
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_resolve_device() -> None:
    assert D.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert D.resolve_device("auto").type == expected
    with pytest.raises(UserError, match="train.device"):
        D.resolve_device("tpu", "train.device")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            D.resolve_device("cuda")


def test_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL needs a GPU per process: auto falls back to the CPU, cuda names the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("auto", local_rank=1, local_world_size=2) == torch.device("cuda", 1)
    assert D.resolve_device("auto", local_rank=3, local_world_size=4) == torch.device("cpu")
    with pytest.raises(UserError, match="4 processes on this node but 2 GPU.*--nproc_per_node 2"):
        D.resolve_device("cuda", local_rank=3, local_world_size=4)

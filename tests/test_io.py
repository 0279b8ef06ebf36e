"""Atomic writes: the file appears whole or not at all, with ordinary permissions."""
from __future__ import annotations

import os

import pytest
import torch

from emactl.errors import UserError
from emactl.io import atomic_path, load_torch, save_torch, write_text


def test_write_text_has_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a" / "table.md", "hello\n")
    finally:
        os.umask(mask)
    assert path.read_text() == "hello\n"
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path):
    path = write_text(tmp_path / "x.csv", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]


def test_checkpoint_round_trip_and_corrupt_file(tmp_path):
    path = save_torch({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(load_torch(path)["w"], torch.arange(3))
    path.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_torch(path)


def test_unsafe_pickle_is_refused_without_suggesting_an_unsafe_load(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": argparse.Namespace(a=1)}, path)
    with pytest.raises(UserError) as info:
        load_torch(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot load checkpoint (") and "argparse.Namespace" in message
    for advice in ("weights_only", "can still be loaded", "trust", "safe_globals"):
        assert advice not in message
    assert "\n" not in message and "\x1b" not in message


def test_folder_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    from emactl.io import folder_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 999999 on elsewhere (emactl train)\n")  # left by a killed process
    with folder_lock(run, "emactl train", "choose another --name"):
        assert (run / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match=rf"run: in use by pid {os.getpid()} on .*\(emactl train\); wait$"):
            with folder_lock(run, "emactl eval", "wait"):
                pass
    with folder_lock(run, "emactl eval", "wait"):  # released: free again
        pass


def test_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    from emactl.io import ensure_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"f: exists and is not a folder; choose another --out"):
        ensure_dir(tmp_path / "f", "--out")
    with pytest.raises(UserError, match=r"f/sub: cannot create this output folder"):
        ensure_dir(tmp_path / "f" / "sub", "--out")
    with pytest.raises(UserError, match=r"f: exists and is not a folder; choose a writable location"):
        write_text(tmp_path / "f" / "x.csv", "a")

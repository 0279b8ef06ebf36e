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

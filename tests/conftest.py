"""Shared test fixtures."""
from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)
    yield


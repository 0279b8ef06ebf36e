"""cuDNN's algorithm search (``torch.backends.cudnn.benchmark``), switched on for a block only."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """Let cuDNN time its convolution algorithms for the shapes seen in the block, then restore
    the previous setting. It pays for fixed shapes (training crops); for images of many sizes
    (whole-image validation) each new size would be timed again. No effect without CUDA."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous

"""Parameters, multiply-accumulates (MACs), FLOPs and non-GEMM work, counted without compute.

Conventions (every table that shows these numbers repeats them):

* **MACs** are the multiply-accumulates of convolutions and matrix products (conv, mm, bmm,
  addmm, attention kernels). They come from :class:`torch.utils.flop_counter.FlopCounterMode`,
  which counts 2 FLOPs per multiply-add, divided by 2. Biases are not counted.
* **FLOPs** are 2 × MACs: the same operations in the "two per multiply-add" convention of
  FlopCounterMode. Neither number includes softmax, normalisation, activations, pooling,
  resizing or elementwise adds.
* **Non-GEMM elements** count that remaining work as a size indicator, not as FLOPs: one per
  element of the largest operand of every pointwise op (ReLU, add, div, ...) and of every
  softmax, batch-norm, reduction, pooling and resize op.

Counting runs on ``meta`` tensors, so a ResNet-101 at 513×513 costs a fraction of a second:
build the module under ``with torch.device("meta"):`` (or pass it to :func:`count_module`,
which makes a meta copy) and feed it meta inputs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

MACS_NOTE = (
    "MACs: multiply-accumulates of conv/matmul ops (torch FlopCounterMode total / 2); "
    "FLOPs = 2 x MACs; neither counts softmax, normalisation, activations, pooling, "
    "resizing or elementwise ops (see non-GEMM elements)"
)
ELEMENTS_NOTE = (
    "non-GEMM elements: one per element of the largest operand of each pointwise, softmax, "
    "batch-norm, reduction, pooling and resize op in the forward pass (a size indicator, not FLOPs)"
)

_aten = torch.ops.aten
_NON_POINTWISE_WORK = {
    _aten._softmax,
    _aten._log_softmax,
    _aten.native_batch_norm,
    _aten._native_batch_norm_legit,
    _aten._native_batch_norm_legit_no_training,
    _aten.cudnn_batch_norm,
    _aten.native_layer_norm,
    _aten.native_group_norm,
    _aten.sum,
    _aten.mean,
    _aten.var,
    _aten.var_mean,
    _aten.amax,
    _aten.linalg_vector_norm,
    _aten.norm,
    _aten.max_pool2d_with_indices,
    _aten.avg_pool2d,
    _aten._adaptive_avg_pool2d,
    _aten.upsample_bilinear2d,
    _aten.upsample_nearest2d,
}


class _ElementCounter(TorchDispatchMode):
    """Counts the non-GEMM work of the ops that run under it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet not in flop_registry and (torch.Tag.pointwise in func.tags or packet in _NON_POINTWISE_WORK):
            sizes = [t.numel() for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
            self.total += max(sizes, default=0)
        return out


@dataclass
class OpCounts:
    """What one forward pass costs. ``module_macs`` maps submodule names ("" = root) to MACs."""

    macs: int
    elements: int
    module_macs: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers such as the EMA bases or BN statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_ops(fn: Callable[..., Any], *args: Any, root: str | None = None) -> OpCounts:
    """Count MACs and non-GEMM elements of ``fn(*args)``, run under ``no_grad``.

    Pass meta tensors to count without computing. ``root`` is the class name FlopCounterMode
    gives the outermost module (``type(module).__name__``); it is stripped from the keys of
    :attr:`OpCounts.module_macs` so they match ``module.named_modules()``.
    """
    flops = FlopCounterMode(display=False, depth=None)
    elements = _ElementCounter()
    with torch.no_grad(), flops, elements:
        fn(*args)
    module_macs: dict[str, int] = {}
    if root is not None:
        for name, per_op in flops.get_flop_counts().items():
            if name == root:
                module_macs[""] = sum(per_op.values()) // 2
            elif name.startswith(root + "."):
                module_macs[name[len(root) + 1:]] = sum(per_op.values()) // 2
    return OpCounts(flops.get_total_flops() // 2, elements.total, module_macs)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device."""
    if all(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        return module
    return copy.deepcopy(module).to("meta")


def count_module(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> OpCounts:
    """Count one forward pass of ``module`` in eval mode on a meta input of ``input_shape``."""
    meta = meta_copy(module)
    was_training = meta.training
    meta.eval()
    try:
        x = torch.empty(*input_shape, device="meta", dtype=dtype)
        return count_ops(meta, x, root=type(meta).__name__)
    finally:
        meta.train(was_training)

"""EM attention captured in CUDA graphs: one launch per call instead of about twenty.

The EM iterations are a chain of small kernels (per iteration two GEMMs, a softmax and the
normalisation; then the reconstruction GEMM). Where each runs for only microseconds, launching
them from Python can cost more than running them; a CUDA graph records the chain once per input
signature and replays it with a single launch. At the paper's shapes (B=4, C=512, K=64, 65×65)
on an H200 it did not pay (+1.6 % fp32, −0.3 % bf16, ``emactl profile --sections ema``): the
kernels themselves take the time there, so ``model.ema.cuda_graph`` is off by default.

Replays write into the graph's own static tensors: the :class:`EMAOutput` returned by a call
is overwritten by the next call of the same signature, exactly like EMAU's reusable
reconstruction buffer. Graphs carry no autograd, so they are only for calls that need no
gradient through the EM iterations (eval, or training with ``grad="none"``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch
from torch import Tensor

from .ema import EMAOutput, em_attention


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    mu0: Tensor
    out: EMAOutput


def graphable(x: Tensor) -> bool:
    """Whether a call on ``x`` may use a graph: a CUDA tensor, outside compilation and capture."""
    return x.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


class GraphedEMAttention:
    """``em_attention(x, mu0, iters, temperature, norm, grad="none")``, replayed from CUDA graphs.

    A signature (shapes, strides, dtypes, device, iterations, autocast state) is captured the
    second time it is seen, so shapes that occur once, such as whole images of varying size in
    evaluation, run eagerly instead of paying for a capture. At most ``max_graphs`` graphs are
    kept; the least recently used is dropped first.
    """

    def __init__(self, temperature: float = 1.0, norm: str = "l2", max_graphs: int = 8) -> None:
        self.temperature, self.norm = temperature, norm
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._seen: set[Hashable] = set()

    def __call__(self, x: Tensor, mu0: Tensor, iters: int) -> EMAOutput:
        if not graphable(x):
            raise ValueError("GraphedEMAttention needs a CUDA input outside torch.compile and graph capture")
        key = self._signature(x, mu0, iters)
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen.add(key)
                with torch.no_grad():
                    return em_attention(x, mu0, iters, self.temperature, self.norm, grad="none")
            captured = self._capture(x, mu0, iters)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        captured.x.copy_(x)
        captured.mu0.copy_(mu0)
        captured.graph.replay()
        return captured.out

    def __len__(self) -> int:
        return len(self._graphs)

    def __deepcopy__(self, memo: dict) -> GraphedEMAttention:
        """A copy starts with no graphs: they belong to the tensors they were captured on."""
        return GraphedEMAttention(self.temperature, self.norm, self.max_graphs)

    def __getstate__(self) -> dict:
        return {"temperature": self.temperature, "norm": self.norm, "max_graphs": self.max_graphs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @staticmethod
    def _signature(x: Tensor, mu0: Tensor, iters: int) -> Hashable:
        amp = torch.is_autocast_enabled("cuda")
        return (
            tuple(x.shape), x.stride(), x.dtype, tuple(mu0.shape), mu0.stride(), mu0.dtype, x.device, iters,
            amp, torch.get_autocast_dtype("cuda") if amp else None,
        )

    def _capture(self, x: Tensor, mu0: Tensor, iters: int) -> _Captured:
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
        static_mu0 = torch.empty_strided(mu0.shape, mu0.stride(), dtype=mu0.dtype, device=mu0.device).copy_(mu0)

        def run() -> EMAOutput:
            return em_attention(static_x, static_mu0, iters, self.temperature, self.norm, grad="none")

        with torch.no_grad():
            # warm up on a side stream, as capture requires (cuBLAS handles, workspaces)
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
        return _Captured(graph, static_x, static_mu0, out)

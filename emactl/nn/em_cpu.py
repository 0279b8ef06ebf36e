"""Faster products on the CPU: the EM iterations that need no gradient, and the unit's conv2.

:func:`emactl.nn.ema.em_attention` writes an iteration as two batched matrix products
(``torch.bmm``) with a softmax and a normalisation between them. On a CPU the same products can
run faster another way, and which way wins depends on the processor, the dtype and the thread
count (docs/BENCHMARKS.md has the figures and the commands that measured them):

* ``conv``: both products as 1×1 convolutions over one sample's pixels (oneDNN instead of
  MKL's sgemm), each operand a view of the tensors as they are (:func:`conv_iterations`);
* ``blocked``: the plain order reads all of ``x`` twice per iteration;
  :func:`blocked_iterations` reads it once, block of pixels by block.

``auto`` considers them for large products only, of at least :data:`LARGE` multiply-adds per
sample (C·N·K; the paper's 512·65²·64 is 138 M): below that their per-call overheads cost more
than they save. Above it, ``auto`` measures: the first call of a signature (shapes, dtype,
iterations, threads) runs each candidate twice on its own inputs and keeps the fastest for later
calls (:func:`tune_methods`); the last run's result is returned, so no call is wasted. It takes
``conv`` into account for contiguous fp32 features on an x86 CPU with oneDNN, ``blocked`` for
fp32 or fp64 CPU features, and leaves everything else (bf16, GPUs, autograd, torch.compile) to
the batched products. Only the summation order changes, so results agree with the plain order
to rounding (the tests hold them to 1e-5).

:func:`conv1x1` does the same for the unit's conv2, a (C, C) weight applied to every pixel of
the (B, C, N) reconstruction, choosing among ``conv2d``, ``bmm`` and pixel-blocked ``bmm``.
In training, :class:`TrainingTail` runs conv2, BN, the residual add and the ReLU as one autograd
Function over tensors the unit keeps, instead of new tensors at every layer.
"""

from __future__ import annotations

import functools
import math
import platform
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ema import finish_m_step, memory_format_of, plain_iterations, softmax_bases

BLOCK_BYTES = 1 << 20  # one sample's share of a pixel block: about half a core's L2 here
LARGE = 1 << 26  # multiply-adds per sample and product (C·N·K) from which auto leaves bmm


@functools.cache
def onednn_on_x86() -> bool:
    """Whether fp32 convolutions go through oneDNN on an x86 processor (where sgemm lags them)."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


TUNED: dict[tuple, str] = {}  # the fastest method measured for each signature (see tune_methods)


def signature(x: Tensor, mu: Tensor, iters: int, folded: bool) -> tuple:
    """What the speed of the methods depends on: shapes, strides, dtype, iterations, threads."""
    return (tuple(x.shape), x.stride(), x.dtype, tuple(mu.shape), iters, folded, torch.get_num_threads())


def candidates(x: Tensor) -> tuple[str, ...]:
    """The methods ``auto`` chooses among for large fp32/fp64 products on the CPU."""
    fast = ("conv",) if x.dtype == torch.float32 and onednn_on_x86() and x[0].is_contiguous() else ()
    return ("bmm", "blocked", *fast)


def tune_methods(methods: Sequence[str], run: Callable[[str], Any], clock: Callable[[], float] = time.perf_counter,
                 repeats: int = 2) -> tuple[str, Any]:
    """Run each method ``repeats`` times, in interleaved rounds (a burst of load then slows
    every method of a round alike), and return the fastest (best of its runs) with the result
    of the last run: the tuning costs no wasted call."""
    best = {method: math.inf for method in methods}
    result = None
    for _ in range(repeats):
        for method in methods:
            start = clock()
            result = run(method)
            best[method] = min(best[method], clock() - start)
    return min(best, key=best.get), result


def pick_method(x: Tensor, mu: Tensor, method: str = "auto", iters: int = 3, folded: bool = False) -> str:
    """The method that will run iterations on ``x``: ``bmm`` wherever the fast ones do not apply
    (autograd, torch.compile, another device, mixed dtypes, inputs autocast would cast); for
    large fp32/fp64 products under ``auto``, the one measured fastest for this signature, or
    ``tune`` when none has been measured yet."""
    if method == "bmm" or x.device.type != "cpu" or x.dtype != mu.dtype:
        return "bmm"
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return "bmm"
    if torch.is_autocast_enabled("cpu") and x.dtype != torch.get_autocast_dtype("cpu"):
        return "bmm"  # fp32 inputs under bf16 autocast: leave the precision to autocast
    if method != "auto":
        return method
    if x.shape[1] * x.shape[2] * mu.shape[2] < LARGE or x.dtype not in (torch.float32, torch.float64):
        return "bmm"
    return TUNED.get(signature(x, mu, iters, folded), "tune")


def run_fast(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, method: str, block: int | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """(last responsibilities (B, K, N), final bases (B, C, K)) by a fast method, or ``None``
    where :func:`pick_method` leaves the iterations to the batched products. ``weight`` and
    ``bias`` fold a 1×1 convolution in, as in :func:`emactl.nn.ema.em_attention`."""
    chosen = pick_method(x, mu, method, iters, weight is not None)
    if weight is not None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        chosen = "bmm"
    if chosen == "bmm":
        return None

    def run(m: str) -> tuple[Tensor, Tensor]:
        if m == "conv":
            return conv_iterations(x, mu, iters, temperature, norm, weight, bias)
        if m == "blocked":
            size = block or max(128, BLOCK_BYTES // (x.shape[1] * x.element_size()) // 64 * 64)
            return blocked_iterations(x, mu, iters, temperature, norm, size, weight, bias)
        return plain_iterations(x, mu, iters, temperature, norm, weight, bias)

    with torch.autocast("cpu", enabled=False):
        if chosen != "tune":
            return run(chosen)
        fastest, result = tune_methods(candidates(x), run)
        TUNED[signature(x, mu, iters, weight is not None)] = fastest
        return result


def _folded(mu: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The E step's operands for bases ``mu`` ((B,) C, K): weightᵀ·mu and muᵀ·bias (see e_step)."""
    if weight is None:
        return mu, None
    mu_t = mu.transpose(-1, -2)
    nu_t = torch.mm(mu_t.reshape(-1, mu.shape[-2]), weight).view(*mu_t.shape[:-1], -1)
    return nu_t.transpose(-1, -2), (torch.matmul(mu_t, bias) if bias is not None else None)


def conv_iterations(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, weight: Tensor | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """EM iterations with both products as 1×1 convolutions, one sample at a time.

    For a sample ``xs`` (C, N):

    * E step: the image (1, C, 1, N) convolved with K filters ``muᵀ`` (K, C, 1, 1) gives the
      logits (K, N);
    * M step: ``zᵀ`` seen as a channels-last image (1, N, 1, K), i.e. N channels over K
      positions, convolved with C filters ``xs`` (C, N, 1, 1) gives ``x zᵀ`` (C, K).

    A sample's features (8.6 MB at the paper's shapes) stay in the last-level cache across its
    iterations.
    """
    x = x.contiguous()
    b, c, n = x.shape
    k = mu.shape[2]
    z = x.new_empty(b, k, n)
    bases = x.new_empty(b, mu.shape[1], k)
    for s in range(b):
        xs = x[s]
        image, filters = xs.view(1, c, 1, n), xs.view(c, n, 1, 1)
        mu_s = mu[s if mu.shape[0] > 1 else 0]
        for _ in range(iters):
            nu, shift = _folded(mu_s, weight, bias)
            logits = F.conv2d(image, nu.t().contiguous().view(k, c, 1, 1), shift).view(k, n)
            if temperature != 1.0:
                logits.mul_(temperature)
            zs = softmax_bases(logits, out=z[s])
            xz = F.conv2d(zs.t().unsqueeze(0).unsqueeze(2), filters)[0, :, 0, :]
            mu_s = finish_m_step(xz.unsqueeze(0), zs.unsqueeze(0), norm, weight, bias)[0]
        bases[s] = mu_s
    return z, bases


def blocked_iterations(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, block: int,
    weight: Tensor | None = None, bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """EM iterations in one pass over the features per iteration.

    The E step's softmax runs over K for each pixel on its own, so an iteration can go block by
    block of pixels: the logits and responsibilities of a block, then its share of the M step's
    sum, while the block of ``x`` is still in cache.
    """
    b, c, n = x.shape
    k = mu.shape[2]
    z = x.new_empty(b, k, n)
    total = x.new_empty(b, c, k)
    for _ in range(iters):
        nu, shift = _folded(mu, weight, bias)
        nu_t = nu.transpose(1, 2)
        for start in range(0, n, block):
            xb, zb = x[:, :, start : start + block], z[:, :, start : start + block]
            logits = torch.bmm(nu_t, xb) if shift is None else torch.baddbmm(shift.unsqueeze(2), nu_t, xb)
            if temperature != 1.0:
                logits.mul_(temperature)
            softmax_bases(logits, out=zb)
            if start == 0:
                torch.bmm(xb, zb.transpose(1, 2), out=total)
            else:
                total.baddbmm_(xb, zb.transpose(1, 2))
        mu = finish_m_step(total, z, norm, weight, bias)  # a new tensor: the next pass may overwrite total
    return z, mu


# ---------------------------------------------------------------------------------------------
# The unit's conv2: a 1×1 convolution of the (B, C, N) reconstruction.

CONV_METHODS = ("conv2d", "bmm", "blocked")
CONV_BLOCK = 512  # pixels per block of ``blocked``: the best of 256–1024 on one thread here
TUNED_CONV: dict[tuple, str] = {}  # the fastest conv method measured for each signature


def conv1x1(weight: Tensor, y: Tensor, shift: Tensor | None = None, method: str = "auto", out: Tensor | None = None) -> Tensor:
    """``weight`` (C_out, C_in) applied to every pixel of ``y`` (B, C_in, N), plus ``shift``
    (C_out,): the (B, C_out, N) output, contiguous, as a 1×1 convolution gives it.

    Three ways compute the same products: ``conv2d`` (oneDNN), ``bmm`` (one batched sgemm or
    bf16 GEMM) and ``blocked`` (the batched product over blocks of :data:`CONV_BLOCK` pixels).
    Which is fastest depends on the processor, the dtype and the thread count, so ``auto``
    times them on the first call of a signature, as :func:`run_fast` does for the EM
    iterations, and keeps the fastest. Under autograd the chosen forward runs inside
    :class:`Conv1x1`, whose backward is one batched product per gradient; ``shift`` is for the
    eval path (a BN folded in) and takes no gradient. Without autograd the product goes into
    ``out`` (B, C_out, N) where the method allows.
    """
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or y.requires_grad)
    if method == "auto":
        method, result = conv_method(weight, y, shift)
        if result is not None and not needs_grad:
            return result
    if needs_grad:
        if shift is not None and shift.requires_grad:
            raise ValueError("conv1x1: shift takes no gradient")
        product = Conv1x1.apply(weight, y, method)
        return product if shift is None else product + shift.view(1, -1, 1)
    return _conv1x1(method, weight, y, shift, out)


def conv_method(weight: Tensor, y: Tensor, shift: Tensor | None = None) -> tuple[str, Tensor | None]:
    """The :data:`CONV_METHODS` entry measured fastest for this signature, timing them (without
    autograd) on its first call; then also the last timed result, else ``None``."""
    key = (tuple(y.shape), y.dtype, tuple(weight.shape), shift is None, torch.get_num_threads())
    if key in TUNED_CONV:
        return TUNED_CONV[key], None
    with torch.no_grad():
        method, result = tune_methods(CONV_METHODS, lambda m: _conv1x1(m, weight, y, shift), repeats=3)
    TUNED_CONV[key] = method
    return method, result


def _conv1x1(method: str, weight: Tensor, y: Tensor, shift: Tensor | None, out: Tensor | None = None) -> Tensor:
    """The product by ``method``; ``bmm`` and ``blocked`` write into ``out`` (B, C_out, N) when given."""
    b, c_in, n = y.shape
    c = weight.shape[0]
    if method == "conv2d":
        return F.conv2d(y.view(b, c_in, 1, n), weight.view(c, c_in, 1, 1), shift).view(b, c, n)
    w = weight.expand(b, c, c_in)
    bias = shift.view(1, c, 1) if shift is not None else None
    if method == "bmm":
        return torch.bmm(w, y, out=out) if bias is None else torch.baddbmm(bias, w, y, out=out)
    out = y.new_empty(b, c, n) if out is None else out
    for start in range(0, n, CONV_BLOCK):
        part, dest = y[:, :, start : start + CONV_BLOCK], out[:, :, start : start + CONV_BLOCK]
        if bias is None:
            torch.bmm(w, part, out=dest)
        else:
            torch.baddbmm(bias, w, part, out=dest)
    return out


class Conv1x1(torch.autograd.Function):
    """:func:`conv1x1` under autograd: the forward by the chosen method, the backward as
    batched products (the weight gradient Σ_b g_b y_bᵀ, the input gradient weightᵀ g)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, y: Tensor, method: str) -> Tensor:
        ctx.save_for_backward(weight, y)
        return _conv1x1(method, weight, y, None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, y = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_weight = torch.bmm(grad, y.transpose(1, 2)).sum(0)
        if ctx.needs_input_grad[1]:
            grad_y = torch.bmm(weight.t().expand(y.shape[0], -1, -1), grad)
        return grad_weight, grad_y, None


# ---------------------------------------------------------------------------------------------
# The unit's end in training: conv2 → BN with batch statistics → + identity → ReLU.


class TrainingTail(torch.autograd.Function):
    """conv2, BN in training mode, the residual add and the ReLU as one autograd Function.

    Through the separate layers, autograd makes every intermediate a new tensor: conv2's
    output, BN's output (and its fp32 copy under autocast), the sum, the gradients of each. At
    the paper's shapes each is tens of MB, which the CPU allocator maps fresh and page-faults on
    every call; those passes then cost about as much as conv2's products (docs/BENCHMARKS.md).
    Here every one of them, the output and the input's gradient included, is a tensor the unit
    keeps (``kept``, an :class:`emactl.nn.ema.Reusable`), reused whenever nothing else still
    refers to it.

    BN is torch's own kernel (``native_batch_norm`` and its backward), so batch statistics,
    running statistics and gradients are those of ``nn.BatchNorm2d``.
    """

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, identity: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor,
        running_var: Tensor, momentum: float, eps: float, method: str, kept: Any,
    ) -> Tensor:
        shape = tuple(identity.shape)
        v = _conv1x1(method, weight, y, None, out=kept.get("conv2", tuple(y.shape), y)).view(shape)
        if v.dtype == identity.dtype:  # BN writes the output itself
            out = normed = kept.get("out", shape, identity)
        else:  # BN's output is copied to the input's dtype, and to its memory layout on the way
            out, normed = kept.get("out", shape, identity, memory_format=memory_format_of(identity)), kept.get("normed", shape, v)
        stats = v.new_empty(2, v.shape[1], dtype=torch.promote_types(v.dtype, torch.float32))  # save_mean, save_invstd
        torch.ops.aten.native_batch_norm.out(
            v, gamma, beta, running_mean, running_var, True, momentum, eps, out=normed, save_mean=stats[0], save_invstd=stats[1]
        )
        if normed is not out:
            out.copy_(normed)
        out.add_(identity).relu_()
        ctx.save_for_backward(y, v, weight, gamma, stats, out)
        ctx.eps, ctx.kept = eps, kept
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, v, weight, gamma, stats, out = ctx.saved_tensors
        needs, kept = ctx.needs_input_grad, ctx.kept
        g = torch.ops.aten.threshold_backward.grad_input(
            grad, out, 0, grad_input=kept.get("grad_in", tuple(out.shape), out, memory_format=memory_format_of(out))
        )
        g_bn = g if g.dtype == v.dtype else kept.get("grad_normed", tuple(v.shape), v).copy_(g)
        grad_v, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            g_bn, v, gamma, None, None, stats[0], stats[1], True, ctx.eps, [True, needs[3], needs[4]]
        )
        gv = grad_v.view(y.shape)
        grad_weight = torch.bmm(gv, y.transpose(1, 2)).sum(0) if needs[2] else None
        grad_y = torch.bmm(weight.t().expand(y.shape[0], -1, -1), gv) if needs[0] else None
        return (grad_y, g if needs[1] else None, grad_weight, grad_gamma if needs[3] else None,
                grad_beta if needs[4] else None, *(None,) * 6)

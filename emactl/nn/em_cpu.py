"""Faster products on the CPU: the EM iterations that need no gradient, and the unit's conv2.

:func:`emactl.nn.ema.em_attention` writes an iteration as two batched matrix products
(``torch.bmm``) with a softmax and a normalisation between them. On a CPU the same products can
run faster another way, and which way wins depends on the processor, the dtype and the thread
count (docs/BENCHMARKS.md has the figures and the commands that measured them):

* ``conv``: both products as 1×1 convolutions over one sample's pixels (oneDNN instead of
  MKL's sgemm), each operand a view of the tensors as they are (:func:`conv_iterations`);
* ``blocked``: the plain order reads all of ``x`` twice per iteration;
  :func:`blocked_iterations` reads it once, block of pixels by block;
* ``onednn``: every product by oneDNN's fp32 matrix product (the op torch.compile uses for a
  linear layer on the CPU) one sample at a time (:func:`onednn_bmm`), the logits stored
  (B, N, K) so that the E step reads a transposed copy of the features, made once per call
  (:func:`onednn_iterations`). Where MKL's sgemm runs these skinny products below its square
  rate, oneDNN's kernels can run them near it; the reconstruction ``mu zᵀ`` then runs the same
  way.

``auto`` considers them for large products only, of at least :data:`LARGE` multiply-adds per
sample (C·N·K; the paper's 512·65²·64 is 138 M): below that their per-call overheads cost more
than they save. Above it, ``auto`` measures: the first call of a signature (shapes, dtype,
iterations, threads) runs each candidate twice on its own inputs and keeps the fastest for later
calls (:func:`tune_methods`); the last run's result is returned, so no call is wasted. It takes
``conv`` and ``onednn`` into account for contiguous fp32 features on an x86 CPU with oneDNN,
``blocked`` for fp32 or fp64 CPU features, and leaves everything else (bf16, GPUs, autograd,
torch.compile) to the batched products. Only the summation order changes, so results agree with
the plain order to rounding (the tests hold them to 1e-5).

:func:`conv1x1` does the same for the unit's conv2, a (C, C) weight applied to every pixel of
the (B, C, N) reconstruction, choosing among ``conv2d``, ``bmm``, pixel-blocked ``bmm`` and, for
fp32, ``onednn`` (not for the separate layers under autograd: :func:`conv_methods`); its
backward's products run by the same method.
In training, :class:`TrainingTail` runs conv2 (on centred input, for BN's sake), BN, the
residual add and the ReLU as one autograd Function over tensors the unit keeps, instead of new
tensors at every layer.
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

from .ema import (add_relu_, add_shift_back, channel_mean, finish_m_step, folded_bases, memory_format_of, plain_iterations,
                  softmax_bases)

BLOCK_BYTES = 1 << 20  # one sample's share of a pixel block: about half a core's L2 here
LARGE = 1 << 26  # multiply-adds per sample and product (C·N·K) from which auto leaves bmm
RESULT_BYTES = 1 << 21  # onednn_bmm makes a shallow product's result a block of rows of about this size at a time
SHALLOW = 128  # products' depth (K) up to which onednn_bmm splits large results


@functools.cache
def onednn_on_x86() -> bool:
    """Whether fp32 convolutions go through oneDNN on an x86 processor (where sgemm lags them)."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@functools.cache
def onednn_products() -> bool:
    """Whether oneDNN's matrix product op (``torch.ops.mkldnn._linear_pointwise``, private to
    PyTorch) is here and computes ``input · weightᵀ`` as this module calls it: checked once on
    a small product, so another PyTorch's change of the op leaves ``onednn`` out, not broken."""
    if not (onednn_on_x86() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
    try:
        got = torch.ops.mkldnn._linear_pointwise(a, b.t().contiguous().t(), None, "none", [], "")
    except (RuntimeError, TypeError):
        return False
    return bool(torch.equal(got, a @ b.t()))


def onednn_bmm(a: Tensor, b: Tensor, out: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """``a`` (B|1, M, K) times ``b`` (B, K, N), plus ``shift`` (B|1, M) on every row's entries,
    by oneDNN's fp32 matrix product, one sample at a time, into ``out`` (B, M, N) when given.

    The op computes ``input · weightᵀ``; ``b``'s sample transposed is a view, so no operand is
    copied. It has no ``out=`` form, so each result is copied in, and freed before the next is
    made, so that the allocator hands the same memory back. A shallow product (K ≤
    :data:`SHALLOW`, as the reconstruction's K = 64) is bound by writing its result, not by its
    arithmetic: a sample's result larger than :data:`RESULT_BYTES` (8.6 MB for the
    reconstruction at the paper's shapes) is then made a block of rows at a time, each copied
    out while it is still in cache. A deep one (conv2's K = 512) loses by the split
    (docs/BENCHMARKS.md).
    """
    product = torch.ops.mkldnn._linear_pointwise
    bt = b.transpose(1, 2)
    rows_total, n = a.shape[1], b.shape[2]
    out = b.new_empty(b.shape[0], rows_total, n) if out is None else out
    shallow = a.shape[2] <= SHALLOW
    blocks = max(1, math.ceil(rows_total * n * b.element_size() / RESULT_BYTES)) if shallow else 1
    rows = math.ceil(rows_total / blocks)
    for s in range(b.shape[0]):
        a_s = a[s if a.shape[0] > 1 else 0]
        shift_s = None if shift is None else shift[s if shift.shape[0] > 1 else 0]
        for r0 in range(0, rows_total, rows):
            result = product(a_s[r0:r0 + rows], bt[s], None, "none", [], "")
            if shift_s is None:
                out[s, r0:r0 + rows].copy_(result)
            else:
                torch.add(result, shift_s[r0:r0 + rows].unsqueeze(1), out=out[s, r0:r0 + rows])
            del result
    return out


def batched_product(method: str, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a`` (B|1, M, K) times ``b`` (B, K, N): by :func:`onednn_bmm` for ``onednn``, else ``torch.bmm``."""
    if method == "onednn":
        return onednn_bmm(a, b, out)
    return torch.bmm(a.expand(b.shape[0], -1, -1), b, out=out)


TUNED: dict[tuple, str] = {}  # the fastest method measured for each signature (see tune_methods)


def signature(x: Tensor, mu: Tensor, iters: int, folded: bool) -> tuple:
    """What the speed of the methods depends on: shapes, strides, dtype, iterations, threads."""
    return (tuple(x.shape), x.stride(), x.dtype, tuple(mu.shape), iters, folded, torch.get_num_threads())


def candidates(x: Tensor) -> tuple[str, ...]:
    """The methods ``auto`` chooses among for large fp32/fp64 products on the CPU."""
    fp32 = x.dtype == torch.float32 and x[0].is_contiguous()
    fast = ("conv",) if fp32 and onednn_on_x86() else ()
    return ("bmm", "blocked", *fast, *(("onednn",) if fp32 and onednn_products() else ()))


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
    if method == "onednn" and not (x.dtype == torch.float32 and onednn_products()):
        return "bmm"
    if method != "auto":
        return method
    if x.shape[1] * x.shape[2] * mu.shape[2] < LARGE or x.dtype not in (torch.float32, torch.float64):
        return "bmm"
    return TUNED.get(signature(x, mu, iters, folded), "tune")


def run_fast(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, method: str, block: int | None = None,
    weight: Tensor | None = None, bias: Tensor | None = None, scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor, str] | None:
    """(last responsibilities (B, K, N), final bases (B, C, K), the method that ran) by a fast
    method, or ``None`` where :func:`pick_method` leaves the iterations to the batched products.
    ``weight`` and ``bias`` fold a 1×1 convolution in, as in :func:`emactl.nn.ema.em_attention`;
    ``scratch`` is memory ``onednn`` may write meanwhile (see :func:`onednn_iterations`)."""
    chosen = pick_method(x, mu, method, iters, weight is not None)
    if weight is not None and (weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        chosen = "bmm"
    if chosen == "bmm":
        return None

    def run(m: str) -> tuple[Tensor, Tensor]:
        if m == "conv":
            return conv_iterations(x, mu, iters, temperature, norm, weight, bias)
        if m == "onednn":
            return onednn_iterations(x, mu, iters, temperature, norm, weight, bias, scratch)
        if m == "blocked":
            size = block or max(128, BLOCK_BYTES // (x.shape[1] * x.element_size()) // 64 * 64)
            return blocked_iterations(x, mu, iters, temperature, norm, size, weight, bias)
        return plain_iterations(x, mu, iters, temperature, norm, weight, bias)

    with torch.autocast("cpu", enabled=False):
        if chosen != "tune":
            return (*run(chosen), chosen)
        methods = candidates(x)
        fastest, result = tune_methods(methods, run)
        TUNED[signature(x, mu, iters, weight is not None)] = fastest
        return (*result, methods[-1])  # the result of the last method timed


def _folded(mu: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The E step's operands for bases ``mu`` ((B,) C, K): weightᵀ·mu and muᵀ·bias (see
    :func:`emactl.nn.ema.folded_bases`), or ``mu`` itself without a folded convolution."""
    if weight is None:
        return mu, None
    nu_t, shift = folded_bases(mu, weight, bias)
    return nu_t.transpose(-1, -2), shift


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


def onednn_iterations(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, weight: Tensor | None = None, bias: Tensor | None = None,
    scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """EM iterations as written (:func:`emactl.nn.ema.plain_iterations`), every product by
    oneDNN, with the logits stored (B, N, K).

    oneDNN runs ``input · weightᵀ`` fastest with a contiguous input, so the E step reads the
    features transposed, ``xᵀ`` (B, N, C_in), copied once per call: the logits of a sample are
    ``xᵀ (weightᵀ mu) + muᵀ bias``, the bias as the op's own. Bases shared by the batch (the
    first iteration from ``mu0``) take one product over all B·N pixels. The M step reads ``x``
    as it is: ``x z`` (B, C_in, K). ``scratch``, a tensor with room for ``xᵀ`` that nothing reads
    meanwhile (:func:`emactl.nn.ema.em_attention` lends the reconstruction's buffer, written only
    after the iterations), saves allocating and page-faulting 35 MB per call at the paper's shapes.
    Returns the responsibilities as a (B, K, N) view, like the other methods.
    """
    product = torch.ops.mkldnn._linear_pointwise
    b, c, n = x.shape
    k = mu.shape[2]
    if mu.shape[0] > 1 and mu.stride(0) == 0:  # mu0 expanded over the batch
        mu = mu[:1]
    fits = (scratch is not None and scratch.numel() == x.numel() and scratch.dtype == x.dtype and scratch.is_contiguous()
            and scratch.device == x.device and scratch.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    xt = (scratch.view(b, n, c) if fits else x.new_empty(b, n, c)).copy_(x.transpose(1, 2))
    z = None
    for _ in range(iters):
        nu, shift = _folded(mu, weight, bias)
        nu_t = nu.transpose(1, 2).contiguous()  # (B|1, K, C_in): the op's weight
        if nu_t.shape[0] == 1 and z is None:  # the op's result is the logits
            z = product(xt.view(b * n, c), nu_t[0], None if shift is None else shift.reshape(k), "none", [], "").view(b, n, k)
        else:
            z = x.new_empty(b, n, k) if z is None else z
            for s in range(b):
                result = product(xt[s], nu_t[s], None if shift is None else shift[s], "none", [], "")
                z[s].copy_(result)
                del result
        if temperature != 1.0:
            z.mul_(temperature)
        torch.softmax(z, -1, out=z)  # over K, the last dimension: PyTorch's kernel there rounds as finely as float64 allows
        mu = finish_m_step(onednn_bmm(x, z), z.transpose(1, 2), norm, weight, bias)
    return z.transpose(1, 2), mu


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

CONV_METHODS = ("conv2d", "bmm", "blocked", "onednn")
CONV_BLOCK = 512  # pixels per block of ``blocked``: the best of 256–1024 on one thread here
TUNED_CONV: dict[tuple, str] = {}  # the fastest conv method measured for each signature


def conv1x1(weight: Tensor, y: Tensor, shift: Tensor | None = None, method: str = "auto", out: Tensor | None = None) -> Tensor:
    """``weight`` (C_out, C_in) applied to every pixel of ``y`` (B, C_in, N), plus ``shift``
    (C_out,): the (B, C_out, N) output, contiguous, as a 1×1 convolution gives it.

    Four ways compute the same products: ``conv2d`` (oneDNN's convolution; the EM methods'
    ``conv`` names it too), ``bmm`` (one batched sgemm or bf16 GEMM), ``blocked`` (the batched
    product over blocks of :data:`CONV_BLOCK` pixels) and, for fp32, ``onednn``
    (:func:`onednn_bmm`; elsewhere ``bmm`` runs instead).
    Which is fastest depends on the processor, the dtype and the thread count, so ``auto``
    times them on the first call of a signature, as :func:`run_fast` does for the EM
    iterations, and keeps the fastest. Under autograd the chosen forward runs inside
    :class:`Conv1x1`, whose backward is one batched product per gradient; ``shift`` is for the
    eval path (a BN folded in) and takes no gradient. Without autograd the product goes into
    ``out`` (B, C_out, N) where the method allows.
    """
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or y.requires_grad)
    method = applicable(method, weight, y)
    if method == "auto":  # under autograd: the separate layers' conv2, perhaps before an uncentred SyncBN
        method, result = conv_method(weight, y, shift, into_batch_norm=needs_grad)
        if result is not None and not needs_grad:
            return result
    if needs_grad:
        if shift is not None and shift.requires_grad:
            raise ValueError("conv1x1: shift takes no gradient")
        product = Conv1x1.apply(weight, y, method)
        return product if shift is None else product + shift.view(1, -1, 1)
    return _conv1x1(method, weight, y, shift, out)


def applicable(method: str, weight: Tensor, y: Tensor) -> str:
    """``method`` as asked for, or ``bmm`` where it is ``onednn`` and oneDNN's fp32 product
    does not apply to these operands."""
    return "bmm" if method == "onednn" and method not in conv_methods(y, weight) else method


def conv_methods(y: Tensor, weight: Tensor, into_batch_norm: bool = False) -> tuple[str, ...]:
    """The :data:`CONV_METHODS` that apply to these operands: ``onednn`` for fp32 on an x86
    CPU, but not for the separate layers' conv2 under autograd (``into_batch_norm``), which may
    feed a SyncBatchNorm uncentred: there its products, about 1.5× further from float64 than
    MKL's, would reach the unit's output fifty-fold (see :class:`TrainingTail`) and take it
    twice as far from float64 as the public code's (docs/BENCHMARKS.md)."""
    fp32 = y.dtype == weight.dtype == torch.float32 and y.device.type == "cpu" and onednn_products()
    return tuple(m for m in CONV_METHODS if m != "onednn" or (fp32 and not into_batch_norm))


def conv_method(weight: Tensor, y: Tensor, shift: Tensor | None = None,
                into_batch_norm: bool = False) -> tuple[str, Tensor | None]:
    """The :func:`conv_methods` entry measured fastest for this signature, timing them (without
    autograd) on its first call; then also the last timed result, else ``None``."""
    key = (tuple(y.shape), y.dtype, tuple(weight.shape), shift is None, into_batch_norm, torch.get_num_threads())
    if key in TUNED_CONV:
        return TUNED_CONV[key], None
    with torch.no_grad():
        method, result = tune_methods(conv_methods(y, weight, into_batch_norm), lambda m: _conv1x1(m, weight, y, shift),
                                      repeats=3)
    TUNED_CONV[key] = method
    return method, result


def _conv1x1(method: str, weight: Tensor, y: Tensor, shift: Tensor | None, out: Tensor | None = None) -> Tensor:
    """The product by ``method``; ``bmm`` and ``blocked`` write into ``out`` (B, C_out, N) when given."""
    b, c_in, n = y.shape
    c = weight.shape[0]
    if method in ("conv2d", "conv"):  # "conv": the EM iterations' name for the same choice
        return F.conv2d(y.view(b, c_in, 1, n), weight.view(c, c_in, 1, 1), shift).view(b, c, n)
    if method == "onednn":
        return onednn_bmm(weight.unsqueeze(0), y, out, shift.unsqueeze(0) if shift is not None else None)
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
    batched products (the weight gradient Σ_b g_b y_bᵀ, the input gradient weightᵀ g), by
    oneDNN where the forward ran so."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, y: Tensor, method: str) -> Tensor:
        ctx.save_for_backward(weight, y)
        ctx.method = method
        return _conv1x1(method, weight, y, None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, y = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_weight = batched_product(ctx.method, grad, y.transpose(1, 2)).sum(0)
        if ctx.needs_input_grad[1]:
            grad_y = batched_product(ctx.method, weight.t().unsqueeze(0), grad)
        return grad_weight, grad_y, None


# ---------------------------------------------------------------------------------------------
# The unit's end in training: conv2 → BN with batch statistics → + identity → ReLU.


def plain_batch_norm(v: Tensor) -> bool:
    """Whether :class:`TrainingTail` runs BN as the plain passes below: fp32 or fp64 (bf16 keeps
    torch's kernel), contiguous, and more than one value per channel."""
    return v.dtype in (torch.float32, torch.float64) and v.is_contiguous() and v.numel() > v.shape[1]


def batch_norm_stats(v: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """BN's batch mean and 1/√(var + eps) per channel of a contiguous (B, C, ...) ``v``, and the
    running statistics' update (the variance unbiased), as ``nn.BatchNorm2d`` in training.

    One pass for Σv and one for Σv² (a per-row norm): the variance as E[v²] − mean², which
    loses digits as mean²/var grows. Here ``v`` is conv2's output on centred input, whose mean
    is zero up to rounding, so nothing is lost. At the paper's shapes, one thread, these passes
    and :func:`batch_norm_add_relu` take about 8 ms where torch's fp32 kernel takes 19.5 for BN
    alone (docs/BENCHMARKS.md).
    """
    b, c = v.shape[:2]
    rows = v.view(b, c, -1)
    count = rows.shape[0] * rows.shape[2]
    mean = channel_mean(rows)
    var = (torch.linalg.vector_norm(rows, dim=2).square_().sum(0) / count - mean.square()).clamp_min_(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * count / (count - 1))
    return mean, torch.rsqrt(var + eps)


def batch_norm_add_relu(v: Tensor, identity: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                        out: Tensor) -> Tensor:
    """``relu(identity + γ (v − mean) invstd + β)`` into ``out``, per channel of (B, C, ...) tensors:
    two passes, ``identity + v·a`` then the shift ``β − mean·a`` and the ReLU together."""
    scale = gamma * invstd
    per_channel = (1, -1) + (1,) * (v.dim() - 2)
    torch.addcmul(identity, v, scale.view(per_channel), out=out)
    return add_relu_(out, torch.addcmul(beta, mean, scale, value=-1).view(per_channel))


def batch_norm_backward(g: Tensor, v: Tensor, gamma: Tensor, mean: Tensor, invstd: Tensor, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BN's gradients in training (input into ``out``, γ, β) from the output's gradient ``g``.

    With a = γ·invstd and x̂ = (v − mean)·invstd, the input's gradient a·(g − mean(g) − x̂·mean(g x̂))
    is a·g + c·(v − mean) per channel: two passes, after one for Σg and two for Σ g·v.
    """
    b, c = v.shape[:2]
    rows, grads, flat = v.view(b, c, -1), g.reshape(b, c, -1), out.view(b, c, -1)
    count = rows.shape[0] * rows.shape[2]
    grad_beta = grads.sum(2).sum(0)
    grad_gamma = (torch.mul(grads, rows, out=flat).sum(2).sum(0) - mean * grad_beta) * invstd
    scale = gamma * invstd
    slope = -scale * invstd * grad_gamma / count
    torch.addcmul((-scale * grad_beta / count - slope * mean).view(1, -1, 1), grads, scale.view(1, -1, 1), out=flat)
    flat.addcmul_(rows, slope.view(1, -1, 1))
    return out, grad_gamma, grad_beta


class TrainingTail(torch.autograd.Function):
    """conv2, BN in training mode, the residual add and the ReLU as one autograd Function.

    Through the separate layers, autograd makes every intermediate a new tensor: conv2's
    output, BN's output (and its fp32 copy under autocast), the sum, the gradients of each. At
    the paper's shapes each is tens of MB, which the CPU allocator maps fresh and page-faults on
    every call; those passes then cost about as much as conv2's products (docs/BENCHMARKS.md).
    Here every one of them, the output and the input's gradient included, is a tensor the unit
    keeps (``kept``, an :class:`emactl.nn.ema.Reusable`), reused whenever nothing else still
    refers to it.

    BN computes what ``nn.BatchNorm2d`` does in training: batch statistics (the running variance
    unbiased), the running statistics' update, the gradients. In bf16 it is torch's own kernel
    (``native_batch_norm`` and its backward); in fp32 and fp64, where that kernel is slow on the
    CPU (19.5 and 24 ms forward and backward at one thread, against 4.3 and 8.1 in bf16, at the
    paper's shapes), a few plain passes: :func:`batch_norm_stats` and :func:`batch_norm_backward`.

    conv2 runs on the centred input ``y − ȳ`` (ȳ: the per-channel mean over the batch and the
    pixels). ``y`` comes out of a ReLU, so conv2's output has a mean about 50 times its standard
    deviation per channel, and BN's subtraction of the batch mean then cancels all but a
    fiftieth of it: the products' rounding, relative to their size, grows fifty-fold in BN's
    output. Centring changes nothing else. BN's output does not move when its input shifts by a
    constant per channel, so the output and ``y``'s gradient ``Wᵀ g`` are those of the plain
    order, and so is the weight gradient ``Σ g (y − ȳ)ᵀ = Σ g yᵀ`` (BN's input gradient ``g`` sums
    to zero per channel); the running mean gets the shift ``W ȳ`` back.
    """

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, identity: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor,
        running_var: Tensor, momentum: float, eps: float, method: str, kept: Any,
    ) -> Tensor:
        shape = tuple(identity.shape)
        mean = channel_mean(y)
        y = torch.sub(y, mean.view(1, -1, 1), out=kept.get("centred", tuple(y.shape), y))
        v = _conv1x1(method, weight, y, None, out=kept.get("conv2", tuple(y.shape), y)).view(shape)
        if v.dtype == identity.dtype:  # BN writes the output itself
            out = normed = kept.get("out", shape, identity)
        else:  # BN's output is copied to the input's dtype, and to its memory layout on the way
            out, normed = kept.get("out", shape, identity, memory_format=memory_format_of(identity)), kept.get("normed", shape, v)
        stats = v.new_empty(2, v.shape[1], dtype=torch.promote_types(v.dtype, torch.float32))  # save_mean, save_invstd
        plain = plain_batch_norm(v)
        if plain:
            stats.copy_(torch.stack(batch_norm_stats(v, running_mean, running_var, momentum, eps)))
            batch_norm_add_relu(v, identity, gamma, beta, stats[0], stats[1], out)
        else:
            torch.ops.aten.native_batch_norm.out(
                v, gamma, beta, running_mean, running_var, True, momentum, eps, out=normed, save_mean=stats[0], save_invstd=stats[1]
            )
            if normed is not out:
                out.copy_(normed)
            add_relu_(out, identity)
        add_shift_back(running_mean, weight, mean, momentum)
        ctx.save_for_backward(y, v, weight, gamma, stats, out)
        ctx.eps, ctx.kept, ctx.method, ctx.plain = eps, kept, method, plain
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, v, weight, gamma, stats, out = ctx.saved_tensors
        needs, kept = ctx.needs_input_grad, ctx.kept
        g = torch.ops.aten.threshold_backward.grad_input(
            grad, out, 0, grad_input=kept.get("grad_in", tuple(out.shape), out, memory_format=memory_format_of(out))
        )
        if ctx.plain:
            grad_v, grad_gamma, grad_beta = batch_norm_backward(g, v, gamma, stats[0], stats[1], kept.get("grad_conv2", tuple(v.shape), v))
        else:
            g_bn = g if g.dtype == v.dtype else kept.get("grad_normed", tuple(v.shape), v).copy_(g)
            grad_v, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
                g_bn, v, gamma, None, None, stats[0], stats[1], True, ctx.eps, [True, needs[3], needs[4]]
            )
        gv = grad_v.view(y.shape)
        grad_weight = batched_product(ctx.method, gv, y.transpose(1, 2)).sum(0) if needs[2] else None
        grad_y = batched_product(ctx.method, weight.t().unsqueeze(0), gv) if needs[0] else None
        return (grad_y, g if needs[1] else None, grad_weight, grad_gamma if needs[3] else None,
                grad_beta if needs[4] else None, *(None,) * 6)

"""Expectation-Maximization Attention (EMA) and the EMA Unit (EMAU).

Notation (Li et al., ICCV 2019): features ``x`` are (B, C, N) with N = H·W pixels, bases
``mu`` are (B, C, K). One EM iteration is

    E step   z   = softmax_k(λ · xᵀ mu)                      (B, N, K)  responsibilities
    M step   mu  = x z / Σ_n z        then normalise each basis over C

and after T iterations the reconstruction is ``x̃ = mu_T z_Tᵀ`` (B, C, N), where ``z_T`` are
the responsibilities of the last E step, as in both public implementations.

With ``norm="l2"`` this is exactly EM for a mixture of von Mises–Fisher components with equal
weights and a shared concentration λ, so ``Σ_n logsumexp_k(λ xₙ·mu_k)`` never decreases from one
iteration to the next. As λ → ∞ the responsibilities become one-hot and EM becomes spherical
K-means.

Gradient modes make the gap between the paper and the public code a choice:

* ``none``: every iteration runs without gradient, so nothing flows back through the EMA
  branch at all (the public code: its first 1×1 conv never learns);
* ``last``: T−1 iterations without gradient, the final one with it;
* ``full``: back-propagate through all T iterations (the paper's unrolled RNN).
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import AVERAGED, BASES_UPDATES, GRAD_MODES, METHODS, NORMS


class EMAOutput(NamedTuple):
    recon: Tensor  # (B, C, N) low-rank reconstruction mu zᵀ
    bases: Tensor  # (B, C, K) final bases mu_T
    resp: Tensor  # (B, N, K) responsibilities z_T of the last E step


def normalize_bases(mu: Tensor, norm: str) -> Tensor:
    """Normalise each basis (a column of the (B, C, K) tensor) over the channel dimension C."""
    if norm == "l2":
        return F.normalize(mu, dim=1, eps=1e-6)
    if norm == "layernorm":
        mean = mu.mean(dim=1, keepdim=True)
        var = mu.var(dim=1, keepdim=True, unbiased=False)
        return (mu - mean) * torch.rsqrt(var + 1e-5)
    if norm == "none":
        return mu
    raise ValueError(f"unknown bases normalisation {norm!r}; choose one of {NORMS}")


def e_step(x: Tensor, mu: Tensor, temperature: float, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Responsibilities z = softmax_k(λ muᵀ f), stored as (B, K, N), with features f = x, or
    f = weight·x + bias when a 1×1 convolution is folded in: muᵀ f = (weightᵀ mu)ᵀ x + muᵀ bias.

    The (B, K, N) layout makes both GEMMs of an iteration read ``x`` in its natural (B, C, N)
    order; docs/BENCHMARKS.md records it as faster than the (B, N, K) layout of the public code.
    """
    if weight is None:
        logits = torch.bmm(mu.transpose(1, 2), x)
    else:
        nu_t, shift = folded_bases(mu, weight, bias)
        logits = torch.bmm(nu_t, x) if shift is None else torch.baddbmm(shift.unsqueeze(2), nu_t, x)
    if temperature != 1.0:
        logits = logits * temperature
    return softmax_bases(logits)


def folded_bases(mu: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The E step's operands for features ``weight·x + bias`` and bases ``mu`` ((B,) C, K):
    ``(weightᵀ mu)ᵀ`` ((B,) K, C_in), as one (B·K, C) × (C, C_in) product, and ``muᵀ bias``
    ((B,) K), or None without a bias. Bases expanded over the batch (the first iteration's
    ``mu0``) are mapped once and the results expanded alike."""
    if mu.dim() == 3 and mu.shape[0] > 1 and mu.stride(0) == 0:
        nu_t, shift = folded_bases(mu[:1], weight, bias)
        return nu_t.expand(mu.shape[0], -1, -1), None if shift is None else shift.expand(mu.shape[0], -1)
    mu_t = mu.transpose(-1, -2)
    nu_t = torch.mm(mu_t.reshape(-1, mu.shape[-2]), weight).view(*mu_t.shape[:-1], -1)
    return nu_t, None if bias is None else torch.matmul(mu_t, bias)


def softmax_bases(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """Softmax over the bases, the second-to-last dimension of (..., K, N) logits.

    torch.softmax over a dimension that is not the last runs a kernel whose fp32 results lie
    about twice as far from float64 as ``exp(l − max) / Σ exp(l − max)`` written out, so fp32
    and fp64 use the written-out form (in place, into ``logits`` or ``out``, when no gradient
    is needed). Reduced precision keeps torch.softmax, which accumulates in fp32 internally.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        return torch.softmax(logits, -2) if out is None else torch.softmax(logits, -2, out=out)
    peak = logits.amax(-2, keepdim=True)
    if torch.is_grad_enabled() and logits.requires_grad:  # out of place: autograd saves exp's output
        z = torch.exp(logits - peak)
        return z / z.sum(-2, keepdim=True)
    z = logits.sub_(peak) if out is None else torch.sub(logits, peak, out=out)
    z.exp_()
    return z.div_(z.sum(-2, keepdim=True))


def m_step(x: Tensor, z: Tensor, norm: str, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Bases mu_k = Σ_n z_kn f_n / Σ_n z_kn, normalised over C; ``z`` is (B, K, N).

    With a folded 1×1 convolution (f = weight·x + bias), Σ_n z_kn f_n = weight·(x zᵀ)_k +
    bias·Σ_n z_kn. l2 normalisation is scale-invariant per basis, so for ``l2`` the division
    by Σ_n z_kn is skipped: it cannot change the result (up to rounding).
    """
    return finish_m_step(torch.bmm(x, z.transpose(1, 2)), z, norm, weight, bias)


def finish_m_step(xz: Tensor, z: Tensor, norm: str, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """The M step from the product ``x zᵀ`` (B, C_in, K): fold the convolution back, normalise."""
    if weight is not None:  # weight · xz as one (B·K, C_in) × (C_in, C) product
        b, c_in, k = xz.shape
        xz = torch.mm(xz.transpose(1, 2).reshape(b * k, c_in), weight.t()).view(b, k, -1).transpose(1, 2)
    mu = xz
    if bias is not None:
        mu = torch.baddbmm(mu, bias.view(1, -1, 1).expand(mu.shape[0], -1, 1), z.sum(dim=2, keepdim=True).transpose(1, 2))
    if norm != "l2":
        mu = mu / (1e-6 + z.sum(dim=2).unsqueeze(1))
    return normalize_bases(mu, norm)


def em_attention(
    x: Tensor,
    mu0: Tensor,
    iters: int = 3,
    temperature: float = 1.0,
    norm: str = "l2",
    grad: str = "none",
    out: Tensor | None = None,
    method: str = "auto",
    block: int | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> EMAOutput:
    """Run T EM iterations on features ``x`` (B, C, N) from initial bases ``mu0`` (1|B, C, K).

    Returns the reconstruction (B, C, N), the final bases (B, C, K) and the last
    responsibilities (B, N, K). See the module docstring for the algorithm and ``grad``.

    ``out``, a (B, C, N) tensor, receives the reconstruction when no gradient is needed for
    it. Reusing one buffer across calls avoids allocating (and, on the CPU, page-faulting) the
    largest tensor of the unit; it has the layout of a fresh result, so nothing downstream
    changes.

    ``weight`` (C, C_in) and ``bias`` (C,) fold a 1×1 convolution into the products: the
    features are then ``weight·x + bias`` for an input ``x`` (B, C_in, N), and they are never
    formed (see :func:`e_step` and :func:`m_step`). Bases, responsibilities and reconstruction
    are the same as on the convolved features, and so are their gradients.

    ``method`` runs the iterations that need no gradient: ``bmm`` as written above, or on the
    CPU ``conv``, ``blocked`` or ``onednn`` (see :mod:`emactl.nn.em_cpu`; with ``onednn`` the
    reconstruction runs by oneDNN too when it needs no gradient); ``auto`` picks the fastest
    measured for the input. ``block`` is the pixels per block of ``blocked`` (default: about
    1 MiB of a sample's features).
    """
    if x.dim() != 3 or mu0.dim() != 3:
        raise ValueError(f"expected x (B, C, N) and mu0 (B, C, K), got {tuple(x.shape)}, {tuple(mu0.shape)}")
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; choose one of {GRAD_MODES}")
    if iters < 1:
        raise ValueError("iters must be >= 1")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    b = x.shape[0]
    mu = mu0.expand(b, -1, -1)
    free_iters = {"none": iters, "last": iters - 1, "full": 0}[grad]
    z = None
    proj = (weight, bias)
    # the reconstruction's buffer, written only after the iterations, lends them its memory
    scratch = out if grad == "none" and out is not None and out.shape == (b, mu.shape[1], x.shape[2]) else None
    with torch.no_grad() if free_iters else contextlib.nullcontext():
        z, mu, ran = _iterate(x, mu, free_iters, temperature, norm, z, method, block, proj, scratch)
    if free_iters < iters:
        z, mu, ran = _iterate(x, mu, iters - free_iters, temperature, norm, z, method, block, proj)
    needs_grad = torch.is_grad_enabled() and (mu.requires_grad or z.requires_grad)
    fits = out is not None and out.shape == (b, mu.shape[1], x.shape[2]) and out.dtype == mu.dtype == z.dtype
    dest = out if fits and not needs_grad and out.is_contiguous() else None
    if ran == "onednn" and not needs_grad:  # the reconstruction as the iterations' products ran
        from .em_cpu import onednn_bmm

        recon = onednn_bmm(mu, z, out=dest)
    else:
        recon = torch.bmm(mu, z, out=dest)
    return EMAOutput(recon, mu, z.transpose(1, 2))


def _iterate(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, z: Tensor | None, method: str, block: int | None,
    proj: tuple[Tensor | None, Tensor | None] = (None, None), scratch: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, str]:
    """``iters`` EM iterations from bases ``mu``: a faster CPU method where one applies
    (:mod:`emactl.nn.em_cpu`), else the plain batched products; and the method that ran.
    ``proj`` is a folded 1×1 convolution's (weight, bias), or (None, None); ``scratch``, memory
    the fast methods may write meanwhile, or None."""
    if iters == 0:
        return z, mu, "bmm"
    if method != "bmm":
        from .em_cpu import run_fast

        fast = run_fast(x, mu, iters, temperature, norm, method, block, *proj, scratch)
        if fast is not None:
            return fast
    return (*plain_iterations(x, mu, iters, temperature, norm, *proj), "bmm")


def plain_iterations(
    x: Tensor, mu: Tensor, iters: int, temperature: float, norm: str, weight: Tensor | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``iters`` EM iterations as written: the batched products of :func:`e_step` and :func:`m_step`."""
    for _ in range(iters):
        z = e_step(x, mu, temperature, weight, bias)
        mu = m_step(x, z, norm, weight, bias)
    return z, mu


def exporting() -> bool:
    """Whether the forward is being traced for export (``torch.jit.trace``, ``torch.onnx.export``,
    ``torch.export``): the unit then records one plain graph, with no
    measured CPU method, no reused buffer and no shape-dependent folding."""
    compiler = torch.compiler
    return (
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or bool(getattr(compiler, "is_exporting", lambda: False)())
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_bases(channels: int, k: int, norm: str = "l2") -> Tensor:
    """Initial bases (1, C, K): normal(0, sqrt(2/K)), normalised over C."""
    mu = torch.randn(1, channels, k) * (2.0 / k) ** 0.5
    return normalize_bases(mu, "l2" if norm == "none" else norm)


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: nothing is ever reused


def _references(t: Tensor) -> int:
    """How many tensors and storage handles refer to ``t``'s memory (the handle made here included)."""
    storage = t.untyped_storage()
    return _use_count(storage._cdata)


_ALONE = _references(torch.empty(1)) if _use_count is not None else 0


def alone(t: Tensor) -> bool:
    """Whether nothing but ``t`` itself refers to its memory: no view, no caller, no autograd graph."""
    return _use_count is not None and _references(t) <= _ALONE


def memory_format_of(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out so, else ``torch.contiguous_format``."""
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


_HANDING_OUT = threading.Lock()  # one for every unit: get() is called a few times per forward


class Reusable:
    """The big tensors a unit keeps from call to call instead of allocating them anew.

    At the paper's shapes the unit's intermediates are tens of MB each. On the CPU the allocator
    maps each such tensor fresh and page-faults on its first write, on every call; writing into a
    kept tensor costs only the write (docs/BENCHMARKS.md has the figures).

    :meth:`get` hands out an alias of a kept tensor only when nothing else refers to its memory
    any more: not the caller that received it last time, not an autograd graph that saved it
    (until its backward has run), not a view. Otherwise it keeps a new one, and the old one
    stays with whoever holds it.
    """

    def __init__(self) -> None:
        self.kept: dict[str, Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        """A tensor of ``shape`` (``like``'s device, ``dtype`` or ``like``'s) to overwrite: the kept
        ``name`` when free, else a new one that is kept instead."""
        dtype = like.dtype if dtype is None else dtype
        with _HANDING_OUT:  # two threads running one unit: the check and the alias as one step
            buf = self.kept.get(name)
            fits = (
                buf is not None
                and buf.shape == shape
                and buf.dtype == dtype
                and buf.device == like.device
                and buf.is_contiguous(memory_format=memory_format)
                # an inference-mode tensor cannot be written outside inference mode (and back)
                and buf.is_inference() == torch.is_inference_mode_enabled()
            )
            if not (fits and alone(buf)):
                buf = self.kept[name] = torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)
            return buf.detach()  # an alias: while it lives, the kept tensor is not alone


def channel_mean(y: Tensor) -> Tensor:
    """The per-channel mean of a (B, C, N) ``y`` over the batch and the pixels, in ``y``'s dtype:
    the shift that centres conv2's input before BN's batch statistics (see
    :class:`emactl.nn.em_cpu.TrainingTail`). Any constant per channel would do, so the pixel
    sums run in ``y``'s dtype (bf16's accumulate in fp32 inside; a bf16 mean over (0, 2)
    accumulated at fp32 runs 20× slower)."""
    wide = torch.promote_types(y.dtype, torch.float32)
    return (y.sum(2).sum(0, dtype=wide) / (y.shape[0] * y.shape[2])).to(y.dtype)


def add_shift_back(running_mean: Tensor, weight: Tensor, mean: Tensor, momentum: float) -> None:
    """BN saw conv2's output less ``weight · mean`` (conv2 ran on centred input): its running
    mean, updated with ``momentum`` from that batch, gets the shift's share back."""
    running_mean.add_(torch.mv(weight.to(running_mean.dtype), mean.to(running_mean.dtype)), alpha=momentum)


def bn_momentum(bn: nn.BatchNorm2d) -> float:
    """The factor BN's last training forward gave the batch in its running statistics."""
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def add_relu_(y: Tensor, other: Tensor) -> Tensor:
    """``relu(y + other)`` into ``y``. On the CPU, where no gradient is recorded and the dtypes
    match in fp32/fp64, one pass by PyTorch's fused kernel (``aten::_add_relu_``, the one its
    JIT fuses add + ReLU into; it has no bf16 kernel): 2.9 against 4.2 ms at the paper's unit
    shapes (docs/BENCHMARKS.md)."""
    fused = getattr(torch.ops.aten, "_add_relu_", None)
    grad = torch.is_grad_enabled() and (y.requires_grad or other.requires_grad)
    plain = y.dtype in (torch.float32, torch.float64) and y.dtype == other.dtype
    traced = exporting() or torch.compiler.is_compiling()  # exporters and compilers see add and ReLU
    if fused is not None and plain and not (grad or traced) and y.device.type == "cpu" and other.device == y.device:
        return fused(y, other)
    return torch.relu_(y.add_(other))


def relu_reconstruction(recon: Tensor) -> Tensor:
    """The ReLU after EM: in place when the reconstruction needs no gradient (it is then a kept
    tensor, or a new one; a graph that saves the result for conv2's weight gradient keeps it
    from being reused, see :class:`Reusable`)."""
    return F.relu(recon) if recon.requires_grad else torch.relu_(recon)


class EMAU(nn.Module):
    """The EMA Unit: 1×1 conv → EMA → ReLU → 1×1 conv + BN → residual add → ReLU.

    ``bases_update`` chooses how the initial bases ``mu`` evolve during training:

    * ``moving_average``: a buffer updated in training mode as
      ``mu ← momentum · mu + (1 − momentum) · mean_b(mu_T)`` — ``momentum`` weights the *old*
      value (0.9 in the paper). Under torch.distributed the batch mean is all-reduced first so
      every replica holds the same buffer. With ``renorm`` the result is normalised again with
      the bases normalisation, which keeps l2 bases on the unit sphere. The original EMANet
      code is this rule with ``renorm=False``.
    * ``normed_moving_average``: as above, but the batch mean is normalised (with the bases
      normalisation) *before* it is mixed in: mmseg's ``EMAModule`` rule, which uses
      ``renorm=False`` and writes its momentum 0.1 for the *new* value (0.9 here).
    * ``backprop``: ``mu`` is an ``nn.Parameter`` learned by back-propagation; this needs
      ``grad="full"`` (otherwise no gradient can reach it).
    * ``none``: a fixed random buffer.

    ``zero_init`` starts the BN after conv2 at weight 0, so the unit begins as the identity
    and learns how much of the reconstruction to add (the public code starts it at 1).

    ``iters`` applies in training; ``eval_iters`` (default: ``iters``) in eval mode, and can be
    changed at any time, e.g. by ``emactl eval --iters``.

    ``fold`` folds conv1 into the EM products (:func:`em_attention`'s ``weight``/``bias``)
    wherever that saves work (:meth:`folds`): conv1's output, an N·C·C product, is then never
    formed; outputs and gradients are the same. ``fold=False`` always runs conv1 as written.

    On the CPU the EM iterations without gradient and conv2 run by the methods
    :mod:`emactl.nn.em_cpu` measures fastest; setting the attribute ``method = "bmm"`` runs every
    product as a plain batched one instead (the profile's ``emactl plain products`` row). In
    training on the CPU, conv2 → BN → residual → ReLU run as one autograd Function
    (:class:`emactl.nn.em_cpu.TrainingTail`, conv2 on centred input) over tensors the unit
    keeps (:class:`Reusable`);
    ``fuse_tail = False`` runs them as separate layers (the ``emactl unfused tail`` row).
    """

    def __init__(
        self,
        channels: int,
        bases: int = 64,
        iters: int = 3,
        eval_iters: int | None = None,
        temperature: float = 1.0,
        norm: str = "l2",
        grad: str = "none",
        bases_update: str = "moving_average",
        momentum: float = 0.9,
        renorm: bool = True,
        zero_init: bool = False,
        fold: bool = True,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; choose one of {GRAD_MODES}")
        if bases_update not in BASES_UPDATES:
            raise ValueError(f"unknown bases update {bases_update!r}; choose one of {BASES_UPDATES}")
        self.channels, self.k = channels, bases
        self.iters = iters
        self.eval_iters = eval_iters if eval_iters is not None else iters
        self.temperature = temperature
        self.norm, self.grad = norm, grad
        self.bases_update = bases_update
        self.momentum, self.renorm = momentum, renorm
        self.zero_init = zero_init
        self.fold = fold
        self.method = "auto"
        self.fuse_tail = True
        self.record = False  # when True, keep the last responsibilities for visualisation
        self.last: EMAOutput | None = None
        self._reusable = Reusable()

        mu = init_bases(channels, bases, norm)
        if bases_update == "backprop":
            self.mu = nn.Parameter(mu)
        else:
            self.register_buffer("mu", mu)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv1.bias)
        nn.init.constant_(self.bn.weight, 0.0 if self.zero_init else 1.0)
        nn.init.zeros_(self.bn.bias)

    @property
    def current_iters(self) -> int:
        return self.iters if self.training else self.eval_iters

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        b, c, h, w = x.shape
        traced = exporting()
        if not traced and self.folds(h * w):  # conv1 lives in the products: its output never exists
            feats = self._features(x)
            proj = {"weight": self.conv1.weight.view(c, c), "bias": self.conv1.bias}
        else:
            feats, proj = self.conv1(x).reshape(b, c, h * w), {}
        # update_bases() writes the buffer in place after this call; autograd may have saved
        # mu0 for backward (grad="full", or "last" with one iteration), so hand it a copy.
        updating = self.training and self.bases_update in AVERAGED
        mu0 = self.mu.to(feats.dtype, copy=updating)
        buffer = self._recon_buffer(b, c, h * w, feats)
        out = em_attention(feats, mu0, self.current_iters, self.temperature, self.norm, self.grad, buffer,
                           method="bmm" if traced else self.method, **proj)
        if updating:
            self.update_bases(out.bases)
        if self.record:
            self.last = EMAOutput(*(t.detach().clone() for t in out))
        if self._fuses_tail(x):
            return self._training_tail(out.recon, identity)
        y = self._conv2_bn(relu_reconstruction(out.recon), h, w)
        # nothing saves y: add and ReLU in place. Under autocast y is bf16 and the input fp32:
        # casting y first and adding in place runs about twice as fast as a type-promoting add
        # (docs/BENCHMARKS.md), with the same result.
        dtype = torch.promote_types(y.dtype, identity.dtype)
        if y.dtype != dtype:
            if self._keeps():  # cast and layout change in one pass
                y = self._reusable.get("out", tuple(identity.shape), identity, dtype, memory_format_of(identity)).copy_(y)
            else:
                y = y.to(dtype)
        return add_relu_(y, identity)

    def _features(self, x: Tensor) -> Tensor:
        """The input as (B, C, N) features for the folded products, contiguous and in the autocast
        dtype (cast once, not per product). Where that takes a copy and only EM iterations
        without autograd read it, the copy goes into a kept tensor."""
        b, c, h, w = x.shape
        autocasting = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocasting else x.dtype
        if dtype == x.dtype and x.is_contiguous():
            return x.view(b, c, h * w)
        if (self.grad == "none" or not torch.is_grad_enabled()) and self._eager():
            with torch.no_grad():
                feats = self._reusable.get("feats", (b, c, h * w), x, dtype)
                feats.view(b, c, h, w).copy_(x)  # cast and layout change in one pass
            return feats
        return x.to(dtype=dtype, memory_format=torch.contiguous_format).view(b, c, h * w)

    def _fuses_tail(self, x: Tensor) -> bool:
        """Whether this forward ends in :class:`em_cpu.TrainingTail`: training with autograd on the
        CPU, with the unit's own BatchNorm2d in training mode (SyncBatchNorm or a frozen BN take
        the separate layers)."""
        bn = self.bn
        return (
            self.fuse_tail and self.training and bn.training and torch.is_grad_enabled() and x.device.type == "cpu"
            and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and self._eager()
        )

    def _training_tail(self, recon: Tensor, identity: Tensor) -> Tensor:
        """ReLU → conv2 → BN → + identity → ReLU as one autograd Function over kept tensors."""
        from .em_cpu import TrainingTail, applicable, conv_method

        b, c, n = recon.shape
        y = relu_reconstruction(recon)
        weight = self.conv2.weight.view(c, c)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            y, weight = y.to(dtype), weight.to(dtype)
        method = conv_method(weight, y)[0] if self.method == "auto" else applicable(self.method, weight, y)
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        momentum = bn_momentum(bn)
        with torch.autocast("cpu", enabled=False):
            return TrainingTail.apply(y, identity, weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      momentum, bn.eps, method, self._reusable)

    def _conv2_bn(self, y: Tensor, h: int, w: int) -> Tensor:
        """conv2 then BN on the (B, C, N) reconstruction; in eval without autograd, one product
        with the BN folded in. On the CPU conv2 runs by the method :func:`em_cpu.conv1x1`
        measured fastest (``self.method="bmm"``: the plain batched product). Where a plain
        BatchNorm2d takes batch statistics, conv2 runs on centred input, as in
        :class:`em_cpu.TrainingTail` (SyncBatchNorm would need one shift on every process; under
        torch.compile or an exporter the plain layers are traced)."""
        bn, (b, c, _) = self.bn, y.shape
        folded = not (self.training or torch.is_grad_enabled() or not bn.track_running_stats or bn.running_var is None)
        weight, shift = self.conv2.weight.view(c, c), None
        centre = None
        if type(bn) is nn.BatchNorm2d and (bn.training or bn.running_mean is None) and self._eager():
            centre = channel_mean(y.detach())  # a constant: BN's output and y's gradient do not depend on it
            y = y - centre.view(1, -1, 1)
        if folded:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight, shift = weight * scale.view(-1, 1), bn.bias - bn.running_mean * scale
        if y.device.type == "cpu" and not exporting() and not torch.compiler.is_compiling():
            from .em_cpu import conv1x1

            if torch.is_autocast_enabled("cpu"):  # cast here: autocast does not reach into conv1x1's choice
                dtype = torch.get_autocast_dtype("cpu")
                y, weight = y.to(dtype), weight.to(dtype)
                shift = shift.to(dtype) if shift is not None else None
            dest = self._reusable.get("conv2", tuple(y.shape), y) if folded and self._keeps() else None
            v = conv1x1(weight, y, shift, self.method, out=dest).view(b, c, h, w)
        else:
            v = F.conv2d(y.view(b, c, h, w), weight.view(c, c, 1, 1), shift)
        if folded:
            return v
        out = bn(v)
        if centre is not None and bn.training and bn.running_mean is not None:  # the shift W·ȳ back
            # BN's autograd node holds running_mean (its training-mode backward never reads it);
            # through .data the update leaves the version autograd checks at backward alone
            used = weight.detach()  # as the product used it: cast by autocast, on the CPU above
            if y.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(y.device.type):
                used = used.to(torch.get_autocast_dtype(y.device.type))
            add_shift_back(bn.running_mean.data, used, centre, bn_momentum(bn))
        return out

    def _eager(self) -> bool:
        """Whether this forward runs eagerly, where it may use kept tensors (:class:`Reusable`),
        the fused tail and conv2 on centred input: not while torch.compile or an exporter traces
        it, which must see one plain graph."""
        return not (exporting() or torch.compiler.is_compiling())

    def _keeps(self) -> bool:
        """Whether this forward writes its intermediates, the output included, into kept tensors:
        without autograd, where nothing but the caller holds them."""
        return not torch.is_grad_enabled() and self._eager()

    def folds(self, pixels: int) -> bool:
        """Whether a forward over ``pixels`` folds conv1 into the products: where that saves
        multiply-adds. conv1 costs N·C² per image; folded, each of the 2T products adds C²·K
        (the bases mapped through the conv), so folding pays when N > 2·T·K."""
        return self.fold and pixels > 2 * self.current_iters * self.k

    def _recon_buffer(self, b: int, c: int, n: int, like: Tensor) -> Tensor | None:
        """A kept (B, C, N) tensor for the reconstruction (see :class:`Reusable`), when the
        reconstruction needs no gradient."""
        if (torch.is_grad_enabled() and self.grad != "none") or not self._eager():
            return None
        return self._reusable.get("recon", (b, c, n), like)

    @torch.no_grad()
    def update_bases(self, bases: Tensor) -> None:
        """Moving-average update of the buffer from a batch of final bases (B, C, K)."""
        mean = bases.detach().float().mean(dim=0, keepdim=True)
        if _distributed():
            dist.all_reduce(mean, op=dist.ReduceOp.SUM)
            mean /= dist.get_world_size()
        if self.bases_update == "normed_moving_average":
            mean = normalize_bases(mean, self.norm)
        new = self.momentum * self.mu.float() + (1.0 - self.momentum) * mean
        if self.renorm:
            new = normalize_bases(new, self.norm)
        self.mu.copy_(new.to(self.mu.dtype))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, bases={self.k}, iters={self.iters}, "
            f"eval_iters={self.eval_iters}, temperature={self.temperature}, norm={self.norm}, "
            f"grad={self.grad}, bases_update={self.bases_update}, momentum={self.momentum}, "
            f"renorm={self.renorm}, zero_init={self.zero_init}, fold={self.fold}"
        )

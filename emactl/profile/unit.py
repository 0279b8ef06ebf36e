"""The whole EMA unit as users run it, against the public code's unit written plainly.

A speed claim about EM attention counts where users feel it: the whole unit (1×1 conv, T EM
iterations, reconstruction, 1×1 conv + BN, residual, ReLU), in eval (a forward under
``no_grad``) and in training (forward, backward and the moving-average update of the bases).
:class:`ReferenceEMAU` computes the unit as the original EMANet code does; both units get the
same weights and inputs and are timed in the same interleaved rounds, at one thread and at all
of them, in fp32 and under bf16 autocast. The training output in each dtype is also compared
with a float64 run of the same unit, for both.

Each unit's matrix-product work is counted too (:func:`unit_gflop`), and a square ``torch.mm``
of the same dtype is timed in the same rounds, so the table shows how close each unit runs to
the machine's matrix rate: a unit can only beat another by doing less work or by running its
work closer to that rate.
"""
from __future__ import annotations

import copy
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..device import autocast
from ..nn.ema import EMAU
from .emattention import DTYPE_NAMES, SQUARE
from .reference import reference_em_attention
from .timing import FaultCount, Timing, measure_many

UNITS = ("emactl", "emactl unfolded", "emactl plain products", "emactl unfused tail", "reference")
MM = "mm"  # the square matrix product whose rate each unit's is measured against


class ReferenceEMAU(nn.Module):
    """The original code's EMA unit: conv1 → EM (no gradient) → ReLU → conv2 + BN → + x → ReLU,
    both ReLUs in place as there.

    ``update_bases`` is the moving average its training script applies after each forward:
    ``mu ← 0.9·mu + 0.1·mean_b(mu_T)``.
    """

    def __init__(self, channels: int, bases: int, iters: int = 3, momentum: float = 0.9) -> None:
        super().__init__()
        self.iters, self.momentum = iters, momentum
        self.register_buffer("mu", torch.zeros(1, channels, bases))
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.last_bases: Tensor | None = None

    @classmethod
    def like(cls, unit: EMAU) -> "ReferenceEMAU":
        """A reference unit holding ``unit``'s weights, bases and BN state."""
        ref = cls(unit.channels, unit.k, unit.iters, unit.momentum)
        with torch.no_grad():
            ref.mu.copy_(unit.mu)
            ref.conv1.load_state_dict(unit.conv1.state_dict())
            ref.conv2[0].load_state_dict(unit.conv2.state_dict())
            ref.conv2[1].load_state_dict(unit.bn.state_dict())
        return ref.to(unit.mu.device)

    def forward(self, x: Tensor) -> Tensor:
        idn = x
        feats = self.conv1(x)
        b, c, h, w = feats.shape
        recon, mu, _ = reference_em_attention(feats.view(b, c, h * w), self.mu.to(feats.dtype), self.iters)
        self.last_bases = mu
        y = F.relu(recon.view(b, c, h, w), inplace=True)
        return F.relu(self.conv2(y) + idn, inplace=True)

    @torch.no_grad()
    def update_bases(self) -> None:
        mean = self.last_bases.float().mean(dim=0, keepdim=True)
        self.mu.mul_(self.momentum).add_(mean * (1 - self.momentum))


def make_units(channels: int, bases: int, iters: int, device: torch.device, seed: int = 0) -> dict[str, nn.Module]:
    """The units with equal weights: emactl's default (conv1 folded into the EM products, the
    CPU methods measured fastest, in training on the CPU the fused tail over kept tensors),
    emactl with ``fold=False``, emactl with every product a plain batched one
    (``method="bmm"``), emactl with the tail as separate layers (``fuse_tail=False``), and the
    reference. BN statistics are non-trivial."""
    torch.manual_seed(seed)
    unit = EMAU(channels, bases, iters, renorm=False).to(device)
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
        unit.bn.weight.uniform_(0.5, 1.5)
    unfolded = copy.deepcopy(unit)
    unfolded.fold = False
    plain = copy.deepcopy(unit)
    plain.method = "bmm"
    unfused = copy.deepcopy(unit)
    unfused.fuse_tail = False
    return {"emactl": unit, "emactl unfolded": unfolded, "emactl plain products": plain, "emactl unfused tail": unfused,
            "reference": ReferenceEMAU.like(unit)}


def eval_call(unit: nn.Module, x: Tensor, device: torch.device, dtype: torch.dtype) -> Callable[[], Tensor]:
    unit.eval()

    def run() -> Tensor:
        with torch.no_grad(), autocast(device, dtype):
            return unit(x)

    return run


def train_call(unit: nn.Module, x: Tensor, grad: Tensor, device: torch.device, dtype: torch.dtype) -> Callable[[], Tensor]:
    """Forward, backward from the output gradient ``grad`` and the bases update, as the unit runs
    inside a training step (the layers after it hand it that gradient; no loss is timed)."""
    unit.train()
    inputs = x.detach().clone().requires_grad_()
    params = [p for p in unit.parameters() if p.requires_grad]

    def run() -> Tensor:
        for p in params:
            p.grad = None
        inputs.grad = None
        with autocast(device, dtype):
            out = unit(inputs)
        if isinstance(unit, ReferenceEMAU):
            unit.update_bases()
        out.backward(grad)
        return out

    return run


def unit_gflop(unit: nn.Module, x: Tensor, mode: str) -> float:
    """GFLOP of the matrix products (convolutions, mm, bmm; 2 per multiply-add) of one call of
    ``unit`` on an input shaped like ``x``: the forward, and in ``train`` the backward too.
    Counted by FlopCounterMode on a meta copy with every product a plain batched one, which does
    the same arithmetic as the CPU methods (oneDNN's own op is invisible to the counter)."""
    meta = copy.deepcopy(unit).to("meta").train(mode == "train")
    if isinstance(meta, EMAU):
        meta.method = "bmm"
    inputs = torch.empty(x.shape, device="meta", requires_grad=mode == "train")
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(mode == "train"):
        out = meta(inputs)
        if mode == "train":
            out.backward(torch.empty_like(out))
    return counter.get_total_flops() / 1e9


def training_error(units: dict[str, nn.Module], x: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Relative error (max |diff| / max |float64|) of each unit's training-mode output, fp32 or
    under ``dtype`` autocast, against a float64 copy of the same unit on the same input, with
    autograd on, as a training step runs it (emactl's fused tail runs only then)."""
    errors = {}
    for name, unit in units.items():
        exact = copy.deepcopy(unit).double().train()
        probe = copy.deepcopy(unit).train()
        want = exact(x.double().requires_grad_()).detach()
        with autocast(x.device, dtype):
            got = probe(x.clone().requires_grad_()).detach()
        errors[name] = float((got.double() - want).abs().max() / want.abs().max())
    return errors


def unit_cases(dtypes: list[torch.dtype]) -> list[tuple[torch.dtype, torch.dtype]]:
    """(compute dtype, input dtype) pairs: each dtype on fp32 input (a unit on its own under
    autocast), and each reduced dtype also on input of that dtype, as EMANet's head hands it
    under autocast (its 3×3 conv + BN + ReLU gives bf16): no cast into the unit or out of it."""
    return [(d, torch.float32) for d in dtypes] + [(d, d) for d in dtypes if d != torch.float32]


def profile_unit(
    batch: int,
    channels: int,
    size: int,
    bases: int,
    iters: int,
    device: torch.device,
    dtypes: list[torch.dtype],
    thread_counts: list[int],
    repeats: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (threads, dtype, input dtype, mode): each unit's time and emactl / reference ratios
    with spread (cases: :func:`unit_cases`).

    The spread of a ratio a/b is [q1(a)/q3(b), q3(a)/q1(b)] over the interleaved rounds.
    """

    torch.manual_seed(1)
    x = torch.randn(batch, channels, size, size, device=device).relu()  # after the head's conv + BN + ReLU
    square = SQUARE.get(device.type, SQUARE["cpu"])
    gflop = {(name, mode): unit_gflop(unit, x, mode)
             for name, unit in make_units(channels, bases, iters, device).items() for mode in ("eval", "train")}
    grad = torch.randn(batch, channels, size, size, device=device)
    cases = [(DTYPE_NAMES[d], DTYPE_NAMES[i], d, i) for d, i in unit_cases(dtypes)]
    previous = torch.get_num_threads()
    rows, summary = [], []
    try:
        for threads in thread_counts:
            if device.type == "cpu":
                torch.set_num_threads(threads)
            fns = {}
            for d, i, dtype, input_dtype in cases:
                inputs, grads = x.to(input_dtype), grad.to(input_dtype)
                for mode in ("eval", "train"):
                    for name, unit in make_units(channels, bases, iters, device).items():
                        fns[(name, d, i, mode)] = FaultCount(
                            eval_call(unit, inputs, device, dtype) if mode == "eval"
                            else train_call(unit, inputs, grads, device, dtype)
                        )
            for dtype in dtypes:  # the machine's matrix rate in this dtype, in the same rounds
                a = torch.randn(square, square, device=device, dtype=dtype)
                fns[(MM, DTYPE_NAMES[dtype], "-", "-")] = lambda a=a: torch.mm(a, a)
            timings = measure_many(fns, device, rounds=repeats)
            for (name, d, i, mode), t in timings.items():
                if name == MM:
                    continue
                ref, rate = timings[("reference", d, i, mode)], 2 * square**3 / timings[(MM, d, "-", "-")].median
                work = gflop[(name, mode)]
                rows.append({"threads": threads, "dtype": d, "input": i, "mode": mode, "unit": name, "ms": t.ms,
                             "IQR (ms)": t.iqr * 1e3, "time / reference": t.median / ref.median, "GFLOP": work,
                             "fraction of mm rate": work * 1e9 / t.median / rate,
                             "page faults / call": fns[(name, d, i, mode)].per_call})
            for d, i, _, _ in cases:
                for mode in ("eval", "train"):
                    for name in UNITS[:-1]:
                        ours, ref = timings[(name, d, i, mode)], timings[("reference", d, i, mode)]
                        low, high = _ratio_spread(ours, ref)
                        summary.append({"threads": threads, "dtype": d, "input": i, "mode": mode, "unit": name,
                                        "time / reference": ours.median / ref.median, "low": low, "high": high})
    finally:
        torch.set_num_threads(previous)
    for dtype in dtypes:
        errors = training_error(make_units(channels, bases, iters, device), x[: min(batch, 2)], dtype)
        for name, err in errors.items():
            summary.append({"threads": None, "dtype": DTYPE_NAMES[dtype], "input": "fp32", "mode": "train output vs float64",
                            "unit": name, "time / reference": None, "low": None, "high": None, "rel. error": err})
    return pd.DataFrame(rows), pd.DataFrame(summary)


def _ratio_spread(a: Timing, b: Timing) -> tuple[float, float]:
    return a.q1 / b.q3, a.q3 / b.q1

"""``em_attention`` against the plain reference, and both against this machine's GEMM rate.

FLOP count of one EM attention call (2 FLOPs per multiply-add, matrix products only):

* E step  ``xᵀ mu``:   2·B·N·K·C per iteration
* M step  ``x z``:     2·B·N·K·C per iteration
* reconstruction ``mu zᵀ``: 2·B·C·N·K, once

so (4·T + 2)·B·N·K·C in all; softmax and the normalisations are left out. The GEMM rate is
measured in the same run on a batched matmul of the E-step's shape, (B, N, C) × (B, C, K),
and on a square 2048³ ``torch.mm``: the ratio of the two rates shows how close EM attention
is to what the machine's matrix units can do at these shapes. The square GEMM is 2048³ on the
CPU and 8192³ on a GPU, where a smaller one does not fill the chip.
"""
from __future__ import annotations

import pandas as pd
import torch
from rich.console import Console

from ..nn.ema import e_step, em_attention, init_bases, normalize_bases
from .reference import reference_em_attention
from .timing import measure_many

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SQUARE = {"cpu": 2048, "cuda": 8192}


def em_flops(batch: int, channels: int, pixels: int, bases: int, iters: int) -> int:
    """(4·T + 2)·B·N·K·C: see the module docstring."""
    return (4 * iters + 2) * batch * pixels * bases * channels


def profile_em_ops(
    batch: int,
    channels: int,
    size: int,
    bases: int,
    iters: int,
    device: torch.device,
    dtypes: list[torch.dtype],
    repeats: int = 3,
) -> pd.DataFrame:
    """Where em_attention's time goes: each of its ops timed alone, in the same rounds as the
    whole call, times the number of calls it makes (T of each per-iteration op, one
    reconstruction). ``share`` is that total over em_attention's time. The ops are timed on
    whole tensors, as em_attention runs them with ``method="bmm"``; that and, on the CPU, the
    other methods (:mod:`emactl.nn.em_cpu`) are timed too, so the table shows both what bounds
    the plain order and what each method saves against it."""
    n = size * size
    ops: dict[str, int] = {
        f"E step: bmm mu^T x ({batch},{bases},{channels})x({batch},{channels},{n})": iters,
        "E step: softmax over K": iters,
        f"M step: bmm x z^T ({batch},{channels},{n})x({batch},{n},{bases})": iters,
        "M step: l2 normalise over C": iters,
        f"reconstruction: bmm mu z ({batch},{channels},{bases})x({batch},{bases},{n}) into out": 1,
    }
    names = list(ops)
    fns = {}
    for dtype in dtypes:
        d = DTYPE_NAMES[dtype]
        x = torch.randn(batch, channels, n, device=device, dtype=dtype)
        mu = init_bases(channels, bases).to(device, dtype).expand(batch, -1, -1).contiguous()
        z = e_step(x, mu, 1.0)
        logits = torch.bmm(mu.transpose(1, 2), x)
        raw = torch.bmm(x, z.transpose(1, 2))
        out = torch.empty(batch, channels, n, device=device, dtype=dtype)
        fns[(names[0], d)] = lambda x=x, mu=mu: torch.bmm(mu.transpose(1, 2), x)
        fns[(names[1], d)] = lambda logits=logits: torch.softmax(logits, dim=1)
        fns[(names[2], d)] = lambda x=x, z=z: torch.bmm(x, z.transpose(1, 2))
        fns[(names[3], d)] = lambda raw=raw: normalize_bases(raw, "l2")
        fns[(names[4], d)] = lambda z=z, mu=mu, out=out: torch.bmm(mu, z, out=out)
        fns[("em_attention", d)] = lambda x=x, mu=mu, out=out: em_attention(x, mu[:1], iters, grad="none", out=out)
        for method in _methods(device):
            fns[(f"em_attention, method={method}", d)] = lambda x=x, mu=mu, out=out, method=method: em_attention(
                x, mu[:1], iters, grad="none", out=out, method=method
            )
    with torch.no_grad():
        timings = measure_many(fns, device, rounds=repeats)
    rows = []
    for dtype in dtypes:
        d = DTYPE_NAMES[dtype]
        whole = timings[("em_attention", d)].median
        total = 0.0
        for name in names:
            t = timings[(name, d)].median
            total += ops[name] * t
            rows.append({"op": name, "dtype": d, "calls": ops[name], "ms per call": t * 1e3,
                         "ms per em_attention": ops[name] * t * 1e3, "share of em_attention time": ops[name] * t / whole})
        rows.append({"op": "sum of the ops", "dtype": d, "calls": None, "ms per call": None,
                     "ms per em_attention": total * 1e3, "share of em_attention time": total / whole})
        for method in _methods(device):
            name = f"em_attention, method={method}"
            t = timings[(name, d)].median
            rows.append({"op": name, "dtype": d, "calls": 1, "ms per call": t * 1e3,
                         "ms per em_attention": t * 1e3, "share of em_attention time": t / whole})
        rows.append({"op": "em_attention (whole call)", "dtype": d, "calls": 1, "ms per call": whole * 1e3,
                     "ms per em_attention": whole * 1e3, "share of em_attention time": 1.0})
    return pd.DataFrame(rows)


def _methods(device: torch.device) -> tuple[str, ...]:
    return ("bmm", "blocked", "conv", "onednn") if device.type == "cpu" else ("bmm",)


def benchmark_dtypes(device: torch.device, requested: torch.dtype) -> list[torch.dtype]:
    """fp32 always; bf16 where the device supports it; and the requested dtype."""
    dtypes = [torch.float32]
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        dtypes.append(torch.bfloat16)
    if requested not in dtypes:
        dtypes.append(requested)
    return dtypes


def profile_em_attention(
    batch: int,
    channels: int,
    size: int,
    bases: int,
    iters: int,
    device: torch.device,
    dtypes: list[torch.dtype],
    repeats: int = 3,
    console: Console | None = None,
    square: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows for both implementations and the GEMMs in every dtype, plus the summary ratios.

    Everything is timed in the same interleaved rounds, so the ratios compare like with like.
    ``square`` is the side of the square GEMM that gives the machine's reference rate
    (default: :data:`SQUARE` for the device).
    """
    square = square or SQUARE.get(device.type, SQUARE["cpu"])
    n = size * size
    flops = em_flops(batch, channels, n, bases, iters)
    x32 = torch.randn(batch, channels, n, device=device)  # EMAU's conv1 output: signed features
    mu32 = init_bases(channels, bases).to(device)
    ref32 = reference_em_attention(x32, mu32, iters)[0]
    bmm_label = f"bmm ({batch},{n},{channels})x({batch},{channels},{bases})"
    mm_label = f"mm {square}^3"
    work = {"bmm": 2 * batch * n * channels * bases, "mm": 2 * square**3, "reference": flops, "em_attention": flops}
    fns = {}
    for dtype in dtypes:
        d = DTYPE_NAMES[dtype]
        x, mu = x32.to(dtype), mu32.to(dtype)
        a = torch.randn(batch, n, channels, device=device, dtype=dtype)
        b = torch.randn(batch, channels, bases, device=device, dtype=dtype)
        sq = torch.randn(square, square, device=device, dtype=dtype)
        fns[("bmm", d)] = lambda a=a, b=b: torch.bmm(a, b)
        fns[("mm", d)] = lambda sq=sq: torch.mm(sq, sq)
        fns[("reference", d)] = lambda x=x, mu=mu: reference_em_attention(x, mu, iters)
        # EMAU reuses one reconstruction buffer across calls; the timing does the same
        out = torch.empty(batch, channels, n, device=device, dtype=dtype)
        fns[("em_attention", d)] = lambda x=x, mu=mu, out=out: em_attention(x, mu, iters, grad="none", out=out)
    if console is not None:
        console.log(
            f"ema: timing reference, em_attention and GEMMs in {', '.join(DTYPE_NAMES[d] for d in dtypes)} "
            f"(B={batch}, C={channels}, N={size}x{size}, K={bases}, T={iters})"
        )
    with torch.no_grad():
        timings = measure_many(fns, device, rounds=repeats)
        diffs = {
            key: float((fn()[0].float() - ref32).abs().max())
            for key, fn in fns.items()
            if key[0] not in ("bmm", "mm")
        }
    rate = {key: work[key[0]] / t.median for key, t in timings.items()}
    base = timings[("reference", "fp32")].median
    rows = []
    for (impl, d), t in timings.items():
        row = {
            "kind": "GEMM" if impl in ("bmm", "mm") else "EM attention",
            "impl": {"bmm": bmm_label, "mm": mm_label}.get(impl, impl),
            "dtype": d,
            "ms": t.ms,
            "GFLOP": work[impl] / 1e9,
            "GFLOP/s": rate[(impl, d)] / 1e9,
        }
        if (impl, d) in diffs:
            row.update(
                {
                    "time / reference fp32": t.median / base,
                    "fraction of bmm rate": rate[(impl, d)] / rate[("bmm", d)],
                    f"fraction of {mm_label} rate": rate[(impl, d)] / rate[("mm", d)],
                    "max |diff| vs reference fp32": diffs[(impl, d)],
                }
            )
        rows.append(row)
    ours32 = ("em_attention", "fp32")
    summary = [
        ("fp32: em_attention time / reference time", timings[ours32].median / base),
        (f"fp32: em_attention rate / {mm_label} rate", rate[ours32] / rate[("mm", "fp32")]),
        ("fp32: em_attention rate / bmm rate (E-step shape)", rate[ours32] / rate[("bmm", "fp32")]),
    ]
    for dtype in dtypes[1:]:
        d = DTYPE_NAMES[dtype]
        summary += [
            (f"{d}: em_attention time / fp32 reference time", timings[("em_attention", d)].median / base),
            (
                f"{d}: em_attention time / {d} reference time",
                timings[("em_attention", d)].median / timings[("reference", d)].median,
            ),
            (f"{d}: em_attention rate / {d} {mm_label} rate", rate[("em_attention", d)] / rate[("mm", d)]),
        ]
    return pd.DataFrame(rows), pd.DataFrame(summary, columns=["metric", "value"])

"""``em_attention`` against the plain reference, and both against this machine's GEMM rate.

FLOP count of one EM attention call (2 FLOPs per multiply-add, matrix products only):

* E step  ``xᵀ mu``:   2·B·N·K·C per iteration
* M step  ``x z``:     2·B·N·K·C per iteration
* reconstruction ``mu zᵀ``: 2·B·C·N·K, once

so (4·T + 2)·B·N·K·C in all; softmax and the normalisations are left out. The GEMM rate is
measured in the same run on a batched matmul of the E-step's shape, (B, N, C) × (B, C, K),
and on a square 2048³ ``torch.mm``: the ratio of the two rates shows how close EM attention
is to what the machine's matrix units can do at these shapes.
"""
from __future__ import annotations

import pandas as pd
import torch
from rich.console import Console

from ..nn.ema import em_attention, init_bases
from .reference import reference_em_attention
from .timing import measure

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SQUARE = 2048


def em_flops(batch: int, channels: int, pixels: int, bases: int, iters: int) -> int:
    """(4·T + 2)·B·N·K·C: see the module docstring."""
    return (4 * iters + 2) * batch * pixels * bases * channels


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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows for both implementations and the GEMMs in every dtype, plus the summary ratios."""
    n = size * size
    flops = em_flops(batch, channels, n, bases, iters)
    x32 = torch.randn(batch, channels, n, device=device)  # EMAU's conv1 output: signed features
    mu32 = init_bases(channels, bases).to(device)
    ref32 = reference_em_attention(x32, mu32, iters)[0]
    rows = []
    rates: dict[tuple[str, str], float] = {}
    times: dict[tuple[str, str], float] = {}
    for dtype in dtypes:
        dname = DTYPE_NAMES[dtype]
        x, mu = x32.to(dtype), mu32.to(dtype)
        a = torch.randn(batch, n, channels, device=device, dtype=dtype)
        b = torch.randn(batch, channels, bases, device=device, dtype=dtype)
        sq = torch.randn(SQUARE, SQUARE, device=device, dtype=dtype)
        gemms = {
            f"bmm ({batch},{n},{channels})x({batch},{channels},{bases})": (lambda: torch.bmm(a, b), 2 * batch * n * channels * bases),
            f"mm {SQUARE}^3": (lambda: torch.mm(sq, sq), 2 * SQUARE**3),
        }
        for label, (fn, work) in gemms.items():
            if console is not None:
                console.log(f"ema: {label} {dname}")
            t = measure(fn, device, min_runs=repeats)
            rates[(label.split()[0], dname)] = work / t.median
            rows.append({"kind": "GEMM", "impl": label, "dtype": dname, "ms": t.ms, "GFLOP": work / 1e9, "GFLOP/s": work / t.median / 1e9})
        impls = {
            "reference": lambda: reference_em_attention(x, mu, iters),
            "em_attention": lambda: em_attention(x, mu, iters, grad="none"),
        }
        for impl, fn in impls.items():
            if console is not None:
                console.log(f"ema: {impl} {dname} (B={batch}, C={channels}, N={size}x{size}, K={bases}, T={iters})")
            with torch.no_grad():
                recon = fn()[0]
                t = measure(fn, device, min_runs=repeats)
            times[(impl, dname)] = t.median
            rows.append(
                {
                    "kind": "EM attention",
                    "impl": impl,
                    "dtype": dname,
                    "ms": t.ms,
                    "GFLOP": flops / 1e9,
                    "GFLOP/s": flops / t.median / 1e9,
                    "max |diff| vs reference fp32": float((recon.float() - ref32).abs().max()),
                }
            )
    df = pd.DataFrame(rows)
    em = df["kind"] == "EM attention"
    base = times[("reference", "fp32")]
    df.loc[em, "time / reference fp32"] = [times[(i, d)] / base for i, d in zip(df.loc[em, "impl"], df.loc[em, "dtype"])]
    df.loc[em, "fraction of bmm rate"] = [flops / times[(i, d)] / rates[("bmm", d)] for i, d in zip(df.loc[em, "impl"], df.loc[em, "dtype"])]
    df.loc[em, f"fraction of mm {SQUARE}^3 rate"] = [flops / times[(i, d)] / rates[("mm", d)] for i, d in zip(df.loc[em, "impl"], df.loc[em, "dtype"])]
    summary = [
        ("fp32: em_attention time / reference time", times[("em_attention", "fp32")] / base),
        (f"fp32: em_attention rate / mm {SQUARE}^3 rate", flops / times[("em_attention", "fp32")] / rates[("mm", "fp32")]),
        ("fp32: em_attention rate / bmm rate (E-step shape)", flops / times[("em_attention", "fp32")] / rates[("bmm", "fp32")]),
    ]
    for dtype in dtypes[1:]:
        dname = DTYPE_NAMES[dtype]
        summary += [
            (f"{dname}: em_attention time / fp32 reference time", times[("em_attention", dname)] / base),
            (f"{dname}: em_attention rate / {dname} mm {SQUARE}^3 rate", flops / times[("em_attention", dname)] / rates[("mm", dname)]),
        ]
    return df, pd.DataFrame(summary, columns=["metric", "value"])

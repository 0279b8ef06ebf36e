"""How time and memory grow with the number of pixels N = H·W: a log-log least-squares fit.

If cost ≈ a·N^p, then log cost = log a + p·log N, so the slope of a straight-line fit through
(log N, log cost) estimates the exponent p. EM attention should come out near 1 (O(N·K·T)),
the non-local block near 2 (its N×N affinity). At small N the linear C·N terms (the 1×1 convs)
still dominate the non-local block, so its fitted exponent only approaches 2 once N ≫ C.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from ..device import autocast
from .heads import build_head
from .memory import peak_memory
from .timing import measure_many


def fit_exponent(n: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of log y against log n, and the fit's R²."""
    logn = np.log(np.asarray(n, dtype=float))
    logy = np.log(np.asarray(y, dtype=float))
    if logn.size < 2 or np.ptp(logn) == 0:
        raise ValueError("need at least two distinct sizes to fit an exponent")
    slope, intercept = np.polyfit(logn, logy, 1)
    residual = logy - (slope * logn + intercept)
    total = float(np.sum((logy - logy.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    return float(slope), r2


def profile_scaling(
    names: tuple[str, ...],
    sizes: tuple[int, ...],
    channels: int,
    batch: int,
    bases: int,
    iters: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    console: Console | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Forward time and peak memory of each head at every size (H = W = s), and the exponents.

    All (head, size) pairs are timed in interleaved rounds, so load from elsewhere does not
    bend one head's curve more than another's.
    """
    inputs = {s: torch.randn(batch, channels, s, s, device=device) for s in sizes}
    fns = {}
    for name in names:
        module = build_head(name, channels, bases, iters).to(device).eval()
        for s, x in inputs.items():

            def forward(module: torch.nn.Module = module, x: torch.Tensor = x) -> None:
                with torch.no_grad(), autocast(device, dtype):
                    module(x)

            fns[(name, s)] = forward
    if console is not None:
        console.log(f"scaling: timing {', '.join(names)} at sizes {', '.join(map(str, sizes))}")
    timings = measure_many(fns, device, rounds=repeats)
    raw = [
        {
            "head": name,
            "size": s,
            "N": s * s,
            "fwd (ms)": timings[(name, s)].ms,
            "fwd peak (MiB)": peak_memory(fn, device) / 2**20,
        }
        for (name, s), fn in fns.items()
    ]
    raw_df = pd.DataFrame(raw)
    fits = []
    for name in names:
        sub = raw_df[raw_df["head"] == name]
        p_time, r2_time = fit_exponent(sub["N"], sub["fwd (ms)"])
        p_mem, r2_mem = fit_exponent(sub["N"], sub["fwd peak (MiB)"])
        fits.append(
            {
                "head": name,
                "sizes": ",".join(str(s) for s in sub["size"]),
                "time exponent": p_time,
                "time R²": r2_time,
                "memory exponent": p_mem,
                "memory R²": r2_mem,
            }
        )
    return raw_df, pd.DataFrame(fits)

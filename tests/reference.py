"""The tests' reference EM attention and error measures, written independently of emactl.

:func:`reference_em` is EM attention with plain Python floats and explicit loops over batch,
bases, pixels and channels, so that a shared mistake with the package's tensor code is
unlikely. (``emactl/profile/reference.py`` is the benchmark's re-statement of the public code,
which the profile times; it is not what the tests check numbers against.)
"""
from __future__ import annotations

import math

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: the largest error against the largest value."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64."""
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def reference_em(x: torch.Tensor, mu0: torch.Tensor, iters: int = 3, lam: float = 1.0, norm: str = "l2"):
    """EM attention with Python floats. x: (B, C, N), mu0: (1|B, C, K).

    Returns (recon (B, C, N), bases (B, C, K), resp (B, N, K)) as float64 tensors: the bases
    after ``iters`` E and M steps, the responsibilities of the last E step and the
    reconstruction μZᵀ from both.
    """
    X = x.detach().double().cpu().tolist()
    M0 = mu0.detach().double().cpu().tolist()
    B, C, N = len(X), len(X[0]), len(X[0][0])
    K = len(M0[0][0])
    recons, bases, resps = [], [], []
    for b in range(B):
        xb = X[b]
        m0 = M0[b] if len(M0) > 1 else M0[0]
        mu = [[m0[c][k] for k in range(K)] for c in range(C)]  # C x K
        z: list[list[float]] = []
        for _ in range(iters):
            # E step: z_nk = softmax_k(lam * sum_c x_cn mu_ck)
            z = []
            for n in range(N):
                logits = [lam * sum(xb[c][n] * mu[c][k] for c in range(C)) for k in range(K)]
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                s = sum(e)
                z.append([v / s for v in e])
            # M step: mu_k = sum_n z_nk x_n / (1e-6 + sum_n z_nk), then normalise over C
            new = [[0.0] * K for _ in range(C)]
            for k in range(K):
                den = 1e-6 + sum(z[n][k] for n in range(N))
                col = [sum(z[n][k] * xb[c][n] for n in range(N)) / den for c in range(C)]
                if norm == "l2":
                    length = math.sqrt(sum(v * v for v in col))
                    col = [v / length for v in col]
                elif norm == "layernorm":
                    mean = sum(col) / C
                    var = sum((v - mean) ** 2 for v in col) / C
                    col = [(v - mean) / math.sqrt(var + 1e-5) for v in col]
                else:
                    assert norm == "none", norm
                for c in range(C):
                    new[c][k] = col[c]
            mu = new
        # reconstruction: x~_cn = sum_k mu_ck z_nk with the last E step's responsibilities
        recon = [[sum(mu[c][k] * z[n][k] for k in range(K)) for n in range(N)] for c in range(C)]
        recons.append(recon)
        bases.append(mu)
        resps.append(z)

    def as_tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return as_tensor(recons), as_tensor(bases), as_tensor(resps)

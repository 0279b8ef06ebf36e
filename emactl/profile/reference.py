"""EM attention written plainly, the way the original EMANet repository writes it.

This is the yardstick for :func:`emactl.nn.ema.em_attention`: the same algorithm with
``torch.bmm``, a softmax over the bases, the responsibilities normalised by their sum over
pixels, and the bases L2-normalised as ``mu / (1e-6 + ||mu||)``; the T iterations run under
``no_grad`` and the reconstruction is built from their result. Keep it plain: it is the
baseline that optimisations are measured against, not code to optimise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _l2norm(inp: Tensor, dim: int) -> Tensor:
    return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))


def reference_em_attention(x: Tensor, mu: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """EM attention on ``x`` (B, C, N) from bases ``mu`` (1, C, K).

    Returns the reconstruction (B, C, N), the final bases (B, C, K) and the responsibilities
    (B, N, K) of the last E step.
    """
    b = x.shape[0]
    mu = mu.repeat(b, 1, 1)  # b * c * k
    with torch.no_grad():
        for _ in range(iters):
            x_t = x.permute(0, 2, 1)  # b * n * c
            z = torch.bmm(x_t, mu)  # b * n * k
            z = F.softmax(z, dim=2)  # b * n * k
            z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
            mu = torch.bmm(x, z_)  # b * c * k
            mu = _l2norm(mu, dim=1)
    z_t = z.permute(0, 2, 1)  # b * k * n
    recon = mu.matmul(z_t)  # b * c * n
    return recon, mu, z

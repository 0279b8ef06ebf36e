"""``visualize recon``: the features EM sees against their reconstruction μZᵀ.

Both feature maps, X (the EMA unit's conv1 output) and X̃ = μZᵀ, are (C, h, w). They are
projected to RGB by **one** PCA fitted on the pixels of both together, with one scaling per
component shared by both maps, so equal colours mean equal feature directions in either panel.
Before that, each map is divided by its own RMS over all pixels and channels: X̃ is built
from unit-norm bases and is far smaller than X, and that global factor carries no meaning
(the unit follows the reconstruction with ReLU, a 1×1 conv and BN, which absorb it); left in,
it would make X̃ a flat colour.
The singular-value spectra (each normalised by its largest value, on a log scale) show the
rank: X̃ is at most rank K, and its within-region noise is smoothed away while the region
boundaries stay sharp (the paper's "edge-preserving" low-rank reconstruction).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..data import Sample
from .common import PANEL, new_figure, show_image, suptitle
from .samples import PerImage, Recorded, draw_per_image

FIGSIZE = (4 * PANEL + 1.5, PANEL + 0.6)
SPECTRUM_FLOOR = 1e-7  # relative singular values below this are numerical zeros


def rms_normalise(x: Tensor) -> Tensor:
    """``x`` divided by its root-mean-square value (left alone when it is all zeros)."""
    rms = x.double().pow(2).mean().sqrt()
    return x / rms if rms > 0 else x


def shared_pca_rgb(a: Tensor, b: Tensor, components: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """Project two (C, h, w) maps to RGB with one PCA fitted on both; return both images (h, w, 3)
    in [0, 1] and the fraction of the joint variance the components explain.

    Each map is first divided by its RMS (see the module docstring). Each component is scaled to [0, 1] by its 1st and 99th percentile over both maps together
    (robust to a few extreme pixels, identical for the two maps).
    """
    c, h, w = a.shape
    pixels = torch.cat([rms_normalise(a).reshape(c, -1).T, rms_normalise(b).reshape(c, -1).T]).double()  # (2N, C)
    centred = pixels - pixels.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(components, vh.shape[0])
    proj = centred @ vh[:k].T  # (2N, k)
    if k < 3:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - k)], dim=1)
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).numpy()
    total = float((s**2).sum())
    explained = float((s[:k] ** 2).sum()) / total if total > 0 else 0.0
    n = h * w
    return rgb[:n].reshape(h, w, 3), rgb[n:].reshape(h, w, 3), explained


def spectrum(x: Tensor) -> np.ndarray:
    """Singular values of a (C, h, w) map as a (C, N) matrix, divided by the largest."""
    s = torch.linalg.svdvals(x.reshape(x.shape[0], -1).double())
    return (s / s[0].clamp_min(1e-30)).numpy()


def energy_rank(rel: np.ndarray, fraction: float = 0.99) -> int:
    """How many singular values hold ``fraction`` of the squared total (the 'energy')."""
    energy = np.cumsum(rel**2)
    return int(np.searchsorted(energy, fraction * energy[-1]) + 1)


def recon_figure(image: np.ndarray, rec: Recorded, title: str) -> Figure:
    """Input, PCA of X, PCA of X̃ and both spectra, in one row."""
    fig = new_figure(*FIGSIZE)
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.4])
    c, h, w = rec.feats.shape
    k = rec.resp.shape[-1]
    before, after, explained = shared_pca_rgb(rec.feats, rec.recon)
    show_image(fig.add_subplot(grid[0, 0]), image, "input")
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    show_image(fig.add_subplot(grid[0, 1]), before, "X: features before EMA\n(conv1 output)",
               interpolation="nearest", extent=extent)
    show_image(fig.add_subplot(grid[0, 2]), after, "X̃ = μZᵀ: reconstruction\nafter EMA",
               interpolation="nearest", extent=extent)

    ax = fig.add_subplot(grid[0, 3])
    for x, name, style in ((rec.feats, "X (before)", "-"), (rec.recon, "X̃ (after)", "--")):
        rel = spectrum(x)
        shown = np.where(rel >= SPECTRUM_FLOOR, rel, np.nan)  # numerical zeros are not drawn
        ax.semilogy(np.arange(1, len(rel) + 1), shown, style, lw=1.8,
                    label=f"{name}: 99% of energy in {energy_rank(rel)} components")
    ax.axvline(k, color="0.5", lw=1, ls=":", label=f"K = {k} bases (the rank limit of X̃)")
    ax.set_xlabel("index i (largest first)")
    ax.set_ylabel(f"σᵢ / σ₁  (log scale; below {SPECTRUM_FLOOR:.0e} not drawn)")
    ax.set_title("singular values of the C×N feature matrices", fontsize="medium")
    ax.set_ylim(SPECTRUM_FLOOR / 2, 2)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    suptitle(fig, f"{title}\nX and X̃ (each scaled to unit RMS) → RGB by one shared PCA: first 3 components, "
                  f"{100 * explained:.0f}% of the variance; C={c}, feature map {h}×{w}")
    return fig


def draw_recon(
    path: str | os.PathLike | None = None,
    images: Sequence[str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    count: int = 4,
    overrides: Sequence[str] = (),
    device: str = "auto",
) -> list[Path]:
    """Write ``recon_<image>.png`` per image; return the paths."""

    def figure(context: PerImage, sample: Sample) -> Figure:
        return recon_figure(sample.image, context.record(sample.image), context.title(sample))

    return draw_per_image("recon", figure, path, images, out, split, count, overrides, device, ema_command="recon")

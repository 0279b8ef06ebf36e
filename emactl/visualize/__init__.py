"""Figures that show what a run learned and how a sweep turned out (``emactl visualize``).

Each ``draw_*`` function writes PNG files atomically and returns their paths:

* :func:`draw_bases` — EMA responsibility maps of chosen bases, per image;
* :func:`draw_recon` — features before EMA vs the low-rank reconstruction, and their spectra;
* :func:`draw_predictions` — prediction and ground-truth overlays with a class legend;
* :func:`draw_confusion` — the row-normalised confusion matrix of ``emactl eval``;
* :func:`draw_curves` — loss, learning rate and val mIoU from ``metrics.jsonl``;
* :func:`draw_ablation` — plots of an ablation sweep's ``results.csv``.

Shared figure code (sizes, palette colouring, overlays, legends) is in
:mod:`emactl.visualize.common`.
"""
from .ablation import draw_ablation
from .bases import draw_bases
from .confusion import draw_confusion
from .curves import draw_curves
from .predictions import draw_predictions
from .recon import draw_recon

__all__ = ["draw_ablation", "draw_bases", "draw_confusion", "draw_curves", "draw_predictions", "draw_recon"]

"""Segmentation losses: cross-entropy, class-weighted cross-entropy and OHEM.

Every loss here is a weighted mean of per-pixel cross-entropies, ``Σ wᵢ·ceᵢ / Σ wᵢ``, where a
pixel's weight is 0 when it is ignored (or, for OHEM, not kept) and otherwise 1 or its class
weight. The denominator ``Σ wᵢ`` and OHEM's selection threshold are taken over the *whole*
batch: under DDP they are all-reduced across ranks, and each rank's loss is scaled by the world
size (DDP averages gradients over ranks). So a run on N ranks computes the same loss and the
same gradients as one process holding the whole batch — per-rank means would not, as soon as
ranks hold different numbers of valid pixels. A batch without any kept pixel gives 0.

OHEM (online hard example mining, as used for Cityscapes by PSPNet, OCNet and mmseg's
``OHEMPixelSampler``): with ``p`` the softmax probability of each valid pixel's target class
and ``q`` the ``min_kept``-th smallest ``p`` of the batch, keep the pixels with ``p < thresh``
or ``p ≤ q``: the hard pixels, and at least ``min_kept`` of them (all valid pixels when there
are fewer). The selection carries no gradient.

Class weights from frequencies follow ENet (Paszke et al., 2016): ``w_c = 1 / ln(1.02 + f_c)``
with ``f_c`` the class's share of the labelled pixels, rescaled so that the classes present
average 1; classes absent from the training set get 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..config import Recipe
from ..data import build_dataset
from ..data.check import check_split, frequency_weights
from ..errors import UserError
from . import distributed as D



def _world() -> int:
    return D.get_world_size()


def _global_sum(value: Tensor) -> Tensor:
    """``value`` summed over ranks (a detached copy; the input is left alone)."""
    value = value.detach().clone()
    return D.all_reduce(value, "sum")


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest (1-based) of ``values`` pooled over all ranks; ``k`` must not
    exceed the pooled count. Each rank contributes its ``k`` smallest, padded with +inf to a
    common length, which is all the pooled k-th smallest can come from."""
    local = torch.topk(values, min(k, values.numel()), largest=False).values
    padded = torch.full((k,), math.inf, device=values.device, dtype=values.dtype)
    padded[: local.numel()] = local
    if D.is_initialized() and _world() > 1:
        gathered = [torch.empty_like(padded) for _ in range(_world())]
        dist.all_gather(gathered, padded)
        padded = torch.cat(gathered)
    return torch.topk(padded, k, largest=False).values[-1]


def ohem_mask(logits: Tensor, labels: Tensor, ignore_index: int, thresh: float,
              min_kept: int) -> Tensor:
    """The pixels OHEM keeps (bool, like ``labels``): see the module docstring."""
    with torch.no_grad():
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.zeros_like(labels))
        prob = torch.softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        keep = valid & (prob < thresh)
        n_valid = int(_global_sum(valid.sum()).item())
        k = min(min_kept, n_valid)
        if k > 0:
            q = _kth_smallest(prob[valid], k)
            keep |= valid & (prob <= q)
    return keep


@dataclass
class SegLoss:
    """The training loss of one head's logits ``(N, C, H, W)`` against ``labels`` ``(N, H, W)``.

    ``kind``: ``ce``, ``weighted_ce`` (needs ``class_weights``) or ``ohem`` (class weights
    optional). ``aux_weight`` scales the auxiliary head's loss, computed the same way.
    """

    kind: str = "ce"
    ignore_index: int = 255
    class_weights: Tensor | None = None
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    aux_weight: float = 0.4

    def pixel_weights(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Each pixel's weight in the mean: 0 if ignored or not kept, else its class weight."""
        valid = labels != self.ignore_index
        if self.kind == "ohem":
            valid = ohem_mask(logits, labels, self.ignore_index, self.ohem_thresh, self.ohem_min_kept)
        weights = valid.float()
        if self.class_weights is not None:
            table = self.class_weights.to(device=labels.device, dtype=torch.float32)
            weights = weights * table[torch.where(valid, labels, torch.zeros_like(labels))]
        return weights

    def head(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of one head: this rank's share of the whole batch's weighted mean."""
        weights = self.pixel_weights(logits, labels)
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none")
        total = (ce * weights).sum()
        # With no kept pixel anywhere every weight is 0, so ``total`` is 0 and so is the loss
        # (still a graph: every rank must be able to call backward under DDP).
        denominator = _global_sum(weights.sum()).clamp_min(1e-12)
        return total * _world() / denominator

    def __call__(self, outputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        loss = self.head(outputs["out"], labels)
        if "aux" in outputs:
            loss = loss + self.aux_weight * self.head(outputs["aux"], labels)
        return loss


def resolve_class_weights(recipe: Recipe, num_classes: int, pixels: Sequence[int] | None = None
                          ) -> list[float] | None:
    """``train.class_weights`` as a list: as given, or from ``pixels`` when ``frequency``."""
    weights = recipe.train.class_weights
    if weights is None:
        return None
    if weights == "frequency":
        if pixels is None:
            raise ValueError("class_weights=frequency needs the training set's pixel counts")
        return frequency_weights(pixels)
    if len(weights) != num_classes:
        raise UserError(f"train.class_weights: {len(weights)} weights for {num_classes} classes; "
                        "give one per class (`emactl data check RECIPE` prints frequency weights)")
    if any(w < 0 for w in weights):
        raise UserError("train.class_weights: weights must be >= 0")
    return [float(w) for w in weights]


def build_loss(recipe: Recipe, ignore_index: int, class_weights: list[float] | None) -> SegLoss:
    """The loss ``train.loss`` names, with ``model.aux_weight`` for the auxiliary head."""
    t = recipe.train
    if t.loss == "weighted_ce" and class_weights is None:
        raise UserError("train.loss=weighted_ce needs train.class_weights: a list with one weight "
                        "per class, or frequency (computed from the training split)")
    if t.loss == "ce" and class_weights is not None:
        raise UserError("train.class_weights is set but train.loss=ce ignores it; use "
                        "train.loss=weighted_ce (or ohem)")
    table = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    return SegLoss(t.loss, ignore_index, table, t.ohem_thresh, t.ohem_min_kept,
                   recipe.model.aux_weight)


def loss_for(recipe: Recipe, num_classes: int, ignore_index: int, progress: bool = False) -> SegLoss:
    """The recipe's loss; ``class_weights: frequency`` scans the training split's labels on
    rank 0 (with a progress bar) and shares the weights with the other ranks."""
    pixels = None
    if recipe.train.class_weights == "frequency":
        if D.is_main_process():
            data = recipe.data
            dataset = build_dataset(data, data.train_split, train=False)
            pixels = check_split(dataset, max(1, data.workers), progress).pixels.tolist()
        pixels = D.broadcast_object(pixels)
    return build_loss(recipe, ignore_index, resolve_class_weights(recipe, num_classes, pixels))

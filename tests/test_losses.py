"""Losses against a plain per-pixel loop in float64, all-ignored batches, and DDP over gloo."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emactl.config import apply_overrides, from_dict
from emactl.engine.losses import SegLoss, build_loss, frequency_weights, ohem_mask, resolve_class_weights
from emactl.engine.rundir import read_metrics
from emactl.engine.trainer import train
from emactl.errors import UserError

from gloo import run_gloo_workers
from runs import make_recipe

IGNORE = 255


def reference(logits: torch.Tensor, labels: torch.Tensor, kind: str = "ce",
              weights: list[float] | None = None, thresh: float = 0.7, min_kept: int = 0) -> float:
    """The loss, one pixel at a time: log-sum-exp CE, OHEM selection by sorting, weighted mean."""
    n, c, h, w = logits.shape
    pixels = []  # (ce, target probability, class)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y == IGNORE:
                    continue
                z = [float(logits[b, k, i, j]) for k in range(c)]
                top = max(z)
                ce = top + math.log(sum(math.exp(v - top) for v in z)) - z[y]
                pixels.append((ce, math.exp(-ce), y))
    if kind == "ohem":
        k = min(min_kept, len(pixels))
        q = sorted(p for _, p, _ in pixels)[k - 1] if k else -math.inf
        pixels = [px for px in pixels if px[1] < thresh or px[1] <= q]
    num = den = 0.0
    for ce, _, y in pixels:
        wy = weights[y] if weights is not None else 1.0
        num += wy * ce
        den += wy
    return num / den if den > 0 else 0.0


def batch(seed: int = 0, n: int = 2, c: int = 4, h: int = 3, w: int = 5, ignored: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen) * 2
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    labels[torch.rand(n, h, w, generator=gen) < ignored] = IGNORE
    return logits, labels


WEIGHTS = [0.5, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("kind,weights,thresh,min_kept", [
    ("ce", None, 0.7, 0),
    ("weighted_ce", WEIGHTS, 0.7, 0),
    ("ohem", None, 0.7, 0),        # threshold only
    ("ohem", None, 0.05, 7),       # min_kept above the pixels under the threshold
    ("ohem", None, 0.7, 1000),     # min_kept above the valid pixels: keep them all
    ("ohem", WEIGHTS, 0.3, 5),
])
def test_loss_matches_per_pixel_loop(kind, weights, thresh, min_kept):
    logits, labels = batch()
    table = torch.tensor(weights) if weights else None
    loss = SegLoss(kind, IGNORE, table, thresh, min_kept)({"out": logits}, labels)
    expected = reference(logits, labels, kind, weights, thresh, min_kept)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ce_is_torch_cross_entropy_and_ohem_keeps_at_least_min_kept():
    logits, labels = batch(1)
    loss = SegLoss("ce", IGNORE)({"out": logits}, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, ignore_index=IGNORE).item(), rel=1e-6)
    valid = int((labels != IGNORE).sum())
    for min_kept in (0, 1, 5, valid, valid + 3):
        keep = ohem_mask(logits, labels, IGNORE, 0.0001, min_kept)
        assert int(keep.sum()) == min(min_kept, valid)
        assert not keep[labels == IGNORE].any()


def test_aux_weight_adds_the_aux_head():
    logits, labels = batch(2)
    aux, _ = batch(3)
    loss = SegLoss("ohem", IGNORE, None, 0.5, 4, aux_weight=0.4)({"out": logits, "aux": aux}, labels)
    expected = reference(logits, labels, "ohem", None, 0.5, 4) + 0.4 * reference(aux, labels, "ohem", None, 0.5, 4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["ce", "weighted_ce", "ohem"])
def test_all_ignored_batch_gives_zero_and_zero_gradient(kind):
    logits, labels = batch()
    labels[:] = IGNORE
    logits.requires_grad_(True)
    loss = SegLoss(kind, IGNORE, torch.tensor(WEIGHTS), 0.7, 10)({"out": logits}, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_frequency_weights_follow_enet():
    weights = frequency_weights([600, 300, 0, 100])
    raw = [1 / math.log(1.02 + f) for f in (0.6, 0.3, 0.1)]
    mean = sum(raw) / 3
    assert weights == [round(raw[0] / mean, 4), round(raw[1] / mean, 4), 1.0, round(raw[2] / mean, 4)]
    assert weights[3] > weights[1] > weights[0]  # rarer classes weigh more


def recipe(*overrides: str):
    return from_dict(apply_overrides({"data": {"num_classes": 4}}, list(overrides)))


def test_recipe_keys_and_their_errors():
    loss = build_loss(recipe("train.loss=ohem", "train.ohem_thresh=0.6", "train.ohem_min_kept=9",
                             "model.aux_weight=0.2"), IGNORE, None)
    assert (loss.kind, loss.ohem_thresh, loss.ohem_min_kept, loss.aux_weight) == ("ohem", 0.6, 9, 0.2)
    r = recipe("train.loss=weighted_ce", f"train.class_weights={WEIGHTS}")
    assert build_loss(r, IGNORE, resolve_class_weights(r, 4)).class_weights.tolist() == WEIGHTS
    with pytest.raises(UserError, match="3 weights for 4 classes"):
        resolve_class_weights(recipe("train.class_weights=[1,2,3]"), 4)
    assert resolve_class_weights(recipe("train.class_weights=frequency"), 2, [1, 1]) == [1.0, 1.0]
    with pytest.raises(UserError, match="weighted_ce needs train.class_weights"):
        build_loss(recipe("train.loss=weighted_ce"), IGNORE, None)
    with pytest.raises(UserError, match="train.loss=ce ignores it"):
        build_loss(recipe(), IGNORE, [1.0] * 4)
    with pytest.raises(UserError, match="train.ohem_thresh"):
        recipe("train.ohem_thresh=0")
    with pytest.raises(UserError, match="choose one of: ce, ohem, weighted_ce"):
        recipe("train.loss=focal")


# --------------------------------------------------------------------------------------------
# DDP: two gloo ranks, each with half of a batch whose halves hold different numbers of
# valid pixels, give the loss and the gradients of one process holding the whole batch.


def _ddp_case() -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = batch(5, n=4, ignored=0.2)
    labels[:2, :, :3] = IGNORE  # rank 0's half has fewer valid pixels
    return logits, labels


DDP_KINDS = [("ce", None, 0.7, 0), ("weighted_ce", WEIGHTS, 0.7, 0), ("ohem", None, 0.2, 9),
             ("ohem", WEIGHTS, 0.05, 20)]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, labels = _ddp_case()
        share = slice(rank * 2, rank * 2 + 2)
        results = []
        for kind, weights, thresh, min_kept in DDP_KINDS:
            mine = logits[share].clone().requires_grad_(True)
            table = torch.tensor(weights) if weights else None
            loss = SegLoss(kind, IGNORE, table, thresh, min_kept)({"out": mine}, labels[share])
            loss.backward()
            results.append((loss.detach(), mine.grad))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    run_gloo_workers(_dist_worker, tmp_path, 2, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    logits, labels = _ddp_case()
    for k, (kind, weights, thresh, min_kept) in enumerate(DDP_KINDS):
        whole = logits.clone().requires_grad_(True)
        table = torch.tensor(weights) if weights else None
        loss = SegLoss(kind, IGNORE, table, thresh, min_kept)({"out": whole}, labels)
        loss.backward()
        # the trainer reports the mean of the ranks' losses; DDP averages their gradients
        mean = (ranks[0][k][0] + ranks[1][k][0]) / 2
        assert mean.item() == pytest.approx(loss.item(), rel=1e-6), kind
        assert mean.item() == pytest.approx(reference(logits, labels, kind, weights, thresh, min_kept), rel=1e-5)
        grads = torch.cat([ranks[0][k][1], ranks[1][k][1]]) / 2
        assert torch.allclose(grads, whole.grad, rtol=1e-5, atol=1e-8), kind
        # per-rank means would differ: the halves hold different numbers of valid pixels
        if kind == "ce":
            halves = [F.cross_entropy(logits[s], labels[s], ignore_index=IGNORE) for s in (slice(0, 2), slice(2, 4))]
            assert abs((halves[0] + halves[1]).item() / 2 - loss.item()) > 1e-3


# --------------------------------------------------------------------------------------------
# The trainer uses the recipe's loss.


def test_trainer_uses_the_recipe_loss(tmp_path: Path, one_thread):
    first = {}
    for loss in ("ce", "weighted_ce", "ohem"):
        extra = {"ce": [], "weighted_ce": ["train.class_weights=frequency"],
                 "ohem": ["train.ohem_thresh=0.05", "train.ohem_min_kept=50"]}[loss]
        r = make_recipe(tmp_path, "train.iters=1", "model.aux=true", f"train.loss={loss}", *extra)
        train(r, tmp_path / loss, progress=False)
        first[loss] = read_metrics(tmp_path / loss)[0]["loss"]
    # the same first forward pass (same seed), three different losses
    assert len(set(first.values())) == 3 and all(math.isfinite(v) for v in first.values())
    with pytest.raises(UserError, match="weighted_ce needs train.class_weights"):
        train(make_recipe(tmp_path, "train.loss=weighted_ce"), tmp_path / "bad", progress=False)

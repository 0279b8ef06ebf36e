"""EM attention (``em_attention``) and the EMA Unit (``EMAU``).

The reference implementation (``tests/reference.py``) is written independently of the
package: plain Python floats, explicit loops over batch, bases, pixels and channels.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emactl.nn.ema import EMAU, add_relu_, em_attention, init_bases

from gloo import run_gloo_workers
from reference import max_abs, reference_em, rel_err


# (B, C, N, K, T, lambda, batch of mu0)
EM_CASES = [
    (1, 4, 6, 2, 1, 1.0, 1),
    (2, 5, 7, 3, 3, 1.0, 1),
    (2, 3, 5, 4, 2, 0.5, 2),
    (3, 4, 6, 3, 4, 3.0, 3),
    (2, 6, 4, 2, 3, 2.0, 2),
]


@pytest.mark.parametrize("norm", ["l2", "layernorm", "none"])
@pytest.mark.parametrize("case", EM_CASES, ids=lambda c: "B{}C{}N{}K{}T{}lam{}mu{}".format(*c))
def test_em_attention_matches_reference(case, norm):
    B, C, N, K, T, lam, mb = case
    x = torch.randn(B, C, N)
    mu0 = F.normalize(torch.randn(mb, C, K), dim=1)
    out = em_attention(x, mu0, iters=T, temperature=lam, norm=norm)
    assert out.recon.shape == (B, C, N)
    assert out.bases.shape == (B, C, K)
    assert out.resp.shape == (B, N, K)
    assert out.recon.dtype == torch.float32
    recon, bases, resp = reference_em(x, mu0, T, lam, norm)
    for name, got, want in (("recon", out.recon, recon), ("bases", out.bases, bases), ("resp", out.resp, resp)):
        assert rel_err(got, want) <= 1e-5, (name, rel_err(got, want))
        assert max_abs(got, want) <= 1e-5, (name, max_abs(got, want))


def test_reference_is_not_trivially_matched():
    """The comparison above can fail: a different T or λ gives a clearly different answer."""
    x = torch.randn(2, 4, 6)
    mu0 = F.normalize(torch.randn(1, 4, 3), dim=1)
    recon, bases, resp = reference_em(x, mu0, 3, 1.0, "l2")
    assert rel_err(em_attention(x, mu0, iters=2).recon, recon) > 1e-3
    assert rel_err(em_attention(x, mu0, iters=3, temperature=2.0).resp, resp) > 1e-3
    assert rel_err(em_attention(x, mu0, iters=3, norm="layernorm").bases, bases) > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. K-means limit


def _clusters(b: int, c: int, k: int, per: int, gen: torch.Generator):
    """Unit-norm points around k orthonormal centres; returns x (b, c, k·per), labels, centres."""
    centres = torch.linalg.qr(torch.randn(c, k, generator=gen))[0]  # (c, k) orthonormal
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[:, labels].unsqueeze(0) + 0.15 * torch.randn(b, c, k * per, generator=gen)
    return F.normalize(x, dim=1), labels, centres


@pytest.mark.parametrize("init", ["near_centres", "random"])
def test_kmeans_limit(init):
    gen = torch.Generator().manual_seed(1)
    B, C, K, per = 2, 8, 3, 10
    x, labels, centres = _clusters(B, C, K, per, gen)
    if init == "near_centres":
        # basis k starts near centre perm[k]; different permutation per batch element
        perms = [torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])]
        mu0 = torch.stack([centres[:, p] for p in perms]) + 0.3 * torch.randn(B, C, K, generator=gen)
    else:
        mu0 = torch.randn(1, C, K, generator=gen)
    mu0 = F.normalize(mu0, dim=1)
    out = em_attention(x, mu0, iters=4, temperature=1e4, norm="l2")

    assert (out.resp.max(dim=2).values >= 1 - 1e-4).all()
    owner = out.resp.argmax(dim=2)  # (B, N)
    for b in range(B):
        for k in range(K):
            owned = owner[b] == k
            if owned.any():
                want = F.normalize(x[b][:, owned].double().mean(dim=1), dim=0)
                assert max_abs(out.bases[b, :, k], want) <= 1e-5
            else:  # a basis that owns nothing collapses to zero
                assert out.bases[b, :, k].abs().max() <= 1e-6
        # each pixel is reconstructed by the basis that owns it
        assert max_abs(out.recon[b], out.bases[b][:, owner[b]]) <= 1e-5
        if init == "near_centres":
            # basis k owns exactly the cluster it started near
            assert torch.equal(owner[b], torch.argsort(perms[b])[labels])


# ---------------------------------------------------------------------------------------------
# 3. Monotone objective (EM for an equal-weight vMF mixture with shared concentration λ)


def _objective(x: torch.Tensor, mu: torch.Tensor, lam: float) -> float:
    """Σ_b Σ_n logsumexp_k(λ x_n · μ_k)."""
    logits = lam * torch.einsum("bcn,bck->bnk", x, mu.expand(x.shape[0], -1, -1))
    return float(torch.logsumexp(logits, dim=2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.5, 1.0, 5.0])
def test_objective_never_decreases(seed, lam):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 20, generator=gen, dtype=torch.float64)
    mu0 = F.normalize(torch.randn(1, 6, 4, generator=gen, dtype=torch.float64), dim=1)
    T = 8
    values = [_objective(x, mu0, lam)]
    for t in range(1, T + 1):
        out = em_attention(x, mu0, iters=t, temperature=lam, norm="l2")
        assert out.bases.dtype == torch.float64
        values.append(_objective(x, out.bases, lam))
    for before, after in zip(values, values[1:]):
        assert after >= before - 1e-9 * abs(before), values
    assert values[-1] > values[0] + 1e-3  # it actually moves


# ---------------------------------------------------------------------------------------------
# 4. Gradient modes


def _unit_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    return (m(x) * w).sum()


def _tiny_unit(iters: int = 3, **kw) -> EMAU:
    torch.manual_seed(0)
    return EMAU(4, bases=3, iters=iters, **kw)


def _tiny_input(b: int = 2) -> torch.Tensor:
    return torch.relu(torch.randn(b, 4, 5, 5, generator=torch.Generator().manual_seed(3)))


def test_grad_none_leaves_conv1_untouched():
    m = _tiny_unit(grad="none").train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    w0, c2 = m.conv1.weight.detach().clone(), m.conv2.weight.detach().clone()
    _unit_loss(m, _tiny_input()).backward()
    g = m.conv1.weight.grad
    assert g is None or torch.count_nonzero(g) == 0
    assert m.conv2.weight.grad is not None and m.conv2.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(m.conv1.weight, w0)  # bit-identical: a fixed random projection
    assert not torch.equal(m.conv2.weight, c2)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("grad", ["last", "full"])
def test_grad_last_full_train_conv1(grad, iters):
    # with the default moving-average bases: the in-place buffer update after the forward pass
    # must not invalidate the graph (regression: backward raised "modified by an inplace op")
    m = _tiny_unit(iters=iters, grad=grad).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0, mu0 = m.conv1.weight.detach().clone(), m.mu.clone()
    _unit_loss(m, _tiny_input()).backward()
    assert m.conv1.weight.grad is not None and m.conv1.weight.grad.abs().sum() > 1e-6
    assert not torch.equal(m.mu, mu0)  # the buffer was updated in that same step
    opt.step()
    assert not torch.equal(m.conv1.weight, w0)


@pytest.mark.parametrize("norm", ["l2", "layernorm", "none"])
def test_em_attention_gradcheck_full(norm):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mu0 = F.normalize(torch.randn(1, 3, 2, dtype=torch.float64), dim=1).requires_grad_()

    def fn(x, mu0):
        return tuple(em_attention(x, mu0, iters=2, temperature=1.0, norm=norm, grad="full"))

    assert torch.autograd.gradcheck(fn, (x, mu0), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_grad_last_backprops_through_final_iteration_only():
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    mu0 = F.normalize(torch.randn(1, 4, 3, dtype=torch.float64), dim=1).requires_grad_()
    w1 = torch.randn(2, 4, 6, dtype=torch.float64)
    w2 = torch.randn(2, 4, 3, dtype=torch.float64)

    out = em_attention(x, mu0, iters=3, norm="l2", grad="last")
    ((out.recon * w1).sum() + (out.bases * w2).sum()).backward()
    assert mu0.grad is None  # the initial bases sit behind T-1 gradient-free iterations
    gx_last = x.grad.clone()

    # reference: T-1 iterations with no graph, then one differentiable iteration written out
    xr = x.detach().clone().requires_grad_()
    with torch.no_grad():
        mu = em_attention(xr, mu0, iters=2, norm="l2").bases
    z = torch.softmax(torch.einsum("bcn,bck->bnk", xr, mu), dim=2)
    mu_t = torch.einsum("bcn,bnk->bck", xr, z) / (1e-6 + z.sum(dim=1, keepdim=True))
    mu_t = mu_t / mu_t.norm(dim=1, keepdim=True)
    recon = torch.einsum("bck,bnk->bcn", mu_t, z)
    ((recon * w1).sum() + (mu_t * w2).sum()).backward()
    assert rel_err(gx_last, xr.grad) <= 1e-10

    # full differs: it also differentiates through the first T-1 iterations and reaches mu0
    x.grad = None
    out = em_attention(x, mu0, iters=3, norm="l2", grad="full")
    ((out.recon * w1).sum() + (out.bases * w2).sum()).backward()
    assert mu0.grad is not None and mu0.grad.abs().sum() > 0
    assert rel_err(x.grad, gx_last) > 1e-6

    # none: nothing needs a gradient at all
    out = em_attention(x, mu0, iters=3, grad="none")
    assert not any(t.requires_grad for t in out)


# ---------------------------------------------------------------------------------------------
# 5. Bases: moving average, eval, iterations, backprop, fixed


def _feats(m: EMAU, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.conv1(x).reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("renorm", [True, False])
def test_moving_average_update(renorm):
    m = _tiny_unit(momentum=0.8, renorm=renorm).train()
    m.record = True
    assert "mu" in dict(m.named_buffers()) and "mu" in m.state_dict()
    x = _tiny_input()
    mu_before = m.mu.clone()
    assert torch.allclose(mu_before.norm(dim=1), torch.ones(1, 3), atol=1e-6)
    m(x)
    ref = em_attention(_feats(m, x), mu_before, iters=3)
    assert max_abs(m.last.bases, ref.bases) <= 1e-6
    mean = ref.bases.double().mean(dim=0, keepdim=True)
    want = 0.8 * mu_before.double() + 0.2 * mean  # momentum weights the *old* value
    if renorm:
        want = want / want.norm(dim=1, keepdim=True)
    assert max_abs(m.mu, want) <= 1e-6
    assert max_abs(m.mu, mu_before) > 1e-3  # it moved
    norms = m.mu.norm(dim=1)
    if renorm:
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    else:
        assert (norms < 1 - 1e-4).all()  # averaging unit vectors shrinks them


def test_normed_moving_average_is_mmsegs_rule():
    """mmseg: bases ← (1 − 0.1)·bases + 0.1·l2normalise(mean_b(mu_T)), no renormalisation after."""
    m = _tiny_unit(momentum=0.9, renorm=False, bases_update="normed_moving_average").train()
    m.record = True
    x = _tiny_input()
    mu_before = m.mu.double().clone()
    m(x)
    mean = m.last.bases.double().mean(dim=0, keepdim=True)
    normed = mean / torch.sqrt((mean * mean).sum(dim=1, keepdim=True))
    want = (1 - 0.1) * mu_before + 0.1 * normed
    assert max_abs(m.mu.double(), want) <= 1e-6
    original = 0.9 * mu_before + 0.1 * mean  # the original code's rule differs
    assert max_abs(m.mu.double(), original) > 1e-3


def test_iters_in_training_and_eval_iters_in_eval():
    m = _tiny_unit(eval_iters=5, bases_update="none")
    m.iters = 2
    m.record = True
    x = _tiny_input()
    f, mu = _feats(m, x), m.mu.clone()
    t2, t5 = em_attention(f, mu, iters=2), em_attention(f, mu, iters=5)
    assert rel_err(t2.recon, t5.recon) > 1e-4  # the two are distinguishable

    m.train()
    m(x)
    assert max_abs(m.last.recon, t2.recon) <= 1e-6

    m.eval()
    m(x)
    assert max_abs(m.last.recon, t5.recon) <= 1e-6
    assert rel_err(m.last.recon, t2.recon) > 1e-4

    m.eval_iters = 1  # can be changed at any time (e.g. `emactl eval --iters`)
    m(x)
    assert max_abs(m.last.recon, em_attention(f, mu, iters=1).recon) <= 1e-6


def test_eval_mode_never_changes_buffer():
    m = _tiny_unit().eval()
    mu = m.mu.clone()
    with torch.no_grad():
        for _ in range(3):
            m(_tiny_input())
    assert torch.equal(m.mu, mu)


def test_bases_update_none_keeps_buffer_in_training():
    m = _tiny_unit(bases_update="none").train()
    assert "mu" in dict(m.named_buffers())
    mu = m.mu.clone()
    for _ in range(3):
        _unit_loss(m, _tiny_input()).backward()
    assert torch.equal(m.mu, mu)


def test_bases_update_backprop_is_a_learned_parameter():
    m = _tiny_unit(grad="full", bases_update="backprop").train()
    assert isinstance(m.mu, nn.Parameter)
    assert "mu" in dict(m.named_parameters()) and "mu" not in dict(m.named_buffers())
    mu = m.mu.detach().clone()
    _unit_loss(m, _tiny_input()).backward()
    assert torch.equal(m.mu.detach(), mu)  # the forward pass does not touch it
    assert m.mu.grad is not None and m.mu.grad.abs().sum() > 1e-8
    opt = torch.optim.SGD([m.mu], lr=0.1)
    opt.step()
    assert not torch.equal(m.mu.detach(), mu)


# ---------------------------------------------------------------------------------------------
# 6. Distributed bases: two gloo ranks on the CPU


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same module init on every rank
        m = EMAU(4, bases=3, iters=3).train()
        m.record = True
        mu_before = m.mu.clone()
        gen = torch.Generator().manual_seed(100 + rank)  # a different batch per rank
        x = torch.relu(torch.randn(2, 4, 5, 5, generator=gen))
        m(x)
        torch.save({"mu_before": mu_before, "mu_after": m.mu.clone(), "bases": m.last.bases},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_bases_agree(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    world = 2
    run_gloo_workers(_dist_worker, tmp_path, world, timeout=60)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert torch.equal(r0["mu_before"], r1["mu_before"])
    assert torch.equal(r0["mu_after"], r1["mu_after"])  # identical replicas
    assert max_abs(r0["bases"], r1["bases"]) > 1e-3  # the ranks really saw different data

    def update(mean):
        new = 0.9 * r0["mu_before"].double() + 0.1 * mean
        return new / new.norm(dim=1, keepdim=True)

    m0 = r0["bases"].double().mean(dim=0, keepdim=True)
    m1 = r1["bases"].double().mean(dim=0, keepdim=True)
    want = update((m0 + m1) / 2)
    assert max_abs(r0["mu_after"], want) <= 1e-6
    assert max_abs(update(m0), want) > 1e-4  # a rank-local update would be detectably different


def test_zero_init_starts_as_identity_and_still_learns():
    """With ``zero_init`` the unit's output equals its (ReLU-positive) input at initialisation,
    and the BN weight after conv2 receives a gradient, so the branch can grow."""
    torch.manual_seed(0)
    unit = EMAU(8, bases=4, zero_init=True)
    x = torch.relu(torch.randn(2, 8, 5, 5))
    y = unit(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert unit.bn.weight.grad is not None and unit.bn.weight.grad.abs().sum() > 0
    assert not torch.equal(EMAU(8, bases=4)(x), x)


# ---------------------------------------------------------------------------------------------
# conv1 folded into the EM products: the same bases, responsibilities, reconstruction and
# gradients as convolving first, in float64.


@pytest.mark.parametrize("norm", ["l2", "layernorm", "none"])
@pytest.mark.parametrize("grad", ["none", "last", "full"])
def test_folded_conv1_equals_conv_then_em_in_float64(grad, norm):
    g = torch.Generator().manual_seed(5)
    b, c_in, c, n, k = 2, 7, 6, 30, 4
    x = torch.randn(b, c_in, n, generator=g, dtype=torch.float64).relu().requires_grad_()
    weight = torch.randn(c, c_in, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(c, generator=g, dtype=torch.float64).requires_grad_()
    mu0 = init_bases(c, k, norm).double()
    feats = torch.einsum("oc,bcn->bon", weight, x) + bias[:, None]  # the 1x1 conv, written out
    plain = em_attention(feats, mu0, 3, 1.5, norm, grad, method="bmm")
    folded = em_attention(x, mu0, 3, 1.5, norm, grad, method="bmm", weight=weight, bias=bias)
    for name, ours, theirs in zip(("recon", "bases", "resp"), folded, plain):
        assert rel_err(ours, theirs) <= 1e-10, name
    if grad == "none":
        assert not any(t.requires_grad for t in folded)
        return
    probe = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in plain]
    expected = torch.autograd.grad(sum((t * p).sum() for t, p in zip(plain, probe)), (x, weight, bias))
    got = torch.autograd.grad(sum((t * p).sum() for t, p in zip(folded, probe)), (x, weight, bias))
    for name, ours, theirs in zip(("x", "weight", "bias"), got, expected):
        assert theirs.abs().sum() > 0 and rel_err(ours, theirs) <= 1e-9, name


@pytest.mark.parametrize("method", ["conv", "blocked"])
def test_folded_fast_cpu_methods_match_float64(method):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 50, generator=g).relu()
    weight, bias = torch.randn(12, 12, generator=g) / 4, torch.randn(12, generator=g)
    mu0 = init_bases(12, 5)
    feats = torch.einsum("oc,bcn->bon", weight.double(), x.double()) + bias.double()[:, None]
    want = em_attention(feats, mu0.double(), 3, method="bmm")
    with torch.no_grad():
        got = em_attention(x, mu0, 3, method=method, weight=weight, bias=bias, block=16)
    for name, ours, theirs in zip(("recon", "bases", "resp"), got, want):
        assert rel_err(ours, theirs) <= 1e-5, name


@pytest.mark.parametrize("grad", ["none", "last", "full"])
def test_emau_folded_equals_unfolded_outputs_and_gradients(grad):
    """The unit with fold=True (default) against fold=False: outputs, bases update, gradients."""
    torch.manual_seed(7)
    unit = EMAU(8, 3, grad=grad, bases_update="backprop" if grad == "full" else "moving_average").double().train()
    plain = copy.deepcopy(unit)
    plain.fold = False
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).relu()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    (unit(xa) * w).sum().backward()
    (plain(xb) * w).sum().backward()
    assert rel_err(xa.grad, xb.grad) <= 1e-9
    assert rel_err(unit.mu.detach(), plain.mu.detach()) <= 1e-9
    for (name, p), q in zip(unit.named_parameters(), plain.parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
        else:
            assert rel_err(p.grad, q.grad) <= 1e-9, name
    if grad != "none":
        assert unit.conv1.weight.grad is not None and unit.conv1.weight.grad.abs().sum() > 0


def test_emau_folds_only_where_it_saves_work():
    """Folding trades N·C² for 2T·C²·K multiply-adds: it pays when N > 2·T·K."""
    unit = EMAU(8, 4, iters=3)
    assert not unit.folds(24) and unit.folds(25)
    unit.eval_iters = 1
    assert unit.eval().folds(9) and not unit.train().folds(9)
    unit.fold = False
    assert not unit.folds(10_000)


# ---------------------------------------------------------------------------------------------
# The softmax over the bases and the whole unit against plain float64 computations.


def test_softmax_bases_matches_float64_closer_than_an_ulp_budget():
    """fp32 responsibilities within 6e-7 (relative to the largest) of float64 at the paper's K
    and a tenth of its pixels; torch.softmax over this non-last dimension measured 7.9e-7."""
    from emactl.nn.ema import softmax_bases

    logits = torch.randn(4, 64, 4225, generator=torch.Generator().manual_seed(0)) * 5
    want = torch.exp(logits.double() - logits.double().amax(1, keepdim=True))
    want = want / want.sum(1, keepdim=True)
    got = softmax_bases(logits.clone())
    assert max_abs(got, want) / float(want.abs().max()) <= 6e-7
    out = torch.empty_like(logits)
    assert softmax_bases(logits, out=out) is out and torch.equal(out, got)
    half = softmax_bases(logits.bfloat16())  # reduced precision: torch.softmax
    assert half.dtype == torch.bfloat16
    assert max_abs(half, torch.softmax(logits.bfloat16().double(), 1)) <= 4e-3  # bf16 output rounding


def test_softmax_bases_gradient_is_softmax_gradient():
    from emactl.nn.ema import softmax_bases

    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax_bases, (logits,))
    probe = torch.randn(2, 5, 7, dtype=torch.float64)
    (ours,) = torch.autograd.grad((softmax_bases(logits) * probe).sum(), logits)
    (theirs,) = torch.autograd.grad((torch.softmax(logits, 1) * probe).sum(), logits)
    assert rel_err(ours, theirs) <= 1e-12


def plain_unit(unit: EMAU, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The EMA unit written out in float64: conv1, the Python-float EM, ReLU, conv2, BN, + x, ReLU."""
    b, c, h, w = x.shape
    x = x.double()
    feats = F.conv2d(x, unit.conv1.weight.double(), unit.conv1.bias.double()).view(b, c, h * w)
    recon, _, _ = reference_em(feats, unit.mu.double(), unit.iters, unit.temperature, unit.norm)
    y = F.conv2d(recon.view(b, c, h, w).relu(), unit.conv2.weight.double())
    if training:
        mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = unit.bn.running_mean.double(), unit.bn.running_var.double()
    y = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + unit.bn.eps)
    y = y * unit.bn.weight.double().view(1, -1, 1, 1) + unit.bn.bias.double().view(1, -1, 1, 1)
    return (y + x).relu()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_emau_fp32_matches_plain_float64_unit(training):
    """The unit as it runs on the CPU (conv1 folded into the products, conv2 as a batched
    product, BN folded into conv2 in eval) against the unit written out in float64."""
    torch.manual_seed(11)
    unit = EMAU(6, 3, iters=3)
    with torch.no_grad():
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
        unit.bn.weight.uniform_(0.5, 1.5)
        unit.bn.bias.uniform_(-0.5, 0.5)
    unit.train(training)
    x = torch.randn(2, 6, 5, 6).relu()
    assert unit.folds(30)
    with torch.no_grad():
        want = plain_unit(unit, x, training)
        got = unit(x.clone())
    assert rel_err(got, want) <= 1e-5
    assert max_abs(got, want) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_relu_matches_add_then_relu(dtype):
    torch.manual_seed(0)
    y, other = torch.randn(2, 3, 40, dtype=dtype), torch.randn(2, 3, 40, dtype=dtype)
    y[0, 0, :3] = torch.tensor([float("nan"), -1.0, 0.0])
    want = torch.relu(y.double() + other.double()).to(dtype)
    got = add_relu_(y.clone(), other)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert (got > 0).any() and (got == 0).any()


def test_add_relu_keeps_gradients():
    torch.manual_seed(0)
    y, other = torch.randn(3, 50, requires_grad=True), torch.randn(3, 50, requires_grad=True)
    add_relu_(y * 1.0, other).sum().backward()
    mask = (y + other > 0).to(y.dtype).detach()
    assert torch.equal(y.grad, mask) and torch.equal(other.grad, mask)
    assert 0 < mask.sum() < mask.numel()

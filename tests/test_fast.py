"""The fast paths of EM attention and the EMA unit against plain references.

Fast paths: the (B, K, N) responsibilities layout, the l2 M step without the division by
Σ_n z, the reusable (B, C, N) reconstruction buffer (``out=``, and ``EMAU``'s own), bf16 inputs
and bf16 autocast, channels_last inputs. The reference is the tests' float64 EM
(``tests/reference.py``, (B, N, K) responsibilities); every comparison is a relative error
‖a − b‖ / ‖b‖. Shapes are tiny; no test looks at time.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from emactl.nn.em_cpu import onednn_products
from emactl.nn.ema import EMAU, Reusable, em_attention, init_bases, m_step

from reference import reference_em, rel_err

BF16 = torch.bfloat16
FP32_TOL = 1e-5
BF16_TOL = 1e-2
ONEDNN = pytest.mark.skipif(not onednn_products(), reason="needs oneDNN's fp32 matrix product on an x86 CPU")


def features(b: int = 2, c: int = 24, n: int = 40, seed: int = 0) -> torch.Tensor:
    """Signed features like EMAU's conv1 output."""
    return torch.randn(b, c, n, generator=torch.Generator().manual_seed(seed))


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def check(out, ref, tol: float) -> None:
    for name, ours, theirs in zip(("recon", "bases", "resp"), out, ref):
        assert ours.shape == theirs.shape, name
        err = rel_err(ours, theirs)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------------
# em_attention in fp32, with and without the reconstruction buffer

CASES = [("l2", 1.0), ("l2", 2.5), ("layernorm", 1.0), ("none", 0.5)]


@pytest.mark.parametrize("use_out", [False, True], ids=["alloc", "out"])
@pytest.mark.parametrize("norm,lam", CASES)
def test_em_attention_fp32_matches_reference(norm, lam, use_out):
    x, mu0 = features(), init_bases(24, 6, norm)
    out = torch.full((2, 24, 40), float("nan")) if use_out else None
    ours = em_attention(x, mu0, 3, lam, norm, "none", out=out)
    check(ours, reference_em(x, mu0, 3, lam, norm), FP32_TOL)
    if use_out:
        assert ours.recon.shape == (2, 24, 40)
        assert shares_storage(ours.recon, out) and ours.recon.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, ours.recon, rtol=0, atol=0)


@pytest.mark.parametrize("grad", ["none", "last", "full"])
def test_em_attention_grad_modes_fp32_match_reference(grad):
    x, mu0 = features(), init_bases(24, 6)
    check(em_attention(x, mu0, 3, grad=grad), reference_em(x, mu0), FP32_TOL)


# the CPU's fast methods for iterations without gradient (emactl.nn.em_cpu); blocked runs
# with small blocks, since its automatic block (about 1 MiB of a sample) covers these inputs whole


@pytest.mark.parametrize(
    "method,block",
    [("conv", None), ("blocked", 16), ("blocked", 7), pytest.param("onednn", None, marks=ONEDNN)],
    ids=["conv", "blocked16", "blocked7", "onednn"],
)
@pytest.mark.parametrize("grad", ["none", "last", "full"])
@pytest.mark.parametrize("norm,lam", CASES)
def test_fast_cpu_methods_match_reference(norm, lam, grad, method, block):
    x, mu0 = features(), init_bases(24, 6, norm)
    out = torch.empty(2, 24, 40)
    with torch.no_grad():
        ours = em_attention(x, mu0, 3, lam, norm, grad, out=out, method=method, block=block)
    check(ours, reference_em(x, mu0, 3, lam, norm), FP32_TOL)


@pytest.mark.parametrize("method", ["conv", "blocked", pytest.param("onednn", marks=ONEDNN)])
def test_fast_cpu_methods_per_image_bases_and_channels_last_features(method):
    x = features(3).transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, N) stored as (B, N, C)
    mu0 = torch.cat([init_bases(24, 5) for _ in range(3)])
    with torch.no_grad():
        check(em_attention(x, mu0, 2, method=method, block=16), reference_em(x, mu0, 2), FP32_TOL)


@pytest.mark.parametrize("amp", [False, True], ids=["bf16-in", "bf16-in-autocast"])
@pytest.mark.parametrize("method", ["conv", "blocked"])
def test_fast_cpu_methods_bf16(method, amp):
    x, mu0 = features(), init_bases(24, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
        ours = em_attention(x.to(BF16), mu0.to(BF16), 3, method=method, block=16)
    assert ours.resp.dtype == ours.bases.dtype == BF16
    check(ours, reference_em(x, mu0), BF16_TOL)


def test_pick_method():
    from emactl.nn.em_cpu import TUNED, pick_method, signature

    x, mu = torch.empty(4, 512, 4225), torch.empty(4, 512, 64)
    with torch.no_grad():
        assert pick_method(x, mu) == "tune"  # large fp32 products: measured on first sight
        TUNED[signature(x, mu, 3, False)] = "blocked"
        try:
            assert pick_method(x, mu) == "blocked"
            assert pick_method(x, mu, iters=2) == "tune"  # another signature
        finally:
            TUNED.pop(signature(x, mu, 3, False))
        assert pick_method(x.double(), mu.double()) == "tune"
        assert pick_method(x.to(BF16), mu.to(BF16)) == "bmm"  # bf16 products already run through oneDNN
        assert pick_method(x.to(BF16), mu.to(BF16), "blocked") == "blocked"  # asked for
        assert pick_method(x, mu, "bmm") == "bmm"
        assert pick_method(x[:, :, :1089], mu) == "bmm"  # 512·33²·64 products: too small to gain
        assert pick_method(x[:, :, :1089], mu, "conv") == "conv"
        assert pick_method(x, mu.to(BF16)) == "bmm"  # mixed dtypes
        assert pick_method(x.to("meta"), mu.to("meta")) == "bmm"
        with torch.autocast("cpu", dtype=BF16):
            assert pick_method(x, mu) == "bmm"  # fp32 inputs under bf16 autocast: autocast's choice
            assert pick_method(x.to(BF16), mu.to(BF16), "conv") == "conv"
        assert pick_method(x.double(), mu.double(), "onednn") == "bmm"  # oneDNN's product: fp32 only
        assert pick_method(x.to(BF16), mu.to(BF16), "onednn") == "bmm"
        assert pick_method(x, mu, "onednn") == ("onednn" if onednn_products() else "bmm")
    assert pick_method(x, mu) == "bmm"  # autograd needs the batched products
    with pytest.raises(ValueError, match="unknown method"):
        em_attention(features(), init_bases(24, 6), method="fast")


def test_tune_methods_keeps_the_fastest_and_the_last_result():
    from emactl.nn.em_cpu import tune_methods

    now, calls = [0.0], []
    cost = {"bmm": 3.0, "blocked": 1.0, "conv": 2.0}

    def run(method: str) -> str:
        calls.append(method)
        now[0] += cost[method] + (5.0 if len(calls) == 1 else 0.0)  # a slow first call (warm-up)
        return method

    fastest, result = tune_methods(("bmm", "blocked", "conv"), run, clock=lambda: now[0])
    assert fastest == "blocked" and result == "conv"
    assert calls == ["bmm", "blocked", "conv", "bmm", "blocked", "conv"]  # interleaved rounds


def test_auto_tunes_once_per_signature_and_matches_the_reference(monkeypatch):
    from emactl.nn import em_cpu

    monkeypatch.setattr(em_cpu, "LARGE", 1)
    monkeypatch.setattr(em_cpu, "TUNED", {})
    x, mu0 = features(), init_bases(24, 6)
    with torch.no_grad():
        first = em_attention(x, mu0, 3)
        assert len(em_cpu.TUNED) == 1 and set(em_cpu.TUNED.values()) <= set(em_cpu.candidates(x))
        second = em_attention(x, mu0, 3)
    check(first, reference_em(x, mu0), FP32_TOL)
    check(second, reference_em(x, mu0), FP32_TOL)


def test_em_attention_per_image_bases_match_reference():
    x = features(3)
    mu0 = torch.cat([init_bases(24, 5) for _ in range(3)])
    check(em_attention(x, mu0, 2, out=torch.empty(3, 24, 40)), reference_em(x, mu0, 2), FP32_TOL)


def test_out_buffer_reused_across_calls():
    """One buffer, several inputs: each call's answer is right when it returns (and lives in
    the buffer, so the next call overwrites it)."""
    mu0 = init_bases(24, 6)
    out = torch.empty(2, 24, 40)
    previous = None
    for seed in range(4):
        x = features(seed=seed) * (1 + seed)
        ours = em_attention(x, mu0, 3, out=out)
        assert shares_storage(ours.recon, out)
        check(ours, reference_em(x, mu0), FP32_TOL)
        if previous is not None:  # the previous call's reconstruction was overwritten
            assert previous.data_ptr() == ours.recon.data_ptr()
            torch.testing.assert_close(previous, ours.recon, rtol=0, atol=0)
        previous = ours.recon


@pytest.mark.parametrize(
    "shape,dtype", [((2, 23, 40), torch.float32), ((2, 40, 24), torch.float32), ((2, 24, 40), torch.float64)]
)
def test_unfit_out_buffer_is_ignored(shape, dtype):
    x, mu0 = features(), init_bases(24, 6)
    out = torch.zeros(shape, dtype=dtype)
    ours = em_attention(x, mu0, 3, out=out)
    assert not shares_storage(ours.recon, out) and bool((out == 0).all())
    check(ours, reference_em(x, mu0), FP32_TOL)


@pytest.mark.parametrize("grad", ["last", "full"])
def test_out_buffer_unused_when_recon_needs_grad(grad):
    x = features().requires_grad_()
    mu0 = init_bases(24, 6)
    out = torch.zeros(2, 24, 40)
    ours = em_attention(x, mu0, 3, grad=grad, out=out)
    assert ours.recon.requires_grad and not shares_storage(ours.recon, out)
    assert bool((out == 0).all())
    check(ours, reference_em(x, mu0), FP32_TOL)


def test_l2_m_step_without_sum_normalisation_equals_normalised():
    x = features(3, 16, 50)
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(1))
    logits[:, 0] -= 8.0  # a nearly empty basis: Σ_n z of order 1e-2
    logits[:, 1] *= 6.0  # a peaked one
    z = torch.softmax(logits, dim=1)  # (B, K, N) as em_attention keeps it
    skipped = m_step(x, z, "l2")
    mu = torch.bmm(x.double(), z.double().transpose(1, 2)) / (1e-6 + z.double().sum(dim=2).unsqueeze(1))
    normalised = mu / mu.norm(dim=1, keepdim=True)
    assert rel_err(skipped, normalised) <= FP32_TOL
    assert rel_err(skipped.norm(dim=1), torch.ones(3, 5)) <= FP32_TOL
    # the same through the public normalise-then-l2 path of the package (layout aside)
    public = F.normalize(torch.bmm(x, (z / (1e-6 + z.sum(dim=2, keepdim=True))).transpose(1, 2)), dim=1, eps=1e-6)
    assert rel_err(skipped, public) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# bf16: cast inputs and autocast, against the fp32 reference


# l2 only: with layernorm the bases have norm √C, the logits are √C times larger and the
# softmax that much sharper, so rounding the inputs to bf16 alone moves the result by 1–3%
# (a plain bf16 implementation does no better); the 1e-2 bound is for the default l2.


@pytest.mark.parametrize("use_out", [False, True], ids=["alloc", "out"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_em_attention_bf16_inputs(seed, use_out):
    x, mu0 = features(seed=seed), init_bases(24, 6)
    out = torch.empty(2, 24, 40, dtype=BF16) if use_out else None
    ours = em_attention(x.to(BF16), mu0.to(BF16), 3, out=out)
    assert ours.recon.dtype == BF16
    if use_out:
        assert shares_storage(ours.recon, out)
    check(ours, reference_em(x, mu0), BF16_TOL)


@pytest.mark.parametrize("inputs", [torch.float32, BF16], ids=["fp32-in", "bf16-in"])
@pytest.mark.parametrize("use_out", [False, True], ids=["alloc", "out"])
def test_em_attention_under_bf16_autocast(inputs, use_out):
    x, mu0 = features(), init_bases(24, 6)
    out = torch.empty(2, 24, 40, dtype=BF16) if use_out else None
    with torch.autocast("cpu", dtype=BF16):
        ours = em_attention(x.to(inputs), mu0.to(inputs), 3, out=out)
        again = em_attention(x.to(inputs), mu0.to(inputs), 3, out=out)  # the buffer once more
    check(ours, reference_em(x, mu0), BF16_TOL)
    check(again, reference_em(x, mu0), BF16_TOL)


# ---------------------------------------------------------------------------------------------
# EMAU: channels_last, bf16 autocast, buffer reuse in training, inference tensors

C, K = 16, 4


def unit_input(b: int = 2, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    """ReLU-positive features, as after the head's reduction conv + BN + ReLU."""
    return torch.randn(b, C, h, w, generator=torch.Generator().manual_seed(seed)).relu()


def make_unit(**kwargs) -> EMAU:
    unit = EMAU(C, K, **kwargs)
    with torch.no_grad():  # non-trivial BN so that the EMA branch shows in the output
        unit.bn.running_mean.uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 2.0)
        unit.bn.weight.uniform_(0.5, 1.5)
    return unit


def eval_outputs(unit: EMAU, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, EMA reconstruction, EMA bases) of one eval-mode forward under no_grad."""
    unit.eval().record = True
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
        y = unit(x)
    return y, unit.last.recon, unit.last.bases


@pytest.mark.parametrize(
    "channels_last,amp,tol",
    [(True, False, FP32_TOL), (False, True, BF16_TOL), (True, True, BF16_TOL)],
    ids=["channels_last", "bf16", "bf16+channels_last"],
)
def test_emau_eval_fast_paths_match_fp32_contiguous(channels_last, amp, tol):
    unit = make_unit()
    x = unit_input()
    ref = [t.clone() for t in eval_outputs(unit, x, amp=False)]
    fast_x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for _ in range(2):  # the second call reuses the unit's buffer
        fast = eval_outputs(unit, fast_x, amp=amp)
        for name, ours, theirs in zip(("output", "recon", "bases"), fast, ref):
            assert rel_err(ours, theirs) <= tol, name
    assert ref[1].dtype == torch.float32 and "recon" in unit._reusable.kept


@ONEDNN
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_emau_eval_with_onednn_products_matches_float64(fold):
    """The unit as eval runs it with every product by oneDNN (iterations, reconstruction into
    the unit's buffer, conv2 with the BN folded in), twice, against its float64 copy."""
    unit = make_unit()
    unit.fold, unit.method = fold, "onednn"
    exact = copy.deepcopy(unit).double()
    x = unit_input()
    want = eval_outputs(exact, x.double(), amp=False)
    for _ in range(2):  # the second call writes into the kept reconstruction
        for name, ours, theirs in zip(("output", "recon", "bases"), eval_outputs(unit, x, amp=False), want):
            assert ours.dtype == torch.float32 and rel_err(ours, theirs) <= FP32_TOL, name


def train_step(unit: EMAU, x: torch.Tensor, weight: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        return (unit(x).float() * weight).sum()


def grads(unit: EMAU, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    found = {name: p.grad.clone() for name, p in unit.named_parameters() if p.grad is not None}
    found.update({f"input{i}": x.grad.clone() for i, x in enumerate(inputs)})
    return found


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_emau_buffer_reuse_keeps_gradients(channels_last, amp):
    """Two training forwards on one unit (the second overwrites the reconstruction buffer)
    before one backward, then again step by step: the gradients equal those of fresh copies
    that never share a buffer."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x1 = unit_input(seed=1).contiguous(memory_format=fmt)
    x2 = unit_input(seed=2).contiguous(memory_format=fmt)
    w1, w2 = torch.randn(2, C, 5, 6), torch.randn(2, C, 5, 6)
    unit = make_unit(grad="none").train()
    fresh1 = copy.deepcopy(unit)

    a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    loss = train_step(unit, a1, w1, amp)
    fresh2 = copy.deepcopy(fresh1)  # the copy sees the bases the unit's second forward sees
    fresh2.mu.copy_(unit.mu)
    loss = loss + train_step(unit, a2, w2, amp)  # overwrites the buffer of the first forward
    assert "recon" in unit._reusable.kept
    loss.backward()
    reused = grads(unit, a1, a2)

    b1, b2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    train_step(fresh1, b1, w1, amp).backward()
    train_step(fresh2, b2, w2, amp).backward()
    assert not shares_storage(fresh1._reusable.kept["recon"], fresh2._reusable.kept["recon"])
    expected = grads(fresh1, b1)
    expected["input1"] = b2.grad.clone()
    for name, p in fresh2.named_parameters():
        if p.grad is not None:
            expected[name] = expected[name] + p.grad if name in expected else p.grad.clone()
    assert set(reused) == set(expected)
    assert "conv2.weight" in reused and "conv1.weight" not in reused  # grad=none: conv1 gets nothing
    for name in expected:
        torch.testing.assert_close(reused[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # and step by step: forward + backward, twice, on one unit against fresh copies
    unit = make_unit(grad="none").train()
    fresh = copy.deepcopy(unit)
    for x, w in ((x1, w1), (x2, w2)):
        unit.zero_grad(set_to_none=True)
        fresh = copy.deepcopy(fresh)
        fresh._reusable = Reusable()
        fresh.mu.copy_(unit.mu)
        fresh.zero_grad(set_to_none=True)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        train_step(unit, a, w, amp).backward()
        train_step(fresh, b, w, amp).backward()
        got, want = grads(unit, a), grads(fresh, b)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grad", ["none", "last", "full"])
def test_emau_inference_mode_then_training(grad):
    unit = make_unit(grad=grad)
    x = unit_input()
    unit.eval()
    with torch.inference_mode():
        unit(x)
    unit.train()
    xt = x.clone().requires_grad_()
    unit(xt).sum().backward()  # must not write into an inference tensor
    assert xt.grad is not None
    with torch.inference_mode():
        unit.eval()(x)
    unit.eval()
    with torch.no_grad():
        y = unit(x)
    unit.train()
    unit(x).sum().backward()
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("grad", ["none", "last", "full"])
def test_emau_eval_with_and_without_grad_agree(grad):
    """Eval mode: the buffered no_grad path equals the autograd path (no buffer for last/full)."""
    unit = make_unit(grad=grad).eval()
    x = unit_input()
    with torch.no_grad():
        buffered = unit(x)
    tracked = unit(x.clone().requires_grad_())
    assert rel_err(buffered, tracked) <= FP32_TOL


# --------------------------------------------------------------------------------------------
# conv2 as a 1×1 convolution of the (B, C, N) reconstruction: every method against float64.


def conv_operands(b: int = 2, c: int = 6, n: int = 1100, seed: int = 3):
    g = torch.Generator().manual_seed(seed)  # n spans two full blocks and a partial one
    return torch.randn(c, c, generator=g), torch.randn(b, c, n, generator=g).relu(), torch.randn(c, generator=g)


@ONEDNN
@pytest.mark.parametrize("result_bytes", [1 << 21, 100], ids=["whole", "rows-of-3"])
@pytest.mark.parametrize("batched", [False, True], ids=["shared-a", "batched-a"])
def test_onednn_bmm_matches_a_float64_loop(batched, result_bytes, monkeypatch):
    """Every operand as a view (a transposed b, a sliced out), a shift per row, against sums
    written out one entry at a time in float64; each sample's result whole, or made a block of
    rows at a time (3, 3 and 1 of the 7)."""
    from emactl.nn import em_cpu
    from emactl.nn.em_cpu import onednn_bmm

    monkeypatch.setattr(em_cpu, "RESULT_BYTES", result_bytes)

    g = torch.Generator().manual_seed(5)
    a = torch.randn(3 if batched else 1, 7, 5, generator=g)
    b = torch.randn(3, 9, 5, generator=g).transpose(1, 2)  # (B, K, N) as a view of (B, N, K)
    shift = torch.randn(a.shape[0], 7, generator=g)
    want = torch.empty(3, 7, 9, dtype=torch.float64)
    for s in range(3):
        ai = a[s if batched else 0].double()
        for i in range(7):
            for j in range(9):
                want[s, i, j] = sum(ai[i, k] * b[s, k, j].double() for k in range(5)) + shift[s if batched else 0, i]
    store = torch.full((3, 7, 12), float("nan"))
    got = onednn_bmm(a, b, out=store[:, :, :9], shift=shift)
    assert got.data_ptr() == store.data_ptr() and store[:, :, 9:].isnan().all()
    assert rel_err(got, want) <= FP32_TOL
    assert rel_err(onednn_bmm(a, b), want - shift.double()[:, :, None]) <= FP32_TOL


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="no oneDNN matrix product op")
@pytest.mark.parametrize("change", ["signature", "result"])
def test_onednn_left_out_where_the_private_op_changed(monkeypatch, change):
    """``torch.ops.mkldnn._linear_pointwise`` is private: called another way, or computing
    another product, it is found out once and ``onednn`` is not offered."""
    from emactl.nn import em_cpu

    real = torch.ops.mkldnn._linear_pointwise

    def changed(*args):
        if change == "signature":
            raise RuntimeError("_linear_pointwise() expected 7 arguments")
        return real(*args) + 1

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", changed)
    em_cpu.onednn_products.cache_clear()
    try:
        assert not em_cpu.onednn_products()
        x = features()
        assert "onednn" not in em_cpu.candidates(x) and "onednn" not in em_cpu.conv_methods(x, torch.randn(24, 24))
    finally:
        monkeypatch.undo()
        em_cpu.onednn_products.cache_clear()
    assert em_cpu.onednn_products() == em_cpu.onednn_on_x86()


@pytest.mark.parametrize("method", ["conv2d", "bmm", "blocked", pytest.param("onednn", marks=ONEDNN)])
def test_conv1x1_methods_match_float64(method):
    from emactl.nn.em_cpu import conv1x1

    weight, y, shift = conv_operands()
    want = torch.einsum("oc,bcn->bon", weight.double(), y.double())
    assert rel_err(conv1x1(weight, y, method=method), want) <= FP32_TOL
    got = conv1x1(weight, y, shift, method=method)
    assert got.is_contiguous() and rel_err(got, want + shift.double()[:, None]) <= FP32_TOL
    half = conv1x1(weight.to(BF16), y.to(BF16), method=method)
    assert half.dtype == BF16 and rel_err(half, want) <= BF16_TOL


@pytest.mark.parametrize("method", ["conv2d", "bmm", "blocked"])
def test_conv1x1_gradients_match_float64(method):
    from emactl.nn.em_cpu import conv1x1

    weight, y, shift = (t.double() for t in conv_operands(n=600))
    weight.requires_grad_(), y.requires_grad_()
    probe = torch.randn(2, 6, 600, dtype=torch.float64)
    ours = torch.autograd.grad((conv1x1(weight, y, method=method) * probe).sum(), (weight, y))
    theirs = torch.autograd.grad((torch.einsum("oc,bcn->bon", weight, y) * probe).sum(), (weight, y))
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) <= 1e-12
    small_w, small_y = weight[:3, :3].detach().clone().requires_grad_(), y[:1, :3, :5].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, x: conv1x1(w, x, method=method), (small_w, small_y))


@ONEDNN
def test_conv1x1_onednn_gradients_match_float64():
    """oneDNN's product runs fp32 only: its forward and both gradients against float64."""
    from emactl.nn.em_cpu import conv1x1

    weight, y, _ = conv_operands(n=600)
    weight.requires_grad_(), y.requires_grad_()
    exact_w, exact_y = weight.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    probe = torch.randn(2, 6, 600)
    ours = conv1x1(weight, y, method="onednn")
    theirs = torch.einsum("oc,bcn->bon", exact_w, exact_y)
    assert rel_err(ours, theirs) <= FP32_TOL
    got = torch.autograd.grad((ours * probe).sum(), (weight, y))
    want = torch.autograd.grad((theirs * probe.double()).sum(), (exact_w, exact_y))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and rel_err(a, b) <= FP32_TOL


def test_conv1x1_methods_apply_by_dtype_and_mode():
    """oneDNN's product is a candidate for fp32, unless its output goes uncentred into BN's
    batch statistics; asked for where it does not apply, ``bmm`` runs."""
    from emactl.nn.em_cpu import conv1x1, conv_methods

    weight, y, _ = conv_operands()
    assert "onednn" not in conv_methods(y.double(), weight.double())
    assert "onednn" not in conv_methods(y.to(BF16), weight.to(BF16))
    assert "onednn" not in conv_methods(y, weight, into_batch_norm=True)
    assert ("onednn" in conv_methods(y, weight)) == onednn_products()
    want = torch.einsum("oc,bcn->bon", weight.double(), y.double())
    assert rel_err(conv1x1(weight.double(), y.double(), method="onednn"), want) <= 1e-12
    assert rel_err(conv1x1(weight, y, method="conv"), want) <= FP32_TOL  # the EM methods' name for conv2d


def test_conv1x1_auto_times_each_method_once_per_signature(monkeypatch):
    from emactl.nn import em_cpu

    calls = []
    monkeypatch.setattr(em_cpu, "TUNED_CONV", {})
    real = em_cpu._conv1x1
    monkeypatch.setattr(em_cpu, "_conv1x1", lambda m, *a: calls.append(m) or real(m, *a))
    weight, y, _ = conv_operands()
    want = torch.einsum("oc,bcn->bon", weight.double(), y.double())
    assert rel_err(em_cpu.conv1x1(weight, y), want) <= FP32_TOL
    assert sorted(set(calls)) == sorted(em_cpu.CONV_METHODS) and len(calls) == 3 * len(em_cpu.CONV_METHODS)
    (chosen,) = em_cpu.TUNED_CONV.values()
    calls.clear()
    em_cpu.conv1x1(weight, y)
    assert calls == [chosen]  # measured once: later calls run the fastest only


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_emau_plain_products_agree_with_tuned_methods(amp):
    """method="bmm" (every product plain) and "auto" give the same unit, eval and training."""
    unit = make_unit(grad="none")
    plain = copy.deepcopy(unit)
    plain.method = "bmm"
    x = unit_input()
    tol = BF16_TOL if amp else FP32_TOL
    assert rel_err(eval_outputs(unit, x, amp)[0], eval_outputs(plain, x, amp)[0]) <= tol
    w = torch.randn(2, C, 5, 6)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    train_step(unit.train(), a, w, amp).backward()
    train_step(plain.train(), b, w, amp).backward()
    assert rel_err(a.grad, b.grad) <= tol and rel_err(unit.conv2.weight.grad, plain.conv2.weight.grad) <= tol


# --------------------------------------------------------------------------------------------
# CUDA: em_attention on the GPU (skipped without a GPU).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("norm,lam", CASES)
def test_em_attention_cuda_fp32_and_bf16_match_reference(norm, lam):
    x, mu0 = features(b=2, c=64, n=300), init_bases(64, 8, norm)
    ref = reference_em(x, mu0, 3, lam, norm)
    xc, muc = x.cuda(), mu0.cuda()
    out = torch.empty(2, 64, 300, device="cuda")
    check(em_attention(xc, muc, 3, lam, norm, out=out), ref, FP32_TOL)
    if (norm, lam) == ("l2", 1.0):  # the bf16 bound holds for the default only, as on the CPU (above)
        check(em_attention(xc.to(BF16), muc.to(BF16), 3, lam, norm), ref, BF16_TOL)


# --------------------------------------------------------------------------------------------
# The training tail (conv2 → BN → + identity → ReLU as one Function over kept tensors).


def training_run(unit: EMAU, x: torch.Tensor, probe: torch.Tensor, amp: bool = False) -> dict[str, torch.Tensor]:
    """Output, every gradient and the BN state after one training forward + backward."""
    unit.train()
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        out = unit(xi)
    out.backward(probe)
    found = {"output": out.detach().clone(), "input grad": xi.grad.clone()}
    found.update({f"{n} grad": p.grad.clone() for n, p in unit.named_parameters() if p.grad is not None})
    found.update({n: b.clone() for n, b in unit.bn.named_buffers()})
    return found


@pytest.mark.parametrize("grad", ["none", "last", "full"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("zero_init", [False, True], ids=["bn1", "bn0"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_training_tail_equals_separate_layers_float64(grad, momentum, zero_init, channels_last):
    """Outputs, gradients (input, conv1/conv2/BN/bases) and BN running statistics of the fused
    tail equal those of the separate layers, in float64, over two steps."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unit = make_unit(grad=grad, zero_init=zero_init, bases_update="backprop" if grad == "full" else "moving_average")
    unit.bn.momentum = momentum
    unit = unit.double()
    layers = copy.deepcopy(unit)
    layers.fuse_tail = False
    for step in range(2):
        x = unit_input(seed=step).double().contiguous(memory_format=fmt)
        probe = torch.randn(2, C, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt)
        unit.zero_grad(set_to_none=True), layers.zero_grad(set_to_none=True)
        fused, separate = training_run(unit, x, probe), training_run(layers, x, probe)
        assert set(fused) == set(separate)
        assert ("conv1.weight grad" in fused) == (grad != "none")
        for name in separate:
            torch.testing.assert_close(fused[name], separate[name], rtol=1e-12, atol=1e-12, msg=f"step {step}: {name}")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_separate_layers_centred_conv2_equals_plain_conv2_then_bn_float64(momentum):
    """The separate layers centre conv2's input before BN's batch statistics; outputs, every
    gradient and the running statistics equal those of conv2 → BatchNorm2d as written."""

    def plain_conv2_bn(self: EMAU, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, c, _ = y.shape
        return self.bn(F.conv2d(y.view(b, c, h, w), self.conv2.weight))

    unit = make_unit(grad="last")
    unit.bn.momentum, unit.fuse_tail = momentum, False
    unit = unit.double()
    plain = copy.deepcopy(unit)
    plain._conv2_bn = types.MethodType(plain_conv2_bn, plain)
    for step in range(2):
        x = unit_input(seed=step).double()
        probe = torch.randn(2, C, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        unit.zero_grad(set_to_none=True), plain.zero_grad(set_to_none=True)
        ours, theirs = training_run(unit, x, probe), training_run(plain, x, probe)
        assert set(ours) == set(theirs) and "conv2.weight grad" in ours and "running_mean" in ours
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=f"step {step}: {name}")


@ONEDNN
def test_training_tail_with_onednn_products_matches_float64():
    """The fused tail with conv2 and its gradients by oneDNN (asked for: ``auto`` may pick it)
    against the separate layers in float64, over two steps: output, gradients, BN state."""
    unit = make_unit()
    unit.method = "onednn"
    exact = copy.deepcopy(unit).double()
    exact.fuse_tail = False
    for step in range(2):
        x = unit_input(seed=step)
        probe = torch.randn(2, C, 5, 6, generator=torch.Generator().manual_seed(step))
        unit.zero_grad(set_to_none=True), exact.zero_grad(set_to_none=True)
        ours, want = training_run(unit, x, probe), training_run(exact, x.double(), probe.double())
        assert "conv2.weight grad" in ours
        for name in want:
            if name != "num_batches_tracked":
                assert rel_err(ours[name], want[name]) <= FP32_TOL, f"step {step}: {name}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_training_tail_bf16_is_as_close_to_float64_as_separate_layers(channels_last):
    """Under bf16 autocast the fused tail (conv2 on centred input) and the separate layers
    round differently; every output, gradient and BN statistic of the fused tail lies about as
    close to a float64 run of the separate layers as theirs does (a ReLU boundary that one of
    them rounds across moves a gradient by about a percent: BF16_TOL of slack)."""
    unit = make_unit()
    layers = copy.deepcopy(unit)
    layers.fuse_tail = False
    exact = copy.deepcopy(layers).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    probe = torch.randn(2, C, 5, 6, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    x = unit_input().contiguous(memory_format=fmt)
    for _ in range(2):  # the second step writes into the kept tensors of the first
        fused, separate = training_run(unit, x, probe, amp=True), training_run(layers, x, probe, amp=True)
        want = training_run(exact, x.double(), probe.double())
        for name in separate:
            assert rel_err(fused[name], want[name]) <= 1.25 * rel_err(separate[name], want[name]) + BF16_TOL, name
    if channels_last:  # the output (and the input's gradient) keep the input's layout
        with torch.autocast("cpu", dtype=BF16):
            out = unit.train()(x.clone().requires_grad_())
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_training_tail_gradcheck():
    from emactl.nn.em_cpu import TrainingTail

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).relu().requires_grad_()
    identity = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    stats = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    kept = Reusable()

    def tail(y, identity, weight, gamma, beta):
        return TrainingTail.apply(y, identity, weight, gamma, beta, *stats, 0.1, 1e-5, "bmm", kept)

    assert torch.autograd.gradcheck(tail, (y, identity, weight, gamma, beta))


def test_training_reuses_kept_tensors_and_never_overwrites_held_ones():
    """Step after step the unit writes into the same memory; a tensor someone still holds
    (the last output, a gradient kept as .grad) is never overwritten."""
    unit = make_unit().train()
    probe = torch.randn(2, C, 5, 6)

    def step(seed: int) -> tuple[torch.Tensor, dict[str, int]]:
        x = unit_input(seed=seed).requires_grad_()
        out = unit(x)
        out.backward(probe)
        return out, {name: t.data_ptr() for name, t in unit._reusable.kept.items()}

    step(0)
    first = step(1)[1]
    second = step(2)[1]  # the output of step 1 (and through its graph, the input and its .grad) is gone
    assert {"recon", "conv2", "out", "grad_in"} <= set(first)
    assert first == second  # nothing held them between the steps: the same memory again
    held, _ = step(3)
    snapshot = held.detach().clone()
    later, _ = step(4)  # the output of step 3 is still referenced: step 4 must not write into it
    assert later.data_ptr() != held.data_ptr() and torch.equal(held, snapshot)


def test_reusable_hands_out_memory_only_when_nothing_refers_to_it():
    kept, like = Reusable(), torch.empty(3)
    a = kept.get("x", (3,), like)
    b = kept.get("x", (3,), like)  # a is alive: b is new
    assert not shares_storage(a, b)
    view = b[1:]
    del b
    assert not shares_storage(kept.get("x", (3,), like), view)  # a view keeps it too
    del a, view
    c = kept.get("x", (3,), like)
    address = c.data_ptr()
    del c
    assert kept.get("x", (3,), like).data_ptr() == address  # free again: reused
    assert kept.get("x", (4,), like).shape == (4,) and kept.get("x", (4,), like, torch.float64).dtype == torch.float64
    with torch.inference_mode():
        inside = kept.get("x", (4,), like)
    assert inside.is_inference() and not kept.get("x", (4,), like).is_inference()


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_eval_output_held_by_the_caller_is_never_overwritten(amp):
    """Without autograd the unit's output is a kept tensor too: the next call writes elsewhere
    while the caller still holds it, and into the same memory once it is dropped."""
    unit = make_unit().eval()
    unit.method = "bmm"  # conv2 into a kept tensor whatever the timing would pick (conv2d makes its own)
    fresh = copy.deepcopy(unit)
    x1, x2 = unit_input(seed=1), unit_input(seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
        first = unit(x1)
        snapshot = first.clone()
        second = unit(x2)
        assert second.data_ptr() != first.data_ptr() and torch.equal(first, snapshot)
        address = second.data_ptr()
        del first, second
        third = unit(x1)
        want = fresh(x1)
    assert third.data_ptr() == address  # nothing held it any more: reused
    assert torch.equal(third, want) and torch.equal(third, snapshot)


@ONEDNN
@pytest.mark.parametrize("shared", [True, False], ids=["shared-bases", "per-image-bases"])
@pytest.mark.parametrize("scratch", ["none", "free", "aliases-x"])
def test_onednn_iterations_match_float64(shared, scratch):
    """The (B, N, K) logits of ``onednn`` with a folded convolution (weight and bias), bases
    shared by the batch (one product over every pixel) or per image, writing xᵀ into lent
    memory, into its own, or into its own when the lent memory is the features themselves."""
    from emactl.nn.em_cpu import onednn_iterations
    from emactl.nn.ema import plain_iterations

    torch.manual_seed(0)
    x = features(3, 24, 40)
    weight, bias = torch.randn(24, 24) / 5, torch.randn(24)
    mu = init_bases(24, 6) if shared else torch.cat([init_bases(24, 6) for _ in range(3)])
    mu = mu.expand(3, -1, -1) if shared else mu
    lent = {"none": None, "free": torch.full((3, 24, 40), 7.0), "aliases-x": x}[scratch]
    x_before = x.clone()
    with torch.no_grad():
        z, bases = onednn_iterations(x, mu, 3, 0.7, "l2", weight, bias, lent)
        want_z, want_bases = plain_iterations(x.double(), mu.double(), 3, 0.7, "l2", weight.double(), bias.double())
    assert z.shape == want_z.shape == (3, 6, 40) and bases.shape == want_bases.shape == (3, 24, 6)
    assert rel_err(z, want_z) <= FP32_TOL and rel_err(bases, want_bases) <= FP32_TOL
    assert torch.equal(x, x_before)  # the features are never written
    if scratch == "free":  # the lent memory held xᵀ
        assert torch.equal(lent.view(3, 40, 24), x.transpose(1, 2))


def test_plain_batch_norm_passes_match_torch_in_float64():
    """The fused tail's fp32/fp64 BN (batch_norm_stats, batch_norm_backward) on input whose mean
    is far from zero, against F.batch_norm in training and its autograd gradients."""
    from emactl.nn.em_cpu import batch_norm_add_relu, batch_norm_backward, batch_norm_stats, plain_batch_norm

    torch.manual_seed(0)
    v = (torch.randn(3, 5, 4, 6, dtype=torch.float64) * torch.rand(1, 5, 1, 1) * 2 + torch.randn(1, 5, 1, 1) * 3)
    gamma, beta = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    g = torch.randn_like(v)
    running = (torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5)
    theirs = tuple(r.clone() for r in running)
    leaf = v.clone().requires_grad_()
    weights = (gamma.clone().requires_grad_(), beta.clone().requires_grad_())
    want = F.batch_norm(leaf, *theirs, *weights, training=True, momentum=0.3, eps=1e-5)
    want.backward(g)

    assert plain_batch_norm(v) and not plain_batch_norm(v.float()[:1, :, :1, :1]) and not plain_batch_norm(v.to(BF16))
    mean, invstd = batch_norm_stats(v, *running, 0.3, 1e-5)
    identity = torch.randn_like(v)
    got = batch_norm_add_relu(v, identity, gamma, beta, mean, invstd, torch.empty_like(v))
    assert rel_err(got, torch.relu(want.detach() + identity)) <= 1e-12 and (got == 0).any()
    for ours, torchs in zip(running, theirs):
        assert rel_err(ours, torchs) <= 1e-12
    grad_v, grad_gamma, grad_beta = batch_norm_backward(g, v, gamma, mean, invstd, torch.empty_like(v))
    assert rel_err(grad_v, leaf.grad) <= 1e-10
    assert rel_err(grad_gamma, weights[0].grad) <= 1e-12 and rel_err(grad_beta, weights[1].grad) <= 1e-12


def test_reusable_never_hands_one_tensor_to_two_threads(monkeypatch):
    """Thread A is held between the check that the kept tensor is free and taking it, while
    thread B asks for the same one: B must not get it too."""
    import threading

    from emactl.nn import ema

    kept, like = Reusable(), torch.empty(3)
    address = kept.get("x", (3,), like).data_ptr()  # kept, and free again
    real, first = ema.alone, threading.Event()
    b_asked, b_done = threading.Event(), threading.Event()

    def held_alone(t):
        if not first.is_set():  # A's check: wait (briefly) for B to ask
            first.set()
            b_asked.wait(5)
            b_done.wait(0.3)
        return real(t)

    monkeypatch.setattr(ema, "alone", held_alone)
    got = {}

    def thread_a():
        got["a"] = kept.get("x", (3,), like)

    def thread_b():
        first.wait(5)
        b_asked.set()
        got["b"] = kept.get("x", (3,), like)
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got["a"].data_ptr() == address and not shares_storage(got["a"], got["b"])


@ONEDNN
def test_onednn_writes_only_into_an_out_it_may_return():
    """``out`` lends its memory to the iterations only when it is the reconstruction's buffer:
    one of another shape (here the transpose's) stays as it was, and the result is right."""
    x, mu0 = features(2, 24, 40), init_bases(24, 6)
    wrong = torch.full((2, 40, 24), 3.0)
    with torch.no_grad():
        ours = em_attention(x, mu0, 3, out=wrong, method="onednn")
    assert torch.equal(wrong, torch.full((2, 40, 24), 3.0))
    check(ours, reference_em(x, mu0), FP32_TOL)

"""``emactl profile``: counting against hand counts, memory methods, fits and the CLI end to end.

No test asserts a time: timings are only checked to exist and be positive.
"""
from __future__ import annotations

import inspect
import json
import mmap
import os
import sys

import pandas as pd
import pytest
import torch
import typer
from torch import nn

from emactl.cli import main
from emactl.nn.ema import EMAU, em_attention, init_bases
from emactl.nn.heads import NonLocal2d
from emactl.profile.counting import count_module, count_ops, count_params
from emactl.profile.emattention import em_flops, profile_em_attention, profile_em_ops
from emactl.profile.heads import build_head
from emactl.profile.memory import peak_memory, saved_tensor_bytes, total_bytes
from emactl.profile.networks import NETWORKS, build_network, network_ratios, profile_networks
from emactl.profile.published import PUBLISHED, published, published_check
from emactl.profile.reference import reference_em_attention
from emactl.profile.scaling import fit_exponent
from emactl.profile.settings import HEADS, ProfileSettings
from emactl.profile.timing import COUNTS_FAULTS, FaultCount, measure_many
from emactl.profile.training import compile_step, profile_training, train_step_flops

from reference import reference_em

CPU = torch.device("cpu")


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


# ---------------------------------------------------------------------------------------------
# Parameters against hand counts


def test_emau_params_hand_count():
    c = 24
    unit = EMAU(c, bases=8)
    # conv1 (C·C weights + C bias) + conv2 (C·C, no bias) + BN (weight and bias, 2C)
    assert count_params(unit) == c * c + c + c * c + 2 * c
    buffers = dict(unit.named_buffers())
    assert buffers["mu"].shape == (1, c, 8)  # the bases are a buffer, not a parameter
    assert "mu" not in dict(unit.named_parameters())


def test_conv3x3_params_hand_count():
    c = 16
    assert count_params(build_head("conv3x3", c)) == 9 * c * c + 2 * c  # no conv bias, BN weight + bias


def test_nonlocal_params_hand_count():
    c = 32
    inter = c // 2
    # theta, phi, g: 1×1 convs C → C/2 with bias; out: 1×1 conv C/2 → C without bias, then BN
    expected = 3 * (c * inter + inter) + inter * c + 2 * c
    assert count_params(NonLocal2d(c)) == expected
    assert count_params(build_head("nonlocal", c)) == expected


# ---------------------------------------------------------------------------------------------
# MACs against hand counts


def test_conv_macs_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=True)
    counts = count_module(conv, (1, 3, 10, 10))
    # output 8 × 5 × 5, each output element costs 3·3·3 multiply-adds (bias not counted)
    assert counts.macs == 8 * 5 * 5 * 3 * 9
    assert counts.flops == 2 * counts.macs


def test_bmm_macs_hand_count():
    a = torch.empty(2, 5, 7, device="meta")
    b = torch.empty(2, 7, 3, device="meta")
    assert count_ops(torch.bmm, a, b).macs == 2 * 5 * 7 * 3


def test_elementwise_counted_apart_from_macs():
    x = torch.empty(2, 3, 4, 4, device="meta")
    counts = count_ops(torch.relu, x)
    assert counts.macs == 0
    assert counts.elements == 2 * 3 * 4 * 4


def test_em_flop_formula_matches_counter():
    b, c, n, k, t = 2, 16, 25, 4, 3
    x = torch.empty(b, c, n, device="meta")
    mu = torch.empty(1, c, k, device="meta")
    assert count_ops(reference_em_attention, x, mu, t).flops == em_flops(b, c, n, k, t)
    assert count_ops(lambda: em_attention(x, mu, t)).flops == em_flops(b, c, n, k, t)


def test_emau_costs_about_a_third_of_a_3x3_conv():
    """The paper's cost claim, as the heads table computes it (C=512, K=64, T=3)."""
    shape = (1, 512, 17, 17)
    with torch.device("meta"):
        ema, conv = build_head("ema", 512), build_head("conv3x3", 512)
    ratio = count_module(ema, shape).macs / count_module(conv, shape).macs
    assert 0.28 < ratio < 0.36


# ---------------------------------------------------------------------------------------------
# Heads, memory, fits


@pytest.mark.parametrize("name", HEADS)
def test_every_head_keeps_the_shape(name):
    head = build_head(name, 16, bases=4, iters=2)
    x = torch.randn(2, 16, 9, 9)
    head.train()
    assert head(x).shape == x.shape
    head.eval()
    with torch.no_grad():
        assert head(x).shape == x.shape
    with torch.device("meta"):
        meta = build_head(name, 16, bases=4, iters=2)
    assert count_module(meta, (1, 16, 9, 9)).macs > 0


def test_saved_tensor_bytes_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    with torch.device("meta"):
        model = model.to("meta")
    x = torch.empty(1, 3, 5, 5, device="meta")
    saved = saved_tensor_bytes(model, x, {"all": "", "relu": "1"})
    # the conv saves its input for the weight gradient (3·25 floats), the ReLU its output (4·25)
    assert total_bytes(saved["all"]) == (3 * 25 + 4 * 25) * 4
    assert total_bytes(saved["relu"]) == 4 * 25 * 4
    assert total_bytes(saved["all"], minus=saved["relu"]) == 3 * 25 * 4


def test_cpu_peak_memory_sees_an_allocation():
    def fn() -> None:
        y = torch.empty(1_000_000)  # 4 MB, freed on return
        y.fill_(1.0)

    peak = peak_memory(fn, CPU)
    assert 4_000_000 <= peak < 4_200_000


def test_fit_exponent_recovers_known_exponent():
    n = [100, 400, 1600, 6400]
    p, r2 = fit_exponent(n, [3.0 * v**1.5 for v in n])
    assert p == pytest.approx(1.5)
    assert r2 == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    noisy = [2.0 * v**0.97 * (1 + 0.02 * float(torch.randn(1, generator=gen))) for v in n]
    assert fit_exponent(n, noisy)[0] == pytest.approx(0.97, abs=0.05)
    with pytest.raises(ValueError):
        fit_exponent([10, 10], [1.0, 2.0])


def _touch_pages(buffer) -> None:
    for i in range(0, len(buffer), mmap.PAGESIZE):
        buffer[i] = 1


@pytest.mark.skipif(sys.platform == "win32", reason="getrusage is Unix-only")
def test_fault_count_sees_memory_mapped_fresh_and_not_memory_reused():
    """64 MB mapped anew on every call (as glibc maps a big tensor while its heap has no room)
    against 64 MB written again: only the first faults."""
    size, kept = 64 << 20, bytearray(64 << 20)

    def fresh() -> None:
        with mmap.mmap(-1, size) as m:
            _touch_pages(m)

    counted_fresh, counted_reused = FaultCount(fresh), FaultCount(lambda: _touch_pages(kept))
    assert counted_fresh.per_call is None
    for _ in range(4):
        counted_fresh(), counted_reused()
    assert counted_fresh.calls == counted_reused.calls == 3  # the first call, which faults `kept` in, is left out
    assert counted_reused.per_call < 8 and counted_fresh.per_call > 30  # 64 MB in 2 MB huge pages: 32 faults at the fewest


def test_measure_many_returns_every_candidate():
    timings = measure_many({"a": lambda: torch.ones(8).sum(), "b": lambda: torch.zeros(8).sum()}, CPU, rounds=2, min_time=0.001)
    assert set(timings) == {"a", "b"}
    assert all(t.median > 0 and t.runs >= 2 for t in timings.values())


# ---------------------------------------------------------------------------------------------
# EM attention against the reference, networks, published check


def test_em_attention_matches_reference():
    x = torch.randn(2, 16, 30)
    mu = init_bases(16, 5)
    ours = em_attention(x, mu, 3)
    ref = [t.float() for t in reference_em(x, mu, 3)]
    torch.testing.assert_close(ours.recon, ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bases, ref[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.resp, ref[2], rtol=1e-4, atol=1e-5)


def test_em_attention_section_tiny():
    df, summary = profile_em_attention(2, 8, 5, 4, 2, CPU, [torch.float32, torch.bfloat16], repeats=1, square=32)
    em = df[df["kind"] == "EM attention"]
    assert set(zip(em["impl"], em["dtype"])) == {(i, d) for i in ("reference", "em_attention") for d in ("fp32", "bf16")}
    assert (df["GFLOP/s"] > 0).all()
    fp32_ours = em[(em["impl"] == "em_attention") & (em["dtype"] == "fp32")]
    assert float(fp32_ours["max |diff| vs reference fp32"].iloc[0]) < 1e-4
    assert summary["metric"].str.contains("bf16: em_attention time / fp32 reference time").any()


def test_networks_section_tiny():
    df = profile_networks("tiny", 33, 2, 16, 4, 1, 3, CPU, torch.float32, repeats=1, names=("emanet", "psp"))
    assert list(df["network"]) == ["emanet", "psp"]
    assert (df["train img/s"] > 0).all() and (df["inference img/s"] > 0).all()


def test_network_ratios_emanet_over_deeplabv3():
    df = pd.DataFrame(
        {"network": ["emanet", "deeplabv3"], "train step (ms)": [30.0, 40.0], "inference (ms)": [10.0, 20.0]}
    )
    ratios = dict(network_ratios(df).itertuples(index=False))
    assert ratios == {"EMANet train step / DeepLabV3 train step": 0.75, "EMANet inference / DeepLabV3 inference": 0.5}
    assert network_ratios(df[df["network"] == "emanet"]).empty


def _failing_compile(model):
    raise RuntimeError("no C++ compiler\nsecond line")


def _slow_compile(model):
    import time

    time.sleep(5)
    return model


@pytest.mark.parametrize(
    "compile_fn,timeout,note",
    [
        (lambda m: m, 60, "compile + 2 warm-up steps"),
        (_failing_compile, 60, "skipped: torch.compile failed (RuntimeError: no C++ compiler)"),
        (_slow_compile, 0.2, "skipped: compiling took over the 0.2 s cap"),
    ],
    ids=["compiled", "fails", "too-slow"],
)
def test_train_section_tiny(compile_fn, timeout, note):
    df, summary = profile_training(
        "tiny", 33, 2, 16, 4, 1, 3, CPU, torch.bfloat16, repeats=1, use_compile=True, compile_timeout=timeout,
        names=("emanet",), compile_fn=compile_fn,
    )  # fmt: skip
    assert list(df["variant"]) == ["fp32 eager", "bf16+channels_last", "bf16+channels_last+compile"]
    assert df["note"].iloc[2].startswith(note)
    assert df["speed-up over fp32 eager"].iloc[0] == 1.0 and df["ms/step"].iloc[1] > 0
    metrics = list(summary["metric"])
    assert metrics[0] == "bf16+channels_last train step speed-up over fp32 eager (EMANet)"
    compiled = note == "compile + 2 warm-up steps"
    assert any("+compile" in m for m in metrics) == compiled
    assert (df["ms/step"].iloc[2] > 0) if compiled else pd.isna(df["ms/step"].iloc[2])
    # the FLOP rate is GFLOP/img x img/s, and its fraction is over the mm rate of the variant's dtype
    values = dict(summary.itertuples(index=False))
    for _, row in df.dropna(subset=["ms/step"]).iterrows():
        assert row["TFLOP/s"] == pytest.approx(row["GFLOP/img"] * row["img/s"] / 1e3)
        mm = values[f"{row['mm dtype']} mm 2048^3 rate (TFLOP/s)"]
        assert row["fraction of mm 2048^3 rate"] == pytest.approx(row["TFLOP/s"] / mm)
    assert list(df["mm dtype"]) == ["fp32", "bf16", "bf16"]
    for variant in ("fp32 eager", "bf16+channels_last"):  # the head alone is a part of the step
        share = values[f"EMANet head (reduce, EMA unit, project, classifier) share of the {variant} step"]
        assert share > 0  # timings are not asserted: only that the row is there and measured


def test_train_step_flops_count_forward_and_backward():
    """A training step costs about 3 forward passes: backward computes the gradients of both
    the inputs and the weights of every layer but the first conv, which needs no input grad."""
    forward = count_module(build_network("emanet", "tiny", 3, channels=16, bases=4, iters=1), (1, 3, 33, 33)).flops
    step = train_step_flops("emanet", "tiny", 33, 3, channels=16, bases=4, iters=1)
    assert 2.5 * forward < step < 3 * forward


def test_compile_step_leaves_no_alarm_behind():
    import signal

    model = build_network("emanet", "tiny", 3, channels=16, bases=4, iters=1)
    x, target = torch.randn(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    # an outer timer, like pytest-timeout's, keeps its handler and runs on, less the time spent
    outer = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert compile_step(model, x, target, torch.float32, 0.1, _slow_compile).step is None
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] < 99.9
        assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert compile_step(model, x, target, torch.float32, 0.1, _slow_compile).step is None
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_returns_logits_at_input_size(name):
    with torch.device("meta"):
        model = build_network(name, "resnet50", 3, channels=16, bases=4, iters=1).eval()
        out = model(torch.empty(1, 3, 33, 33))["out"]
    assert out.shape == (1, 3, 33, 33)


def test_published_check_reproduces_the_paper():
    """EMANet(512) and DeepLabV3 within ±10% of the published extra MACs and params."""
    assert published("EMANet(512)").flops_g == 43.1 and len(PUBLISHED) == 6
    df = published_check()
    for method in ("EMANet(512)", "DeepLabV3 (torchvision)"):
        rows = df[(df["method"] == method) & df["counted"].str.startswith("context")]
        assert len(rows) == 1
        assert rows["GMACs / published"].iloc[0] == pytest.approx(1.0, abs=0.1)
        assert rows["params / published"].iloc[0] == pytest.approx(1.0, abs=0.1)
    deep = df[df["method"].str.contains("deep")]
    assert deep["GMACs / published"].iloc[0] == pytest.approx(1.0, abs=0.02)

    from rich.console import Console

    from emactl.tables import header, print_table

    con = Console(width=100, record=True, log_path=False)
    print_table(df, "published", con)
    shown = con.export_text()
    assert "…" not in shown and max(len(line) for line in shown.splitlines()) <= 100
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in shown.splitlines() if line[:1] in "┏┃┡│└")  # not cropped
    for column in df.columns:  # headers wrap at spaces at most, never cut
        assert all(word in shown for word in header(column).split()), column
    for method in df["method"]:
        assert all(word in shown for word in str(method).split()), method


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_tiny_sections_write_tables(tmp_path):
    out = tmp_path / "prof"
    code = run(
        "profile", "--device", "cpu", "--sections", "heads,scaling", "--channels", "8", "--size", "5",
        "--bases", "4", "--iters", "1", "--batch", "2", "--sizes", "5,7", "--heads", "ema,nonlocal,conv3x3",
        "--repeats", "1", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    for stem in ("heads", "scaling", "scaling_exponents"):
        for suffix in (".csv", ".md", ".json"):
            assert (out / f"{stem}{suffix}").is_file()
    heads = pd.read_csv(out / "heads.csv")
    assert list(heads["head"]) == ["ema", "nonlocal", "conv3x3"]
    assert heads["params (M)"].iloc[0] == pytest.approx((8 * 8 + 8 + 8 * 8 + 16) / 1e6)
    records = json.loads((out / "scaling_exponents.json").read_text())
    assert {r["head"] for r in records} == {"ema", "nonlocal", "conv3x3"}
    env = json.loads((out / "env.json").read_text())
    assert {"torch", "device_name", "torch_threads", "date"} <= set(env)
    assert "heads" in (out / "notes.md").read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ("--dtype", "fp64"),
        ("--dtype", "fp16", "--device", "cpu"),
        ("--sections", "heads,bogus"),
        ("--sizes", "33"),
        ("--sections", "networks", "--backbone", "resnet18"),
        ("--sections", "train", "--backbone", "tiny"),
        ("--sections", "train", "--compile-timeout", "0"),
        ("--batch", "1", "--sections", "train"),
        ("--batch", "1", "--sections", "heads"),
        ("--batch", "1", "--size", "1", "--sections", "unit"),
        ("--threads", "0"),
        ("--device", "tpu"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(argv, tmp_path, capsys):
    assert run("profile", "--out", str(tmp_path / "p"), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error") and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_cli_defaults_match_settings_defaults():
    """The command's option defaults and ProfileSettings' defaults must not drift apart."""
    from emactl import cli

    command = typer.main.get_command(cli.app).commands["profile"]
    defaults = {p.name: p.default for p in command.params}
    s = ProfileSettings()
    assert defaults["sections"] == ",".join(s.sections)
    assert defaults["sizes"] == ",".join(map(str, s.sizes))
    for name in ("channels", "bases", "iters", "size", "batch", "backbone", "crop", "repeats", "threads", "dtype", "published_memory", "compile", "compile_timeout"):
        assert defaults[name] == getattr(s, name), name
    assert inspect.signature(ProfileSettings).parameters["out"].default == defaults["out"]


def test_cpu_threads_default_to_one_on_the_cpu_only():
    assert ProfileSettings().cpu_threads() == 1
    assert ProfileSettings(threads=3).cpu_threads() == 3
    assert ProfileSettings(device=torch.device("cuda")).cpu_threads() is None


def test_em_ops_breakdown_adds_up():
    df = profile_em_ops(2, 16, 9, 4, 3, CPU, [torch.float32], repeats=1)
    ops = df[df["calls"].notna() & ~df["op"].str.startswith("em_attention")]
    assert list(ops["calls"]) == [3, 3, 3, 3, 1]  # T of each per-iteration op, one reconstruction
    assert list(ops["ms per em_attention"]) == pytest.approx(list(ops["calls"] * ops["ms per call"]))
    whole = df.set_index("op").loc["em_attention (whole call)", "ms per call"]
    total = df.set_index("op").loc["sum of the ops"]
    assert total["ms per em_attention"] == pytest.approx(ops["ms per em_attention"].sum())
    assert total["share of em_attention time"] == pytest.approx(total["ms per em_attention"] / whole)


# --------------------------------------------------------------------------------------------
# The unit section: the reference unit is the public code's, and emactl's training output is
# no less accurate than it.


def test_reference_unit_matches_emau_in_float64():
    from emactl.profile.unit import UNITS, make_units

    units = make_units(16, 4, 3, torch.device("cpu"))
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64).relu()
    outs = {}
    for name, unit in units.items():
        unit = unit.double().eval()
        with torch.no_grad():
            outs[name] = unit(x)
    for name in UNITS[:-1]:  # they differ by the public code's 1e-6 epsilons only
        assert float((outs[name] - outs["reference"]).abs().max() / outs["reference"].abs().max()) <= 1e-6, name


def test_unit_training_output_error_is_no_worse_than_the_reference():
    from emactl.profile.unit import UNITS, make_units, training_error

    torch.manual_seed(0)
    x = torch.randn(2, 512, 33, 33).relu()  # large enough for BN's channels-last path to show
    errors = training_error(make_units(512, 8, 3, torch.device("cpu")), x)
    assert errors["reference"] > 0
    for name in UNITS[:-1]:  # conv2 on centred input: 1.5–2.2e-6 against 4.8–10e-6 here
        assert errors[name] <= 0.6 * errors["reference"], errors


def test_unit_section_tables():
    from emactl.profile.unit import UNITS, profile_unit

    rows, summary = profile_unit(2, 16, 9, 4, 2, torch.device("cpu"), [torch.float32, torch.bfloat16], [1], repeats=1)
    assert set(rows["unit"]) == set(UNITS)
    assert set(rows["mode"]) == {"eval", "train"}
    ratios = summary.dropna(subset=["time / reference"])
    cases = {("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")}  # bf16 also on bf16 input, as EMANet's head gives it
    assert set(zip(ratios["dtype"], ratios["input"])) == cases
    assert len(ratios) == len(cases) * 2 * (len(UNITS) - 1) and (ratios["low"] <= ratios["time / reference"]).all()
    assert (ratios["time / reference"] <= ratios["high"]).all()
    errors = summary.dropna(subset=["rel. error"])
    assert len(errors) == 2 * len(UNITS) and set(errors["dtype"]) == {"fp32", "bf16"}
    fp32, bf16 = (errors[errors["dtype"] == d].set_index("unit")["rel. error"] for d in ("fp32", "bf16"))
    assert (fp32 < 1e-4).all() and (bf16 > 10 * fp32).all() and (bf16 < 0.2).all()  # bf16 rounds, fp32 barely
    if COUNTS_FAULTS:
        assert (rows["page faults / call"] >= 0).all()


def test_cli_unit_section_records_the_work_ratio_and_the_allocator(tmp_path, monkeypatch):
    from emactl.profile.report import ALLOCATOR_VARIABLES

    for name in [*ALLOCATOR_VARIABLES, *(k for k in os.environ if k.startswith("MALLOC_"))]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=123456789")  # read, not applied: glibc reads it at start
    out = tmp_path / "prof"
    code = run("profile", "--device", "cpu", "--sections", "unit", "--channels", "16", "--size", "9", "--bases", "4",
               "--iters", "2", "--batch", "2", "--threads", "1", "--repeats", "1", "--out", str(out))
    assert code == 0
    rows = pd.read_csv(out / "unit.csv")
    assert {"input", "page faults / call"} <= set(rows.columns) and set(rows["threads"]) == {1}
    gflop = rows.groupby(["unit", "mode"])["GFLOP"].first()
    notes = (out / "notes.md").read_text()
    assert f"{gflop[('emactl', 'train')] / gflop[('reference', 'train')]:.3f} in train" in notes
    assert "GLIBC_TUNABLES=glibc.malloc.trim_threshold=123456789" in notes
    assert json.loads((out / "env.json").read_text())["allocator"] == {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=123456789"}


def test_unit_work_is_the_products_counted_by_hand():
    """conv1 and conv2 are 2·B·N·C² FLOPs each, EM 2(2T+1)·B·N·K·C; folded, conv1 becomes 2T
    products of the bases through it (2·B·K·C² each; the first, from bases the batch shares,
    2·K·C²); training adds conv2's weight gradient. The bias terms (·B·K·C) stay under 0.5 %."""
    from emactl.profile.unit import make_units, profile_unit, unit_gflop

    b, c, side, k, t = 2, 16, 9, 4, 2
    n = side * side
    conv, em = 2 * b * n * c * c, 2 * (2 * t + 1) * b * n * k * c
    folds = (2 * t - 1) * 2 * b * k * c * c + 2 * k * c * c
    want = {("reference", "eval"): conv + em + conv, ("emactl", "eval"): em + folds + conv}
    want.update({(name, "train"): flops + conv for (name, _), flops in list(want.items())})
    units = make_units(c, k, t, torch.device("cpu"))
    x = torch.randn(b, c, side, side)
    for (name, mode), flops in want.items():
        assert unit_gflop(units[name], x, mode) * 1e9 == pytest.approx(flops, rel=0.005), (name, mode)
    rows, _ = profile_unit(b, c, side, k, t, torch.device("cpu"), [torch.float32], [1], repeats=1)
    assert (rows["GFLOP"] > 0).all() and (rows["fraction of mm rate"] > 0).all()
    assert rows.set_index(["unit", "mode"])["GFLOP"][("emactl", "train")] * 1e9 == pytest.approx(want[("emactl", "train")], rel=0.005)

"""Optimiser parameter groups and the poly + warm-up learning-rate schedule."""
from __future__ import annotations

import io

import pytest
import torch

from emactl.config import EMAConfig, ModelConfig, TrainConfig
from emactl.engine.optim import build_optimizer, build_scheduler, param_groups, poly_warmup_factor
from emactl.nn.emanet import build_model


def tiny_model(**ema: object) -> torch.nn.Module:
    cfg = ModelConfig(backbone="tiny", head_channels=16, mid_channels=16, aux=True, ema=EMAConfig(bases=8, **ema))
    return build_model(cfg, 7)


def group_of(groups: list[dict], model: torch.nn.Module) -> dict[str, dict]:
    """Parameter name → the group holding it."""
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_param_groups_follow_the_original() -> None:
    model = tiny_model()
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4, bias_lr_mult=2.0, head_lr_mult=10.0)
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each exactly once
    g = group_of(groups, model)

    # backbone: conv weights decay at lr; BN weights no decay at lr; biases no decay at 2× lr
    assert g["backbone.stem.0.weight"]["weight_decay"] == 1e-4
    assert g["backbone.stem.0.weight"]["lr"] == pytest.approx(0.01)
    assert g["backbone.stem.1.weight"]["weight_decay"] == 0.0
    assert g["backbone.stem.1.weight"]["lr"] == pytest.approx(0.01)
    assert g["backbone.stem.1.bias"]["weight_decay"] == 0.0
    assert g["backbone.stem.1.bias"]["lr"] == pytest.approx(0.02)
    # head (everything outside model.backbone, the aux head included): ×10 on top
    assert g["head.reduce.0.weight"]["lr"] == pytest.approx(0.1)
    assert g["head.reduce.0.weight"]["weight_decay"] == 1e-4
    assert g["head.context.bn.weight"]["lr"] == pytest.approx(0.1)
    assert g["head.context.bn.weight"]["weight_decay"] == 0.0
    assert g["head.context.conv1.bias"]["lr"] == pytest.approx(0.2)
    assert g["head.classifier.bias"]["lr"] == pytest.approx(0.2)
    assert g["head.classifier.bias"]["weight_decay"] == 0.0
    assert g["aux.classifier.weight"]["lr"] == pytest.approx(0.1)
    # every bias and every 1-d (BN) parameter is free of weight decay
    for name, p in model.named_parameters():
        if name.endswith("bias") or p.dim() == 1:
            assert g[name]["weight_decay"] == 0.0, name
        else:
            assert g[name]["weight_decay"] == 1e-4, name

    opt = build_optimizer(model, cfg)
    assert opt.defaults["momentum"] == cfg.momentum
    assert sorted(pg["name"] for pg in opt.param_groups) == sorted(gr["name"] for gr in groups)


def test_learned_bases_get_no_weight_decay() -> None:
    model = tiny_model(grad="full", bases_update="backprop")
    g = group_of(param_groups(model, TrainConfig(weight_decay=1e-4)), model)
    assert g["head.context.mu"]["weight_decay"] == 0.0
    assert g["head.context.mu"]["lr"] == pytest.approx(TrainConfig().lr)


def test_poly_with_warmup_matches_hand_computation() -> None:
    cfg = TrainConfig(lr=0.01, iters=10, poly_power=0.9, warmup_iters=3, warmup_factor=0.1, bias_lr_mult=2.0)
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    # hand computation: lr · (1 − it/10)^0.9 · warm-up, warm-up = 0.1 + 0.9 · it/3 for it < 3
    expected = [
        0.01 * 1.0 * 0.1,
        0.01 * 0.9**0.9 * (0.1 + 0.9 / 3),
        0.01 * 0.8**0.9 * (0.1 + 0.9 * 2 / 3),
        0.01 * 0.7**0.9,
        0.01 * 0.6**0.9,
        0.01 * 0.5**0.9,
        0.01 * 0.4**0.9,
        0.01 * 0.3**0.9,
        0.01 * 0.2**0.9,
        0.01 * 0.1**0.9,
        0.0,
    ]
    seen_base, seen_bias = [], []
    for _ in range(11):
        by_name = {pg["name"]: pg["lr"] for pg in opt.param_groups}
        seen_base.append(by_name["backbone.weight"])
        seen_bias.append(by_name["backbone.bias"])
        opt.step()
        sched.step()
    assert seen_base == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert seen_bias == pytest.approx([2 * e for e in expected], rel=1e-12, abs=1e-15)


def test_poly_without_warmup() -> None:
    assert poly_warmup_factor(0, 100, 0.9) == 1.0
    assert poly_warmup_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_warmup_factor(100, 100, 0.9) == 0.0
    assert poly_warmup_factor(150, 100, 0.9) == 0.0


def test_scheduler_state_round_trips_with_weights_only() -> None:
    cfg = TrainConfig(lr=0.01, iters=10, warmup_iters=2)
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(4):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 4
    for _ in range(3):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]

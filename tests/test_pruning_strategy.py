"""Latency-aware MAC target (:mod:`onnx_compress.dependency_graph.strategy`).

The cost model gives each group an exponent ``e_g = clip(rho_g / rho_ref, 1/E, E)`` from its
wall-time-per-MAC ``rho_g = T_g / M_g`` (``T = M + kappa * elements``); at the bisected ratio
``r`` the group removes ``1 - (1 - r) ** e_g``. Checked here on a small inverted-residual net
(stem -> 1x1 expand -> depthwise 3x3 -> 1x1 project + residual -> head): the expanded channels
(feeding the memory-bound depthwise conv) get the larger exponent and lose more channels than
the residual stream, the MAC target still holds, the pruned model still equals the masked
reference, and ``latency_aware=False`` / all-ones exponents reproduce the uniform plan.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from onnx_compress.dependency_graph.strategy import (
    MAX_EXPONENT,
    latency_exponents,
    mac_fraction,
    mac_model,
    target_plan,
    uniform_plan,
    weighted_plan,
)
from onnx_compress.dependency_graph.apply import keep_masks
from onnx_compress.prune import _lift, masked_reference, prune
from onnx_compress.dependency_graph import score_groups
from tests.numerics import assert_parity
from tests.test_pruning import REL_TOL, export


class InvertedResidual(nn.Module):
    def __init__(self, c: int = 16, t: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        e = c * t
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.Conv2d(c, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.head(x).mean((2, 3))
        return self.fc(x)


SHAPE_IR = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def model():
    return export(InvertedResidual(), SHAPE_IR)


def _group(dg, weight: str, axis: int = 0):
    return next(g for g in dg.prunable if any(m.tensor == weight and m.axis == axis for m in g.members))


def test_exponents_favour_the_memory_bound_expansion(model):
    _, dg = _lift(model, ())
    e = latency_exponents(dg)
    assert set(e) == {g.id for g in dg.prunable}
    assert all(1 / MAX_EXPONENT - 1e-12 <= v <= MAX_EXPONENT + 1e-12 for v in e.values())
    dw = next(n for n in dg.graph.nodes if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1)
    expansion = _group(dg, dw.inputs[1].name)  # the depthwise weight's channels = the expanded ones
    head = next(n for n in dg.graph.nodes if n.op == "Gemm")
    stream = next(g for g in dg.prunable if g.channels == 16)  # stem output + residual Add
    hidden = _group(dg, head.inputs[1].name, 1)  # head conv out = Gemm in
    assert expansion.channels == 96 and hidden.channels == 64
    assert e[expansion.id] > 1.0
    assert e[expansion.id] > e[hidden.id] and e[expansion.id] > e[stream.id]
    # kappa = 0 turns the model back into MACs: every group costs what it computes
    flat = latency_exponents(dg, element_cost=0.0)
    assert all(abs(v - 1.0) < 1e-9 for v in flat.values())


def test_weighted_plan_with_unit_exponents_is_uniform(model):
    _, dg = _lift(model, ())
    scores = score_groups(dg, "l1")
    ones = {g.id: 1.0 for g in dg.prunable}
    for r in (0.1, 0.3, 0.55):
        a, b = weighted_plan(dg, scores, r, ones, round_to=8), uniform_plan(dg, scores, r, round_to=8)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("latency_aware", [True, False])
def test_latency_aware_target_holds_and_stays_equivalent(model, latency_aware):
    _, dg = _lift(model, ())
    scores = score_groups(dg, "l1")
    plan = target_plan(dg, scores, 0.5, round_to=8, latency_aware=latency_aware)
    frac = mac_fraction(mac_model(dg), keep_masks(dg, plan))
    assert 0.35 <= frac <= 0.5 + 1e-9
    dw = next(n for n in dg.graph.nodes if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1)
    expansion = _group(dg, dw.inputs[1].name)
    head = next(n for n in dg.graph.nodes if n.op == "Gemm")
    hidden = _group(dg, head.inputs[1].name, 1)
    removed = {g.id: (g.channels - len(plan.get(g.id, range(g.channels)))) / g.channels for g in dg.prunable}
    if latency_aware:
        assert removed[expansion.id] > removed[hidden.id]
    else:  # one ratio for all: equal up to rounding to 8 channels
        assert abs(removed[expansion.id] - removed[hidden.id]) <= 8 / 64 + 1e-9
    for gid, kept in plan.items():
        if dg.groups[gid].channels >= 16:
            assert len(kept) % 8 == 0


def test_prune_with_mac_target_matches_masked_reference(model):
    pruned, report = prune(model, target_macs=0.5, round_to=8)
    assert report.macs_after <= 0.5 * report.macs_before + 1
    assert any(g.removed for g in report.groups if g.channels == 96)
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)

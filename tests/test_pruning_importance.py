"""Importance (``bn_scale``, ``activation``), calibration sources and strategies (global ranking
with a per-group cap, MAC target) of :func:`onnx_compress.prune.prune`.

Each test pairs the numeric claim (parity with the masked reference, MACs within the target)
with a structural one (which channels went, kept counts that are multiples of ``round_to``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.prune import masked_reference, prune
from tests.numerics import assert_parity
from tests.test_pruning import REL_TOL, SHAPE, BasicBlock, Chain, export, weights


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise AssertionError(name)


def _group_of(report, tensor: str, axis: int = 0):
    return next(g for g in report.groups if any(m.tensor == tensor and m.axis == axis for m in g.members))


# --- bn_scale ---------------------------------------------------------------------------------


def test_bn_scale_removes_the_smallest_gammas():
    model = export(BasicBlock(), SHAPE)
    gamma = np.linspace(1.0, 2.0, 32)
    small = np.array([3, 7, 11, 19, 23, 27, 29, 31])
    gamma[small] = 1e-3 * (1 + np.arange(8))
    _set(model, "bn1.weight", gamma)
    pruned, report = prune(model, 0.25, importance="bn_scale")
    group = _group_of(report, "c1.weight")
    assert sorted(set(range(32)) - set(report.plan[group.id])) == small.tolist()
    assert weights(pruned)["bn1.weight"].shape == (24,)
    assert not any(n.op_type == "Shape" for n in pruned.graph.node)
    assert sum(n.op_type == "BatchNormalization" for n in pruned.graph.node) == 3  # BN kept, sliced
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)


def test_bn_scale_without_bn_names_the_group():
    model = export(Chain(), SHAPE)  # c2 -> HardSigmoid -> c3 has no BatchNormalization
    with pytest.raises(ValueError, match=r"group \d+ .*no BatchNormalization"):
        prune(model, 0.3, importance="bn_scale")


# --- activation -------------------------------------------------------------------------------


def _dead_channel_model():
    """x -> Conv(16) -> Relu -> Conv(4): channels 0..3 have big weights and a bias so negative that
    Relu zeroes them on every input (l1 keeps them; mean |activation| removes them)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 1, 1)).astype(np.float32)
    b1 = np.zeros(16, np.float32)
    w1[:4] *= 5.0
    b1[:4] = -1e3
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_activation_importance_removes_dead_channels(tmp_path):
    model = _dead_channel_model()
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    _, l1 = prune(model, 0.25, round_to=1)
    assert not set(range(4)) & (set(range(16)) - set(l1.plan[0]))  # l1 keeps the big dead ones
    # the same statistics from every calibration form: stacked .npz, folder of .npz, list of feeds
    stacked = tmp_path / "calib.npz"
    np.savez(stacked, x=xs)
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(6):
        np.savez(folder / f"{i:02d}.npz", x=xs[i : i + 1])
    plans = []
    for calib in (str(stacked), str(folder), [{"x": xs[i : i + 1]} for i in range(6)]):
        pruned, report = prune(model, 0.25, round_to=1, importance="activation", calib=calib)
        assert report.calib_samples == 6
        assert sorted(set(range(16)) - set(report.plan[0])) == [0, 1, 2, 3]
        plans.append(report.plan)
        assert weights(pruned)["w2"].shape == (4, 12, 1, 1)
    assert plans[0] == plans[1] == plans[2]
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)


def test_activation_importance_needs_calibration():
    with pytest.raises(ValueError, match="calib"):
        prune(_dead_channel_model(), 0.25, importance="activation")


# --- strategies -------------------------------------------------------------------------------


class TwoBranches(nn.Module):
    """Two independent groups: one with one dominant half of its channels, one uniform."""

    def __init__(self):
        super().__init__()
        self.a1 = nn.Conv2d(3, 32, 3, padding=1)
        self.a2 = nn.Conv2d(32, 4, 1)
        self.b1 = nn.Conv2d(3, 32, 3, padding=1)
        self.b2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.a2(F.relu(self.a1(x))) + self.b2(F.relu(self.b1(x)))


def _two_branches():
    model = export(TwoBranches(), SHAPE)
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((32, 3, 3, 3)) * 0.1
    wa[::2] *= 20  # half of a1's channels dominate: the other half is cheap to remove
    _set(model, "a1.weight", wa)
    _set(model, "b1.weight", rng.uniform(0.9, 1.1, (32, 3, 3, 3)) * np.sign(rng.standard_normal((32, 3, 3, 3))))
    return model


def test_global_ranking_prunes_groups_unevenly_with_a_cap():
    model = _two_branches()
    pruned, report = prune(model, 0.3, global_ranking=True, max_group_ratio=0.5, round_to=1)
    ga, gb = _group_of(report, "a1.weight"), _group_of(report, "b1.weight")
    total = ga.channels + gb.channels
    assert ga.removed + gb.removed >= 0.3 * total
    assert ga.removed > gb.removed  # the spread-out group gives more
    assert ga.removed <= 16 and gb.removed <= 16  # cap: at most half of any group
    assert report.strategy == "global"
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)
    # a tight cap binds: 0.6 of all channels cannot come out when no group may lose > 20 %
    _, capped = prune(model, 0.6, global_ranking=True, max_group_ratio=0.2, round_to=1)
    assert all(g.removed <= int(g.channels * 0.2) for g in capped.groups if not g.frozen)


@pytest.mark.parametrize("global_ranking", [False, True])
def test_mac_target_keeps_about_half(global_ranking):
    model = export(BasicBlock(c=48), (1, 3, 16, 16))
    pruned, report = prune(model, target_macs=0.5, global_ranking=global_ranking, round_to=8)
    frac = report.macs_after / report.macs_before
    print(f"\nMAC target 0.5 ({'global' if global_ranking else 'uniform'}): kept {frac:.3f}")
    assert 0.35 <= frac <= 0.5 + 1e-9
    assert report.strategy == "target-macs" and report.target_macs == 0.5
    for g in report.groups:
        if not g.frozen and g.channels >= 16:
            assert g.kept % 8 == 0, (g.id, g.kept)
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)
    # a looser target prunes less
    _, loose = prune(model, target_macs=0.8, global_ranking=global_ranking, round_to=8)
    assert report.macs_after < loose.macs_after <= 0.8 * loose.macs_before


def test_bad_options_are_one_line_errors():
    model = _dead_channel_model()
    for kw, pattern in [({"target_macs": 0.0}, "target_macs"), ({"max_group_ratio": 1.0}, "max_group_ratio"),
                        ({"reconstruct": True}, "calib"), ({"importance": "taylor"}, "unknown importance")]:
        with pytest.raises(ValueError, match=pattern) as info:
            prune(model, 0.3, **kw)
        assert "\n" not in str(info.value)

"""Structured pruning end to end on torch-exported architectures (issue 3).

For each model at ratio 0.3: the pruned model passes ``onnx.checker`` (full check) and runs in
ONNX Runtime, and equals the *masked reference* (original with the removed channels made inert,
``masked_reference``) within 1e-4 of each output's range; structurally, every pruned constant
shrank by exactly the planned count on the planned axis and MACs dropped. The masked reference
itself is cross-checked against a hand-made one on a plain chain. Ratio 0 returns the weights
bit-identical, and architectures whose channels cannot be proven (channel shuffle) come out
frozen with the reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from onnx_compress.prune import list_groups, masked_reference, prune
from tests.numerics import assert_parity, constant_arrays as weights, run

REL_TOL = 1e-4  # the acceptance bound: pruned == masked within 1e-4 of output range


def export(module: nn.Module, shape, *, dynamo: bool = False) -> onnx.ModelProto:
    torch.manual_seed(0)
    module.eval()
    for m in module.modules():  # non-trivial BN statistics so BN slicing is really tested
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, (x,), dynamo=True, external_data=False, opset_version=18,
                                        input_names=["x"], output_names=["y"], verbose=False)
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


def conv_attr(model: onnx.ModelProto, weight: str, name: str, default=1):
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] == weight:
            for a in node.attribute:
                if a.name == name:
                    return a.i
            return default
    raise AssertionError(f"no conv reads {weight}")


def check_pruned(model: onnx.ModelProto, ratio: float = 0.3, **kw):
    """Prune, then assert validity, masked equivalence and the planned shapes."""
    pruned, report = prune(model, ratio, **kw)
    assert report.plan, "nothing was pruned"
    onnx.checker.check_model(pruned, full_check=True)
    ref = masked_reference(model, report.plan, ignore=kw.get("ignore", ()))
    assert_parity(ref, pruned, rel_tol=REL_TOL, samples=2)
    # structure: each constant shrank exactly by the planned number on the planned axis
    before, after = weights(model), weights(pruned)
    expected = {name: list(v.shape) for name, v in before.items()}
    for g in report.groups:
        for m in g.members:
            if m.kind != "activation" and m.tensor in expected:
                expected[m.tensor][m.axis] -= m.removed
    shrunk = 0
    for name, shape in expected.items():
        if name in after:
            assert list(after[name].shape) == shape, f"{name}: {after[name].shape} != planned {shape}"
            shrunk += list(before[name].shape) != shape
    assert shrunk > 0
    assert report.macs_after < report.macs_before
    assert report.params_after < report.params_before
    return pruned, report


# ---------------------------------------------------------------------------------------------
# architectures


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 24, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.c3(F.hardsigmoid(self.c2(F.relu(self.b1(self.c1(x))))))


class BasicBlock(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        return self.head(F.relu(x + y))


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.l1 = nn.Conv2d(16, 16, 3, padding=1)
        self.l2 = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(48, 6, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([x, F.relu(self.l1(x))], 1)
        x = torch.cat([x, F.relu(self.l2(x))], 1)
        return self.out(x)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 style: expand 1x1, depthwise 3x3, HardSwish/ReLU6, project 1x1, residual."""

    def __init__(self, c=16, e=48):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.project = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        y = F.hardswish(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.bn3(self.project(y))
        return self.head(x + y)


class ResNeXtBlock(nn.Module):
    def __init__(self, c=32, width=32, groups=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, width, 1)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=groups)
        self.expand = nn.Conv2d(width, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.grouped(F.relu(self.reduce(x))))
        return self.head(F.relu(x + self.expand(y)))


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        d = F.relu(self.down(F.max_pool2d(e, 2)))
        u = F.leaky_relu(self.up(d), 0.1)
        return self.out(F.relu(self.dec(torch.cat([u, e], 1))))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class PoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.sigmoid(self.c1(x)), 1), 1))


class C2f(nn.Module):
    """YOLOv8 C2f: cv1 -> split in two -> bottleneck on the second -> concat all -> cv2."""

    def __init__(self, c=32, chunk=False):
        super().__init__()
        self.chunk = chunk
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.cv1 = nn.Conv2d(c, c, 1)
        self.m = nn.Conv2d(c // 2, c // 2, 3, padding=1)
        self.cv2 = nn.Conv2d(c // 2 * 3, 6, 1)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = F.silu(self.cv1(x))
        # chunk() exports a Shape-computed Slice; split() a Split with constant sizes
        h = self.cv1.out_channels // 2
        a, b = y.chunk(2, 1) if self.chunk else y.split([h, h], 1)
        m = F.silu(self.m(b))
        return self.cv2(torch.cat([a, b, m], 1))


class ShuffleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c2b = nn.Conv2d(16, 24, 1)
        self.c3 = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = F.relu(self.c1(x))
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c3(F.relu(self.c2b(F.relu(self.c2(x)))))


SHAPE = (1, 3, 8, 8)

# ---------------------------------------------------------------------------------------------
# tests


def test_chain_and_hand_made_masked_reference():
    model = export(Chain(), SHAPE)
    pruned, report = check_pruned(model)
    # the group of c2's outputs (HardSigmoid between c2 and c3: f(0) = 0.5 != 0)
    group = next(g for g in report.groups if any(m.tensor == "c2.weight" and m.axis == 0 for m in g.members))
    kept = np.asarray(report.plan[group.id])
    removed = np.setdiff1d(np.arange(24), kept)
    assert removed.size == 24 - 16  # 24 * 0.7 = 16.8 -> nearest multiple of 8
    # independent masked reference: zero the consumer's input slices (exact whatever f(0) is)
    hand = onnx.ModelProto()
    hand.CopyFrom(model)
    for init in hand.graph.initializer:
        if init.name == "c3.weight":
            w = numpy_helper.to_array(init).copy()
            w[:, removed] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    # c1's group too (Relu after BN): zero c2's input slices
    g1 = next(g for g in report.groups if any(m.tensor == "c1.weight" and m.axis == 0 for m in g.members))
    removed1 = np.setdiff1d(np.arange(32), report.plan[g1.id])
    for init in hand.graph.initializer:
        if init.name == "c2.weight":
            w = numpy_helper.to_array(init).copy()
            w[:, removed1] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    assert_parity(hand, pruned, rel_tol=REL_TOL)
    # zeroing only at the producer is NOT equivalent through HardSigmoid: the documented pitfall
    producer_only = onnx.ModelProto()
    producer_only.CopyFrom(model)
    for init in producer_only.graph.initializer:
        if init.name == "c2.weight":
            w = numpy_helper.to_array(init).copy()
            w[removed] = 0
            w[:, removed1] = 0
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    feed = {"x": np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)}
    assert not np.allclose(run(producer_only, feed)[0], run(pruned, feed)[0], atol=1e-3)


def test_residual_block_prunes_the_stream_as_one_group():
    model = export(BasicBlock(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    # stem, c2 (both feeding the Add) and head's input are one group: same kept count
    assert w["stem.weight"].shape[0] == w["c2.weight"].shape[0] == w["head.weight"].shape[1] == 24
    assert w["c1.weight"].shape[1] == 24 and w["c1.weight"].shape[0] == 24
    stream = next(g for g in report.groups if any(m.tensor == "stem.weight" for m in g.members))
    assert any(m.tensor == "c2.weight" and m.axis == 0 for m in stream.members)
    assert any(m.tensor == "bn2.weight" for m in stream.members)


def test_dense_concat_block():
    model = export(DenseBlock(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    # out conv input = stem kept + l1 kept + l2 kept (concat offsets)
    assert w["out.weight"].shape[1] == w["stem.weight"].shape[0] + w["l1.weight"].shape[0] + w["l2.weight"].shape[0]
    assert w["l2.weight"].shape[1] == w["stem.weight"].shape[0] + w["l1.weight"].shape[0]
    assert w["stem.weight"].shape[0] < 16


def test_depthwise_separable_inverted_residual():
    model = export(InvertedResidual(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    kept = w["expand.weight"].shape[0]
    assert kept == 32  # 48 * 0.7 = 33.6 -> 32
    assert w["dw.weight"].shape == (kept, 1, 3, 3)
    assert conv_attr(pruned, "dw.weight", "group") == kept
    assert w["project.weight"].shape[1] == kept


def test_grouped_conv_removes_whole_groups():
    model = export(ResNeXtBlock(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    groups = conv_attr(pruned, "grouped.weight", "group")
    assert groups == 6  # 8 conv groups * 0.7 = 5.6 -> 6 (4 channels each: round_to 8 keeps an even number)
    assert w["grouped.weight"].shape == (6 * 4, 4, 3, 3)  # channels per group unchanged
    assert w["reduce.weight"].shape[0] == 24 and w["expand.weight"].shape[1] == 24
    # round_to counts tensor channels: 4 per conv group, so under 16 the conv groups come in
    # fours (5.6 -> 4 groups = 16 channels), and the plain 32-channel stream goes to 16 (22.4)
    pruned16, _ = check_pruned(model, round_to=16)
    w16 = weights(pruned16)
    assert conv_attr(pruned16, "grouped.weight", "group") == 4
    assert w16["grouped.weight"].shape == (16, 4, 3, 3) and w16["stem.weight"].shape[0] == 16


def test_unet_conv_transpose_and_concat_skip():
    model = export(TinyUNet(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    # ConvTranspose weight [C_in, C_out, k, k]: axis 0 follows `down`, axis 1 the up group
    assert w["up.weight"].shape[0] == w["down.weight"].shape[0] == 24
    assert w["up.bias"].shape[0] == w["up.weight"].shape[1]
    assert w["dec.weight"].shape[1] == w["up.weight"].shape[1] + w["enc.weight"].shape[0]


def test_flatten_into_gemm_maps_whole_spatial_blocks():
    model = export(FlattenHead(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    kept = w["c2.weight"].shape[0]
    assert kept < 16
    assert w["fc1.weight"].shape == (24, kept * 16)  # transB Gemm: [out, in]; in = C * H * W
    group = next(g for g in report.groups if any(m.tensor == "fc1.weight" and m.axis == 1 for m in g.members))
    member = next(m for m in group.members if m.tensor == "fc1.weight")
    assert member.removed == (16 - kept) * 16


def test_global_pool_flatten_gemm_with_sigmoid():
    model = export(PoolHead(), SHAPE)
    pruned, _ = check_pruned(model)
    assert weights(pruned)["fc.weight"].shape == (5, 16)


def test_c2f_split_concat():
    model = export(C2f(), SHAPE)
    pruned, report = check_pruned(model)
    w = weights(pruned)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    sizes = [int(v) for v in weights(pruned)[split.input[1]]]
    # each half of cv1 is its own group (16 * 0.7 = 11.2 -> nearest multiple of 8)
    assert sizes == [8, 8]
    assert w["cv1.weight"].shape[0] == 16
    assert w["m.weight"].shape[1] == 8
    assert w["cv2.weight"].shape[1] == 8 + 8 + w["m.weight"].shape[0]
    halves = [g for g in report.groups if any(m.tensor == "cv1.weight" and m.axis == 0 for m in g.members)]
    assert len(halves) == 2 and all(g.channels == 16 for g in halves)
    _, report7 = prune(model, 0.3, round_to=1)  # without rounding: 16 * 0.7 = 11.2 -> 11
    assert all(g.kept == 11 for g in report7.groups if g.id in {h.id for h in halves})


def test_shape_computed_slice_bounds_are_folded_and_pruned():
    # chunk() exports Shape -> ... -> Slice; prune() folds constants first, so both halves of
    # cv1 become provable groups and the Slice bounds are rewritten
    model = export(C2f(chunk=True), SHAPE)
    assert any(n.op_type == "Shape" for n in model.graph.node)
    pruned, report = check_pruned(model)
    assert not any(n.op_type == "Shape" for n in pruned.graph.node)
    halves = [g for g in report.groups if any(m.tensor == "cv1.weight" and m.axis == 0 for m in g.members)]
    assert len(halves) == 2 and all(not g.frozen and g.kept == 8 for g in halves)
    assert weights(pruned)["cv1.weight"].shape[0] == 16
    assert weights(pruned)["m.weight"].shape[1] == 8


def test_slice_with_runtime_bounds_freezes_only_its_group():
    """Slice ``ends`` fed by a graph input cannot be folded: that group is frozen, with reason."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "w2")
    w3 = numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "w3")
    w4 = numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "w4")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["s"], name="dyn_slice"),
        helper.make_node("Conv", ["x", "w3"], ["b"], name="c3"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w4"], ["z"], name="c4"),
    ]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                       helper.make_tensor_value_info("ends", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", "c", 4, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 4, 4])],
        [w1, w2, w3, w4, starts, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = prune(model, 0.5, round_to=1)
    c1 = next(g for g in report.groups if any(m.tensor == "w1" and m.axis == 0 for m in g.members))
    assert c1.frozen and any("Slice" in r and "not a constant" in r for r in c1.reasons), c1.reasons
    c3 = next(g for g in report.groups if any(m.tensor == "w3" and m.axis == 0 for m in g.members))
    assert not c3.frozen and c3.kept == 8


def test_channel_shuffle_is_frozen_with_reason():
    model = export(ShuffleBlock(), SHAPE)
    groups = list_groups(model)
    c1 = next(g for g in groups if any(m.tensor == "c1.weight" and m.axis == 0 for m in g.members))
    assert c1.frozen
    assert any("Reshape" in r for r in c1.reasons), c1.reasons
    pruned, report = prune(model, 0.3)
    w0, w1 = weights(model), weights(pruned)
    assert w1["c1.weight"].shape == w0["c1.weight"].shape  # never mis-pruned across the shuffle
    # the grouped conv after the shuffle couples its outputs to its (frozen) inputs: frozen too
    assert w1["c2.weight"].shape == w0["c2.weight"].shape
    c2 = next(g for g in groups if any(m.tensor == "c2.weight" and m.axis == 0 for m in g.members))
    assert c2.frozen and any("Reshape" in r for r in c2.reasons)
    # c2b -> c3 is still provable and pruned
    assert w1["c2b.weight"].shape[0] == 16 and w1["c3.weight"].shape[1] == 16
    assert_parity(masked_reference(model, report.plan), pruned, rel_tol=REL_TOL)


def test_ratio_zero_is_bit_identical():
    model = export(BasicBlock(), SHAPE)
    pruned, report = prune(model, 0.0)
    assert not report.plan
    before, after = weights(model), weights(pruned)
    assert before.keys() == after.keys()
    for name, v in before.items():
        assert after[name].tobytes() == v.tobytes() and after[name].shape == v.shape
    assert report.macs_after == report.macs_before


def test_ignore_by_op_type_and_name():
    model = export(DenseBlock(), SHAPE)
    _, report = prune(model, 0.3, ignore=["Concat"])
    assert not report.plan  # every prunable channel passes a Concat
    assert any("ignored (matches 'Concat')" in r for g in report.groups for r in g.reasons)
    chain = export(Chain(), SHAPE)
    pruned, report = prune(chain, 0.3, ignore=[r"/c3/.*"])  # c3's inputs: c2's output group
    ignored = [g for g in report.groups if any("ignored (matches '/c3/.*')" in r for r in g.reasons)]
    assert ignored and all(g.frozen and g.kept == g.channels for g in ignored)
    assert weights(pruned)["c2.weight"].shape[0] == 24
    assert weights(pruned)["c1.weight"].shape[0] == 24  # the other group is still pruned


@pytest.mark.parametrize("importance", ["l2", "random"])
def test_other_importances_keep_equivalence(importance):
    model = export(ResNeXtBlock(), SHAPE)
    check_pruned(model, importance=importance, seed=3)


def test_dynamo_export_when_available():
    try:
        model = export(BasicBlock(), SHAPE, dynamo=True)
    except Exception as exc:  # the dynamo exporter needs onnxscript; say so instead of failing
        pytest.skip(f"dynamo exporter unavailable offline: {type(exc).__name__}: {str(exc)[:120]}")
    pruned, report = check_pruned(model)
    assert report.macs_after < report.macs_before

"""Channel rules for DepthToSpace/SpaceToDepth, GroupNormalization, Gather/GatherND and GQA
(Expand/Tile), end to end (issue 3).

Each rule is checked three ways: the pruned model equals the *masked reference* (original with
the removed channels made inert) within 1e-4 of the output range, on ONNX Runtime with every
optimisation off; the structure shrank the way the index map says (which conv rows survive, the
rewritten ``num_groups`` / Gather indices / Reshape and Expand targets); and, where a torch
module is at hand, the pruned model equals the torch module with those channels removed by hand.
What cannot be proven (a scalar channel index, run-time indices, a sequence length only known at
run time) comes out frozen with the reason, weights untouched.

Index maps under test (``b`` = blocksize, ``C`` = channels of the shallow side):

* DepthToSpace DCR: deep channel ``(i*b + j)*C + c`` -> shallow ``c``; CRD: ``c*b*b + i*b + j``
  -> ``c``; SpaceToDepth: deep (output) channel ``(i*b + j)*C + c`` -> input ``c``;
* GroupNormalization with ``G`` groups of ``C/G``: a whole group is one channel, ``num_groups``
  shrinks (per-group scale at opset 18, per-channel at 21); torch's decomposition
  ``Reshape [N, G, -1] -> InstanceNormalization -> Reshape(Shape(x)) -> Mul/Add`` gets the same
  atoms from the Reshape factorisation;
* Gather with constant 1-D ``idx`` on the channel axis: ``Y[p] <-> X[idx[p]]``, after pruning
  ``idx' = rank of idx[p] among the kept channels`` for the kept ``p``;
* GQA with ``H = G*r`` query heads: query head ``h`` uses key/value group ``h // r`` (torch's
  ``repeat_interleave`` and ``expand + reshape``), so a channel is one KV group with its ``r``
  query heads.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx_compress.dependency_graph import (
    apply_mask,
    apply_plan,
    build_dependency_graph,
)
from onnx_compress.ir.graph import to_graph, to_model
from torch import nn

from onnx_compress.prune import list_groups, masked_reference, prune
from tests.numerics import assert_parity, constant_arrays as constants, run

REL_TOL = 1e-4  # the acceptance bound: pruned == masked within 1e-4 of output range


def export(module: nn.Module, shape, *, dynamo: bool = False, dynamic: dict | None = None) -> onnx.ModelProto:
    module.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            try:
                program = torch.onnx.export(module, (x,), dynamo=True, external_data=False, opset_version=18,
                                            input_names=["x"], output_names=["y"], verbose=False)
            except Exception as exc:  # noqa: BLE001 - the dynamo exporter needs onnxscript; say so instead of failing
                pytest.skip(f"dynamo exporter unavailable: {type(exc).__name__}: {str(exc)[:120]}")
            return program.model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes=None if dynamic is None else {"x": dynamic, "y": dynamic})
    return onnx.load_from_string(buf.getvalue())


def attr(model: onnx.ModelProto, op: str, name: str):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def input_value(model: onnx.ModelProto, op: str, slot: int, k: int = 0) -> np.ndarray:
    """Constant input ``slot`` of the ``k``-th node of type ``op``."""
    node = [n for n in model.graph.node if n.op_type == op][k]
    return constants(model)[node.input[slot]]


def check(model: onnx.ModelProto, ratio: float, feeds=None, **kw):
    """Prune; assert validity, masked equivalence, that every constant member shrank by exactly
    the planned count on the planned axis, and that float constants outside every group kept
    their shape (index and shape vectors are rewritten by the rules; each test checks those)."""
    pruned, report = prune(model, ratio, **kw)
    assert report.plan, "nothing was pruned"
    onnx.checker.check_model(pruned, full_check=True)
    ref = masked_reference(model, report.plan)
    assert_parity(ref, pruned, rel_tol=REL_TOL, feeds=feeds, samples=0 if feeds else 2)
    after = constants(pruned)
    planned: dict[tuple[str, int], int] = {}
    for g in report.groups:
        for m in g.members:
            if m.kind != "activation":
                planned[(m.tensor, m.axis)] = planned.get((m.tensor, m.axis), m.size) - m.removed
    for (name, axis), size in planned.items():
        assert after[name].shape[axis] == size, f"{name} axis {axis}: {after[name].shape} != planned {size}"
    assert any(m.removed for g in report.groups for m in g.members if m.kind != "activation")
    members = {name for name, _ in planned}
    for name, value in constants(model).items():
        if name in after and name not in members and value.dtype.kind == "f":
            assert after[name].shape == value.shape, f"{name} is in no group but changed shape"
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    return pruned, report


def group_of(groups, tensor: str, axis: int):
    return next(g for g in groups if any(m.tensor == tensor and m.axis == axis for m in g.members))


def kept_blocks(original: np.ndarray, pruned: np.ndarray, width: int, axis: int = 0) -> list[int]:
    """Which ``width``-wide blocks of ``original`` (along ``axis``) ``pruned`` keeps, in order."""
    o, p = np.moveaxis(original, axis, 0), np.moveaxis(pruned, axis, 0)
    out = []
    for j in range(p.shape[0] // width):
        block = p[j * width:(j + 1) * width]
        hits = [k for k in range(o.shape[0] // width) if np.array_equal(o[k * width:(k + 1) * width], block)]
        assert len(hits) == 1, "a pruned block is not exactly one original block"
        out.append(hits[0])
    assert out == sorted(out)
    return out


def graph_model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def init(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


# ---------------------------------------------------------------------------------------------
# DepthToSpace / SpaceToDepth


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.pixel_shuffle(F.relu(self.c1(x)), 2))


def test_pixel_shuffle_crd_prunes_blocks_of_four_conv_rows():
    module = PixelShuffleNet()
    model = export(module, (1, 3, 6, 6))
    assert attr(model, "DepthToSpace", "mode") == b"CRD"
    pruned, report = check(model, 0.5, round_to=1)
    group = group_of(report.groups, "c1.weight", 0)
    assert not group.frozen and group.channels == 8 and group.kept == 4
    w1, w1p = module.c1.weight.detach().numpy(), constants(pruned)["c1.weight"]
    kept = kept_blocks(w1, w1p, 4)  # CRD: output channel c <- conv rows 4c .. 4c+3, contiguous
    assert len(kept) == 4
    w2p = constants(pruned)["c2.weight"]
    assert np.array_equal(w2p, module.c2.weight.detach().numpy()[:, kept])
    assert attr(pruned, "DepthToSpace", "blocksize") == 2 and attr(pruned, "DepthToSpace", "mode") == b"CRD"
    # the pruned model is the torch net with those output channels removed
    x = np.random.default_rng(3).standard_normal((1, 3, 6, 6)).astype(np.float32)
    rows = np.concatenate([np.arange(4 * c, 4 * c + 4) for c in kept])
    with torch.no_grad():
        h = F.pixel_shuffle(F.relu(F.conv2d(torch.from_numpy(x), module.c1.weight[rows], module.c1.bias[rows], padding=1)), 2)
        expect = F.conv2d(h, module.c2.weight[:, kept], module.c2.bias, padding=1).numpy()
    got = run(pruned, {"x": x})[0]
    assert np.abs(got - expect).max() <= REL_TOL * float(expect.max() - expect.min())


@pytest.mark.parametrize("op, mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("SpaceToDepth", None)])
def test_depth_space_index_maps(op, mode):
    """Deep channel d belongs to shallow channel d % C (DCR, SpaceToDepth) or d // 4 (CRD)."""
    deep, shallow = 16, 4
    c1_out, c2_in, hw_in, hw_mid = (deep, shallow, 4, 8) if op == "DepthToSpace" else (shallow, deep, 8, 4)
    attrs = {"blocksize": 2} | ({"mode": mode} if mode else {})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node(op, ["r"], ["d"], name="rearrange", **attrs),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="c2")]
    model = graph_model(nodes, [vi("x", ["n", 3, hw_in, hw_in])], [vi("y", ["n", 2, hw_mid, hw_mid])],
                        [init("w1", (c1_out, 3, 1, 1), 1), init("b1", (c1_out,), 2), init("w2", (2, c2_in, 1, 1), 3)])
    onnx.checker.check_model(model, full_check=True)
    group = group_of(list_groups(model), "w1", 0)
    assert not group.frozen and group.channels == shallow
    x = [{"x": np.random.default_rng(i).standard_normal((1 + i, 3, hw_in, hw_in)).astype(np.float32)} for i in range(2)]
    pruned, _ = check(model, 0.5, feeds=x, round_to=1)
    w1, w2 = constants(model)["w1"], constants(model)["w2"]
    w1p, w2p = constants(pruned)["w1"], constants(pruned)["w2"]
    if op == "SpaceToDepth":  # the shallow side is c1's output, the deep side c2's input
        kept = kept_blocks(w1, w1p, 1)
        cols = [k * shallow + c for k in range(4) for c in kept]
        assert np.array_equal(w2p, w2[:, cols])
    else:
        kept = kept_blocks(w2, w2p, 1, axis=1)
        rows = [k * shallow + c for k in range(4) for c in kept] if mode == "DCR" else \
               [4 * c + k for c in kept for k in range(4)]
        assert np.array_equal(w1p, w1[rows])
    assert len(kept) == 2
    assert attr(pruned, op, "blocksize") == 2


def test_depth_to_space_on_a_graph_output_is_frozen():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("DepthToSpace", ["a"], ["y"], blocksize=2, mode="DCR", name="d2s")]
    model = graph_model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 8, 8])], [init("w1", (16, 3, 1, 1))])
    group = group_of(list_groups(model), "w1", 0)
    assert group.frozen and "graph output 'y'" in group.reasons


@pytest.mark.slow
def test_pixel_shuffle_dynamo():
    # round_to=1: c2 reads 8 channels, so round_to 8 would keep the whole group
    pruned, _ = check(export(PixelShuffleNet(), (1, 3, 6, 6), dynamo=True), 0.3, round_to=1)
    assert constants(pruned)["c1.weight"].shape[0] == 4 * constants(pruned)["c2.weight"].shape[1]


# ---------------------------------------------------------------------------------------------
# GroupNormalization


class GroupNormNet(nn.Module):
    def __init__(self, channels=32, groups=8):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, channels, 3, padding=1)
        self.gn = nn.GroupNorm(groups, channels)
        self.c2 = nn.Conv2d(channels, 4, 1)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x))))


def torch_groupnorm_removed(module: GroupNormNet, kept_groups: list[int], x: np.ndarray) -> np.ndarray:
    """The torch net with whole groups removed: sliced conv/GN parameters, GroupNorm(G')."""
    cpg = module.gn.num_channels // module.gn.num_groups
    ch = np.concatenate([np.arange(g * cpg, (g + 1) * cpg) for g in kept_groups])
    with torch.no_grad():
        h = F.conv2d(torch.from_numpy(x), module.c1.weight[ch], module.c1.bias[ch], padding=1)
        h = F.group_norm(h, len(kept_groups), module.gn.weight[ch], module.gn.bias[ch], module.gn.eps)
        return F.conv2d(F.relu(h), module.c2.weight[:, ch], module.c2.bias).numpy()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_torch_groupnorm_removes_whole_groups(dynamic):
    """torch exports GroupNorm as Reshape [N, G, -1] -> InstanceNormalization -> Reshape(Shape(x))
    -> Mul -> Add; a group of 4 channels is the atom. With a dynamic batch the way back reads
    ``Shape(x)`` at run time: it follows x's pruned width, linked one to one."""
    module = GroupNormNet()
    model = export(module, (2, 3, 6, 6), dynamic={0: "n"} if dynamic else None)
    assert sum(n.op_type == "InstanceNormalization" for n in model.graph.node) == 1
    group = group_of(list_groups(model), "c1.weight", 0)
    assert not group.frozen and group.channels == 8  # 8 groups of 4 channels
    rng = np.random.default_rng(0)
    x = [{"x": rng.standard_normal((1 + 2 * i if dynamic else 2, 3, 6, 6)).astype(np.float32)} for i in range(2)]
    pruned, _ = check(model, 0.5, feeds=x)
    w1 = constants(pruned)["c1.weight"]
    kept = kept_blocks(module.c1.weight.detach().numpy(), w1, 4)
    assert len(kept) == 4 and w1.shape[0] == 16
    assert input_value(pruned, "InstanceNormalization", 1).shape == (4,)  # one scale per kept group
    first = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    assert list(constants(pruned)[first.input[1]]) == [0, 4, -1]  # [N, G', -1]
    if dynamic:
        assert any(n.op_type == "Shape" for n in pruned.graph.node)  # still read at run time
    for feed in x:
        expect = torch_groupnorm_removed(module, kept, feed["x"])
        got = run(pruned, feed)[0]
        assert np.abs(got - expect).max() <= REL_TOL * float(expect.max() - expect.min())


@pytest.mark.slow
def test_torch_groupnorm_dynamo():
    module = GroupNormNet()
    pruned, _ = check(export(module, (1, 3, 6, 6), dynamo=True), 0.5)
    assert constants(pruned)["c1.weight"].shape[0] == 16


def groupnorm_model(opset: int, channels=16, groups=4) -> onnx.ModelProto:
    per = channels if opset >= 21 else groups
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("GroupNormalization", ["a", "gamma", "beta"], ["n"], num_groups=groups,
                              epsilon=1e-5, name="gn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    return graph_model(nodes, [vi("x", ["n", 3, 6, 6])], [vi("y", ["n", 4, 6, 6])],
                       [init("w1", (channels, 3, 3, 3), 1), init("b1", (channels,), 2), init("gamma", (per,), 3),
                        init("beta", (per,), 4), init("w2", (4, channels, 1, 1), 5)], opset)


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's shape inference does not type GroupNormalization's output (a function op without an
    inference function); ONNX Runtime's symbolic engine does."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def test_groupnormalization_21_per_channel_scale():
    model = with_shapes(groupnorm_model(21))
    onnx.checker.check_model(model, full_check=True)
    pruned, _ = check(model, 0.5, round_to=1)
    assert attr(pruned, "GroupNormalization", "num_groups") == 2
    w1, gamma = constants(model)["w1"], constants(model)["gamma"]
    kept = kept_blocks(w1, constants(pruned)["w1"], 4)
    ch = np.concatenate([np.arange(4 * g, 4 * g + 4) for g in kept])
    assert np.array_equal(constants(pruned)["gamma"], gamma[ch])  # per channel, whole groups
    # ONNX's own inference leaves the GroupNormalization output untyped; prune() then asks ONNX
    # Runtime's symbolic inference for it, so the model without value_info prunes the same way
    group = group_of(list_groups(groupnorm_model(21)), "w1", 0)
    assert not group.frozen, group.reasons
    unshaped, _ = check(groupnorm_model(21), 0.5, round_to=1)
    assert attr(unshaped, "GroupNormalization", "num_groups") == 2


def test_groupnormalization_18_per_group_scale():
    """Opset 18's per-group form (deprecated in ONNX 1.16; the checker and hence ``prune()``
    refuse it, ONNX Runtime still runs it): lifted and applied directly."""
    model = with_shapes(groupnorm_model(18))
    dg = build_dependency_graph(to_graph(model))
    group = next(g for g in dg.groups if any(m.tensor == "w1" and m.axis == 0 for m in g.members))
    assert not group.frozen and group.channels == 4
    assert any(m.tensor == "gamma" and m.role == "scale" for m in group.members)
    plan = {group.id: np.array([0, 2])}
    apply_plan(dg, plan)
    pruned = to_model(dg.graph, like=model)
    ref_dg = build_dependency_graph(to_graph(model))
    apply_mask(ref_dg, plan)
    ref = to_model(ref_dg.graph, like=model)
    assert attr(pruned, "GroupNormalization", "num_groups") == 2
    gamma = constants(model)["gamma"]
    assert np.array_equal(constants(pruned)["gamma"], gamma[[0, 2]])
    assert np.array_equal(constants(pruned)["w1"], constants(model)["w1"][[0, 1, 2, 3, 8, 9, 10, 11]])
    x = [{"x": np.random.default_rng(i).standard_normal((2, 3, 6, 6)).astype(np.float32)} for i in range(2)]
    assert_parity(ref, pruned, feeds=x, samples=0, rel_tol=REL_TOL, full_check=False)


# ---------------------------------------------------------------------------------------------
# Gather / GatherND


class GatherNet(nn.Module):
    IDX = (3, 1, 5, 12, 0, 9, 14, 7)

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(len(self.IDX), 4, 1)
        self.register_buffer("idx", torch.tensor(self.IDX))

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h[:, list(self.IDX)] if self.how == "list" else torch.index_select(h, 1, self.idx)
        return self.c2(h)


@pytest.mark.parametrize("how", ["list", "index_select"])
def test_gather_constant_indices_on_the_channel_axis(how):
    module = GatherNet(how)
    model = export(module, (1, 3, 6, 6))
    assert any(n.op_type == "Gather" for n in model.graph.node)
    pruned, report = check(model, 0.5, round_to=1)
    gathered = group_of(report.groups, "c2.weight", 1)
    assert not gathered.frozen and gathered.channels == 8 and gathered.kept == 4
    w1 = module.c1.weight.detach().numpy()
    kept_rows = kept_blocks(w1, constants(pruned)["c1.weight"], 1)
    idx = [int(v) for v in input_value(pruned, "Gather", 1)]
    assert len(idx) == 4
    # every new index points, among the kept conv rows, at the channel the old index did
    kept_positions = [p for p in range(8) if GatherNet.IDX[p] in kept_rows]
    assert [kept_rows[i] for i in idx] == [GatherNet.IDX[p] for p in kept_positions]
    assert np.array_equal(constants(pruned)["c2.weight"], module.c2.weight.detach().numpy()[:, kept_positions])


def repeated_gather_model() -> onnx.ModelProto:
    """``idx = [2, -3, 2, 7, 0]`` on 8 channels: channel 2 feeds two positions, -3 is channel 5."""
    idx = numpy_helper.from_array(np.array([2, -3, 2, 7, 0], np.int64), "idx")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),  # f(0) != 0: the mask must be exact
             helper.make_node("Gather", ["s", "idx"], ["g"], axis=-3, name="pick"),
             helper.make_node("Conv", ["g", "w2"], ["y"], name="c2")]
    return graph_model(nodes, [vi("x", ["n", 3, 4, 4])], [vi("y", ["n", 2, 4, 4])],
                       [init("w1", (8, 3, 1, 1), 1), init("b1", (8,), 2), init("w2", (2, 5, 1, 1), 3), idx])


def test_gather_repeated_and_negative_indices_couple_both_positions():
    model = repeated_gather_model()
    onnx.checker.check_model(model, full_check=True)
    groups = list_groups(model)
    gathered = group_of(groups, "w2", 1)
    assert not gathered.frozen and gathered.channels == 4  # channels 0, 2, 5, 7
    members = {m.tensor: m for m in gathered.members}
    assert members["w2"].size == 5 and members["w1"].size == 8
    # channels 1, 3, 4, 6 are read by nobody downstream: their own group
    free = next(g for g in groups if g.id != gathered.id and any(m.tensor == "w1" and m.axis == 0 for m in g.members))
    assert not free.frozen and free.channels == 4
    # remove channel 2 (group channel 1): both positions 0 and 2 go, the rest are renumbered
    inferred = onnx.shape_inference.infer_shapes(model)
    dg = build_dependency_graph(to_graph(inferred))
    gid = next(g.id for g in dg.groups if any(m.tensor == "w2" and m.axis == 1 for m in g.members))
    plan = {gid: np.array([0, 2, 3])}
    apply_plan(dg, plan)
    pruned = to_model(dg.graph, like=model)
    ref_dg = build_dependency_graph(to_graph(inferred))
    apply_mask(ref_dg, plan)
    ref = to_model(ref_dg.graph, like=model)
    assert constants(pruned)["w1"].shape[0] == 7 and constants(pruned)["w2"].shape[1] == 3
    assert input_value(pruned, "Gather", 1).tolist() == [4, 6, 0]  # channels 5, 7, 0 among 7 kept
    assert np.array_equal(constants(pruned)["w2"], constants(model)["w2"][:, [1, 3, 4]])
    x = [{"x": np.random.default_rng(i).standard_normal((2, 3, 4, 4)).astype(np.float32)} for i in range(2)]
    assert_parity(ref, pruned, feeds=x, samples=0, rel_tol=REL_TOL)
    assert not np.allclose(run(model, x[0])[0], run(pruned, x[0])[0], atol=1e-3)  # channel 2 mattered


class ScalarPick(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        torch.manual_seed(0)
        self.axis = axis
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv1d(16, 4, 1) if axis == 2 else nn.Conv1d(3, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.axis == 2:  # one row of the image: channels pass through
            return self.c2(h[:, :, 2])
        return self.c2(torch.stack([h[:, 3], h[:, 1], h[:, 5]], 1).flatten(2))


def test_scalar_gather_on_a_spatial_axis_passes_channels():
    model = export(ScalarPick(2), (1, 3, 6, 6))
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert gathers and constants(model)[gathers[0].input[1]].ndim == 0
    pruned, _ = check(model, 0.5, round_to=1)
    assert constants(pruned)["c1.weight"].shape[0] == 8 and constants(pruned)["c2.weight"].shape[1] == 8


def test_scalar_gather_on_the_channel_axis_is_frozen():
    model = export(ScalarPick(1), (1, 3, 6, 6))
    pruned, report = prune(model, 0.5, round_to=1)
    group = group_of(report.groups, "c1.weight", 0)
    assert group.frozen
    assert any("Gather node" in r and "scalar index picks one channel of axis 1" in r for r in group.reasons)
    assert constants(pruned)["c1.weight"].shape == (16, 3, 3, 3)


def test_gather_with_run_time_indices_is_frozen():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
             helper.make_node("Gather", ["a", "idx"], ["g"], axis=1, name="pick"),
             helper.make_node("Conv", ["g", "w2"], ["y"], name="c2")]
    model = graph_model(nodes, [vi("x", [1, 3, 4, 4]), helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
                        [vi("y", [1, 2, 4, 4])], [init("w1", (8, 3, 1, 1)), init("w2", (2, 4, 1, 1))])
    group = group_of(list_groups(model), "w1", 0)
    assert group.frozen and any("indices on axis 1 are computed at run time" in r for r in group.reasons)


@pytest.mark.slow
def test_gather_nd_from_dynamo_list_indexing():
    module = GatherNet("list")
    model = export(module, (1, 3, 6, 6), dynamo=True)
    assert any(n.op_type == "GatherND" for n in model.graph.node)
    pruned, _ = check(model, 0.5, round_to=1)
    kept_rows = kept_blocks(module.c1.weight.detach().numpy(), constants(pruned)["c1.weight"], 1)
    idx = input_value(pruned, "GatherND", 1)
    kept_positions = [p for p in range(8) if GatherNet.IDX[p] in kept_rows]
    assert idx.shape == (4, 1) and [kept_rows[i] for i in idx[:, 0]] == [GatherNet.IDX[p] for p in kept_positions]


def test_tile_on_the_channel_axis_removes_every_copy():
    """``Tile [1, 3, 1, 1]`` of 8 channels: channel c is copied to 8k + c; repeats stay 3."""
    reps = numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "reps")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1"),
             helper.make_node("HardSigmoid", ["a"], ["h"], name="hs"),
             helper.make_node("Tile", ["h", "reps"], ["t"], name="tile"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="c2")]
    model = graph_model(nodes, [vi("x", ["n", 3, 4, 4])], [vi("y", ["n", 2, 4, 4])],
                        [init("w1", (8, 3, 1, 1), 1), init("b1", (8,), 2), init("w2", (2, 24, 1, 1), 3), reps])
    pruned, _ = check(model, 0.5, round_to=1)
    w1, w2 = constants(model)["w1"], constants(model)["w2"]
    kept = kept_blocks(w1, constants(pruned)["w1"], 1)
    assert len(kept) == 4
    assert np.array_equal(constants(pruned)["w2"], w2[:, [8 * k + c for k in range(3) for c in kept]])
    assert input_value(pruned, "Tile", 1).tolist() == [1, 3, 1, 1]


# ---------------------------------------------------------------------------------------------
# grouped-query attention

D, H, G, HD = 32, 8, 4, 4  # hidden, query heads, key/value groups, head dim
R = H // G


class GQA(nn.Module):
    def __init__(self, repeat: str):
        super().__init__()
        torch.manual_seed(0)
        self.repeat = repeat
        self.q, self.o = nn.Linear(D, H * HD), nn.Linear(H * HD, D)
        self.k, self.v = nn.Linear(D, G * HD), nn.Linear(D, G * HD)

    def rep(self, t):
        if self.repeat == "interleave":
            return t.repeat_interleave(R, dim=1)
        b, g, n, d = t.shape
        return t[:, :, None].expand(b, g, R, n, d).reshape(b, g * R, n, d)

    def forward(self, x, kv_mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, HD).transpose(1, 2)
        k = self.rep(self.k(x).view(b, n, G, HD).transpose(1, 2))
        v = self.rep(self.v(x).view(b, n, G, HD).transpose(1, 2))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), -1)
        y = a @ v
        if kv_mask is not None:  # remove whole KV groups: their r query heads contribute nothing
            y = y * kv_mask.repeat_interleave(R)[None, :, None, None]
        return self.o(y.transpose(1, 2).reshape(b, n, H * HD))


@pytest.mark.parametrize("repeat", ["interleave", "expand"])
@pytest.mark.parametrize("ratio, kept", [(0.3, 3), (0.5, 2)])
def test_gqa_removes_whole_kv_groups_with_their_query_heads(repeat, ratio, kept):
    module = GQA(repeat)
    model = export(module, (1, 5, D))
    assert any(n.op_type in ("Tile", "Expand") for n in model.graph.node)
    # round_to=1: with head_dim 4, round_to 8 would keep only even numbers of KV groups
    pruned, report = check(model, ratio, round_to=1)
    heads = [g for g in report.groups if not g.frozen]
    assert len(heads) == 1 and heads[0].channels == G and heads[0].kept == kept
    wk = module.k.weight.detach().numpy().T
    names = {n.name: n.input[1] for n in pruned.graph.node if n.op_type == "MatMul"}
    w = constants(pruned)
    groups = kept_blocks(wk, w[names["/k/MatMul"]], HD, axis=1)
    assert len(groups) == kept
    assert kept_blocks(module.v.weight.detach().numpy().T, w[names["/v/MatMul"]], HD, axis=1) == groups
    # query heads h with h // r a kept group, and nothing else; Wo loses the same rows
    q_heads = kept_blocks(module.q.weight.detach().numpy().T, w[names["/q/MatMul"]], HD, axis=1)
    assert q_heads == [g * R + i for g in groups for i in range(R)]
    assert kept_blocks(module.o.weight.detach().numpy().T, w[names["/o/MatMul"]], HD, axis=0) == q_heads
    # head counts baked into the Reshape / Expand targets follow: G -> G', H -> G' * r
    targets = sorted([int(v) for v in constants(pruned)[n.input[1]]] for n in pruned.graph.node if n.op_type == "Reshape")
    repeat_target = [1, -1, 5, HD] if repeat == "interleave" else [1, kept * R, 5, HD]
    assert targets == sorted([[1, 5, kept * R, HD], [1, 5, kept, HD], [1, 5, kept, HD], repeat_target, repeat_target,
                              [1, 5, kept * R * HD]])
    if repeat == "expand":
        assert list(input_value(pruned, "Expand", 1)) == [1, kept, R, 5, HD]
    # == the torch block with the removed KV groups' heads masked out
    mask = torch.zeros(G)
    mask[groups] = 1.0
    x = np.random.default_rng(5).standard_normal((1, 5, D)).astype(np.float32)
    with torch.no_grad():
        expect = module(torch.from_numpy(x), mask).numpy()
    got = run(pruned, {"x": x})[0]
    assert np.abs(got - expect).max() <= REL_TOL * float(expect.max() - expect.min())


def test_gqa_with_run_time_batch_and_sequence_length():
    """Dynamic batch and sequence: ``repeat_interleave`` (Tile) reshapes ``[b, G, r, s, D] ->
    [b, H, s, D]`` where ``s`` is the same symbol on both sides, so it cancels and the heads prune;
    ``expand`` leaves the repeat's shape to run time (``[unk, G, unk, unk, D]``): frozen, with the
    node that froze it, weights untouched."""
    model = export(GQA("interleave"), (2, 5, D), dynamic={0: "b", 1: "s"})
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((b, s, D)).astype(np.float32)} for b, s in ((1, 3), (2, 7))]
    pruned, report = check(model, 0.5, feeds=feeds)
    heads = [g for g in report.groups if not g.frozen]
    assert len(heads) == 1 and heads[0].channels == G and heads[0].kept == 2
    model = export(GQA("expand"), (2, 5, D), dynamic={0: "b", 1: "s"})
    pruned, report = prune(model, 0.5)
    assert not report.plan
    names = {n.name: n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    for proj in "kv":
        group = group_of(report.groups, names[f"/{proj}/MatMul"], 1)
        assert group.frozen and any("Expand node" in r and "computed at run time" in r for r in group.reasons)
    heads = group_of(report.groups, names["/q/MatMul"], 1)
    assert heads.frozen and any("Reshape node" in r and "not static" in r for r in heads.reasons), heads.reasons
    assert all(np.array_equal(constants(pruned)[k], v) for k, v in constants(model).items())


@pytest.mark.slow
@pytest.mark.parametrize("repeat", ["interleave", "expand"])
def test_gqa_dynamo(repeat):
    _, report = check(export(GQA(repeat), (1, 5, D), dynamo=True), 0.5)
    heads = [g for g in report.groups if not g.frozen]
    assert len(heads) == 1 and heads[0].channels == G and heads[0].kept == 2


# ---------------------------------------------------------------------------------------------


def test_ratio_zero_is_bit_identical():
    for model in (export(PixelShuffleNet(), (1, 3, 6, 6)), export(GroupNormNet(), (1, 3, 6, 6)),
                  export(GQA("expand"), (1, 5, D)), repeated_gather_model()):
        pruned, report = prune(model, 0.0)
        assert not report.plan
        before, after = constants(model), constants(pruned)
        for name, v in before.items():
            if name in after:
                assert after[name].tobytes() == v.tobytes() and after[name].dtype == v.dtype
        assert {t.name for t in model.graph.initializer} <= set(after)

"""Per-rule tests of the coupled-channel graph on hand-built ONNX graphs (positive and negative).

Each positive case prunes and checks masked equivalence (``masked_reference``, 1e-4 of output
range, full checker) plus the exact sliced shapes; each negative case checks the group is
frozen and the reason names the op and node.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.dependency_graph import (
    RULES,
    build_dependency_graph,
    group_scores,
    kept_count,
    top_k,
)
from onnx_compress.dependency_graph.graph import _components
from onnx_compress.dependency_graph.strategy import host_channel_block, resolve_round_to
from onnx_compress.ir.graph import to_graph
from onnx_compress.prune import list_groups, masked_reference, prune
from tests.numerics import assert_parity

RNG = np.random.default_rng(0)


def w(*shape, name):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def model(nodes, inits, x_shape, y_shape, *, opset=17, x_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def shapes(m):
    out = {t.name: tuple(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = tuple(n.attribute[0].t.dims)
    return out


def value(m, name):
    for t in m.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def prune_and_check(m, ratio=0.3, **kw):
    pruned, report = prune(m, ratio, **kw)
    assert report.plan, [g.reasons for g in report.groups]
    assert_parity(masked_reference(m, report.plan), pruned, rel_tol=1e-4)
    return pruned, report


def conv_pair(mid_nodes, mid_inits=(), c=32, opset=17, last_input="h"):
    """x[1,4,6,6] -> conv a (32) -> mid nodes (read 'a', write 'h') -> conv b (3) -> y."""
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a")]
    nodes += mid_nodes
    nodes += [helper.make_node("Conv", [last_input, "wb"], ["y"], name="conv_b")]
    inits = [w(c, 4, 3, 3, name="wa"), w(c, name="ba"), w(3, c, 1, 1, name="wb"), *mid_inits]
    return model(nodes, inits, (1, 4, 6, 6), (1, 3, 6, 6), opset=opset)


# ---------------------------------------------------------------------------------------------
# positive rules


@pytest.mark.parametrize(
    "op,const_shape,role_name",
    [
        ("Mul", (1, 32, 1, 1), "k"),
        ("Add", (32, 1, 1), "k"),
        ("Sub", (1, 32, 1, 1), "k"),
        ("Div", (1, 32, 1, 1), "k"),  # divisor: masked with 1, never 0 -> no inf/nan
    ],
)
def test_per_channel_constant_is_sliced(op, const_shape, role_name):
    k = numpy_helper.from_array((RNG.random(const_shape) + 0.5).astype(np.float32), "k")
    m = conv_pair([helper.make_node(op, ["a", "k"], ["h"], name="op")], [k])
    pruned, _ = prune_and_check(m)
    assert shapes(pruned)["k"] == tuple(24 if d == 32 else d for d in const_shape)


def test_broadcast_constant_is_exempt_and_untouched():
    k = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "k")
    m = conv_pair([helper.make_node("Mul", ["a", "k"], ["h"], name="op")], [k])
    pruned, report = prune_and_check(m)
    assert shapes(pruned)["k"] == (1, 1, 1, 1)
    assert not any(mm.tensor == "k" for g in report.groups for mm in g.members)


def test_prelu_and_batchnorm_and_hardswish():
    inits = [
        numpy_helper.from_array((RNG.random((32, 1, 1)) * 0.3).astype(np.float32), "slope"),
        numpy_helper.from_array((RNG.random(32) + 0.5).astype(np.float32), "g"),
        numpy_helper.from_array(RNG.standard_normal(32).astype(np.float32), "b"),
        numpy_helper.from_array(RNG.standard_normal(32).astype(np.float32), "mu"),
        numpy_helper.from_array((RNG.random(32) + 0.5).astype(np.float32), "var"),
    ]
    mid = [
        helper.make_node("BatchNormalization", ["a", "g", "b", "mu", "var"], ["n"], name="bn"),
        helper.make_node("PRelu", ["n", "slope"], ["p"], name="prelu"),
        helper.make_node("HardSwish", ["p"], ["h"], name="hs"),
    ]
    pruned, _ = prune_and_check(conv_pair(mid, inits))
    s = shapes(pruned)
    assert s["slope"] == (24, 1, 1) and s["g"] == s["var"] == (24,) and s["wb"] == (3, 24, 1, 1)


def test_constant_node_weights_are_sliced():
    """paddle2onnx style: weights are Constant-node outputs, no initializers."""
    def const(name, shape):
        return helper.make_node("Constant", [], [name], name=f"{name}_const",
                                value=numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name))
    nodes = [const("wa", (32, 4, 3, 3)), const("ba", (32,)), const("wb", (3, 32, 1, 1)),
             helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Relu", ["a"], ["h"], name="relu"),
             helper.make_node("Conv", ["h", "wb"], ["y"], name="conv_b")]
    m = model(nodes, [], (1, 4, 6, 6), (1, 3, 6, 6))
    pruned, _ = prune_and_check(m)
    s = shapes(pruned)
    assert s["wa"] == (24, 4, 3, 3) and s["ba"] == (24,) and s["wb"] == (3, 24, 1, 1)
    assert not pruned.graph.initializer


def test_depthwise_with_channel_multiplier():
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["a", "wd", "bd"], ["d"], group=16, pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Relu", ["d"], ["h"], name="relu"),
             helper.make_node("Conv", ["h", "wb"], ["y"], name="conv_b")]
    inits = [w(16, 4, 1, 1, name="wa"), w(32, 1, 3, 3, name="wd"), w(32, name="bd"), w(3, 32, 1, 1, name="wb")]
    m = model(nodes, inits, (1, 4, 6, 6), (1, 3, 6, 6))
    groups = [g for g in list_groups(m) if not g.frozen]
    assert len(groups) == 1 and groups[0].channels == 16  # in channel k + its 2 outputs = 1 atom
    pruned, _ = prune_and_check(m)
    s = shapes(pruned)
    assert s["wa"][0] == 8 and s["wd"] == (16, 1, 3, 3) and s["wb"] == (3, 16, 1, 1)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 8


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_either_way(trans_b):
    w1 = numpy_helper.from_array(RNG.standard_normal((10, 32) if not trans_b else (32, 10)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(RNG.standard_normal((32, 5) if not trans_b else (5, 32)).astype(np.float32), "w2")
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], transB=trans_b, name="fc1"),
             helper.make_node("Tanh", ["a"], ["h"], name="tanh"),
             helper.make_node("Gemm", ["h", "w2"], ["y"], transB=trans_b, name="fc2")]
    m = model(nodes, [w1, w2, w(32, name="b1")], (2, 10), (2, 5))
    pruned, _ = prune_and_check(m)
    s = shapes(pruned)
    assert s["w1"] == ((10, 24) if not trans_b else (24, 10))
    assert s["w2"] == ((24, 5) if not trans_b else (5, 24)) and s["b1"] == (24,)


def test_matmul_with_constant_weight_on_3d_input():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Add", ["a", "b1"], ["ab"], name="bias"),
             helper.make_node("Relu", ["ab"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")]
    m = model(nodes, [w(8, 32, name="w1"), w(32, name="b1"), w(32, 6, name="w2")], (2, 5, 8), (2, 5, 6))
    pruned, _ = prune_and_check(m)
    s = shapes(pruned)
    assert s["w1"] == (8, 24) and s["b1"] == (24,) and s["w2"] == (24, 6)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_sizes_rewritten(opset):
    split = np.array([12, 20], np.int64)
    if opset >= 13:
        sp = [helper.make_node("Split", ["a", "sizes"], ["s0", "s1"], axis=1, name="split")]
        inits = [numpy_helper.from_array(split, "sizes")]
    else:
        sp = [helper.make_node("Split", ["a"], ["s0", "s1"], axis=1, split=split.tolist(), name="split")]
        inits = []
    mid = sp + [helper.make_node("Relu", ["s1"], ["r1"], name="r"),
                helper.make_node("Concat", ["r1", "s0"], ["h"], axis=1, name="cat")]
    m = conv_pair(mid, inits, opset=opset)
    pruned, report = prune_and_check(m)
    node = next(n for n in pruned.graph.node if n.op_type == "Split")
    if opset >= 13:
        sizes = value(pruned, node.input[1]).tolist()
    else:
        sizes = list(next(a for a in node.attribute if a.name == "split").ints)
    assert sizes == [8, 16]  # 12 -> 8.4 -> 8 (no rounding below 16); 20 -> 14 -> 16 (multiple of 8)
    assert shapes(pruned)["wa"][0] == 24 and shapes(pruned)["wb"][1] == 24


def test_slice_starts_ends_rewritten():
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
             (("st", 8), ("en", 32), ("ax", 1))]
    mid = [helper.make_node("Slice", ["a", "st", "en", "ax"], ["h"], name="slice")]
    m = conv_pair(mid, inits, c=32, last_input="h")
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "wb"))
    m.graph.initializer.append(w(3, 24, 1, 1, name="wb"))
    pruned, report = prune_and_check(m)
    sl = next(n for n in pruned.graph.node if n.op_type == "Slice")
    start, end = int(value(pruned, sl.input[1])[0]), int(value(pruned, sl.input[2])[0])
    assert end - start == shapes(pruned)["wb"][1]
    # channels 0..7 of conv_a reach nothing: they form their own group and are pruned too
    assert shapes(pruned)["wa"][0] < 32


def test_transpose_to_matmul_is_followed():
    """NCHW -> NHWC then a Linear layer on the channel axis: the permutation is exact."""
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1], name="tr"),
             helper.make_node("MatMul", ["t", "wl"], ["y"], name="fc")]
    m = model(nodes, [w(32, 4, 1, 1, name="wa"), w(32, name="ba"), w(32, 5, name="wl")], (1, 4, 3, 3), (1, 3, 3, 5))
    pruned, _ = prune_and_check(m)
    assert shapes(pruned)["wl"] == (24, 5)


# ---------------------------------------------------------------------------------------------
# barriers (negative cases)


def _frozen_group_of(m, tensor, axis=0):
    return next(g for g in list_groups(m) if any(mm.tensor == tensor and mm.axis == axis for mm in g.members))


def test_unknown_op_is_a_barrier_naming_op_and_node():
    mid = [helper.make_node("LRN", ["a"], ["h"], size=3, name="lrn_1")]  # mixes channels
    m = conv_pair(mid)
    g = _frozen_group_of(m, "wa")
    assert g.frozen and any("LRN node 'lrn_1'" in r and "no channel rule" in r for r in g.reasons)
    pruned, report = prune(m, 0.5)
    assert shapes(pruned)["wa"] == (32, 4, 3, 3) and not report.plan


def test_reshape_that_mixes_channels_is_a_barrier():
    # [1, 32, 6, 6] -> [1, 6, 192]: a row of 192 holds 5.33 channels, no channel maps whole
    shape = numpy_helper.from_array(np.array([1, 6, 192], np.int64), "shp")
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["a", "shp"], ["y"], name="reshape_1")]
    m = model(nodes, [w(32, 4, 3, 3, name="wa"), shape], (1, 4, 6, 6), (1, 6, 192))
    g = _frozen_group_of(m, "wa")
    assert any("Reshape node 'reshape_1'" in r and "straddles" in r for r in g.reasons), g.reasons


def test_maxpool_indices_used_is_a_barrier():
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("MaxPool", ["a"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Cast", ["idx"], ["fi"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Add", ["p", "fi"], ["h"], name="add"),
             helper.make_node("Conv", ["h", "wb"], ["y"], name="conv_b")]
    m = model(nodes, [w(32, 4, 1, 1, name="wa"), w(3, 32, 1, 1, name="wb")], (1, 4, 6, 6), (1, 3, 3, 3))
    g = _frozen_group_of(m, "wa")
    assert g.frozen and any("Indices output is used" in r for r in g.reasons)


def test_graph_input_and_output_are_barriers():
    groups = list_groups(conv_pair([helper.make_node("Relu", ["a"], ["h"])]))
    inp = next(g for g in groups if any(m.tensor == "x" for m in g.members))
    out = next(g for g in groups if any(m.tensor == "y" for m in g.members))
    assert inp.frozen and "graph input 'x'" in inp.reasons
    assert out.frozen and "graph output 'y'" in out.reasons


def test_channel_axis_softmax_is_a_barrier_but_spatial_reduce_is_not():
    mid = [helper.make_node("Softmax", ["a"], ["h"], axis=1, name="sm")]
    g = _frozen_group_of(conv_pair(mid), "wa")
    assert any("Softmax node 'sm': normalised axis 1" in r for r in g.reasons)
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
             helper.make_node("ReduceMean", ["a", "axes"], ["r"], keepdims=0, name="gap"),
             helper.make_node("Gemm", ["r", "wl"], ["y"], transB=1, name="fc")]
    m = model(nodes, [w(32, 4, 1, 1, name="wa"), w(32, name="ba"), w(5, 32, name="wl"), axes],
              (1, 4, 3, 3), (1, 5), opset=18)
    pruned, _ = prune_and_check(m)
    assert shapes(pruned)["wl"] == (5, 24)


# ---------------------------------------------------------------------------------------------
# building blocks


def test_union_find_components():
    labels = _components(6, np.array([0, 2, 4]), np.array([1, 3, 2]))
    assert labels.tolist() == [0, 0, 2, 2, 2, 5]
    chain = _components(1000, np.arange(999), np.arange(1, 1000))
    assert (chain == 0).all()


@pytest.mark.parametrize(
    "channels,ratio,round_to,expected",
    [(64, 0.3, 8, 48), (24, 0.3, 8, 16), (16, 0.3, 8, 8), (12, 0.3, 8, 8), (3, 0.9, 8, 1),
     (2, 0.99, 1, 1), (100, 0.0, 8, 100), (16, 0.5, 1, 8),
     # a multiple of round_to or all channels, whichever is nearer: 10.8 -> 12 (not 8), 37.8 -> 40
     (12, 0.1, 8, 12), (42, 0.1, 8, 40), (42, 0.01, 8, 42),
     # a group of exactly round_to channels stays whole; fewer than round_to: unrounded
     (8, 0.3, 8, 8), (16, 0.3, 16, 16), (7, 0.3, 8, 5),
     # AVX-512 blocks: 24 -> 16.8 -> 16, 32 -> 22.4 -> 16, 96 -> 67.2 -> 64
     (24, 0.3, 16, 16), (32, 0.3, 16, 16), (96, 0.3, 16, 64)],
)
def test_kept_count(channels, ratio, round_to, expected):
    assert kept_count(channels, ratio, round_to) == expected


def test_resolve_round_to():
    assert resolve_round_to(8) == 8 and resolve_round_to(np.int64(16)) == 16
    assert resolve_round_to("auto") == host_channel_block() in (8, 16)
    for bad in (0, -8, 2.5, "16", True, None):
        with pytest.raises(ValueError, match="round_to must be"):
            resolve_round_to(bad)
    with pytest.raises(ValueError, match="round_to must be"):
        prune(model([helper.make_node("Relu", ["x"], ["y"])], [], (1, 2), (1, 2)), 0.3, round_to=0)


def test_kept_count_rejects_bad_ratio():
    with pytest.raises(ValueError):
        kept_count(8, 1.0)


def test_top_k_prefers_high_scores_and_low_index_on_ties():
    assert top_k(np.array([1.0, 3.0, 3.0, 0.5, 2.0]), 3).tolist() == [1, 2, 4]


def test_l1_importance_is_group_summed_and_normalised():
    m = conv_pair([helper.make_node("Relu", ["a"], ["h"])])
    g = build_dependency_graph(to_graph(onnx.shape_inference.infer_shapes(m)))
    group = next(gr for gr in g.prunable if any(mm.tensor == "wa" for mm in gr.members))
    wa, wb = value(m, "wa").astype(np.float64), value(m, "wb").astype(np.float64)
    sa = np.abs(wa).reshape(32, -1).sum(1)
    sb = np.abs(wb).transpose(1, 0, 2, 3).reshape(32, -1).sum(1)
    expected = sa / sa.mean() + sb / sb.mean()  # bias is not a weight member
    np.testing.assert_allclose(group_scores(group, "l1"), expected, rtol=1e-9)
    r1, r2 = group_scores(group, "random", seed=1), group_scores(group, "random", seed=1)
    assert np.array_equal(r1, r2) and not np.array_equal(r1, group_scores(group, "random", seed=2))


def test_registry_is_a_plain_dict_of_rules():
    assert isinstance(RULES, dict)
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Concat", "Split",
               "Slice", "Flatten", "Add", "PRelu", "GlobalAveragePool"):
        assert op in RULES
    for op in ("DepthToSpace", "SpaceToDepth", "GroupNormalization", "Gather", "GatherND", "Expand", "Tile"):
        assert op in RULES  # tests/test_pruning_rules_more.py
    for op in ("LRN", "GatherElements", "ScatterND"):
        assert op not in RULES  # fail closed until a rule is written

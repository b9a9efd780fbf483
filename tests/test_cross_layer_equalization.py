"""CrossLayerEqualizationPass: exact in float, ranges equalized, non-homogeneous pairs declined."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes.cross_layer_equalization import CrossLayerEqualizationPass
from tests.numerics import assert_parity, op_count


def _w(rng, shape, spread=True):
    w = rng.normal(size=shape).astype(np.float32)
    if spread:  # output channels with ranges over three orders of magnitude
        w *= np.logspace(-1.5, 1.5, shape[0]).astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    return w


def _model(acts=("Relu", "Relu"), group2=8, c=8, seed=0, share=False):
    """x -> Conv(3->c, 3x3) -> act0 -> Conv(c->c, group2) -> act1 -> Conv(c->6, 1x1) -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_w(rng, (c, 3, 3, 3)), "w1"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b1"),
        numpy_helper.from_array(_w(rng, (c, c // group2, 3, 3)), "w2"),
        numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b2"),
        numpy_helper.from_array(_w(rng, (6, c, 1, 1)), "w3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1])]

    def act(kind, src, dst, name):
        if kind is None:
            return [helper.make_node("Identity", [src], [dst], name=name)]
        if kind == "Clip":
            return [helper.make_node("Clip", [src, "lo", "hi"], [dst], name=name)]
        return [helper.make_node(kind, [src], [dst], name=name)]

    nodes += act(acts[0], "y1", "a1", "act1")
    nodes.append(helper.make_node("Conv", ["a1", "w2", "b2"], ["y2"], name="conv2", pads=[1, 1, 1, 1], group=group2))
    nodes += act(acts[1], "y2", "a2", "act2")
    nodes.append(helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 10, 10])]
    if share:  # w1 is also read by a second Conv
        nodes.append(helper.make_node("Conv", ["x", "w1"], ["z"], name="conv1b", pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 10, 10]))
    graph = helper.make_graph(nodes, "cle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = _drop_identity(model)
    onnx.checker.check_model(model)
    return model


def _drop_identity(model):
    from onnx_compress.passes.eliminate_noop import EliminateNoOpPass

    return EliminateNoOpPass()(model)


def _weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def _in_ranges(w, group):
    o, i = w.shape[:2]
    view = np.abs(w).reshape(group, o // group, i, -1)
    return view.max(axis=(1, 3)).reshape(-1)


def test_depthwise_chain_is_exact_and_equalized():
    model = _model(("Relu", "Relu"), group2=8)
    result = CrossLayerEqualizationPass().call(to_graph(model))
    out = to_model(result.graph, like=model)
    assert result.modified and result.changes == 2  # conv1->dw, dw->conv3
    assert_parity(model, out, rel_tol=1e-5)
    before, after = _weights(model), _weights(out)
    assert op_count(out, "Conv") == 3 and op_count(out, "Relu") == 2
    # structure: at the fixed point every channel's range is the same on both sides of each pair
    # (conv1 rows = depthwise rows = conv3 columns), and the weights did change
    r1 = np.abs(after["conv1"]).reshape(8, -1).max(1)
    r_dw = _in_ranges(after["conv2"], 8)
    np.testing.assert_allclose(r1, r_dw, rtol=1e-3)
    np.testing.assert_allclose(r_dw, _in_ranges(after["conv3"], 1), rtol=1e-3)
    assert not np.allclose(r1, np.abs(before["conv1"]).reshape(8, -1).max(1), rtol=0.1)


def test_grouped_and_plain_pairs_are_exact():
    for group2 in (1, 2):
        model = _model((None, "Relu"), group2=group2, seed=group2)
        result = CrossLayerEqualizationPass().call(to_graph(model))
        out = to_model(result.graph, like=model)
        assert result.changes == 2
        assert not np.allclose(_weights(model)["conv2"], _weights(out)["conv2"])
        assert_parity(model, out, rel_tol=1e-5)


def test_relu6_pair_is_declined_and_left_exactly_as_it_was():
    model = _model(("Clip", "Relu"), group2=8)
    result = CrossLayerEqualizationPass().call(to_graph(model))
    out = to_model(result.graph, like=model)
    assert ("conv1", "Clip upper bound does not scale per channel") in result.declined
    assert result.changes == 1  # only dw -> conv3 through Relu
    np.testing.assert_array_equal(_weights(out)["conv1"], _weights(model)["conv1"])
    assert op_count(out, "Clip") == 1
    assert_parity(model, out, rel_tol=1e-5)


def test_relu6_to_relu_opt_in_rewrites_the_clip():
    model = _model(("Clip", "Clip"), group2=8)
    result = CrossLayerEqualizationPass(relu6_to_relu=True).call(to_graph(model))
    out = to_model(result.graph, like=model)
    assert result.changes == 2
    assert op_count(out, "Clip") == 0 and op_count(out, "Relu") == 2
    onnx.checker.check_model(out, full_check=True)


def test_shared_weight_is_declined():
    model = _model(("Relu", "Relu"), group2=8, share=True)
    result = CrossLayerEqualizationPass().call(to_graph(model))
    out = to_model(result.graph, like=model)
    assert ("conv1", "weight is shared with other nodes") in result.declined
    np.testing.assert_array_equal(_weights(out)["conv1"], _weights(model)["conv1"])
    assert result.changes == 1  # dw -> conv3 only
    assert_parity(model, out, rel_tol=1e-5)

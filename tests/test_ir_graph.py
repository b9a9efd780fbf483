"""ir.graph: ``to_graph``/``to_model`` lose nothing, and the small helpers do what they say."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.graph import (
    bypass_node,
    constant_value,
    consumers,
    is_graph_output,
    make_constant,
    producer,
    rank,
    static_shape,
    to_graph,
    to_model,
    unique_name,
)
from tests.numerics import assert_parity, run


def _rich_model() -> onnx.ModelProto:
    """A model carrying every field graphsurgeon alone would drop."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, None, "width"])
    x.type.tensor_type.shape.dim[2].Clear()  # an unknown dimension: neither value nor name
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 4, None, "width"])
    y.type.tensor_type.shape.dim[2].Clear()
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    conv = helper.make_node("Conv", ["image", "w"], ["c"], name="conv", doc_string="pointwise conv")
    relu = helper.make_node("Relu", ["c"], ["score"], name="relu", doc_string="activation")
    relu.metadata_props.add(key="origin", value="layer3.act")
    graph = helper.make_graph([conv, relu], "rich_graph", [x], [y], initializer=[w], doc_string="graph doc")
    graph.metadata_props.add(key="graph-key", value="graph-value")
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
        producer_name="pytorch",
        producer_version="2.13.0",
        domain="org.example",
        model_version=42,
        doc_string="model doc",
    )
    model.ir_version = 9
    helper.set_model_props(model, {"character": "a\nb\nc", "classes": "cat,dog"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    return to_model(to_graph(model), like=model)


def test_round_trip_keeps_model_level_fields():
    model = _rich_model()
    out = _round_trip(model)
    assert [(p.key, p.value) for p in out.metadata_props] == [(p.key, p.value) for p in model.metadata_props]
    assert out.doc_string == "model doc"
    assert out.graph.doc_string == "graph doc"
    assert out.graph.name == "rich_graph"
    assert [(p.key, p.value) for p in out.graph.metadata_props] == [("graph-key", "graph-value")]
    assert (out.producer_name, out.producer_version) == ("pytorch", "2.13.0")
    assert out.domain == "org.example" and out.model_version == 42
    assert out.ir_version == 9
    # ai.onnx.ml is imported though no node uses it
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17), ("ai.onnx.ml", 3)]
    onnx.checker.check_model(out, full_check=True)


def test_round_trip_keeps_node_doc_strings_and_metadata():
    out = _round_trip(_rich_model())
    nodes = {n.name: n for n in out.graph.node}
    assert nodes["conv"].doc_string == "pointwise conv"
    assert nodes["relu"].doc_string == "activation"
    assert [(p.key, p.value) for p in nodes["relu"].metadata_props] == [("origin", "layer3.act")]


def test_round_trip_keeps_names_and_dynamic_dims():
    model = _rich_model()
    out = _round_trip(model)
    assert [i.name for i in out.graph.input] == ["image"]
    assert [o.name for o in out.graph.output] == ["score"]
    for before, after in ((model.graph.input[0], out.graph.input[0]), (model.graph.output[0], out.graph.output[0])):
        dims_before = [(d.HasField("dim_value"), d.dim_value, d.dim_param) for d in before.type.tensor_type.shape.dim]
        dims_after = [(d.HasField("dim_value"), d.dim_value, d.dim_param) for d in after.type.tensor_type.shape.dim]
        assert dims_after == dims_before
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[3].dim_param == "width"
    assert not dims[2].HasField("dim_value") and not dims[2].HasField("dim_param")
    assert_parity(model, out, input_shapes={"image": (2, 3, 5, 7)})


def test_constant_node_weights_survive_and_are_readable():
    """paddle2onnx style: every weight is a Constant node, there are no initializers."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b_value")),
        helper.make_node("Constant", [], ["alpha"], value_float=0.1),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c"], ["y"], alpha=0.1),
    ]
    graph = helper.make_graph(
        nodes, "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    assert len(model.graph.initializer) == 0
    g = to_graph(model)
    conv = next(n for n in g.nodes if n.op == "Conv")
    np.testing.assert_array_equal(constant_value(conv.inputs[1]), w)
    np.testing.assert_array_equal(constant_value(conv.inputs[2]), b)
    alpha = next(t for t in g.tensors().values() if t.name == "alpha")
    assert constant_value(alpha).dtype == np.float32 and float(constant_value(alpha)) == pytest.approx(0.1)
    assert constant_value(conv.inputs[0]) is None  # a graph input is never a constant
    out = to_model(g, like=model)
    assert len(out.graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in out.graph.node) == 3
    assert_parity(model, out)


def test_sparse_initializer_survives():
    values = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "w_indices")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out = _round_trip(model)
    assert len(out.graph.sparse_initializer) == 1
    assert out.graph.sparse_initializer[0] == model.graph.sparse_initializer[0]
    onnx.checker.check_model(out)


def test_overridable_input_with_default_stays_an_input():
    """IR >= 4: an input that also has an initializer may be fed; it is not a weight."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    g = to_graph(model)
    mul = g.nodes[0]
    assert constant_value(mul.inputs[1]) is None
    assert [t.name for t in g.inputs] == ["x", "scale"]
    out = to_model(g, like=model)
    assert [i.name for i in out.graph.input] == ["x", "scale"]
    assert [t.name for t in out.graph.initializer] == ["scale"]
    x = np.array([1.0, 1.0], np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], [2.0, 3.0])
    np.testing.assert_array_equal(run(out, {"x": x, "scale": np.array([5.0, 7.0], np.float32)})[0], [5.0, 7.0])


def test_ir3_initializers_as_inputs_round_trip_to_valid_model():
    model = onnx.ModelProto()
    model.CopyFrom(_rich_model())
    del model.opset_import[1:]
    model.opset_import[0].version = 9
    model.ir_version = 3
    del model.graph.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 1, 1]))
    onnx.checker.check_model(model)
    out = _round_trip(model)
    assert out.ir_version >= 4
    assert [i.name for i in out.graph.input] == ["image"]
    onnx.checker.check_model(out)
    assert_parity(model, out, input_shapes={"image": (1, 3, 4, 4)})


def test_helpers_on_a_small_graph():
    x = gs.Variable("x", dtype=np.float32, shape=(1, 4))
    mid = gs.Variable("mid", dtype=np.float32, shape=(1, 4))
    y = gs.Variable("y", dtype=np.float32, shape=(1, 4))
    ident = gs.Node("Identity", "ident", inputs=[x], outputs=[mid])
    relu = gs.Node("Relu", "relu", inputs=[mid], outputs=[y])
    graph = gs.Graph(nodes=[ident, relu], inputs=[x], outputs=[y], opset=13)
    assert producer(mid) is ident and producer(x) is None
    assert consumers(mid) == [relu]
    assert is_graph_output(graph, y) and not is_graph_output(graph, mid)
    assert static_shape(x) == (1, 4) and rank(x) == 2
    assert static_shape(gs.Variable("d", dtype=np.float32, shape=("N", 4))) is None
    assert unique_name(graph, "relu") == "relu_1" and unique_name(graph, "fresh") == "fresh"
    c = make_constant(graph, "mid", np.ones(3, np.float32))
    assert c.name == "mid_1" and constant_value(c).tolist() == [1.0, 1.0, 1.0]
    assert bypass_node(graph, ident, x) is None
    assert relu.inputs[0] is x
    # the output of the last node is a graph output and its input is a graph input: refused
    assert bypass_node(graph, relu, x) is not None

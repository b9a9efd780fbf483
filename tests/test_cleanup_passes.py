"""The clean-up passes: constant folding (size limit, non-deterministic and sequence ops left alone),
no-op elimination (positive and negative cases) and dead-node / unused-initializer removal.
Each positive case checks parity in ONNX Runtime and the structure it promises."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes import EliminateNoOpPass, FoldConstantsPass, RemoveDeadNodesPass
from tests.numerics import assert_parity, op_count


def _model(nodes, inputs, outputs, inits=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _apply(pass_, model):
    graph = to_graph(onnx.shape_inference.infer_shapes(model))  # as the pipeline does
    result = pass_.call(graph)
    return result, to_model(result.graph, like=model)


# ---------------------------------------------------------------------------------------------
# constant folding


def test_fold_constants_folds_weight_arithmetic_and_static_shapes():
    nodes = [
        helper.make_node("Constant", [], ["two"], value=_const("v", np.float32(2.0))),
        helper.make_node("Mul", ["w", "two"], ["w2"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["xr"]),
        helper.make_node("Add", ["xr", "w2"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_const("w", np.arange(3, dtype=np.float32))])
    result, out = _apply(FoldConstantsPass(), model)
    assert result.modified and result.changes >= 2
    assert op_count(out, "Mul") == op_count(out, "Shape") == op_count(out, "Constant") == 0
    assert_parity(model, out)


def test_fold_constants_respects_the_size_limit():
    """A 1 MiB ConstantOfShape result that would have to be stored is not materialised."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=_const("v", np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [512, 512])], [_vi("y", [512, 512])],
                   [_const("shape", np.array([512, 512], np.int64))])
    _, limited = _apply(FoldConstantsPass(size_limit_bytes=1 << 16), model)
    assert op_count(limited, "ConstantOfShape") == 1
    assert all(np.prod(t.dims) < 512 * 512 for t in limited.graph.initializer)
    assert_parity(model, limited)
    _, unlimited = _apply(FoldConstantsPass(size_limit_bytes=8 << 20), model)
    assert op_count(unlimited, "ConstantOfShape") == 0
    assert any(list(t.dims) == [512, 512] for t in unlimited.graph.initializer)
    assert_parity(model, unlimited)


def test_fold_constants_never_folds_random_ops():
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[3], seed=1.0), helper.make_node("Add", ["x", "r"], ["y"])]
    model = _model(nodes, [_vi("x", [3])], [_vi("y", [3])])
    result, out = _apply(FoldConstantsPass(), model)
    assert op_count(out, "RandomNormal") == 1 and not result.modified


def test_fold_constants_leaves_sequence_ops_alone(capsys):
    """Regression: SequenceEmpty has no inputs; folding it sent graphsurgeon into endless recursion."""
    nodes = [
        helper.make_node("SequenceEmpty", [], ["seq0"], dtype=TensorProto.FLOAT),
        helper.make_node("SequenceInsert", ["seq0", "x"], ["seq1"]),
        helper.make_node("SequenceAt", ["seq1", "pos"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [2])], [_vi("y", [2])], [_const("pos", np.array(0, np.int64))])
    result, out = _apply(FoldConstantsPass(), model)
    assert op_count(out, "SequenceEmpty") == 1 and op_count(out, "SequenceAt") == 1
    assert_parity(model, out)
    assert capsys.readouterr().out == ""  # graphsurgeon's warnings are not printed


def test_fold_constants_honours_shape_start_and_end():
    """Regression: graphsurgeon folded Shape(x, start, end) to the whole shape of x."""
    nodes = [
        helper.make_node("Shape", ["x"], ["hw"], start=-2),
        helper.make_node("Shape", ["x"], ["c"], start=1, end=2),
        helper.make_node("Concat", ["c", "hw"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", [1, 2, 3, 4])], [_vi("y", [2, 3, 4])], opset=15)
    result, out = _apply(FoldConstantsPass(), model)
    assert result.modified and op_count(out, "Shape") == 0
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert_parity(model, out)


# ---------------------------------------------------------------------------------------------
# no-op elimination


def _noop_model(node, extra_inits=(), x_shape=(2, 3), x_type=TensorProto.FLOAT, y_shape=None):
    nodes = [helper.make_node("Relu", ["x"], ["a"]) if x_type == TensorProto.FLOAT else
             helper.make_node("Abs", ["x"], ["a"]), node, helper.make_node("Neg", ["b"], ["y"])]
    return _model(nodes, [_vi("x", list(x_shape), x_type)], [_vi("y", list(y_shape or x_shape), x_type)], extra_inits)


@pytest.mark.parametrize(
    "node, inits",
    [
        (helper.make_node("Identity", ["a"], ["b"]), ()),
        (helper.make_node("Dropout", ["a"], ["b"]), ()),
        (helper.make_node("Add", ["a", "zero"], ["b"]), (_const("zero", np.float32(0)),)),
        (helper.make_node("Add", ["zero", "a"], ["b"]), (_const("zero", np.zeros((1, 1), np.float32)),)),
        (helper.make_node("Sub", ["a", "zero"], ["b"]), (_const("zero", np.float32(0)),)),
        (helper.make_node("Mul", ["one", "a"], ["b"]), (_const("one", np.float32(1)),)),
        (helper.make_node("Div", ["a", "one"], ["b"]), (_const("one", np.ones(1, np.float32)),)),
        (helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT), ()),
        (helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1]), ()),
        (helper.make_node("Reshape", ["a", "shape"], ["b"]), (_const("shape", np.array([2, -1], np.int64)),)),
    ],
    ids=["identity", "dropout", "add0", "0add-rank2", "sub0", "1mul", "div1", "cast-same", "transpose-id", "reshape-same"],
)
def test_noops_are_removed(node, inits):
    model = _noop_model(node, inits)
    result, out = _apply(EliminateNoOpPass(), model)
    assert result.modified
    assert [n.op_type for n in out.graph.node] == ["Relu", "Neg"]
    assert_parity(model, out)


@pytest.mark.parametrize(
    "node, inits, why",
    [
        (helper.make_node("Add", ["a", "zero"], ["b"]), (_const("zero", np.zeros((1, 1, 1), np.float32)),),
         "broadcasts to a higher rank"),
        (helper.make_node("Sub", ["zero", "a"], ["b"]), (_const("zero", np.float32(0)),), "0 - x is not x"),
        (helper.make_node("Div", ["one", "a"], ["b"]), (_const("one", np.float32(1)),), "1 / x is not x"),
        (helper.make_node("Mul", ["a", "one"], ["b"]), (_const("one", np.float32(1.5)),), "not 1"),
        (helper.make_node("Add", ["a", "zero"], ["b"]), (_const("zero", np.zeros(3, np.float32)),), "not one element"),
        (helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]), (), "a real transpose"),
        (helper.make_node("Dropout", ["a", "ratio", "train"], ["b"]),
         (_const("ratio", np.float32(0.0)), _const("train", np.array(True))), "training mode"),
    ],
)
def test_non_noops_are_kept(node, inits, why):
    y_shape = (3, 2) if node.op_type == "Transpose" else ((1, 2, 3) if why == "broadcasts to a higher rank" else None)
    model = _noop_model(node, inits, y_shape=y_shape)
    result, out = _apply(EliminateNoOpPass(), model)
    assert not result.modified, why
    assert len(out.graph.node) == 3
    assert_parity(model, out)


def test_cast_to_another_type_is_kept():
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT32), helper.make_node("Abs", ["c"], ["y"])]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4], TensorProto.INT32)])
    result, _ = _apply(EliminateNoOpPass(), model)
    assert not result.modified


def test_dropout_with_used_mask_is_kept():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Relu", ["d"], ["y"])]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4]), _vi("mask", [4], TensorProto.BOOL)])
    result, out = _apply(EliminateNoOpPass(), model)
    assert not result.modified and op_count(out, "Dropout") == 1
    assert [o.name for o in out.graph.output] == ["y", "mask"]


def test_identity_writing_a_graph_output_keeps_the_output_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    model = _model(nodes, [_vi("x", [4])], [_vi("y", [4])])
    result, out = _apply(EliminateNoOpPass(), model)
    assert result.modified and [n.op_type for n in out.graph.node] == ["Relu"]
    assert out.graph.node[0].output[0] == "y" and out.graph.output[0].name == "y"
    assert_parity(model, out)


def test_identity_from_graph_input_to_graph_output_is_kept():
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])])
    result, out = _apply(EliminateNoOpPass(), model)
    assert not result.modified and op_count(out, "Identity") == 1
    assert [reason for _, reason in result.declined] == ["output is a graph output and its input cannot be renamed"]


# ---------------------------------------------------------------------------------------------
# dead nodes


def test_dead_nodes_and_unused_initializers_are_removed_inputs_kept():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="live"),
        helper.make_node("Mul", ["x", "w_dead"], ["dead1"], name="dead1"),
        helper.make_node("Neg", ["dead1"], ["dead2"], name="dead2"),
    ]
    inits = [_const("w_dead", np.ones(4, np.float32)), _const("unused", np.ones(8, np.float32))]
    model = _model(nodes, [_vi("x", [4]), _vi("spare", [1])], [_vi("y", [4])], inits)
    result, out = _apply(RemoveDeadNodesPass(), model)
    assert result.modified and result.changes >= 3  # two nodes and the weight only they read
    assert [n.name for n in out.graph.node] == ["live"]
    assert len(out.graph.initializer) == 0
    assert [i.name for i in out.graph.input] == ["x", "spare"]  # the interface is kept
    assert_parity(model, out)
    again = RemoveDeadNodesPass().call(to_graph(out))
    assert not again.modified and again.changes == 0

"""BatchNormToMulAddPass: a BN with constant statistics becomes Mul(x, S) + Add(., T)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_compress
from onnx_compress.passes import BatchNormToMulAddPass
from tests.numerics import assert_parity, constant_arrays as _constants, op_count
from tests.test_fold_batchnorm import Builder, assert_declined, ops, run_pass


@pytest.mark.parametrize("shape", [[2, 5], [2, 5, 7], [1, 5, 4, 6], [1, 5, 2, 3, 4]])
def test_bn_after_relu_becomes_mul_add(shape):
    b = Builder(len(shape))
    b.node("Relu", ["x"], "r")
    b.bn("r", 5, "y")
    b.node("Sigmoid", ["y"], "out")
    model = onnx.shape_inference.infer_shapes(b.model([("x", shape)], [("out", None)]))
    out, result = run_pass(BatchNormToMulAddPass(), model)
    assert result.changes == 1
    assert ops(out) == ["Relu", "Mul", "Add", "Sigmoid"]
    consts = _constants(out)
    mul, add = out.graph.node[1], out.graph.node[2]
    expected = (5,) + (1,) * (len(shape) - 2)
    assert consts[mul.input[1]].shape == expected and consts[add.input[1]].shape == expected
    assert consts[mul.input[1]].dtype == np.float32
    assert add.output[0] == "y"
    assert_parity(model, out, rel_tol=1e-5)


def test_graph_output_name_and_dynamic_batch_kept():
    b = Builder(10)
    b.node("Relu", ["x"], "r")
    b.bn("r", 3, "y")
    model = b.model([("x", ["N", 3, 4, 4])], [("y", ["N", 3, 4, 4])])
    out = BatchNormToMulAddPass()(model)  # rank of r is unknown, but BN's output declares it
    assert ops(out) == ["Relu", "Mul", "Add"]
    assert out.graph.output[0].name == "y" and out.graph.node[-1].output[0] == "y"
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 3, 4, 4)).astype(np.float32)} for n in (1, 4)]
    assert_parity(model, out, feeds=feeds, samples=0, rel_tol=1e-5)


def test_bn_on_graph_input():
    b = Builder(11)
    b.bn("x", 4, "y")
    model = b.model([("x", [2, 4, 3])], [("y", None)])
    out = BatchNormToMulAddPass()(model)
    assert ops(out) == ["Mul", "Add"]
    assert_parity(model, out, rel_tol=1e-5)


def test_unknown_rank_declined():
    b = Builder(12)
    b.node("Relu", ["x"], "r")
    b.bn("r", 3, "y")
    b.node("Relu", ["y"], "out")
    model = b.model([("x", [1, 3, 4, 4])], [("out", None)])
    out, result = run_pass(BatchNormToMulAddPass(), model)  # no value_info for r or y
    assert_declined(out, result, "rank is unknown")
    assert ops(out) == ["Relu", "BatchNormalization", "Relu"]
    inferred = onnx.shape_inference.infer_shapes(model)
    out = BatchNormToMulAddPass()(inferred)
    assert op_count(out, "BatchNormalization") == 0
    assert_parity(model, out, rel_tol=1e-5)


def test_nonconstant_statistics_declined():
    b = Builder(13)
    gamma, _, mean, var = b.bn_stats("bn", 3)
    b.node("BatchNormalization", ["x", gamma, "beta", mean, var], "y")
    model = b.model([("x", [1, 3, 4, 4]), ("beta", [3])], [("y", None)])
    out, result = run_pass(BatchNormToMulAddPass(), model)
    assert_declined(out, result, "bias is not constant")
    assert ops(out) == ["BatchNormalization"]


def test_training_mode_declined():
    b = Builder(14)
    b.nodes.append(helper.make_node("BatchNormalization", ["x", *b.bn_stats("bn", 3)], ["y", "rm", "rv"],
                                    name="bn", training_mode=1))
    model = b.model([("x", [2, 3, 4])], [("y", None), ("rm", None), ("rv", None)])
    out, result = run_pass(BatchNormToMulAddPass(), model)
    assert_declined(out, result, "training mode")


def test_constant_node_statistics_keep_constant_node_form():
    b = Builder(15, constant_nodes=True)
    b.node("Relu", ["x"], "r")
    b.bn("r", 4, "y")
    model = onnx.shape_inference.infer_shapes(b.model([("x", [1, 4, 3, 3])], [("y", None)]))
    out = BatchNormToMulAddPass()(model)
    assert op_count(out, "BatchNormalization") == 0 and op_count(out, "Mul") == 1
    assert not out.graph.initializer
    assert op_count(out, "Constant") == 2  # S and T; the four statistics are gone
    assert_parity(model, out, rel_tol=1e-5)


def test_float16():
    b = Builder(16, dtype=np.float16)
    b.node("Relu", ["x"], "r")
    b.bn("r", 4, "y")
    model = onnx.shape_inference.infer_shapes(b.model([("x", [1, 4, 5, 5])], [("y", None)]))
    out = BatchNormToMulAddPass()(model)
    assert ops(out) == ["Relu", "Mul", "Add"]
    assert all(i.data_type == TensorProto.FLOAT16 for i in out.graph.initializer)
    # S and T rounded to fp16 (relative 2^-11 each) plus fp16 rounding of x*S: a few ulps of range
    assert_parity(model, out, rel_tol=5e-3)


def test_default_pipeline_folds_what_it_can_and_mul_adds_the_rest():
    b = Builder(17)
    b.node("Conv", ["x", b.const("w", b.rng.standard_normal((4, 3, 3, 3)))], "c", pads=[1, 1, 1, 1])
    b.bn("c", 4, "y1")                      # foldable
    b.node("Relu", ["y1"], "r")
    b.bn("r", 4, "y2")                      # after Relu: Mul + Add
    model = b.model([("x", ["N", 3, 6, 6])], [("y2", None)])
    out, report = onnx_compress.compress_with_report(model)
    assert op_count(out, "BatchNormalization") == 0
    assert ops(out) == ["Conv", "Relu", "Mul", "Add"]
    assert report.verification.passed
    assert out.graph.output[0].name == "y2"
    assert_parity(model, out, rel_tol=1e-5)

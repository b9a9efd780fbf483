"""benchmarks/bench_quantize_noise.py's helpers on a tiny QDQ model: the input QuantizeLinear's
scale is found and scaled in a copy (the original untouched), and the SQNR is the textbook one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.bench_quantize_noise import input_scale_name, sqnr_db, with_scaled_initializer


def _qdq_model():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(3), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])


def test_input_scale_is_scaled_in_a_copy():
    model = _qdq_model()
    name = input_scale_name(model, "input")
    assert name == "s"
    scaled = with_scaled_initializer(model, name, 1 + 1e-6)
    values = {i.name: numpy_helper.to_array(i) for i in scaled.graph.initializer}
    assert values["s"].dtype == np.float32 and values["s"] == np.float32(0.5) * np.float32(1 + 1e-6)
    assert numpy_helper.to_array(model.graph.initializer[0]) == np.float32(0.5)
    onnx.checker.check_model(scaled)
    with pytest.raises(ValueError, match="nothing"):
        input_scale_name(model, "nothing")


def test_sqnr_db():
    ref = np.array([[3.0, 4.0]], np.float32)  # power 25
    assert sqnr_db(ref + np.array([[0.5, 0.0]], np.float32), ref) == pytest.approx(10 * np.log10(25 / 0.25))


def _two_pair_model():
    """input -> Q/DQ (s=0.5) -> Relu -> Q/DQ (s=0.25) -> y: two activation pairs."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(128), "z"),
             numpy_helper.from_array(np.float32(0.25), "s2")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq_in"),
             helper.make_node("Relu", ["dq"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s2", "z"], ["q2"], name="q_r"),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["dq2"], name="dq_r"),
             helper.make_node("Identity", ["dq2"], ["y"], name="out")]
    return helper.make_model(helper.make_graph(nodes, "qdq2", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])


def test_keep_activation_pairs_bypasses_the_others():
    from benchmarks.bench_quantize_noise import activation_pairs, emulated_outputs, keep_activation_pairs

    model = _two_pair_model()
    assert [n.name for n in activation_pairs(model)] == ["q_in", "q_r"]
    x = np.array([[0.3, -0.7, 1.1, 2.01]], np.float32)
    float_path = emulated_outputs(keep_activation_pairs(model, set()), x)
    np.testing.assert_array_equal(float_path, np.maximum(x, 0))  # no rounding anywhere
    only_input = emulated_outputs(keep_activation_pairs(model, {"q_in"}), x)
    np.testing.assert_array_equal(only_input, np.maximum(np.round(x / 0.5) * 0.5, 0))
    only_relu = emulated_outputs(keep_activation_pairs(model, {"q_r"}), x)
    np.testing.assert_array_equal(only_relu, np.round(np.maximum(x, 0) / 0.25) * 0.25)
    np.testing.assert_array_equal(emulated_outputs(keep_activation_pairs(model, {"q_in", "q_r"}), x),
                                  emulated_outputs(model, x))
    assert len(model.graph.node) == 6 and model.graph.node[2].input[0] == "dq"  # the original is untouched

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

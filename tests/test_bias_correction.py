"""Empirical bias correction: it removes the mean output error of quantized layers on held-out data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.passes.bias_correction import apply_biases, empirical_bias_correction
from onnx_compress.quantize import prepare_float_model, quantize
from tests.numerics import op_count


def _model(seed=0):
    """x[N,4,12,12] >= 0 -> depthwise 3x3 (bias) -> Relu -> Conv 1x1 4->8 (no bias) -> y.

    Each weight row has one outlier, so 7-bit per-channel rounding of the rest is coarse and,
    on inputs with a positive mean, biased.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(4, 1, 3, 3)) * 0.1).astype(np.float32)
    w1[:, 0, 0, 0] = 1.0
    w2 = (rng.normal(size=(8, 4, 1, 1)) * 0.1).astype(np.float32)
    w2[:, 0, 0, 0] = 1.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="dw", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["a1"], name="relu"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="pw"),
    ]
    graph = helper.make_graph(nodes, "bc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed, count):
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0.0, 1.0, size=(2, 4, 12, 12)).astype(np.float32) + 0.5} for _ in range(count)]


def _run(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _mean_error(float_model, quantized, feeds):
    """Mean over channels of |per-channel mean of (y_q - y)| on ``feeds`` (ORT integer kernels)."""
    err = (_run(quantized, feeds) - _run(float_model, feeds)).astype(np.float64)
    return float(np.abs(err.mean(axis=(0, 2, 3))).mean())


def test_bias_correction_reduces_mean_error_on_held_out_data():
    model = _model()
    calib, held_out = _feeds(0, 16), _feeds(1, 16)
    plain, _ = quantize(model, calib, cle=False, bias_correction=False, report_kernels=False, progress=False)
    corrected, report = quantize(model, calib, cle=False, bias_correction=True, report_kernels=False, progress=False)
    before, after = _mean_error(model, plain, held_out), _mean_error(model, corrected, held_out)
    assert set(report.bias_shifts) == {"dw", "pw"}
    assert after < 0.5 * before, (before, after)
    # structure: same QDQ layout plus one bias DequantizeLinear for the Conv that had none
    assert op_count(corrected, "DequantizeLinear") == op_count(plain, "DequantizeLinear") + 1
    assert op_count(corrected, "Conv") == 2


def test_direct_api_rewrites_int32_bias_and_adds_a_missing_one():
    model = prepare_float_model(_model(1))
    calib = _feeds(2, 8)
    plain, _ = quantize(model, calib, cle=False, bias_correction=False, report_kernels=False, progress=False)
    fixed, shifts, biases = empirical_bias_correction(model, plain, calib)
    assert set(shifts) == {"dw", "pw"} and all(v > 0 for v in shifts.values())
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    nodes = {n.name: n for n in fixed.graph.node}
    producers = {o: n for n in fixed.graph.node for o in n.output}
    for name in ("dw", "pw"):
        dq = producers[nodes[name].input[2]]
        assert dq.op_type == "DequantizeLinear"
        q = inits[dq.input[0]]
        assert q.dtype == np.int32 and q.shape == biases[name].shape
        # the int32 bias is the corrected float bias at scale s_x * s_w
        np.testing.assert_allclose(q * inits[dq.input[1]], biases[name], atol=float(inits[dq.input[1]].max()))
    onnx.checker.check_model(fixed, full_check=True)
    held_out = _feeds(3, 8)
    assert _mean_error(model, fixed, held_out) < 0.5 * _mean_error(model, plain, held_out)

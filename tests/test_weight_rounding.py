"""GPTQ weight rounding and the sequential error-compensating variant (passes/weight_rounding.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_compress.passes import weight_rounding as wr


def _gemm_node():
    return helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)


def test_gptq_rows_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 24)) @ rng.normal(size=(24, 24))  # correlated inputs
    w = rng.normal(size=(16, 24))
    h = x.T @ x / len(x)
    q, scale = wr.gptq_rows(w, h, 63)
    nearest = np.clip(np.round(w / scale[:, None]), -63, 63)
    assert q.dtype == np.int8 and int(np.abs(q).max()) <= 63

    def err(qw):
        e = (qw * scale[:, None] - w) @ x.T
        return float(np.mean(e ** 2))

    assert err(q) < 0.8 * err(nearest)


def test_gptq_tail_column_stays_float_and_absorbs_the_mean():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(1.0, 1.0, size=(3000, 12)), np.ones((3000, 1))], axis=1)
    w = np.concatenate([rng.normal(size=(8, 12)), rng.normal(size=(8, 1))], axis=1)
    h = x.T @ x / len(x)
    q, scale, tail = wr.gptq_rows_with_tail(w, h, 7, keep_float=1)
    assert q.shape == (8, 12) and tail.shape == (8, 1)
    np.testing.assert_allclose(scale, np.abs(w[:, :12]).max(axis=1) / 7, rtol=1e-6)
    e = np.concatenate([q * scale[:, None], tail], axis=1) @ x.T - w @ x.T
    e_fixed_bias = (q * scale[:, None]) @ x[:, :12].T + w[:, 12:] - w @ x.T
    assert abs(float(e.mean())) < 0.1 * abs(float(e_fixed_bias.mean())) + 1e-9
    assert float(np.mean(e ** 2)) < float(np.mean(e_fixed_bias ** 2))


def test_compensated_solve_reduces_error_against_the_float_output():
    """min ||W_q x_q - W x||: from quantized (noisy, clipped, shifted) inputs, the compensated
    weights reach the float output better than GPTQ of the float weights."""
    rng = np.random.default_rng(2)
    n, d, r = 20000, 16, 12
    x = np.maximum(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5, 0)
    step = x.max() / 255
    x_q = np.minimum(np.round(x / step) * step, np.quantile(x, 0.98))  # grid + clipping
    w, b = rng.normal(size=(r, d)).astype(np.float32), rng.normal(size=r).astype(np.float32)
    node = _gemm_node()
    ones = np.ones((n, 1))
    xa, xqa = np.concatenate([x, ones], 1), np.concatenate([x_q, ones], 1)
    h, c = xqa.T @ xqa / n, xa.T @ xqa / n
    q, scale, bias = wr._solve_layer(node, w, {"transB": 1}, b, h, c, 63, damp=0.01, ridge=0.01)
    q0, s0 = wr.gptq_rows(w, x_q.T @ x_q / n, 63)
    target = x @ w.T + b
    err_comp = np.mean(((x_q @ (q * scale[:, None]).T + bias) - target) ** 2)
    err_gptq = np.mean(((x_q @ (q0 * s0[:, None]).T + b) - target) ** 2)
    assert q.shape == w.shape and q.dtype == np.int8 and int(np.abs(q).max()) <= 63
    # the best any float weights can do from x_q (clipped information is lost): least squares
    sol, *_ = np.linalg.lstsq(xqa, target, rcond=None)
    err_ls = np.mean((xqa @ sol - target) ** 2)
    assert err_comp - err_ls < 0.25 * (err_gptq - err_ls), (err_comp, err_gptq, err_ls)


def test_patch_layer_rewrites_weight_scale_and_int32_bias():
    x_scale = np.float32(0.05)
    inits = [
        numpy_helper.from_array(np.float32(x_scale).reshape(()), "xs"),
        numpy_helper.from_array(np.uint8(0).reshape(()), "xz"),
        numpy_helper.from_array(np.ones((4, 3), np.int8), "wq"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.zeros(4, np.int32), "bq"),
        numpy_helper.from_array(np.full(4, 0.005, np.float32), "bs"),
        numpy_helper.from_array(np.zeros(4, np.int32), "bz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0),
        helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    q = np.arange(12, dtype=np.int8).reshape(4, 3)
    scale = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    bias = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    assert wr._patch_layer(model, "fc", q, scale, bias)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(values["wq"], q)
    np.testing.assert_array_equal(values["bs"], x_scale * scale)
    np.testing.assert_array_equal(values["bq"], np.round(bias / (x_scale * scale)).astype(np.int32))
    onnx.checker.check_model(model, full_check=True)
    assert not wr._patch_layer(model, "missing", q, scale, bias)


def _two_conv_model(rng) -> onnx.ModelProto:
    w1 = (rng.normal(size=(16, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.normal(size=(8, 16, 1, 1)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 12, 12])
    graph = helper.make_graph(nodes, "two_conv", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_sequential_compensation_lowers_the_output_error_on_held_out_data():
    import onnxruntime as ort
    from onnx_compress.ir.graph import to_graph, to_model
    from onnx_compress.passes.bias_correction import apply_biases
    from onnx_compress.passes.calibration import collect_statistics, compute_range
    from onnx_compress.passes.insert_qdq import (
        InsertQDQPass,
        QuantConfig,
        plan_quantization,
    )

    rng = np.random.default_rng(3)
    model = _two_conv_model(rng)
    config = QuantConfig()
    calib = [{"x": (rng.normal(size=(4, 4, 12, 12)) + 0.5).astype(np.float32)} for _ in range(8)]
    held = (rng.normal(size=(16, 4, 12, 12)) + 0.5).astype(np.float32)
    plan = plan_quantization(to_graph(model), config)
    stats = collect_statistics(model, calib, plan.quantized, histogram=True, progress=False).stats
    # inputs clipped at the 95th percentile (a shift the bias column absorbs); the output kept whole
    ranges = {k: compute_range(s, "percentile", percentile=95.0) for k, s in stats.items()}
    ranges["y"] = (stats["y"].min, stats["y"].max)

    def insert(weights=None, biases=None):
        source = apply_biases(model, biases) if biases else model
        out = to_model(InsertQDQPass(ranges, config, weights=weights).call(to_graph(source)).graph, like=model)
        del out.graph.value_info[:]
        return out

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": held})[0]

    plain = insert()
    weights, biases = wr.sequential_compensation(model, plain, calib, config.weight_qmax_of, progress=False)
    assert set(weights) == {"conv1", "conv2"} and set(biases) == {"conv1", "conv2"}
    assert all(int(np.abs(q.astype(np.int16)).max()) <= 63 for q, _ in weights.values())  # 7-bit bound kept
    compensated = insert(weights, biases)
    assert sum(n.op_type == "QuantizeLinear" for n in compensated.graph.node) == \
        sum(n.op_type == "QuantizeLinear" for n in plain.graph.node)
    reference = run(model)
    err_plain = float(np.mean((run(plain) - reference) ** 2))
    err_comp = float(np.mean((run(compensated) - reference) ** 2))
    assert err_comp < 0.8 * err_plain, (err_comp, err_plain)

    # too few input columns per unknown: every layer left as it was
    none, _ = wr.sequential_compensation(model, plain, calib[:1], config.weight_qmax_of, min_ratio=1e6, progress=False)
    assert none == {}

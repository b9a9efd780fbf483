"""InsertQDQPass (passes/insert_qdq.py) and the ORT kernel report (passes/quant_report.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.errors import PassError
from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes.calibration import collect_statistics, compute_range
from onnx_compress.passes.insert_qdq import (
    InsertQDQPass,
    QuantConfig,
    activation_params,
    plan_quantization,
    quantize_weight,
)
from onnx_compress.passes.quant_report import ort_kernel_report, per_layer_sqnr, sqnr_db
from onnx_compress.verify import reference_session

FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "Add", "Mul", "ConvTranspose"}


def _model(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def residual_cnn(seed=0, opset=17, out_relu6=False):
    """Conv-Relu -> Conv(+bias) -> Add(residual) -> Clip(0,6)? -> GAP -> Flatten -> Gemm(transB=1)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
        "b2": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "fw": (rng.standard_normal((5, 8)) * 0.5).astype(np.float32),
        "fb": (rng.standard_normal(5) * 0.1).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["a6"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    return _model(
        nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], opset,
    )


def _feeds(n=24, seed=1, shape=(1, 3, 8, 8)):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _quantize(model, config=QuantConfig(), feeds=None, method="minmax"):
    graph = to_graph(model)
    plan = plan_quantization(graph, config)
    stats = collect_statistics(model, feeds or _feeds(), plan.quantized, progress=False)
    ranges = {k: compute_range(s, method) for k, s in stats.stats.items()}
    qdq = InsertQDQPass(ranges, config)
    result = qdq.call(graph)
    return to_model(result.graph, like=model), qdq, result, ranges


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dq_of(model, consumer_name, index):
    node = next(n for n in model.graph.node if n.name == consumer_name)
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[index])


def _outputs(model, feeds):
    sess = reference_session(model)
    return [sess.run(None, f)[0] for f in feeds]


def test_residual_cnn_structure_bias_scale_and_integer_kernels():
    model = residual_cnn()
    q, qdq, result, _ = _quantize(model)
    onnx.checker.check_model(q, full_check=True)
    inits = _inits(q)
    assert result.modified and {n.name for n in qdq.plan.nodes} >= {"conv1", "conv2", "add", "gap", "fc"}
    # weights: int8 per-channel, 7-bit by default
    for conv, axis, channels in (("conv1", 0, 8), ("conv2", 0, 8), ("fc", 0, 5)):
        dq = _dq_of(q, conv, 1)
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs["axis"] == axis
        w = inits[dq.input[0]]
        assert w.dtype == np.int8 and np.abs(w).max() == 63 and inits[dq.input[1]].shape == (channels,)
    # bias: int32, zero point 0, scale exactly s_x * s_w in float32
    for conv, x_tensor in (("conv1", "x"), ("conv2", "r1")):
        bias_dq = _dq_of(q, conv, 2)
        w_dq = _dq_of(q, conv, 1)
        assert inits[bias_dq.input[0]].dtype == np.int32 and not inits[bias_dq.input[2]].any()
        s_x = qdq.params[x_tensor].scale
        np.testing.assert_array_equal(inits[bias_dq.input[1]], (np.float32(s_x) * inits[w_dq.input[1]]).astype(np.float32))
    # the QDQ graph computes nearly the float function (evaluated in float)
    feeds = _feeds(8, seed=5)
    assert sqnr_db(_outputs(model, feeds), _outputs(q, feeds)) > 25.0
    # ORT turns everything into integer kernels; Relu and Clip disappear into the Q
    report = ort_kernel_report(q)
    assert report.integer_ops["QLinearConv"] == 2 and report.integer_ops["QLinearAdd"] == 1
    assert report.integer_ops["QGemm"] == 1 and report.integer_ops["QLinearGlobalAveragePool"] == 1
    assert not FLOAT_COMPUTE & set(report.float_ops), report.summary()
    assert not {"Relu", "Clip"} & set(report.float_ops), report.summary()
    assert [o.name for o in q.graph.output] == ["y"]


def test_relu_and_clip_outputs_get_removable_parameters():
    config = QuantConfig()
    relu = activation_params(-1.0, 3.0, config, bounds=(0.0, math.inf))
    assert relu.zero_point == 0 and relu.representable()[0] == 0.0
    clip = activation_params(0.0, 6.0, config, bounds=(0.0, 6.0))
    low, high = clip.representable()
    assert low == 0.0 and high <= 6.0 and high > 5.99999
    s8 = activation_params(0.0, 6.0, QuantConfig(activations="s8"), bounds=(0.0, 6.0))
    assert s8.zero_point == -128 and s8.representable()[1] <= 6.0
    sym = activation_params(-2.0, 1.0, QuantConfig(activations="s8", symmetric=True))
    assert sym.zero_point == 0 and sym.scale == np.float32(2.0 / 127)


def test_weight_quantization_axis_and_error_bound():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 6, 3)) * np.array([0.01, 1.0, 5.0, 0.0])[:, None, None]).astype(np.float32)
    q, scale = quantize_weight(w, 0, 63)
    assert scale.shape == (4,) and scale[3] == 1.0 and not q[3].any()
    recon = q.astype(np.float32) * scale[:, None, None]
    assert np.all(np.abs(recon - w) <= scale[:, None, None] / 2 + 1e-7)
    assert np.abs(q).max() <= 63
    q8, _ = quantize_weight(w, 1, 127)
    assert np.abs(q8).max() == 127
    qt, st = quantize_weight(w, None, 127)
    assert st.shape == () and np.abs(qt).max() == 127


@pytest.mark.parametrize("trans_b, axis", [(0, 1), (1, 0)])
def test_gemm_weight_axis_follows_transB(trans_b, axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b)],
        {"w": w, "b": np.zeros(6, np.float32)},
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
    )
    q, _, _, _ = _quantize(model, feeds=_feeds(8, shape=(2, 4)))
    dq = _dq_of(q, "fc", 1)
    assert helper.get_attribute_value(dq.attribute[0]) == axis
    assert _inits(q)[dq.input[1]].shape == (6,)
    assert ort_kernel_report(q).integer_ops["QGemm"] == 1


def test_matmul_weight_axis_1_and_activation_matmul():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm_w"),
         helper.make_node("MatMul", ["h", "x2"], ["y"], name="mm_act")],
        {"w": rng.standard_normal((4, 6)).astype(np.float32)},
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, [6, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "x2": rng.standard_normal((6, 3)).astype(np.float32)}
             for _ in range(8)]
    q, qdq, _, _ = _quantize(model, feeds=feeds)
    dq = _dq_of(q, "mm_w", 1)
    assert helper.get_attribute_value(dq.attribute[0]) == 1
    plan = qdq.plan
    assert {"x", "h", "x2"} <= set(plan.quantized) and "y" not in plan.quantized  # graph output stays float
    report = ort_kernel_report(q)
    assert "MatMul" not in report.float_ops, report.summary()
    assert report.integer_total >= 2


def test_conv_transpose_weight_axis_1_with_bias():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2])],
        {"w": rng.standard_normal((3, 4, 2, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)},
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
    )
    q, _, _, _ = _quantize(model, feeds=_feeds(8, shape=(1, 3, 4, 4)))
    dq = _dq_of(q, "deconv", 1)
    assert helper.get_attribute_value(dq.attribute[0]) == 1 and _inits(q)[dq.input[1]].shape == (4,)
    assert _inits(q)[_dq_of(q, "deconv", 2).input[0]].dtype == np.int32
    feeds = _feeds(4, seed=9, shape=(1, 3, 4, 4))
    assert sqnr_db(_outputs(model, feeds), _outputs(q, feeds)) > 25.0
    assert [o.name for o in q.graph.output] == ["y"]  # Conv-like output renamed back through Q/DQ


@pytest.mark.parametrize("pattern", ["conv2", "conv[2]", "Add"])
def test_excluded_nodes_stay_float(pattern):
    config = QuantConfig(exclude=(pattern,))
    q, qdq, result, _ = _quantize(residual_cnn(), config)
    excluded = "add" if pattern == "Add" else "conv2"
    assert excluded not in {n.name for n in qdq.plan.nodes}
    assert (excluded, "excluded") in result.declined
    node = next(n for n in q.graph.node if n.name == excluded)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    if excluded == "conv2":
        assert producers.get(node.input[1]) is None  # weight still the float initializer
    report = ort_kernel_report(q)
    assert report.float_total >= 1 and any(op in FLOAT_COMPUTE for _, op in report.float_islands)


def test_missing_range_and_old_opset_are_refused():
    model = residual_cnn()
    with pytest.raises(PassError, match="no calibrated range"):
        InsertQDQPass({}, QuantConfig()).call(to_graph(model))
    with pytest.raises(PassError, match="opset >= 13"):
        InsertQDQPass({}, QuantConfig()).call(to_graph(residual_cnn(opset=12)))


def test_non_constant_weight_is_declined_with_reason():
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        {},
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
    )
    plan = plan_quantization(to_graph(model))
    assert plan.nodes == [] and ("conv", "weight is not constant") in plan.declined
    result = InsertQDQPass({}, QuantConfig()).call(to_graph(model))
    assert not result.modified


def test_s8_symmetric_activations():
    q, qdq, _, _ = _quantize(residual_cnn(), QuantConfig(activations="s8", symmetric=True, weight_bits=8))
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    inits = _inits(q)
    assert qs and all(inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0 for n in qs)
    assert np.abs(inits[_dq_of(q, "conv1", 1).input[0]]).max() == 127
    feeds = _feeds(8, seed=5)
    assert sqnr_db(_outputs(residual_cnn(), feeds), _outputs(q, feeds)) > 20.0


def test_per_layer_sqnr_quantizes_one_layer_at_a_time():
    model = residual_cnn()
    _, _, _, ranges = _quantize(model)
    feeds = _feeds(6, seed=3)
    layers = per_layer_sqnr(model, ranges, feeds)
    names = {layer.node for layer in layers}
    assert {"conv1", "conv2", "add", "fc"} <= names
    assert all(layer.sqnr_db > 15.0 for layer in layers)
    assert layers == sorted(layers, key=lambda r: r.sqnr_db)
    assert all(layer.agreement is not None and 0.0 <= layer.agreement <= 1.0 for layer in layers)

"""Numba INT8 kernels: bit-exact against the NumPy references of ONNX integer semantics
(``onnx_compress.kernels.reference``), and the references against ONNX Runtime's own
QLinearConv / QLinearMatMul / QuantizeLinear / DequantizeLinear (single-node models,
ORT_DISABLE_ALL).

What holds against ORT (measured on ORT 1.32, x86-64): the reference equals ORT's QLinearConv and
QLinearMatMul **bit for bit** (same float32 requantization as MLAS), for every dtype combination
ORT implements (u8 x u8 -> u8, u8 x s8 -> u8, s8 x s8 -> s8). On CPUs without VNNI, ORT's u8 x s8
path uses ``vpmaddubsw``, whose int16 pair sums saturate when ``|w|`` is large; there the parity
tests draw 7-bit weights (``|w - z_w| <= 64``) where no saturation can occur, and the exact
claim is made only for them. QuantizeLinear/DequantizeLinear are bit-exact.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnx_compress import kernels as K
from onnx_compress.kernels import reference as R

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

QDT = [np.uint8, np.int8]
ORT_CONV_COMBOS = [(np.uint8, np.uint8, np.uint8), (np.uint8, np.int8, np.uint8), (np.int8, np.int8, np.int8)]


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni)\b", flags))


VNNI = _has_vnni()


# ---------------------------------------------------------------- strategies
def qarray(draw, dtype, shape):
    lo, hi = R.qrange(dtype)
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(dtype)


def zero_point(draw, dtype):
    lo, hi = R.qrange(dtype)
    return np.array(draw(st.integers(lo, hi)), dtype=dtype)


scales = st.floats(0.0009765625, 0.5, allow_nan=False, width=32).map(np.float32)


@st.composite
def conv_cases(draw, combos=None, weight_bits=8):
    if combos is None:
        xdt, wdt, ydt = draw(st.sampled_from(QDT)), draw(st.sampled_from(QDT)), draw(st.sampled_from(QDT))
    else:
        xdt, wdt, ydt = draw(st.sampled_from(combos))
    kind = draw(st.sampled_from(["direct", "depthwise", "pointwise"]))
    if kind == "depthwise":
        c = draw(st.integers(1, 6))
        group, cg, m = c, 1, c * draw(st.integers(1, 2))
    else:
        group = 1 if kind == "pointwise" else draw(st.integers(1, 3))
        cg = draw(st.integers(1, 4))
        m = group * draw(st.integers(1, 4))
    kh, kw = (1, 1) if kind == "pointwise" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    n = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (1, 1) if kind == "pointwise" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = (0, 0, 0, 0) if kind == "pointwise" and draw(st.booleans()) else tuple(draw(st.integers(0, 2)) for _ in range(4))
    assume(R.output_size(h, kh, strides[0], pads[0], pads[2], dilations[0]) >= 1)
    assume(R.output_size(w, kw, strides[1], pads[1], pads[3], dilations[1]) >= 1)
    x = qarray(draw, xdt, (n, cg * group, h, w))
    wt = qarray(draw, wdt, (m, cg, kh, kw))
    per_channel = draw(st.booleans())
    if per_channel:
        w_scale = np.array([draw(scales) for _ in range(m)], np.float32)
        w_zp = np.zeros(m, wdt) if weight_bits == 7 else np.array([draw(st.integers(*R.qrange(wdt))) for _ in range(m)], wdt)
    else:
        w_scale = draw(scales)
        w_zp = np.array(0 if weight_bits == 7 and wdt == np.int8 else (128 if weight_bits == 7 else draw(st.integers(*R.qrange(wdt)))), wdt)
    if weight_bits == 7:  # |w - z_w| <= 64: no int16 pair sum can saturate in a u8 x s8 kernel
        wt = (np.clip(wt.astype(np.int32) - w_zp.reshape(-1, 1, 1, 1), -64, 64) + w_zp.reshape(-1, 1, 1, 1)).astype(wdt)
    bias = None if draw(st.booleans()) else np.random.default_rng(draw(st.integers(0, 99))).integers(-20000, 20000, m).astype(np.int32)
    y_zp = zero_point(draw, ydt)
    out_range = draw(st.sampled_from([None, "relu", "clip"]))
    if out_range == "relu":
        out_range = R.relu_range(y_zp)
    elif out_range == "clip":
        lo, hi = R.qrange(ydt)
        a = draw(st.integers(lo, hi))
        out_range = (a, draw(st.integers(a, hi)))
    return dict(x=x, x_scale=draw(scales), x_zp=zero_point(draw, xdt), w=wt, w_scale=w_scale, w_zp=w_zp,
                y_scale=draw(scales) * np.float32(8), y_zp=y_zp, bias=bias, strides=strides, pads=pads,
                dilations=dilations, group=group, out_range=out_range)


def _conv_args(c):
    args = (c["x"], c["x_scale"], c["x_zp"], c["w"], c["w_scale"], c["w_zp"], c["y_scale"], c["y_zp"], c["bias"])
    kw = dict(strides=c["strides"], pads=c["pads"], dilations=c["dilations"], group=c["group"])
    return args, kw


# ---------------------------------------------------------------- kernels == reference
@SETTINGS
@given(conv_cases())
def test_qlinear_conv_matches_reference(case):
    args, kw = _conv_args(case)
    expected = R.qlinear_conv(*args, **kw, out_range=case["out_range"])
    got = K.qlinear_conv(*args, **kw, out_range=case["out_range"])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_qlinear_conv_nhwc_layout_and_kernel_choice():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 6, 5, 5)).astype(np.uint8)
    cases = [
        (rng.integers(-128, 128, (8, 6, 1, 1)).astype(np.int8), dict(strides=(2, 2)), "gemm"),
        (rng.integers(-128, 128, (12, 1, 3, 3)).astype(np.int8), dict(group=6, pads=(1, 1, 1, 1)), "depthwise"),
        (rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8), dict(group=2, pads=(1, 1, 1, 1)), "direct"),
    ]
    for w, kw, kind in cases:
        args = (np.float32(0.02), np.uint8(7), w, np.float32(0.01), np.int8(0), np.float32(0.5), np.uint8(100))
        params = K.prepare_qconv(np.uint8, *args, **kw)
        assert params.kind == kind
        nchw = K.qlinear_conv(x, *args, **kw)
        nhwc = K.run_qconv(params, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        np.testing.assert_array_equal(nhwc.transpose(0, 3, 1, 2), nchw)
        np.testing.assert_array_equal(nchw, R.qlinear_conv(x, *args, **kw))


@st.composite
def gemm_cases(draw, combos=None, with_bias=True):
    if combos is None:
        adt, bdt, ydt = (draw(st.sampled_from(QDT)) for _ in range(3))
    else:
        adt, bdt, ydt = draw(st.sampled_from(combos))
    m, k, n = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 17))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    per_col = draw(st.booleans())
    return dict(
        a=qarray(draw, adt, lead + (m, k)), a_scale=draw(scales), a_zp=zero_point(draw, adt),
        b=qarray(draw, bdt, (k, n)),
        b_scale=np.array([draw(scales) for _ in range(n)], np.float32) if per_col else draw(scales),
        b_zp=np.array([draw(st.integers(*R.qrange(bdt))) for _ in range(n)], bdt) if per_col else zero_point(draw, bdt),
        y_scale=draw(scales) * np.float32(8), y_zp=zero_point(draw, ydt),
        bias=None if not with_bias or draw(st.booleans()) else np.random.default_rng(k).integers(-9999, 9999, n).astype(np.int32),
    )


@SETTINGS
@given(gemm_cases(), st.sampled_from([None, "relu"]))
def test_qlinear_matmul_matches_reference(case, epilogue):
    out_range = R.relu_range(case["y_zp"]) if epilogue else None
    expected = R.qlinear_matmul(**case, out_range=out_range)
    np.testing.assert_array_equal(K.qlinear_matmul(**case, out_range=out_range), expected)


@FEW
@given(gemm_cases())
def test_qgemm_trans_b_matches_reference(case):
    a = case.pop("a").reshape(-1, case["b"].shape[0])
    bt = np.ascontiguousarray(case.pop("b").T)
    expected = R.qgemm(a, b=bt, trans_b=True, **case)
    np.testing.assert_array_equal(K.qgemm(a, b=bt, trans_b=True, **case), expected)


@st.composite
def binary_cases(draw):
    adt, bdt, ydt = (draw(st.sampled_from(QDT)) for _ in range(3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    bshape = tuple(s if draw(st.booleans()) else 1 for s in shape)[draw(st.integers(0, len(shape) - 1)):]
    return dict(a=qarray(draw, adt, shape), a_scale=draw(scales), a_zp=zero_point(draw, adt),
                b=qarray(draw, bdt, bshape), b_scale=draw(scales), b_zp=zero_point(draw, bdt),
                y_scale=draw(scales), y_zp=zero_point(draw, ydt))


@SETTINGS
@given(binary_cases(), st.sampled_from(["add", "mul"]), st.booleans())
def test_qlinear_add_mul_match_reference(case, op, relu):
    out_range = R.relu_range(case["y_zp"]) if relu else None
    ref = R.qlinear_add if op == "add" else R.qlinear_mul
    ker = K.qlinear_add if op == "add" else K.qlinear_mul
    np.testing.assert_array_equal(ker(**case, out_range=out_range), ref(**case, out_range=out_range))


@st.composite
def pool_cases(draw):
    dt = draw(st.sampled_from(QDT))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = tuple(draw(st.integers(0, k[i % 2] - 1)) for i in range(4))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ceil_mode = draw(st.booleans())
    assume(R.output_size(h, k[0], strides[0], pads[0], pads[2], dil[0], ceil_mode) >= 1)
    assume(R.output_size(w, k[1], strides[1], pads[1], pads[3], dil[1], ceil_mode) >= 1)
    x = qarray(draw, dt, (draw(st.integers(1, 2)), draw(st.integers(1, 5)), h, w))
    return x, dict(kernel_shape=k, strides=strides, pads=pads, dilations=dil, ceil_mode=ceil_mode)


@SETTINGS
@given(pool_cases())
def test_max_pool_matches_reference(case):
    x, kw = case
    np.testing.assert_array_equal(K.max_pool(x, **kw), R.max_pool(x, **kw))


@SETTINGS
@given(pool_cases(), st.booleans(), st.data())
def test_average_pool_matches_reference(case, include_pad, data):
    x, kw = case
    ydt = data.draw(st.sampled_from(QDT))
    q = (data.draw(scales), zero_point(data.draw, x.dtype), data.draw(scales), zero_point(data.draw, ydt))
    got = K.average_pool(x, *q, **kw, count_include_pad=include_pad)
    np.testing.assert_array_equal(got, R.average_pool(x, *q, **kw, count_include_pad=include_pad))


@FEW
@given(st.data())
def test_global_average_pool_matches_reference(data):
    dt, ydt = data.draw(st.sampled_from(QDT)), data.draw(st.sampled_from(QDT))
    x = qarray(data.draw, dt, (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 9)),
                               data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))))
    q = (data.draw(scales), zero_point(data.draw, dt), data.draw(scales), zero_point(data.draw, ydt))
    got = K.global_average_pool(x, *q)
    assert got.shape == x.shape[:2] + (1, 1)
    np.testing.assert_array_equal(got, R.global_average_pool(x, *q))
    np.testing.assert_array_equal(K.global_average_pool(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *q,
                                                        layout="NHWC").transpose(0, 3, 1, 2), got)


floats32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@SETTINGS
@given(st.data(), st.sampled_from(QDT), st.booleans())
def test_quantize_dequantize_match_reference(data, dt, per_axis):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * data.draw(st.sampled_from([0.1, 3.0, 300.0]))).astype(np.float32)
    x.reshape(-1)[0] = data.draw(floats32)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    c = shape[axis]
    scale = np.array([data.draw(scales) for _ in range(c)], np.float32) if per_axis else data.draw(scales)
    zp = np.array([data.draw(st.integers(*R.qrange(dt))) for _ in range(c)], dt) if per_axis else zero_point(data.draw, dt)
    q = K.quantize_linear(x, scale, zp, axis=axis)
    np.testing.assert_array_equal(q, R.quantize_linear(x, scale, zp, axis=axis))
    np.testing.assert_array_equal(K.dequantize_linear(q, scale, zp, axis=axis), R.dequantize_linear(q, scale, zp, axis=axis))
    q2 = R.quantize_linear(x, np.float32(0.05), np.uint8(3))
    np.testing.assert_array_equal(K.requantize(q2, np.float32(0.05), np.uint8(3), scale if not per_axis else scale[0], zp.reshape(-1)[0]),
                                  R.requantize(q2, np.float32(0.05), np.uint8(3), scale if not per_axis else scale[0], zp.reshape(-1)[0]))


@SETTINGS
@given(st.data(), st.sampled_from(QDT))
def test_quantize_to_nhwc_matches_reference_transposed(data, dt):
    # RGB rows of 16+ pixels take the byte-shuffle interleave, the rest the scalar loop
    shape = (data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 3, 3, 4])), data.draw(st.integers(1, 5)),
             data.draw(st.integers(1, 40)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * data.draw(st.sampled_from([0.1, 3.0, 300.0]))).astype(np.float32)
    x.reshape(-1)[0] = data.draw(floats32)
    x.reshape(-1)[-1] = np.nan
    scale, zp = data.draw(scales), zero_point(data.draw, dt)
    got = K.quantize_linear_to_nhwc(x, scale, zp)
    assert got.dtype == zp.dtype and got.shape == (shape[0], shape[2], shape[3], shape[1])
    np.testing.assert_array_equal(got, R.quantize_linear(x, scale, zp).transpose(0, 2, 3, 1))


def test_quantize_to_nhwc_refuses_what_it_cannot_do():
    """Per-tensor and 4-D only: a per-axis scale or a 3-D tensor is refused, naming the problem."""
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="per-tensor"):
        K.quantize_linear_to_nhwc(x, np.ones(3, np.float32), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="4 dimensions"):
        K.quantize_linear_to_nhwc(x[0], np.float32(1), np.uint8(0))


def test_quantize_rounds_half_to_even_saturates_and_maps_nan_to_zero_point():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1e9, -1e9, np.nan, np.inf], np.float32)
    q = K.quantize_linear(x, np.float32(1.0), np.int8(0))
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128, 0, 127]
    np.testing.assert_array_equal(q, R.quantize_linear(x, np.float32(1.0), np.int8(0)))


def test_clamp_epilogue_equals_float_relu_and_clip():
    q = np.arange(256, dtype=np.uint8)
    s, z = np.float32(0.1), np.uint8(40)
    f = R.dequantize_linear(q, s, z)
    np.testing.assert_array_equal(K.clamp(q, R.relu_range(z)), R.quantize_linear(np.maximum(f, 0), s, z))
    rng6 = R.clip_range(0.0, 6.0, s, z)
    np.testing.assert_array_equal(K.clamp(q, rng6), R.quantize_linear(np.clip(f, 0, 6), s, z))


# ---------------------------------------------------------------- validation errors
def test_wrappers_reject_bad_dtype_and_shape_naming_the_argument():
    x = np.zeros((1, 4, 5, 5), np.uint8)
    w = np.zeros((4, 4, 3, 3), np.int8)
    q = (np.float32(0.1), np.uint8(0))
    good = dict(w_scale=np.float32(0.1), w_zp=np.int8(0), y_scale=np.float32(0.1), y_zp=np.uint8(0))
    with pytest.raises(TypeError, match=r"^x must have dtype"):
        K.qlinear_conv(x.astype(np.float32), *q, w, **good)
    with pytest.raises(TypeError, match="x_zero_point"):
        K.qlinear_conv(x, np.float32(0.1), np.int8(0), w, **good)
    with pytest.raises(ValueError, match=r"^w must have 4 dimensions"):
        K.qlinear_conv(x, *q, w[0], **good)
    with pytest.raises(ValueError, match="not divisible by group"):
        K.qlinear_conv(x, *q, w, **good, group=3)
    with pytest.raises(ValueError, match="x must have 4 channels"):
        K.qlinear_conv(x[:, :3], *q, w, **good)
    with pytest.raises(ValueError, match="w_scale must have 1 or 4 entries"):
        K.qlinear_conv(x, *q, w, **dict(good, w_scale=np.ones(3, np.float32)))
    with pytest.raises(ValueError, match="y_scale must be positive"):
        K.qlinear_conv(x, *q, w, **dict(good, y_scale=np.float32(0)))
    with pytest.raises(TypeError, match="bias must have dtype int32"):
        K.qlinear_conv(x, *q, w, **good, bias=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="strides entries must be >= 1"):
        K.qlinear_conv(x, *q, w, **good, strides=(0, 1))
    with pytest.raises(ValueError, match="too small"):
        K.qlinear_conv(x[:, :, :2, :2], *q, w, **good)
    with pytest.raises(ValueError, match="layout"):
        K.qlinear_conv(x, *q, w, **good, layout="NCWH")
    with pytest.raises(ValueError, match="out_range"):
        K.qlinear_conv(x, *q, w, **good, out_range=(10, 300))
    with pytest.raises(ValueError, match="overflow the int32 accumulator"):
        K.prepare_qgemm(np.uint8, np.float32(1), np.uint8(0), np.zeros((40000, 2), np.int8), np.float32(1),
                        np.int8(0), np.float32(1), np.uint8(0))
    with pytest.raises(ValueError, match="a must have last dimension 3"):
        K.qlinear_matmul(np.zeros((2, 4), np.uint8), *q, np.zeros((3, 2), np.int8), np.float32(1), np.int8(0),
                         np.float32(1), np.uint8(0))
    with pytest.raises(TypeError, match="^x must have dtype float32"):
        K.quantize_linear(np.zeros(3, np.float64), np.float32(1), np.uint8(0))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        K.quantize_linear(np.zeros((2, 2), np.float32), np.ones(2, np.float32), np.zeros(2, np.uint8), axis=3)
    with pytest.raises(TypeError, match="^q must have dtype"):
        K.dequantize_linear(np.zeros(3, np.float32), np.float32(1))
    with pytest.raises(ValueError, match="do not broadcast"):
        K.qlinear_add(np.zeros(3, np.uint8), *q, np.zeros(4, np.uint8), *q, *q)
    with pytest.raises(ValueError, match="kernel_shape entries"):
        K.max_pool(x, (0, 2))
    with pytest.raises(TypeError, match="^x must be a numpy.ndarray"):
        K.max_pool(x.tolist(), (2, 2))


# ---------------------------------------------------------------- reference == ONNX Runtime
def _session(model):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _single_node(op, x, consts, attrs, out_dtype, opset=21):
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in consts if v is not None]
    inputs = ["x"] + [name if v is not None else "" for name, v in consts]
    while inputs and inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(op, inputs, ["y"], **attrs)
    tt = helper.np_dtype_to_tensor_dtype
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", tt(x.dtype), x.shape)],
                              [helper.make_tensor_value_info("y", tt(np.dtype(out_dtype)), None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return _session(model).run(None, {"x": x})[0]


@FEW
@given(conv_cases(combos=ORT_CONV_COMBOS, weight_bits=8 if VNNI else 7))
def test_reference_qlinear_conv_equals_onnxruntime(case):
    args, kw = _conv_args(case)
    x, xs, xz, w, ws, wz, ys, yz, b = args
    consts = [("xs", np.float32(xs)), ("xz", xz), ("w", w), ("ws", ws), ("wz", wz), ("ys", np.float32(ys)),
              ("yz", yz), ("b", b)]
    attrs = dict(strides=list(kw["strides"]), pads=list(kw["pads"]), dilations=list(kw["dilations"]), group=kw["group"])
    got = _single_node("QLinearConv", x, consts, attrs, yz.dtype)
    np.testing.assert_array_equal(got, R.qlinear_conv(*args, **kw))


@FEW
@given(gemm_cases(combos=ORT_CONV_COMBOS, with_bias=False))
def test_reference_qlinear_matmul_equals_onnxruntime(case):
    a, b = case["a"], case["b"]
    if a.dtype == np.uint8 and b.dtype == np.int8 and not VNNI:  # 7-bit weights: no vpmaddubsw saturation
        b = case["b"] = np.clip(b, -64, 63).astype(np.int8)
        case["b_zp"] = np.zeros_like(case["b_zp"])
    consts = [("as", np.float32(case["a_scale"])), ("az", case["a_zp"]), ("b", b), ("bs", case["b_scale"]),
              ("bz", case["b_zp"]), ("ys", np.float32(case["y_scale"])), ("yz", case["y_zp"])]
    got = _single_node("QLinearMatMul", a, consts, {}, case["y_zp"].dtype)
    np.testing.assert_array_equal(got, R.qlinear_matmul(**case))


@SETTINGS
@given(st.data(), st.sampled_from(QDT), st.booleans())
def test_reference_quantize_dequantize_equal_onnxruntime(data, dt, per_axis):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * data.draw(st.sampled_from([0.1, 3.0, 300.0]))).astype(np.float32)
    axis = data.draw(st.integers(0, len(shape) - 1))
    c = shape[axis]
    scale = np.array([data.draw(scales) for _ in range(c)], np.float32) if per_axis else data.draw(scales)
    zp = np.array([data.draw(st.integers(*R.qrange(dt))) for _ in range(c)], dt) if per_axis else zero_point(data.draw, dt)
    # exact ties (x / s = k + 0.5) exercise round-half-to-even
    x.reshape(-1)[: min(4, x.size)] = (np.float32(2.5) * np.float32(np.asarray(scale).reshape(-1)[0]))
    attrs = dict(axis=axis)
    q_ort = _single_node("QuantizeLinear", x, [("s", scale), ("z", zp)], attrs, dt)
    np.testing.assert_array_equal(q_ort, R.quantize_linear(x, scale, zp, axis=axis))
    f_ort = _single_node("DequantizeLinear", q_ort, [("s", scale), ("z", zp)], attrs, np.float32)
    np.testing.assert_array_equal(f_ort, R.dequantize_linear(q_ort, scale, zp, axis=axis))


def test_reference_qdq_add_equals_onnxruntime_graph():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    b = rng.integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    sa, za, sb, zb, sy, zy = np.float32(0.031), np.uint8(120), np.float32(0.017), np.uint8(3), np.float32(0.05), np.uint8(60)
    tt = helper.np_dtype_to_tensor_dtype
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in
             [("sa", sa), ("za", za), ("sb", sb), ("zb", zb), ("sy", sy), ("zy", zy)]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Add", ["fa", "fb"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "add", [helper.make_tensor_value_info(n, tt(np.dtype(np.uint8)), a.shape) for n in "ab"],
                              [helper.make_tensor_value_info("y", tt(np.dtype(np.uint8)), None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    got = _session(model).run(None, {"a": a, "b": b})[0]
    np.testing.assert_array_equal(got, R.qlinear_add(a, sa, za, b, sb, zb, sy, zy))
    np.testing.assert_array_equal(K.qlinear_add(a, sa, za, b, sb, zb, sy, zy), got)

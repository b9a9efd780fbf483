"""Session API and the numba back end end to end: a small QDQ CNN made by ORT's own
``quantize_static`` (u8 and s8 activations, per-channel s8 weights) runs on the Numba kernels and
is compared with the same QDQ model evaluated by ONNX Runtime with ORT_DISABLE_ALL.

Acceptance (issue 5): within one quantization step of the output on >= 99.9 % of elements. On
this model the plan is in fact bit-exact with ORT's float evaluation (the measured fraction of
identical elements is asserted too, at >= 99 %, so a regression in the requantization shows)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.errors import UnsupportedOpError
from onnx_compress.runtime import Session
from onnx_compress.verify import reference_session


def _float_cnn(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def conv(x, cin, cout, k, name, group=1, stride=1, relu=True):
        w = const(name + ".w", rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2 / (cin // group * k * k)))
        b = const(name + ".b", rng.normal(0, 0.1, cout))
        nodes.append(helper.make_node("Conv", [x, w, b], [name + ".y"], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride] * 2, group=group))
        if not relu:
            return name + ".y"
        nodes.append(helper.make_node("Relu", [name + ".y"], [name + ".r"], name=name + "/Relu"))
        return name + ".r"

    h = conv("image", 3, 8, 3, "stem", stride=2)
    nodes.append(helper.make_node("MaxPool", [h], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    a = conv("pool1", 8, 8, 3, "dw", group=8)
    a = conv(a, 8, 8, 1, "pw", relu=False)
    nodes.append(helper.make_node("Add", ["pool1", a], ["sum"], name="add"))
    nodes.append(helper.make_node("Relu", ["sum"], ["sum.r"], name="add/Relu"))
    h = conv("sum.r", 8, 16, 3, "c3")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    fc_w, fc_b = const("fc.w", rng.standard_normal((10, 16)) * 0.3), const("fc.b", rng.normal(0, 0.1, 10))
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("c3.r", TensorProto.FLOAT, ["N", 16, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantize(tmp_path, activation: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.data = iter([{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    src, dst = tmp_path / f"f_{activation}.onnx", tmp_path / f"q_{activation}.onnx"
    onnx.save_model(_float_cnn(), str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return onnx.load_model(str(dst))


@pytest.fixture(scope="module", params=["u8", "s8"])
def qdq_model(request, tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("qdq"), request.param)


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of each graph output (each is a DequantizeLinear output)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    steps = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in {o.name for o in model.graph.output}:
            steps[node.output[0]] = float(inits[node.input[1]])
    return steps


def test_numba_backend_matches_ort_qdq_within_one_step(qdq_model):
    feed = {"image": np.random.default_rng(5).standard_normal((8, 3, 32, 32)).astype(np.float32)}
    sess = Session(qdq_model, backend="numba")
    # structural: every Conv/Gemm/pool/Add became one kernel step, no float op is left to run
    step_names = {s.name for s in sess._plan.steps}
    for node in qdq_model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MaxPool", "Add", "GlobalAveragePool", "Flatten"):
            assert node.name in step_names, f"{node.op_type} '{node.name}' was not lowered"
    # Q(image), stem, pool1, dw, pw, add, c3, gap, flatten, fc, DQ(logits), DQ(c3.r)
    assert len(sess._plan.steps) == 12
    got = sess.run(None, feed)
    ref = reference_session(qdq_model).run(None, feed)
    steps = _output_steps(qdq_model)
    assert set(steps) == {"logits", "c3.r"}
    for out, g, r in zip(sess.get_outputs(), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype == np.float32
        diff = np.abs(g.astype(np.float64) - r)
        within_one = np.mean(diff <= steps[out.name] * (1 + 1e-5))
        identical = np.mean(diff == 0)
        assert within_one >= 0.999, f"{out.name}: only {within_one:.4%} within one step"
        assert identical >= 0.99, f"{out.name}: only {identical:.4%} identical"


def test_numba_threads_and_onnxruntime_backend(qdq_model):
    feed = {"image": np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    one = Session(qdq_model, backend="numba", threads=1).run(["logits"], feed)
    two = Session(qdq_model, backend="numba").run(["logits"], feed)
    np.testing.assert_array_equal(one[0], two[0])
    ort_sess = Session(qdq_model, backend="onnxruntime", threads=1)
    assert ort_sess._plan is None
    ort_out = ort_sess.run(["logits"], feed)[0]
    assert ort_out.shape == (2, 10)
    # ORT's fused QLinear kernels use the same requantization: at most one step from the plan
    step = _output_steps(qdq_model)["logits"]
    assert np.max(np.abs(ort_out - one[0])) <= 2 * step + 1e-6


def test_repeated_runs_rebind_buffers_and_match_fresh_sessions(qdq_model):
    """Steps bind their kernels to reused buffers once; new inputs, a new batch size and a return
    to the first one must each give exactly what a fresh session gives."""
    sess = Session(qdq_model, backend="numba")
    rng = np.random.default_rng(11)
    for batch in (2, 2, 5, 2):
        feed = {"image": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
        got = sess.run(None, feed)
        fresh = Session(qdq_model, backend="numba").run(None, feed)
        for g, f in zip(got, fresh):
            np.testing.assert_array_equal(g, f)


def test_get_inputs_outputs_mirror_onnxruntime(qdq_model):
    ours = Session(qdq_model)
    ort_sess = reference_session(qdq_model)
    for mine, theirs in ((ours.get_inputs(), ort_sess.get_inputs()), (ours.get_outputs(), ort_sess.get_outputs())):
        assert [(a.name, a.type, a.shape) for a in mine] == [(b.name, b.type, b.shape) for b in theirs]


def _with_float_graph_input_op(qdq_model) -> onnx.ModelProto:
    """The QDQ CNN plus ``Add(logits, bias_in)`` where ``bias_in`` is a float graph input that is
    never quantized: the numba back end does not run float paths that start outside a DQ."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    model.graph.input.append(helper.make_tensor_value_info("bias_in", TensorProto.FLOAT, [1, 10]))
    model.graph.node.append(helper.make_node("Add", ["logits", "bias_in"], ["shifted"], name="head/Add"))
    model.graph.output.append(helper.make_tensor_value_info("shifted", TensorProto.FLOAT, None))
    return model


def test_unsupported_op_names_the_node(qdq_model):
    model = _with_float_graph_input_op(qdq_model)
    with pytest.raises(UnsupportedOpError, match=r"node 'head/Add' \(Add\): input 'bias_in' is not a dequantized activation"):
        Session(model, backend="numba")
    custom = onnx.ModelProto()
    custom.CopyFrom(qdq_model)
    custom.graph.node.append(helper.make_node("Foo", ["logits"], ["prob"], name="head/Foo", domain="com.example"))
    custom.graph.output.append(helper.make_tensor_value_info("prob", TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedOpError, match=r"'head/Foo': op com.example::Foo has no numba lowering"):
        Session(custom, backend="numba")
    feed = {"image": np.zeros((1, 3, 32, 32), np.float32), "bias_in": np.ones((1, 10), np.float32)}
    assert Session(model, backend="onnxruntime").run(["shifted"], feed)[0].shape == (1, 10)


def test_fallback_runs_the_whole_model_on_onnxruntime_and_says_so(qdq_model, caplog):
    model = _with_float_graph_input_op(qdq_model)
    feed = {"image": np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32),
            "bias_in": np.ones((1, 10), np.float32)}
    with caplog.at_level("WARNING", logger="onnx_compress.runtime.session"):
        sess = Session(model, backend="numba", fallback=True)
    assert sess.backend == "numba" and sess.active_backend == "onnxruntime" and sess._plan is None
    assert "bias_in" in sess.fallback_reason
    assert any("running the whole model on onnxruntime" in r.getMessage() for r in caplog.records)
    got = sess.run(["shifted"], feed)[0]
    np.testing.assert_array_equal(got, Session(model, backend="onnxruntime").run(["shifted"], feed)[0])
    # a model the numba back end can run is not sent to ORT by fallback=True
    ok = Session(qdq_model, backend="numba", fallback=True)
    assert ok.active_backend == "numba" and ok.fallback_reason is None and ok._plan is not None


def test_float_op_without_qdq_is_unsupported():
    with pytest.raises(UnsupportedOpError, match=r"node 'stem' \(Conv\): input 'image' is not a dequantized activation"):
        Session(_float_cnn(), backend="numba")


def test_session_errors_name_the_tensor(qdq_model):
    sess = Session(qdq_model)
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match="missing input 'image'"):
        sess.run(None, {})
    with pytest.raises(ValueError, match="unknown input 'img'"):
        sess.run(None, {"image": x, "img": x})
    with pytest.raises(TypeError, match=r"input 'image' must be tensor\(float\), got float64"):
        sess.run(None, {"image": x.astype(np.float64)})
    with pytest.raises(ValueError, match="input 'image' must have shape"):
        sess.run(None, {"image": x[:, :, :16]})
    with pytest.raises(ValueError, match="unknown output 'nope'"):
        sess.run(["nope"], {"image": x})
    with pytest.raises(ValueError, match="backend must be one of"):
        Session(qdq_model, backend="tvm")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Session(qdq_model, threads=0)


def test_quantized_graph_input_and_output_match_onnxruntime():
    """uint8 in, uint8 out: DQ -> MaxPool -> Q (scale change) and DQ -> Relu -> Q."""
    tt = TensorProto.UINT8
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in
             [("s", np.float32(0.05)), ("z", np.uint8(100)), ("s2", np.float32(0.08)), ("z2", np.uint8(10))]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"], name="dq"),
             helper.make_node("MaxPool", ["xf"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["p", "s2", "z2"], ["y"], name="q"),
             helper.make_node("DequantizeLinear", ["y", "s2", "z2"], ["yf"], name="dq2"),
             helper.make_node("Relu", ["yf"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["yr"], name="q2")]
    graph = helper.make_graph(nodes, "qio", [helper.make_tensor_value_info("x", tt, [2, 3, 7, 9])],
                              [helper.make_tensor_value_info("y", tt, None), helper.make_tensor_value_info("yr", tt, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": np.random.default_rng(2).integers(0, 256, (2, 3, 7, 9)).astype(np.uint8)}
    got = Session(model).run(None, feed)
    ref = reference_session(model).run(None, feed)
    assert [g.dtype for g in got] == [np.uint8, np.uint8] and got[0].shape == (2, 3, 4, 5)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert got[1].min() >= 10  # Relu clamps at the zero point

"""``target="trt"``: TensorRT's explicit-quantization Q/DQ placement (passes/insert_qdq.py).

TensorRT's rules, checked structurally on a ResNet-style block and a Concat block:

- every weighted op (Conv, Gemm) reads its activation input and its weight through a
  DequantizeLinear; weights are int8 per-channel on axis 0 with all-zero int8 zero points and the
  full 8-bit range (``max |q| == 127``); the bias stays float;
- activations are symmetric int8 (zero point 0, int8);
- no QuantizeLinear reads a Conv/Gemm output unless its DQ feeds a weighted op or a residual Add
  (no output Q on weighted ops);
- both inputs of the residual Add are DQ outputs;
- all Concat inputs and its output share one scale.

Numerics: the QDQ model run by ONNX Runtime (CPU, every optimisation on) stays within int8
tolerance of the float model (cosine >= 0.99 on a trained digits CNN). A TensorRT engine is built
through ORT's TensorrtExecutionProvider where that provider exists (skipped otherwise).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_compress.ir.graph import to_graph, to_model
from onnx_compress.passes.calibration import collect_statistics, compute_range
from onnx_compress.passes.insert_qdq import (
    InsertQDQPass,
    QuantConfig,
    plan_quantization,
)
from onnx_compress.passes.quant_report import sqnr_db

from onnx_compress.verify import reference_session

TRT = QuantConfig.for_target("trt")
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def resnet_block(seed=0):
    """Stem Conv-Relu -> [Conv-Relu-Conv] + shortcut -> Add -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {
        "w0": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
        "b0": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w1": (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32),
        "b1": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((8, 8, 1, 1)) * 0.4).astype(np.float32),
        "b2": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "fw": (rng.standard_normal((5, 8)) * 0.5).astype(np.float32),
        "fb": (rng.standard_normal(5) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "r0"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["ra"], name="add_relu"),
        helper.make_node("GlobalAveragePool", ["ra"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])])


def concat_block(seed=0):
    """Two Conv-Relu branches of different ranges -> Concat -> Conv (graph output)."""
    rng = np.random.default_rng(seed)
    inits = {
        "wa": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
        "wb": (rng.standard_normal((6, 3, 1, 1)) * 1.5).astype(np.float32),  # a wider range than branch a
        "wc": (rng.standard_normal((4, 10, 3, 3)) * 0.2).astype(np.float32),
        "bc": (rng.standard_normal(4) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["x", "wb"], ["cb"], name="conv_b"),
        helper.make_node("Relu", ["cb"], ["rb"], name="relu_b"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["y"], name="conv_c", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])])


def _feeds(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _quantize_trt(model, feeds=None):
    graph = to_graph(model)
    plan = plan_quantization(graph, TRT)
    stats = collect_statistics(model, feeds or _feeds(), plan.quantized, progress=False)
    ranges = {k: compute_range(s, "minmax") for k, s in stats.stats.items()}
    qdq = InsertQDQPass(ranges, TRT)
    result = qdq.call(graph)
    return to_model(result.graph, like=model), qdq, ranges


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model, tensor):
    return [n for n in model.graph.node if tensor in n.input]


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _outputs(model, feeds):
    sess = reference_session(model)
    return [sess.run(None, f)[0] for f in feeds]


def assert_trt_placement(model):
    """TensorRT's explicit-quantization rules (module docstring) on a QDQ model."""
    prod, inits = _producers(model), _inits(model)
    weighted = [n for n in model.graph.node if n.op_type in WEIGHTED]
    assert weighted
    for node in weighted:
        for i in (0, 1):
            src = prod.get(node.input[i])
            assert src is not None and src.op_type == "DequantizeLinear", f"{node.name} input {i} is not a DQ output"
        w_dq = prod[node.input[1]]
        q, scale, zp = (inits[t] for t in w_dq.input)
        assert q.dtype == np.int8 and np.abs(q.astype(np.int16)).max() == 127, node.name
        assert _attrs(w_dq).get("axis", 1) == 0 and scale.shape == (q.shape[0],), node.name
        assert zp.dtype == np.int8 and not zp.any(), node.name
        if len(node.input) > 2 and node.input[2]:
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32, "bias must stay float"
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[2] in inits:
            zp = inits[node.input[2]]
            if zp.dtype != np.int32:
                assert zp.dtype == np.int8 and not zp.any(), f"{node.name}: not symmetric int8"
        if node.op_type != "QuantizeLinear":
            continue
        src = prod.get(node.input[0])
        if src is None or src.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        dqs = [c for c in _consumers(model, node.output[0]) if c.op_type == "DequantizeLinear"]
        readers = [r for dq in dqs for r in _consumers(model, dq.output[0])]
        assert readers and all(r.op_type in WEIGHTED or r.op_type == "Add" for r in readers), (
            f"output Q {node.name} after {src.name} feeds {[r.op_type for r in readers]}"
        )
    for add in (n for n in model.graph.node if n.op_type == "Add"):
        assert all(prod.get(t) is not None and prod[t].op_type == "DequantizeLinear" for t in add.input), add.name


def test_trt_resnet_block_placement_and_parity():
    model = resnet_block()
    q, qdq, _ = _quantize_trt(model)
    onnx.checker.check_model(q, full_check=True)
    assert_trt_placement(q)
    prod = _producers(q)
    # the Conv output entering the Add is Q/DQ'd for the Add, not as the Conv's own output Q
    add = next(n for n in q.graph.node if n.op_type == "Add")
    conv2_q = prod[prod[add.input[0]].input[0]]
    assert conv2_q.op_type == "QuantizeLinear" and prod[conv2_q.input[0]].op_type == "Conv"
    # the final Gemm writes the float graph output itself, and GAP / Relus stay float (TensorRT fuses them)
    assert prod["y"].op_type == "Gemm"
    assert {n.op_type for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")} == {
        "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert all(p.zero_point == 0 and p.dtype is np.int8 for p in qdq.params.values())
    feeds = _feeds(8, seed=5)
    assert sqnr_db(_outputs(model, feeds), _outputs(q, feeds)) > 25.0


def test_trt_concat_inputs_share_one_scale():
    model = concat_block()
    q, qdq, ranges = _quantize_trt(model)
    onnx.checker.check_model(q, full_check=True)
    assert_trt_placement(q)
    prod, inits = _producers(q), _inits(q)
    concat = next(n for n in q.graph.node if n.op_type == "Concat")
    dqs = [prod[t] for t in concat.input]
    assert all(d.op_type == "DequantizeLinear" for d in dqs)
    conv_c = next(n for n in q.graph.node if n.name == "conv_c")
    out_dq = prod[conv_c.input[0]]
    assert out_dq.op_type == "DequantizeLinear" and prod[out_dq.input[0]].input[0] == concat.output[0]
    scales = {float(inits[d.input[1]]) for d in dqs + [out_dq]}
    assert len(scales) == 1, scales
    # the one scale covers the wider branch: max |x| over both inputs / 127
    lo, hi = ranges["cat"]
    absmax = max(abs(lo), abs(hi))
    assert scales.pop() == pytest.approx(absmax / 127.0, rel=1e-6)
    assert max(abs(v) for v in ranges.get("cat", (0, 0))) >= max(
        max(abs(a), abs(b)) for a, b in (qdq.ranges.get(t, (0, 0)) for t in ("ra", "rb")))
    feeds = _feeds(8, seed=5)
    assert sqnr_db(_outputs(model, feeds), _outputs(q, feeds)) > 25.0


def test_trt_config_is_symmetric_int8():
    assert (TRT.activations, TRT.symmetric, TRT.weight_bits, TRT.target) == ("s8", True, 8, "trt")
    with pytest.raises(ValueError, match="trt"):
        QuantConfig(target="trt")  # u8 asymmetric 7-bit defaults are not TensorRT's form
    with pytest.raises(ValueError, match="target"):
        QuantConfig(target="tpu")


def _train_digits_small():
    """A digits-style CNN (Conv-BN-ReLU6, residual Conv block, GAP, Linear) on sklearn's 8x8 digits,
    trained briefly (3 epochs, seeded): enough to give it real, peaked logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn.datasets")
    from tests.digits import digits_split, train_and_export

    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c3, self.b3 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
            self.fc, self.act = nn.Linear(32, 10), nn.ReLU6()

        def forward(self, t):
            t = self.act(self.b1(self.c1(t)))
            t = self.act(t + self.b2(self.c2(t)))
            t = self.act(self.b3(self.c3(t)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1))

    x_train, y_train, x_test, y_test = digits_split(1200)
    model = train_and_export(Net, x_train, y_train, epochs=3, lr=1e-2)
    return model, x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def digits():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
        return _train_digits_small()


def _ort_all(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_trt_digits_cnn_ort_parity(digits):
    from onnx_compress.quantize import quantize

    model, x_train, _, x_test, y_test = digits
    calib = [{"x": x_train[i : i + 1]} for i in range(64)]
    q, report = quantize(model, calib, target="trt", report_kernels=False, progress=False)
    assert report.config.target == "trt" and report.as_dict()["config"]["target"] == "trt"
    onnx.checker.check_model(q, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in q.graph.node)
    assert_trt_placement(q)
    ref = _ort_all(model).run(None, {"x": x_test})[0]
    got = _ort_all(q).run(None, {"x": x_test})[0]
    cos = _cosine(ref, got)
    assert cos.mean() >= 0.99 and cos.min() >= 0.9, (cos.mean(), cos.min())
    ref_acc, got_acc = (ref.argmax(1) == y_test).mean(), (got.argmax(1) == y_test).mean()
    assert ref_acc > 0.6, "the float CNN did not learn the digits (chance is 0.1)"
    assert got_acc >= ref_acc - 0.02, (ref_acc, got_acc)


def test_trt_engine_builds_through_ort_tensorrt_provider(tmp_path):
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in providers:
        pytest.skip(f"TensorrtExecutionProvider not available in onnxruntime (providers: {', '.join(providers)})")
    model = resnet_block()
    q, _, _ = _quantize_trt(model)
    options = {"trt_int8_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path)}
    sess = ort.InferenceSession(q.SerializeToString(), providers=[("TensorrtExecutionProvider", options)])
    assert sess.get_providers()[0] == "TensorrtExecutionProvider", sess.get_providers()
    feeds = _feeds(4, seed=7)
    got = [sess.run(None, f)[0] for f in feeds]
    assert any(tmp_path.iterdir()), "TensorRT wrote no engine"
    assert sqnr_db(_outputs(model, feeds), got) > 20.0


def test_cli_target_trt(tmp_path):
    from onnx_compress.cli import EXIT_OK, main

    model = resnet_block()
    src, out, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(src))
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    rc = main([str(src), str(out), "--quantize", "int8", "--calib", str(calib), "--target", "trt", "-q"])
    assert rc == EXIT_OK
    assert_trt_placement(onnx.load(str(out)))

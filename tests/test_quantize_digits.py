"""End-to-end INT8 on a digits CNN trained here: accuracy in ORT's integer kernels vs FP32.

The CNN (ReLU6, a depthwise conv, a residual Add, BatchNorm kept unfused in the export) is trained
seeded on ``sklearn.datasets.load_digits()``, quantized with 256 calibration samples from the train
split, and evaluated on the held-out split in ONNX Runtime with ``ORT_ENABLE_ALL`` (the fused
integer kernels users actually get). ORT's own ``quantize_static`` (QDQ, per-channel) on the same
data is measured and recorded for comparison, not asserted.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.digits import digits_split, train_and_export

logger = logging.getLogger(__name__)

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")


def _train_digits():
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.dw, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
            self.pw, self.b3 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
            self.c2, self.b4 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
            self.fc, self.act = nn.Linear(32, 10), nn.ReLU6()

        def forward(self, t):
            t = self.act(self.b1(self.c1(t)))
            t = t + self.b3(self.pw(self.act(self.b2(self.dw(t)))))
            t = self.act(self.b4(self.c2(t)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1))

    x_train, y_train, x_test, y_test = digits_split(1200)
    model = train_and_export(Net, x_train, y_train, epochs=30, lr=3e-3)
    return model, x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def digits():
    return _train_digits()


def _accuracy(model_or_path, x, y) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(1) == y).mean())


def _ort_quantize_static(model: onnx.ModelProto, calib: np.ndarray, tmp: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"x": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self._it, None)

    src, dst = tmp / "fp32.onnx", tmp / "ort_int8.onnx"
    onnx.save_model(model, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return dst


def test_digits_int8_matches_fp32_in_ort_integer_kernels(digits, record_property):
    from onnx_compress.quantize import quantize

    model, x_train, _, x_test, y_test = digits
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    fp32 = _accuracy(model, x_test, y_test)
    assert fp32 > 0.93, f"the digits CNN did not train (FP32 accuracy {fp32:.3f})"

    quantized, report = quantize(model, {"x": x_train[:256]}, progress=False)
    int8 = _accuracy(quantized, x_test, y_test)

    with tempfile.TemporaryDirectory() as tmp:
        ort_path = _ort_quantize_static(model, x_train[:256], Path(tmp))
        ort_int8 = _accuracy(ort_path, x_test, y_test)
    record_property("fp32_accuracy", fp32)
    record_property("onnx_compress_int8_accuracy", int8)
    record_property("ort_quantize_static_per_channel_accuracy", ort_int8)
    logger.warning("digits: FP32 %.4f, onnx-compress INT8 %.4f, ORT quantize_static(QDQ, per_channel) %.4f",
                   fp32, int8, ort_int8)

    # accuracy in the fused integer kernels: within 0.3 points of FP32
    assert int8 >= fp32 - 0.003, (fp32, int8, report.summary())

    # structure: BN folded, every Conv/Gemm/Add an integer kernel in ORT's optimised graph
    assert not any(n.op_type == "BatchNormalization" for n in quantized.graph.node)
    kernels = report.kernels
    assert kernels is not None
    assert kernels.integer_ops["QLinearConv"] == 4, kernels.summary()
    assert kernels.integer_ops["QLinearAdd"] == 1, kernels.summary()
    assert kernels.integer_ops["QGemm"] == 1, kernels.summary()
    float_compute = {"Conv", "FusedConv", "Gemm", "FusedGemm", "Add", "MatMul", "Clip", "Relu"}
    assert not float_compute & set(kernels.float_ops), kernels.summary()

    # the non-VNNI trap: every u8 x s8 pair sum of the GEMM-based kernels (vpmaddubsw) fits int16
    # (7-bit weights), so they cannot saturate on any x86 CPU; depthwise Convs (group == C_out,
    # W [C, 1, k, k]) run in MLAS's depthwise kernels, which widen both operands to 16/32 bits
    # before multiplying (exact for any int8 weight), and may use all 8 bits
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    readers = {i: n for n in quantized.graph.node for i in n.input}
    weights = []
    for n in quantized.graph.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.dtype != np.int8:
            continue
        reader = readers[n.output[0]]
        group = next((a.i for a in reader.attribute if a.name == "group"), 1)
        weights.append((reader.op_type == "Conv" and group == w.shape[0] and w.shape[1] == 1, w))
    assert len(weights) == 5
    assert all(2 * 255 * int(np.abs(w).max()) <= 32767 for depthwise, w in weights if not depthwise)
    assert any(depthwise for depthwise, _ in weights)
    assert all(int(np.abs(w).max()) <= 127 for _, w in weights)

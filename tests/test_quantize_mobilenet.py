"""Acceptance: MobileNetV2 (real ImageNet weights) INT8 vs FP32 and vs ORT's quantize_static.

Calibrated on 32 samples (4 views of 8 real photos), evaluated on 72 views of the 12 other photos
(``benchmarks/bench_quantize.py`` holds the data split and prints the same table). Every model is
run by ONNX Runtime with ``ORT_ENABLE_ALL``, i.e. in the fused integer kernels.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from benchmarks import bench_quantize as bench  # noqa: E402
from tests import real_models as rm  # noqa: E402

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    path = rm.mobilenet_v2_onnx(tmp_path_factory.mktemp("mobilenet"))
    calib, evaluation = bench.data()
    model = onnx.load(str(path))
    return path, model, calib, evaluation, bench.outputs(model, evaluation).argmax(1)


def _agreement(model, evaluation, reference) -> float:
    return float((bench.outputs(model, evaluation).argmax(1) == reference).mean())


def test_mobilenet_v2_int8_agreement_beats_ort(mobilenet, record_property):
    from onnx_compress.quantize import quantize

    path, model, calib, evaluation, reference = mobilenet
    assert len(calib) <= 32 and len(evaluation) == 72
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    quantized, report = quantize(model, feeds, min_agreement=0.99, holdout=0.5, progress=False)
    ours = _agreement(quantized, evaluation, reference)
    ort_default = _agreement(bench.ort_quantize_static(path, calib, per_channel=False), evaluation, reference)
    ort_channel = _agreement(bench.ort_quantize_static(path, calib, per_channel=True), evaluation, reference)
    for key, value in (("ours", ours), ("ort_default", ort_default), ("ort_per_channel", ort_channel)):
        record_property(key, value)
    logger.warning("MobileNetV2 top-1 agreement: ours %.3f (%s), ORT default %.3f, ORT per-channel %.3f",
                   ours, report.summary(), ort_default, ort_channel)

    # structure: BN folded, most of the network in integer kernels, the float layers reported
    assert not any(n.op_type == "BatchNormalization" for n in quantized.graph.node)
    assert report.kernels is not None and report.kernels.integer_ops["QLinearConv"] >= 52 - 2 * len(report.float_layers)
    assert report.holdout is not None and report.holdout.top1 >= 0.99
    assert report.sensitivity and all(np.isfinite(s.sqnr_db) or s.sqnr_db > 0 for s in report.sensitivity)

    assert ours >= 0.95, (ours, report.summary())
    assert ours >= ort_default + 0.20, (ours, ort_default)
    assert ours >= ort_channel + 0.20, (ours, ort_channel)


@pytest.fixture(scope="module")
def default_run(mobilenet):
    from onnx_compress.quantize import quantize

    path, model, calib, evaluation, reference = mobilenet
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    quantized, report = quantize(model, feeds, progress=False)
    return quantized, report, _agreement(quantized, evaluation, reference)


def test_mobilenet_v2_int8_default_pipeline_beats_ort(mobilenet, default_run, record_property):
    """The default pipeline (no layer kept float): every Conv an integer kernel, >= 20 points above
    ORT quantize_static both ways, and the saturation bound of the kernels ORT uses."""
    from onnx import numpy_helper

    path, model, calib, evaluation, reference = mobilenet
    quantized, report, ours = default_run
    ort_default = _agreement(bench.ort_quantize_static(path, calib, per_channel=False), evaluation, reference)
    ort_channel = _agreement(bench.ort_quantize_static(path, calib, per_channel=True), evaluation, reference)
    record_property("ours_default", ours)
    logger.warning("MobileNetV2 default pipeline: ours %.3f, ORT default %.3f, ORT per-channel %.3f (%s)",
                   ours, ort_default, ort_channel, report.summary())
    assert not report.float_layers
    assert report.kernels is not None and report.kernels.integer_ops["QLinearConv"] == 52, report.kernels.summary()
    assert report.kernels.integer_ops["QGemm"] == 1 and report.kernels.float_total == 0, report.kernels.summary()
    # GEMM-based kernels: 7-bit (2 * 255 * 63 <= 32767); depthwise kernels widen first: 8-bit allowed
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    readers = {i: n for n in quantized.graph.node for i in n.input}
    depthwise = 0
    for n in quantized.graph.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.dtype != np.int8:
            continue
        reader = readers[n.output[0]]
        group = next((a.i for a in reader.attribute if a.name == "group"), 1)
        if reader.op_type == "Conv" and group == w.shape[0] and w.shape[1] == 1:
            depthwise += 1
            assert int(np.abs(w.astype(np.int16)).max()) <= 127
        else:
            assert 2 * 255 * int(np.abs(w.astype(np.int16)).max()) <= 32767, reader.name
    assert depthwise == 17
    assert ours >= ort_default + 0.20, (ours, ort_default)
    assert ours >= ort_channel + 0.20, (ours, ort_channel)


@pytest.mark.xfail(strict=True, reason="the default pipeline reaches 88.9 % on this split (lottery mean 64.6 "
                                       "of 72 views), the bar is 95 %, which needs ~24 dB logits SQNR against "
                                       "18.0 dB: 8-bit activations would need ~1/10 of their noise; "
                                       "measurements in onnx_compress/quantize.py")
def test_mobilenet_v2_int8_default_pipeline_reaches_the_bar(default_run):
    quantized, report, ours = default_run
    assert ours >= 0.95, (ours, report.summary())

"""``onnx-compress IN OUT --prune 0.3 --quantize int8 --calib DATA`` in one call (issue 4 acceptance).

Pruning runs first (on the model as given), then the lossless pipeline (BatchNorm folded), then
INT8 quantization calibrated on ``DATA`` (an ``.npz`` keyed by input name, stacked on axis 0).

* MobileNetV2 with ImageNet weights, calibrated on 16 views of the 8 calibration photos of
  ``benchmarks/bench_quantize.py``; agreement of the pruned INT8 model with the *pruned FP32*
  model (``--prune 0.3`` alone, same calibration file) on the 72 views of the 12 other photos, run
  by ONNX Runtime with all optimisations (its integer kernels): top-1, top-5 overlap, and SQNR and
  top-1 of the logits with each class's mean over the views removed (see ``MIN_TOP1``).
* ResNet-50 (``benchmarks/models.py``, seeded weights: agreement would say nothing) on 8 seeded
  inputs: the call succeeds and gives a smaller, Q/DQ model that ORT runs.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from benchmarks import bench_quantize as bench  # noqa: E402
from onnx_compress.passes.quant_report import ort_kernel_report  # noqa: E402
from tests import real_models as rm  # noqa: E402

logger = logging.getLogger(__name__)


ARGS = ["--prune", "0.3", "--quantize", "int8"]
#: Uniform 30 % L1 pruning without fine-tuning (``--reconstruct`` too) leaves a MobileNetV2 that
#: predicts one class (333) for all 72 views, so top-1 agreement with it is 1.0 and says little;
#: the input-dependent part of the logits (each class's mean over the views removed) is what the
#: INT8 model must follow. Measured (2-core AVX-512 VNNI machine, ORT_ENABLE_ALL): top-1 1.000,
#: top-5 overlap 0.975, centred logits SQNR 18.9 dB and top-1 agreement 0.736 (28 distinct classes).
MIN_TOP1 = 0.95
MIN_TOP5_OVERLAP = 0.90
MIN_CENTRED_SQNR_DB = 15.0
MIN_CENTRED_TOP1 = 0.60


def _check_compressed(src, out, report) -> onnx.ModelProto:
    """Smaller than the input, BatchNorm folded, Q/DQ present, and ORT loads it."""
    assert report["after"]["parameters"] < report["before"]["parameters"], (report["before"], report["after"])
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["prune"] is not None and report["quantization"] is not None
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["Conv"] > 0, ops
    assert ops["BatchNormalization"] == 0
    onnx.checker.check_model(model, full_check=True)
    return model


def test_bias_correction_with_two_layers_reading_one_tensor():
    """ResNet's first block: the downsample Conv and conv1 read the same quantized tensor. The
    bias-correction probe builds one quantized twin of that tensor for both (it used to build two
    nodes with one name, which ORT refuses)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_compress.quantize import quantize

    rng = np.random.default_rng(0)
    inits = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
             (("w0", (4, 3, 3, 3)), ("w1", (4, 4, 1, 1)), ("w2", (4, 4, 1, 1)))}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w1"], ["b1"], name="conv1"),
             helper.make_node("Conv", ["r", "w2"], ["b2"], name="downsample"),
             helper.make_node("Add", ["b1", "b2"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    _, report = quantize(model, feeds, bias_correction=True, weight_rounding="nearest", progress=False)
    assert report.bias_shifts is not None and {"conv1", "downsample"} <= set(report.bias_shifts)
    assert report.kernels is not None and report.kernels.integer_ops["QLinearConv"] == 3, report.kernels.summary()


@pytest.mark.slow
@pytest.mark.realmodel
def test_mobilenet_v2_prune_and_quantize_in_one_call(tmp_path_factory, record_property):
    cache = tmp_path_factory.mktemp("mobilenet_prune_int8")
    src = rm.mobilenet_v2_onnx(cache)
    calib, evaluation = bench.data()
    data = cache / "calib.npz"
    np.savez(data, input=calib[:16])

    code, out, report = rm.compress_cli(src, cache, args=[*ARGS, "--calib", str(data)], name="int8")
    assert code == 0
    int8 = _check_compressed(src, out, report)
    kernels = ort_kernel_report(int8)
    convs = Counter(n.op_type for n in int8.graph.node)["Conv"]
    assert kernels.integer_ops["QLinearConv"] == convs == 52, kernels.summary()

    code, fp32_out, fp32_report = rm.compress_cli(src, cache, args=["--prune", "0.3", "--calib", str(data)],
                                                  name="fp32")
    assert code == 0
    assert fp32_report["after"]["macs"] == report["after"]["macs"]  # the same pruning

    pruned = bench.outputs(onnx.load(str(fp32_out)), evaluation).astype(np.float64)
    original = bench.outputs(onnx.load(str(src)), evaluation).argmax(1)
    quantized = bench.outputs(int8, evaluation).astype(np.float64)
    top1 = float((quantized.argmax(1) == pruned.argmax(1)).mean())
    top5 = np.argsort(-pruned, axis=1)[:, :5], np.argsort(-quantized, axis=1)[:, :5]
    top5_overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(*top5)]))
    pc, qc = pruned - pruned.mean(axis=0), quantized - quantized.mean(axis=0)
    centred_sqnr = float(10 * np.log10((pc**2).sum() / ((pc - qc) ** 2).sum()))
    centred_top1 = float((pc.argmax(1) == qc.argmax(1)).mean())
    figures = {"top1_vs_pruned_fp32": top1, "top5_overlap": top5_overlap, "centred_sqnr_db": centred_sqnr,
               "centred_top1": centred_top1, "pruned_fp32_distinct_top1": len(np.unique(pruned.argmax(1))),
               "pruned_fp32_top1_vs_original": float((pruned.argmax(1) == original).mean())}
    for key, value in figures.items():
        record_property(key, value)
    logger.warning("MobileNetV2 --prune 0.3 --quantize int8: params %d -> %d, MACs %d -> %d; vs pruned FP32: %s; %s",
                   report["before"]["parameters"], report["after"]["parameters"], report["before"]["macs"],
                   report["after"]["macs"], figures, kernels.summary())
    assert top1 >= MIN_TOP1, figures
    assert top5_overlap >= MIN_TOP5_OVERLAP, figures
    assert centred_sqnr >= MIN_CENTRED_SQNR_DB, figures
    assert centred_top1 >= MIN_CENTRED_TOP1, figures


@pytest.mark.slow
@pytest.mark.realmodel
def test_resnet50_prune_and_quantize_in_one_call(tmp_path_factory, record_property):
    from benchmarks.models import resnet_onnx

    cache = tmp_path_factory.mktemp("resnet50_prune_int8")
    src = resnet_onnx("resnet50", cache_dir=cache)
    rng = np.random.default_rng(0)
    data = cache / "calib.npz"
    np.savez(data, input=rng.standard_normal((8, 3, 224, 224)).astype(np.float32))

    code, out, report = rm.compress_cli(src, cache, args=[*ARGS, "--calib", str(data)])
    assert code == 0
    model = _check_compressed(src, out, report)
    kernels = ort_kernel_report(model)
    convs = Counter(n.op_type for n in model.graph.node)["Conv"]
    assert convs == 53 and kernels.integer_ops["QLinearConv"] == 53, kernels.summary()
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    y = bench.outputs(model, x)
    assert y.shape == (2, 1000) and np.isfinite(y).all()
    record_property("params", [report["before"]["parameters"], report["after"]["parameters"]])
    logger.warning("ResNet-50 --prune 0.3 --quantize int8: params %d -> %d, MACs %d -> %d; %s",
                   report["before"]["parameters"], report["after"]["parameters"], report["before"]["macs"],
                   report["after"]["macs"], kernels.summary())

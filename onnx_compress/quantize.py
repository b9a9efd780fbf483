"""INT8 post-training quantization: ``quantize(model, calib, **options) -> (ModelProto, QuantReport)``.

The pipeline:

1. load (path, bytes or ModelProto) and run the default lossless pipeline without verification
   (``compress(model, verify=False)``), which folds every BatchNormalization into its Conv/Gemm
   first, so that the folded weights are what gets quantized;
2. lift the opset to 13 if lower (per-axis DequantizeLinear);
3. plan: :func:`~onnx_compress.passes.insert_qdq.plan_quantization` lists the activation
   tensors to quantize;
4. calibrate: stream the calibration data through ONNX Runtime and keep running statistics of
   exactly those tensors (:mod:`~onnx_compress.passes.calibration`), memory flat in the number of
   samples; compute each tensor's range with ``method`` (``minmax``, ``percentile``, ``entropy``,
   ``mse``);
5. insert Q/DQ (:class:`~onnx_compress.passes.insert_qdq.InsertQDQPass`);
6. report: integer vs float kernels in ORT with all optimisations on, sizes, per-layer SQNR when
   asked.

Defaults (``activations="u8"``, asymmetric, per-channel, ``weight_bits=7``, ``method="percentile"``)
are chosen by measurement on the digits CNN (``tests/test_quantize_digits.py``): 7-bit weights
keep ORT's fused u8s8 kernels free of int16 saturation on x86 CPUs without VNNI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import onnx

from .ir import io as ir_io
from .ir.graph import to_graph, to_model
from .ir.stats import file_size
from .ir.validate import validate_model
from .passes.calibration import (
    CALIB_METHODS,
    ImagePreprocessing,
    collect_statistics,
    compute_range,
    load_calibration,
)
from .passes.insert_qdq import DEFAULT_OP_TYPES, InsertQDQPass, QuantConfig, plan_quantization
from .passes.quant_report import KernelReport, LayerSensitivity, ort_kernel_report, per_layer_sqnr

logger = logging.getLogger(__name__)

QDQ_MIN_OPSET = 13


@dataclass
class QuantReport:
    config: QuantConfig
    method: str
    samples: int
    quantized_nodes: list[str]
    declined: list[tuple[str, str]]
    tensors_calibrated: int
    size_before: int
    size_after: int
    kernels: KernelReport | None = None
    sensitivity: list[LayerSensitivity] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": {
                "activations": self.config.activations,
                "symmetric": self.config.symmetric,
                "per_channel": self.config.per_channel,
                "weight_bits": self.config.weight_bits,
                "exclude": list(self.config.exclude),
            },
            "method": self.method,
            "samples": self.samples,
            "quantized_nodes": self.quantized_nodes,
            "declined": [{"node": n, "reason": r} for n, r in self.declined],
            "tensors_calibrated": self.tensors_calibrated,
            "bytes": {"before": self.size_before, "after": self.size_after},
            "kernels": None if self.kernels is None else self.kernels.as_dict(),
            "sensitivity": None if self.sensitivity is None else [
                {"node": s.node, "op": s.op, "sqnr_db": s.sqnr_db, "agreement": s.agreement} for s in self.sensitivity
            ],
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        kernels = "" if self.kernels is None else f"; ORT kernels: {self.kernels.summary()}"
        return (
            f"{len(self.quantized_nodes)} nodes quantized ({self.method}, {self.samples} samples), "
            f"{self.size_before} -> {self.size_after} bytes{kernels}"
        )


def prepare_float_model(model: Any, *, fold: bool = True) -> onnx.ModelProto:
    """Load, run the lossless pipeline (BatchNorm folding included) and lift the opset to >= 13."""
    from .api import compress

    proto = ir_io.load_model(model)
    if fold:
        proto = compress(proto, verify=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_MIN_OPSET:
        from onnx import version_converter

        converted = version_converter.convert_version(proto, QDQ_MIN_OPSET)
        converted.metadata_props.extend(p for p in proto.metadata_props if p not in converted.metadata_props)
        proto = converted
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # shapes only give dtypes to the planner; unknown dtypes default to float
        return proto


def quantize(
    model: Any,
    calib: Any,
    *,
    method: str = "percentile",
    activations: str = "u8",
    symmetric: bool = False,
    per_channel: bool = True,
    weight_bits: int = 7,
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    percentile: float = 99.999,
    batch_size: int = 16,
    max_samples: int | None = None,
    preprocessing: ImagePreprocessing | None = None,
    fold: bool = True,
    report_kernels: bool = True,
    sensitivity_feeds: Sequence[dict] | None = None,
    progress: bool | None = None,
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` to INT8 QDQ with calibration data ``calib``.

    ``calib``: an ``.npz`` path (arrays stacked on axis 0), a folder of ``.npz`` feeds, a folder of
    images (see ``preprocessing``), a dict of stacked arrays, or any iterable of feed dicts.
    ``sensitivity_feeds``: when given, per-layer SQNR on these feeds is added to the report.
    """
    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    config = QuantConfig(
        activations=activations, symmetric=symmetric, per_channel=per_channel, weight_bits=weight_bits,
        op_types=frozenset(op_types) if op_types is not None else DEFAULT_OP_TYPES, exclude=tuple(exclude),
    )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    original = ir_io.load_model(model)
    size_before = file_size(original)
    float_model = prepare_float_model(original, fold=fold)
    seconds["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = plan_quantization(to_graph(float_model), config)
    inputs = [i.name for i in float_model.graph.input if i.name not in {t.name for t in float_model.graph.initializer}]
    data = load_calibration(calib, input_names=inputs, preprocessing=preprocessing)
    collector = collect_statistics(
        float_model, data, plan.quantized, histogram=method != "minmax", batch_size=batch_size,
        max_samples=max_samples, progress=progress,
    )
    ranges = {}
    for name, stats in collector.stats.items():
        unsigned_levels = not config.symmetric and stats.min >= 0
        ranges[name] = compute_range(
            stats, method, symmetric=config.symmetric, percentile=percentile,
            num_quantized_bins=256 if unsigned_levels else 128, levels=255,
        )
    seconds["calibrate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graph = to_graph(float_model)
    qdq = InsertQDQPass(ranges, config)
    result = qdq.call(graph)
    quantized = to_model(result.graph, like=float_model)
    del quantized.graph.value_info[:]
    validate_model(quantized, origin="quantized model", shape_inference=False)
    seconds["insert"] = time.perf_counter() - t0

    kernels = None
    if report_kernels:
        t0 = time.perf_counter()
        kernels = ort_kernel_report(quantized)
        seconds["kernel_report"] = time.perf_counter() - t0
    sensitivity = None
    if sensitivity_feeds is not None:
        t0 = time.perf_counter()
        sensitivity = per_layer_sqnr(float_model, ranges, list(sensitivity_feeds), config=config, progress=progress)
        seconds["sensitivity"] = time.perf_counter() - t0
    report = QuantReport(
        config=config,
        method=method,
        samples=collector.samples,
        quantized_nodes=[n.name or n.op for n in (qdq.plan.nodes if qdq.plan else [])],
        declined=result.declined,
        tensors_calibrated=len(plan.quantized),
        size_before=size_before,
        size_after=file_size(quantized),
        kernels=kernels,
        sensitivity=sensitivity,
        seconds=seconds,
    )
    logger.info("%s", report.summary())
    return quantized, report


__all__ = ["QuantReport", "prepare_float_model", "quantize"]

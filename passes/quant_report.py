"""What ONNX Runtime actually runs for a QDQ model, and how much each layer's quantization costs.

:func:`ort_kernel_report` loads a model on the CPU provider with ``ORT_ENABLE_ALL`` and
``optimized_model_filepath`` set, reads back the graph ORT will execute, and classifies every
compute node by the element type it computes on. Types are propagated through the optimised
graph: ``QuantizeLinear`` and the ``QLinear*``/``QGemm`` family (with an output scale) produce
integers, ``DequantizeLinear``, ``MatMulIntegerToFloat`` and ``QGemm`` without output scale produce
float, ``MatMulInteger``/``ConvInteger`` produce int32, and data-movement ops (MaxPool, Reshape,
Flatten, Transpose, Squeeze, Unsqueeze, Identity, Slice, Gather, Concat, Split, Pad, Resize,
Expand, Tile) produce the type of their data input. A compute node is *integer* when it is one
of the integer kernels, or a data-movement op on integers; everything else that computes on float
(``Conv``, ``FusedConv``, ``Gemm``, ``Add``, ...) is a *float island*. Q/DQ conversions and shape
plumbing (Shape, Constant, ...) are counted separately.

:func:`per_layer_sqnr` measures sensitivity: it quantizes one node at a time (everything else
float) and computes the signal-to-quantization-noise ratio of the model outputs over the given
feeds, ``SQNR = 10 log10(sum y^2 / sum (y - y_q)^2)`` in dB (all outputs concatenated;
``inf`` when identical), evaluated with ORT optimisations on so the integer kernels are the ones
measured.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

logger = logging.getLogger(__name__)

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QGemm", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QLinearSum",
})
#: integer kernels whose output is float (input is integer)
INT_TO_FLOAT = frozenset({"MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
DATA_MOVEMENT = frozenset({
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice",
    "Gather", "Concat", "Split", "Pad", "Resize", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
})
CONVERSIONS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
PLUMBING = frozenset({"Shape", "Constant", "ConstantOfShape", "Size", "Range", "Cast", "ReorderInput",
                      "ReorderOutput"})
INT_TYPES = frozenset({onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.INT32,
                       onnx.TensorProto.INT16, onnx.TensorProto.UINT16})
FLOAT = onnx.TensorProto.FLOAT


@dataclass
class KernelReport:
    """Op counts of the graph ORT executes after its optimisations."""

    integer_ops: Counter = field(default_factory=Counter)
    float_ops: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    #: (node name, op type) of every float compute node
    float_islands: list[tuple[str, str]] = field(default_factory=list)

    @property
    def integer_total(self) -> int:
        return sum(self.integer_ops.values())

    @property
    def float_total(self) -> int:
        return sum(self.float_ops.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "integer_ops": dict(self.integer_ops),
            "float_ops": dict(self.float_ops),
            "conversions": dict(self.conversions),
            "float_islands": [{"node": n, "op": o} for n, o in self.float_islands],
        }

    def summary(self) -> str:
        ints = ", ".join(f"{k} {v}" for k, v in sorted(self.integer_ops.items())) or "none"
        flts = ", ".join(f"{k} {v}" for k, v in sorted(self.float_ops.items())) or "none"
        return f"integer: {ints}; float: {flts}"


def ort_optimized_model(model: onnx.ModelProto, *, level: str = "all") -> onnx.ModelProto:
    """The graph ORT's CPU provider runs for ``model`` (read back via optimized_model_filepath)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="onnx_compress_ort_") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        options.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def _output_types(node: onnx.NodeProto, types: Mapping[str, int]) -> int | None:
    op = node.op_type
    first = types.get(node.input[0]) if node.input else None
    if op == "DequantizeLinear" or op in INT_TO_FLOAT:
        return FLOAT
    if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
        zp = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return zp if zp is not None else onnx.TensorProto.UINT8
    if op in ("MatMulInteger", "ConvInteger"):
        return onnx.TensorProto.INT32
    if op == "QGemm":
        # QGemm(A, a_s, a_zp, B, b_s, b_zp, C, y_s, y_zp): float output without y_scale
        has_y = len(node.input) > 7 and node.input[7]
        return types.get(node.input[0]) if has_y else FLOAT
    if op.startswith("QLinear"):
        return first
    if op in DATA_MOVEMENT:
        if op == "Concat":
            known = [types.get(i) for i in node.input if i]
            return known[0] if known and all(k == known[0] for k in known) else FLOAT
        return first
    if op in PLUMBING:
        return onnx.TensorProto.INT64 if op in ("Shape", "Size") else first
    return FLOAT if first is None or first == FLOAT else first


def kernel_report(optimized: onnx.ModelProto) -> KernelReport:
    """Classify the nodes of an ORT-optimised graph (see the module docstring)."""
    types: dict[str, int] = {}
    graph = optimized.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    report = KernelReport()
    for node in graph.node:  # ORT writes the optimised graph in topological order
        out_type = _output_types(node, types)
        for out in node.output:
            if out and out not in types and out_type is not None:
                types[out] = out_type
        op = node.op_type
        if op in CONVERSIONS:
            report.conversions[op] += 1
        elif op in INTEGER_KERNELS:
            report.integer_ops[op] += 1
        elif op in PLUMBING:
            continue
        elif op in DATA_MOVEMENT and types.get(node.input[0]) in INT_TYPES:
            report.integer_ops[op] += 1
        else:
            report.float_ops[op] += 1
            report.float_islands.append((node.name, op))
    return report


def ort_kernel_report(model: onnx.ModelProto) -> KernelReport:
    """Integer vs float kernels of ``model`` as ORT's CPU provider runs it with ``ORT_ENABLE_ALL``."""
    return kernel_report(ort_optimized_model(model))


def sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """``10 log10(sum y^2 / sum (y - y_q)^2)`` over all arrays (inf when identical)."""
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(c, np.float64)) ** 2))
                for r, c in zip(reference, candidate))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def optimized_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_outputs(model_or_session: Any, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = optimized_session(model_or_session) if isinstance(model_or_session, onnx.ModelProto) else model_or_session
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {k: feed[k] for k in names}) for feed in feeds]


@dataclass
class LayerSensitivity:
    node: str
    op: str
    sqnr_db: float
    #: top-1 agreement with float over the last axis of the first output (None if not a vector)
    agreement: float | None


def per_layer_sqnr(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    config: Any = None,
    progress: bool | None = None,
) -> list[LayerSensitivity]:
    """Quantize one node at a time and measure output SQNR and top-1 agreement against float.

    ``model`` is the float model the ranges were calibrated on (opset >= 13); ``ranges`` maps
    every root tensor of the full plan to its calibrated range. Sorted, most sensitive first.
    """
    from ..ir.graph import to_graph, to_model
    from .calibration import progress_bar
    from .insert_qdq import InsertQDQPass, QuantConfig, plan_quantization

    config = config or QuantConfig()
    reference = run_outputs(model, feeds)
    plan = plan_quantization(to_graph(model), config)
    names = [n.name for n in plan.nodes if n.name]
    results: list[LayerSensitivity] = []
    for name in progress_bar(names, desc="per-layer SQNR", enabled=progress):
        graph = to_graph(model)
        p = InsertQDQPass(ranges, config.replace(only=frozenset({name})))
        result = p.call(graph)
        op = next((n.op for n in p.plan.nodes if n.name == name), "?") if p.plan else "?"
        candidate = run_outputs(to_model(result.graph, like=model), feeds)
        ref_flat = [a for outs in reference for a in outs]
        cand_flat = [a for outs in candidate for a in outs]
        results.append(LayerSensitivity(name, op, sqnr_db(ref_flat, cand_flat), _agreement(reference, candidate)))
    results.sort(key=lambda r: r.sqnr_db)
    return results


@dataclass
class Agreement:
    """How closely a quantized model follows FP32 on some feeds.

    ``top1``: fraction of rows (last axis of the first output, as class scores) whose argmax is
    FP32's (None when the first output is not a score vector); ``cosine``: mean over rows of
    ``<y, y_q> / (|y| |y_q|)`` of the first output flattened per row (1 when identical).
    """

    top1: float | None
    cosine: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "cosine": self.cosine, "samples": self.samples}

    def summary(self) -> str:
        top1 = "n/a" if self.top1 is None else f"{100 * self.top1:.1f} %"
        return f"top-1 agreement {top1}, cosine {self.cosine:.4f} on {self.samples} rows"


def agreement(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> Agreement:
    """:class:`Agreement` of ``candidate`` outputs with ``reference`` (per feed, lists of outputs)."""
    cosines = []
    for ref, cand in zip(reference, candidate):
        r = np.asarray(ref[0], np.float64)
        c = np.asarray(cand[0], np.float64)
        r = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(1, -1)
        c = c.reshape(r.shape)
        denom = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
        cos = np.where(denom > 0, (r * c).sum(axis=1) / np.where(denom > 0, denom, 1.0), 1.0)
        cosines.extend(cos.tolist())
    return Agreement(_agreement(reference, candidate), float(np.mean(cosines)) if cosines else 1.0, len(cosines))


def _agreement(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float | None:
    hits = total = 0
    for ref, cand in zip(reference, candidate):
        r, c = np.asarray(ref[0]), np.asarray(cand[0])
        if r.ndim < 1 or r.shape[-1] < 2:
            return None
        a, b = r.reshape(-1, r.shape[-1]).argmax(-1), c.reshape(-1, c.shape[-1]).argmax(-1)
        hits += int((a == b).sum())
        total += a.size
    return hits / total if total else None


__all__ = [
    "Agreement",
    "INTEGER_KERNELS",
    "agreement",
    "KernelReport",
    "LayerSensitivity",
    "kernel_report",
    "optimized_session",
    "ort_kernel_report",
    "ort_optimized_model",
    "per_layer_sqnr",
    "run_outputs",
    "sqnr_db",
]

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

Defaults: ``activations="u8"``, asymmetric, per-channel weights, **7-bit weights for GEMM-based
kernels and 8-bit for depthwise Convs** (``weight_bits=7``, ``depthwise_weight_bits=8``; both
proven free of the non-VNNI int16 saturation in :mod:`~onnx_compress.passes.insert_qdq`),
**GPTQ weight rounding** (``weight_rounding="gptq"``, :mod:`~onnx_compress.passes.weight_rounding`),
``method="percentile"`` at **99.99**, no CLE, **activation range equalization** of the ReLU/ReLU6
outputs read by depthwise Convs (:mod:`~onnx_compress.passes.equalize_activations`), **local
empirical bias correction**.

Chosen by measurement on MobileNetV2 with ImageNet weights (calibration: 32 views of 8 real
photos; evaluation: top-1 agreement with FP32 and logits SQNR on 72 views of the 12 other photos,
ORT ``ORT_ENABLE_ALL`` unless marked *emulated*; the split of ``benchmarks/bench_quantize.py``).
The first and last rows are ``python benchmarks/bench_quantize.py`` (2-core AVX-512 VNNI machine:
its integer kernels do not saturate, so 8-bit GEMM rows are what a VNNI CPU gets, not an AVX2
one); the others come from the same functions with the options shown:

===============================================================  ===========  ===========
pipeline                                                         agreement    logits SQNR
===============================================================  ===========  ===========
ORT quantize_static, defaults (QDQ, per-tensor)                  51.4 %
ORT quantize_static, per_channel=True                            55.6 %
*weights only* (activations float): 7-bit, nearest rounding      77.8 %       10.2 dB
  depthwise 8-bit, others 7-bit, nearest                         86.1 %       14.5 dB
  depthwise 8-bit, others 7-bit, GPTQ                            93.1 %       25.5 dB
  all 8-bit, nearest / GPTQ                                      91.7 / 95.8  17.1 / 30.1
*activations only* (8-bit weights then float, emulated):
  percentile 99.999 / 99.99 / 99.9                               83 / 85 / 89 14.8 / 17.3 / 15.7
  mse / entropy / minmax                                         83 / 83 / 67 15.6 / 11.9 / 12.6
previous default (7-bit, nearest, p99.999, local bias corr.)     84.7 %       14.3 dB
dw 8 / 7-bit, GPTQ, p99.999, bias correction                     75.0 %       14.6 dB
dw 8 / 7-bit, GPTQ, p99.99, no bias correction                   86.1 %       16.8 dB
  + p99.999 on Relu/Clip outputs only                            79.2 %       15.8 dB
  + minmax on Relu/Clip outputs only                             79.2 %       15.3 dB
all 8-bit (saturates on AVX2 without VNNI), GPTQ, p99.99, b.c.   88.9 %       16.3 dB
compensating GPTQ (x_q in, fp target), from one QDQ model        1.4 %        -5.7 dB
  sequential (layer by layer), all layers                        55.6 %       6.3 dB
  same, only layers with >= 20 columns per unknown (38 of 53)    87.5 %       17.0 dB
    + local bias correction on the 15 others                     87.5 %       16.1 dB
  sequential, min_ratio=20 during the pass, ridge 0.1            83.3 %       13.9 dB
previous default: dw 8 / 7-bit, GPTQ, p99.99, local bias corr.  87.5 %       16.2 dB
**default**: the same + activation range equalization            **88.9 %**   18.0 dB
===============================================================  ===========  ===========

Averaged over the rounding lottery described below (16 draws each), equalization moves the mean
agreement from 62.5 to 64.6 of 72 views (sd 1.5 in both) and the logits SQNR from 16.18 to
17.92 dB (``python benchmarks/bench_quantize_noise.py`` and the same with ``--no-equalize``).

Reading: weight rounding was the larger error (depthwise layers above all: 7-bit depthwise alone
costs more than every pointwise layer together), and GPTQ plus 8-bit depthwise removes most of
it (weights-only SQNR 10 -> 25 dB). What remains is activation quantization, spread over the 65
activation tensors (one tensor at a time costs 25 to 40 dB each; the worst were ReLU6 outputs
whose 99.99th percentile clips: ``features.0``, ``features.15/conv.1``); no single calibration
method or per-kind override tried beats 99.99 everywhere; activation range equalization takes
``features.0`` from 16.8 % of the activation noise to 6.1 % (all activations 16.8 -> 18.8 dB;
``bench_quantize_noise.py --per-tensor`` with and without ``--no-equalize``). **The default does not reach the issue's
95 % bar on this split** (88.9 %, up from 84.7 %; logits SQNR 14.3 -> 18.0 dB, bounded by the
8-bit activations); it is 33 to 37 points above ORT.
Sequential error-compensating GPTQ (each layer fitted from the quantized prefix's output to the
float layer's output, :func:`~onnx_compress.passes.weight_rounding.sequential_compensation`) fits
the calibration views almost exactly (logits 68 dB) but overfits 32 views of 8 photos in the
classifier and the 7x7 layers; restricted to well-determined layers it gains at most 0.8 dB and
no agreement (compensation dropped after the fact on the others), or loses 4 points when the
restriction applies during the pass (ridge 0.1), at 13x the CPU time of GPTQ (361 s CPU), so it
is a library function, not wired into :func:`quantize`.
How far 95 % is, and how noisy the metric is (``python benchmarks/bench_quantize_noise.py
--per-tensor``, default pipeline): 10 of the 72 evaluation views have an FP32 top-1/top-2 logit
gap under 0.25 (3 under 0.1), and the default's 8 disagreeing views have gaps of 0.03 to 0.80.
Multiplying the input QuantizeLinear's scale by ``1 + k * 1e-6`` (16 draws; only which values
round up or down changes, the logits SQNR stays 17.92 +- 0.06 dB) moves the agreement between 61
and 67 views (mean 64.6, sd 1.5): rows of the table above that differ by 1-2 views are within the
metric's noise. Scaling the INT8 logit error by ``f`` gives 66/72 at ``f = 0.7`` (21.1 dB) and
69/72 = 95.8 % only at ``f = 0.5`` (24.1 dB): the bar needs about 24 dB. Attributing the noise
(each activation Q/DQ pair alone, emulated in float): the activations together are at 18.8 dB
(over the model with only its weights quantized, 23.0 dB from FP32 with the bias correction that
is tuned for quantized activations; 25.5 dB in the table without it), spread over 65 tensors,
the largest the ReLU6 outputs that feed the 1x1 projections (``features.15/conv.1`` 13 %,
``features.10/conv.1`` 12 %) and the last residual sums (``features.16/Add`` 8.5 %). With weights
at 25.5 dB, 24 dB leaves the activations a budget near 30 dB: about a tenth of their noise power
now, i.e. more than 1.5 extra bits on the per-tensor 8-bit activations ONNX Runtime's integer
kernels take (8-bit weights at 30 dB still leave 25 dB: a quarter). Rescaling the projections'
inputs the same way as the depthwise ones (dense consumers, several strengths) measured worse in
an experiment whose script was not kept (no figures).
An output-aware search of the
activation ranges (coordinate descent on the calibration logits' MSE, candidates scored over
small perturbations to beat the lottery) was tried in an experiment whose code was not kept: a
small SQNR gain at many times the pipeline's time, agreement within the lottery (no figures here:
nothing in the repository reruns it).
Mixed precision reaches it by keeping layers float: ``min_agreement=0.99`` reached 98.6 % with
the previous default (38 of 64 layers kept float). Bias correction is kept: it helps agreement
(86.1 -> 87.5 %) at a small SQNR cost (16.8 -> 16.2 dB). Wall time of the default on MobileNetV2:
38 s in the benchmark run above (GPTQ statistics and rounding are the largest part).
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
from .passes.bias_correction import apply_biases, empirical_bias_correction
from .passes.cross_layer_equalization import CrossLayerEqualizationPass
from .passes.insert_qdq import DEFAULT_OP_TYPES, InsertQDQPass, QuantConfig, check_op_types, plan_quantization
from .passes.weight_rounding import collect_hessians, gptq_weights
from .passes.quant_report import (
    Agreement,
    KernelReport,
    LayerSensitivity,
    agreement,
    ort_kernel_report,
    per_layer_sqnr,
    run_outputs,
)

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
    #: cross-layer equalization: pairs equalized (None: not run)
    cle_pairs: int | None = None
    #: activation equalization: activation tensor -> geometric mean of its channel scales (None: not run)
    equalized: dict[str, float] | None = None
    #: bias correction: node -> largest per-channel mean shift removed (None: not run)
    bias_shifts: dict[str, float] | None = None
    #: layers kept in float by mixed precision (most sensitive first)
    float_layers: list[str] = field(default_factory=list)
    #: agreement with FP32 on the held-back split (None: no split)
    holdout: Agreement | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": {
                "activations": self.config.activations,
                "symmetric": self.config.symmetric,
                "per_channel": self.config.per_channel,
                "weight_bits": self.config.weight_bits,
                "target": self.config.target,
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
            "cle_pairs": self.cle_pairs,
            "equalized": self.equalized,
            "bias_correction": self.bias_shifts,
            "float_layers": self.float_layers,
            "holdout_agreement": None if self.holdout is None else self.holdout.as_dict(),
        }

    def summary(self) -> str:
        kernels = "" if self.kernels is None else f"; ORT kernels: {self.kernels.summary()}"
        held = "" if self.holdout is None else f"; held-back {self.holdout.summary()}"
        floats = f", {len(self.float_layers)} kept float" if self.float_layers else ""
        return (
            f"{len(self.quantized_nodes)} nodes quantized{floats} ({self.method}, {self.samples} samples), "
            f"{self.size_before} -> {self.size_after} bytes{held}{kernels}"
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
    depthwise_weight_bits: int = 8,
    weight_rounding: str = "gptq",
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    percentile: float = 99.99,
    cle: bool = False,
    bias_correction: bool = True,
    bias_correction_options: dict | None = None,
    min_agreement: float | None = None,
    holdout: float | int | None = None,
    batch_size: int = 4,
    max_samples: int | None = None,
    preprocessing: ImagePreprocessing | None = None,
    fold: bool = True,
    report_kernels: bool = True,
    sensitivity_feeds: Sequence[dict] | None = None,
    progress: bool | None = None,
    target: str = "ort",
    smooth: float | None = None,
    equalize: bool = True,
) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` to INT8 QDQ with calibration data ``calib``.

    ``calib``: an ``.npz`` path (arrays stacked on axis 0), a folder of ``.npz`` feeds, a folder of
    images (see ``preprocessing``), a dict of stacked arrays, or any iterable of feed dicts.
    ``cle``: cross-layer equalization of the float model first (exact). ``bias_correction``:
    empirical bias correction on the calibration part (needs re-iterable data).
    ``holdout``: the last feeds held back from calibration (a fraction < 1 or a count; default 0.25
    when ``min_agreement`` is set, else none); the report gives agreement with FP32 on them.
    ``min_agreement``: keep the most sensitive layers (lowest one-layer SQNR on the held-back
    split) in float until top-1 agreement on the held-back split reaches it.
    ``sensitivity_feeds``: when given, per-layer SQNR on these feeds is added to the report.
    ``target``: ``ort`` (ONNX Runtime CPU integer kernels) or ``trt`` (TensorRT explicit
    quantization; implies s8 symmetric activations and 8-bit weights, overriding ``activations``,
    ``symmetric``, ``weight_bits`` and ``depthwise_weight_bits``; see
    :mod:`~onnx_compress.passes.insert_qdq`), or ``numba`` (the ``ort`` form with 8-bit weights
    everywhere: the Numba kernels accumulate exactly and never saturate).
    ``smooth``: SmoothQuant migration strength ``alpha`` (e.g. 0.5) for the inputs of MatMuls with
    a constant weight (:mod:`~onnx_compress.passes.smooth_activations`; exact in float, computed
    on the calibration part); None (default) leaves them as they are. For transformers:
    all-MiniLM-L6-v2 with only MatMul quantized (``op_types={"MatMul", "Gemm"}``, ``method="minmax"``)
    keeps mean embedding cosine 0.9885 without it, 0.9916 with 0.5 and 0.9966 with 0.7
    (``tests/test_quantize_minilm.py``).
    ``equalize``: activation range equalization of the ReLU/ReLU6 outputs read by depthwise Convs
    (:mod:`~onnx_compress.passes.equalize_activations`; computed on the calibration part). On by
    default: MobileNetV2's logits SQNR 16.2 -> 18.0 dB (module docstring); nets without such
    chains are untouched.
    ``batch_size``: calibration samples per ONNX Runtime run. Peak memory grows with it, not with
    the number of samples: ResNet-50 peaks at 1.38 GB with 4 and 2.5 GB with 16
    (``python benchmarks/bench_calibration.py --batch-size 4``), hence the default of 4.
    """
    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    if weight_rounding not in ("nearest", "gptq"):
        raise ValueError(f"weight_rounding must be 'nearest' or 'gptq', got {weight_rounding!r}")
    if min_agreement is not None and not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    if op_types is not None:
        check_op_types(op_types)
    if target == "trt":
        activations, symmetric, weight_bits, depthwise_weight_bits = "s8", True, 8, 8
    elif target == "numba":  # ONNX Runtime's QDQ form; the Numba kernels cannot saturate: 8-bit weights
        target, weight_bits, depthwise_weight_bits = "ort", 8, 8
    config = QuantConfig(
        target=target, activations=activations, symmetric=symmetric, per_channel=per_channel, weight_bits=weight_bits,
        depthwise_weight_bits=depthwise_weight_bits, op_types=frozenset(op_types) if op_types is not None else DEFAULT_OP_TYPES, exclude=tuple(exclude),
    )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    original = ir_io.load_model(model)
    size_before = file_size(original)
    float_model = prepare_float_model(original, fold=fold)
    cle_pairs = None
    if cle:
        result = CrossLayerEqualizationPass().call(to_graph(float_model))
        cle_pairs = result.changes
        if result.modified:
            float_model = to_model(result.graph, like=float_model)
    seconds["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inputs = [i.name for i in float_model.graph.input if i.name not in {t.name for t in float_model.graph.initializer}]
    data = load_calibration(calib, input_names=inputs, preprocessing=preprocessing)
    if max_samples is not None:
        data = data.take(max_samples)
    held = None
    if holdout is None and min_agreement is not None:
        holdout = 0.25
    if holdout:
        if data.size is None:
            raise ValueError("a held-back split needs calibration data of known size (a list, .npz or folder)")
        count = int(round(holdout * data.size)) if holdout < 1 else int(holdout)
        count = max(1, min(count, data.size - 1))
        data, held = data.split(count)
        held = list(held)
    if smooth is not None and data.size is None:
        logger.warning("activation smoothing skipped: the calibration data can be read only once")
    elif smooth is not None:
        from .passes.smooth_activations import smooth_activations

        float_model, smoothing = smooth_activations(
            float_model, data, alpha=smooth, select=lambda n: "MatMul" in config.op_types and config.selects(n),
            progress=progress,
        )
        config = config.replace(exclude=config.exclude + tuple(smoothing))  # the Muls read the outliers
    reference_model = float_model  # what agreement is measured against (equalization is not exact)
    equalized = None
    if equalize and data.size is None:
        logger.warning("activation equalization skipped: the calibration data can be read only once")
    elif equalize:
        from .passes.equalize_activations import equalize_activations

        t_equalize = time.perf_counter()
        float_model, equalized = equalize_activations(
            float_model, data, select=lambda n: "Conv" in config.op_types and config.selects(n), progress=progress,
        )
        seconds["equalize"] = time.perf_counter() - t_equalize
    plan = plan_quantization(to_graph(float_model), config)
    collector = collect_statistics(
        float_model, data, plan.quantized, histogram=method != "minmax", batch_size=batch_size, progress=progress,
    )
    ranges = {}
    for name, stats in collector.stats.items():
        unsigned_levels = not config.symmetric and stats.min >= 0
        ranges[name] = compute_range(
            stats, method, symmetric=config.symmetric, percentile=percentile,
            num_quantized_bins=256 if unsigned_levels else 128, levels=255,
        )
    seconds["calibrate"] = time.perf_counter() - t0 - seconds.get("equalize", 0.0)

    def insert(excluded: Sequence[str] = ()) -> tuple[onnx.ModelProto, InsertQDQPass, Any]:
        source = float_model
        if biases:
            source = apply_biases(float_model, {k: v for k, v in biases.items() if k not in set(excluded)})
        qdq = InsertQDQPass(ranges, config.replace(exclude=config.exclude + tuple(excluded)), weights=rounded)
        result = qdq.call(to_graph(source))
        out = to_model(result.graph, like=float_model)
        del out.graph.value_info[:]
        return out, qdq, result

    rounded: dict = {}
    if weight_rounding == "gptq" and config.per_channel:
        t0 = time.perf_counter()
        if data.size is None:
            logger.warning("GPTQ weight rounding skipped: the calibration data can be read only once")
        else:
            weighted = [u.node.name for u in plan.weights if u.node.name]
            hessians = collect_hessians(float_model, data, nodes=weighted, progress=progress)
            rounded = gptq_weights(float_model, hessians, config.weight_qmax_of)
        seconds["weight_rounding"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    biases: dict = {}
    quantized, qdq, result = insert()
    seconds["insert"] = time.perf_counter() - t0

    bias_shifts = None
    if bias_correction:
        t0 = time.perf_counter()
        if data.size is None:
            logger.warning("bias correction skipped: the calibration data can be read only once")
        else:
            _, bias_shifts, biases = empirical_bias_correction(
                float_model, quantized, data, batch_size=batch_size, progress=progress, **(bias_correction_options or {})
            )
            quantized, qdq, result = insert()
        seconds["bias_correction"] = time.perf_counter() - t0

    held_agreement = None
    float_layers: list[str] = []
    sensitivity = None
    if held is not None:
        t0 = time.perf_counter()
        reference = run_outputs(reference_model, held)
        held_agreement = agreement(reference, run_outputs(quantized, held))
        if min_agreement is not None and (held_agreement.top1 or 0.0) < min_agreement:
            if held_agreement.top1 is None:
                raise ValueError("min_agreement needs a model whose first output is a vector of class scores")
            sensitivity = per_layer_sqnr(float_model, ranges, held, config=config, progress=progress)
            order = [s.node for s in sensitivity]

            def trial(k: int):
                model_k, qdq_k, result_k = insert(order[:k])
                return model_k, qdq_k, result_k, agreement(reference, run_outputs(model_k, held))

            # exponential search for the smallest k that meets the bar, then bisection
            best, lo, k = None, 0, 1
            while k <= len(order):
                attempt = trial(k)
                if (attempt[3].top1 or 0.0) >= min_agreement:
                    best = (k, attempt)
                    break
                lo, k = k, k * 2
            if best is None and lo < len(order):
                attempt = trial(len(order))
                best = (len(order), attempt) if (attempt[3].top1 or 0.0) >= min_agreement else None
            if best is not None:
                hi = best[0]
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    attempt = trial(mid)
                    if (attempt[3].top1 or 0.0) >= min_agreement:
                        best, hi = (mid, attempt), mid
                    else:
                        lo = mid
                k, (quantized, qdq, result, held_agreement) = best
                float_layers = order[:k]
            else:
                logger.warning("min_agreement %.3f not reached even with every layer in float", min_agreement)
        seconds["mixed_precision"] = time.perf_counter() - t0
    validate_model(quantized, origin="quantized model", shape_inference=False)

    kernels = None
    if report_kernels:
        t0 = time.perf_counter()
        kernels = ort_kernel_report(quantized)
        seconds["kernel_report"] = time.perf_counter() - t0
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
        cle_pairs=cle_pairs,
        equalized=None if equalized is None else {p.tensor: p.mean_scale for p in equalized},
        bias_shifts=bias_shifts,
        float_layers=float_layers,
        holdout=held_agreement,
    )
    logger.info("%s", report.summary())
    return quantized, report


__all__ = ["QuantReport", "prepare_float_model", "quantize"]

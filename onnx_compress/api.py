"""The public Python API: ``compress(model, **options) -> ModelProto``.

``compress`` loads (path, bytes or ModelProto), validates, lifts opsets below 11, optionally
prunes, runs the lossless pass pipeline to a fixed point, verifies that pipeline's result in ONNX
Runtime, and optionally quantizes to INT8. A lossless result that changes the outputs beyond
tolerance raises :class:`VerificationError` and nothing is returned (or written, by the CLI). ``compress_with_report`` returns the model together with a
:class:`CompressReport` (stats before/after, per-pass changes and declines, verification).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from .ir import io as ir_io
from .ir.constant_nodes import initializers_to_constant_nodes, uses_constant_node_weights
from .ir.errors import OnnxCompressError, UnsupportedOpError, VerificationError
from .ir.graph import to_graph, to_model
from .ir.stats import ModelStats, file_size, model_stats
from .ir.validate import infer_shapes, normalize_opset, validate_model
from .options import CompressOptions
from .passes.base import PassManager
from .passes.registry import DEFAULT_PIPELINE, PASS_FACTORIES
from .verify import VerificationReport, load_feeds, verify_models

logger = logging.getLogger(__name__)


@dataclass
class CompressReport:
    before: ModelStats
    after: ModelStats
    size_before: int
    size_after: int
    pipeline: list[str]
    pass_changes: dict[str, int] = field(default_factory=dict)
    declined: list[tuple[str, str]] = field(default_factory=list)
    verification: VerificationReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: structured pruning (``onnx_compress.prune.PruneReport``), when asked for
    prune: Any = None
    #: INT8 quantization (``onnx_compress.quantize.QuantReport``), when asked for
    quantization: Any = None
    #: lossy result vs the original model (reported, not enforced)
    fidelity: VerificationReport | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "before": {**self.before.as_dict(), "bytes": self.size_before},
            "after": {**self.after.as_dict(), "bytes": self.size_after},
            "pipeline": self.pipeline,
            "pass_changes": self.pass_changes,
            "declined": [{"node": n, "reason": r} for n, r in self.declined],
            "verification": None if self.verification is None else self.verification.as_dict(),
            "seconds": self.seconds,
            "prune": None if self.prune is None else self.prune.as_dict(),
            "quantization": None if self.quantization is None else self.quantization.as_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.as_dict(),
        }


def resolve_pipeline(options: CompressOptions) -> list[str]:
    names = list(options.passes) if options.passes is not None else list(DEFAULT_PIPELINE)
    if options.fuse_activations and "fuse-conv-activation" not in names:
        names.append("fuse-conv-activation")
    unknown = [n for n in list(names) + list(options.skip) if n not in PASS_FACTORIES]
    if unknown:
        raise ValueError(
            f"unknown pass(es): {', '.join(unknown)}; available: {', '.join(PASS_FACTORIES)}"
        )
    return [n for n in names if n not in set(options.skip)]


def _keep_original_value_info(compressed: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Shapes we inferred only to help the passes are not written out; the original's
    ``value_info`` entries are kept for the tensors that still exist (nothing lost, nothing stale)."""
    produced = {name for node in compressed.graph.node for name in node.output}
    del compressed.graph.value_info[:]
    compressed.graph.value_info.extend(vi for vi in original.graph.value_info if vi.name in produced)


def load_for_compression(model: Any) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(original as loaded, working copy at opset >= 11)."""
    original = ir_io.load_model(model)
    return original, normalize_opset(original)


def _run_lossless(working: onnx.ModelProto, opts: CompressOptions, pipeline: list[str]):
    """The pass pipeline on ``working``: (result, per-pass change counts, declined rewrites)."""
    try:
        inferred = infer_shapes(working, data_prop=True)  # on a weightless copy: fast
    except Exception:  # shapes only help passes decide; a model that validated runs without them
        inferred = working
    graph = to_graph(inferred)
    manager = PassManager([PASS_FACTORIES[name](opts) for name in pipeline], steps=opts.max_steps)
    result = manager.call(graph)
    compressed = to_model(result.graph, like=working)
    _keep_original_value_info(compressed, working)
    if uses_constant_node_weights(working):
        initializers_to_constant_nodes(compressed)
    validate_model(compressed, origin="compressed model", shape_inference=False)
    changes: dict[str, int] = {}
    for label, pass_result in getattr(manager, "history", []):
        changes[label] = changes.get(label, 0) + pass_result.changes
    return compressed, changes, result.declined


def _prune(working: onnx.ModelProto, opts: CompressOptions):
    from .prune import prune

    return prune(
        working,
        ratio=opts.prune if opts.prune is not None else 0.0,
        importance=opts.importance,
        target_macs=opts.target_macs,
        round_to=opts.round_to,
        ignore=opts.prune_ignore,
        calib=opts.calib,
        calib_preprocessing=opts.image_preprocessing(),
        reconstruct=opts.reconstruct,
        global_ranking=opts.global_ranking,
        seed=opts.seed,
    )


def _quantize(model: onnx.ModelProto, opts: CompressOptions):
    from .quantize import quantize

    return quantize(
        model,
        opts.calib,
        method=opts.calib_method,
        activations=opts.activations,
        symmetric=opts.symmetric,
        per_channel=not opts.per_tensor,
        target=opts.target,  # numba: 8-bit weights (its kernels cannot saturate); ort: 7-bit (AVX2 u8s8 can)
        exclude=opts.exclude,
        cle=opts.cle,
        bias_correction=opts.bias_correction,
        equalize=opts.equalize,
        min_agreement=opts.min_agreement,
        op_types=opts.quantize_ops or None,
        preprocessing=opts.image_preprocessing(),
        smooth=opts.smooth,
    )


def compress_with_report(model: Any, **options: Any) -> tuple[onnx.ModelProto, CompressReport]:
    """Run the whole job: [prune] -> lossless pipeline (verified strictly) -> [quantize].

    The lossless pipeline is checked against its own input within ``tolerance`` and raises
    :class:`VerificationError` when it is not within it. Pruning and quantization change the
    function on purpose: their cost is measured against the original (``report.fidelity``:
    cosine, top-1 agreement, max diff) and reported, not enforced — ``min_agreement`` is the
    knob that enforces accuracy for quantization.
    """
    opts = CompressOptions.from_kwargs(**options)
    pipeline = resolve_pipeline(opts)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    original, working = load_for_compression(model)
    seconds["load"] = time.perf_counter() - t0

    prune_report = None
    if opts.prunes:
        t0 = time.perf_counter()
        working, prune_report = _prune(working, opts)
        seconds["prune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    compressed, changes, declined = _run_lossless(working, opts, pipeline)
    seconds["passes"] = time.perf_counter() - t0

    real = load_feeds(opts.verify_inputs) if (opts.verify and opts.verify_inputs) else None

    def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> VerificationReport:
        return verify_models(
            reference,
            candidate,
            tolerance=opts.tolerance,
            samples=opts.verify_samples,
            seed=opts.seed,
            real_feeds=real,
            input_shapes=dict(opts.input_shapes),
        )

    verification = None
    if opts.verify:
        t0 = time.perf_counter()
        verification = compare(working, compressed)
        seconds["verify"] = time.perf_counter() - t0

    final = compressed
    quant_report = None
    if opts.quantize and (verification is None or verification.passed or verification.skipped_reason):
        t0 = time.perf_counter()
        final, quant_report = _quantize(compressed, opts)
        seconds["quantize"] = time.perf_counter() - t0

    fidelity = None
    if opts.lossy and opts.verify:
        t0 = time.perf_counter()
        fidelity = compare(original, final)
        seconds["fidelity"] = time.perf_counter() - t0

    report = CompressReport(
        before=model_stats(original),
        after=model_stats(final),
        size_before=file_size(original),
        size_after=file_size(final),
        pipeline=pipeline,
        pass_changes=changes,
        declined=declined,
        verification=verification,
        seconds=seconds,
        prune=prune_report,
        quantization=quant_report,
        fidelity=fidelity,
    )
    if verification is not None and not verification.passed and verification.skipped_reason is None:
        raise VerificationError(f"verification failed: {verification.summary()}", report)
    return final, report


def compress(model: Any, **options: Any) -> onnx.ModelProto:
    """Compress a model (path, bytes or ModelProto) and return the verified ModelProto."""
    compressed, _ = compress_with_report(model, **options)
    return compressed


def compress_file(
    source: str | os.PathLike, destination: str | os.PathLike, *, external_data: bool | None = None, **options: Any
) -> CompressReport:
    """Compress ``source`` into ``destination`` (atomic write; never overwrites the input)."""
    ir_io.check_output_path(destination, source)
    compressed, report = compress_with_report(source, **options)
    ir_io.save_model(compressed, destination, external_data=external_data, protect=(source,))
    return report


__all__ = [
    "CompressReport",
    "OnnxCompressError",
    "UnsupportedOpError",
    "compress",
    "compress_file",
    "compress_with_report",
]

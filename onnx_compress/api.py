"""The public Python API: ``compress(model, **options) -> ModelProto``.

``compress`` loads (path, bytes or ModelProto), validates, lifts opsets below 11, runs the pass
pipeline to a fixed point, and verifies the result against the original in ONNX Runtime. A
result that changes the outputs beyond tolerance raises :class:`VerificationError` and nothing is
returned (or written, by the CLI). ``compress_with_report`` returns the model together with a
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "before": {**self.before.as_dict(), "bytes": self.size_before},
            "after": {**self.after.as_dict(), "bytes": self.size_after},
            "pipeline": self.pipeline,
            "pass_changes": self.pass_changes,
            "declined": [{"node": n, "reason": r} for n, r in self.declined],
            "verification": None if self.verification is None else self.verification.as_dict(),
            "seconds": self.seconds,
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


def compress_with_report(model: Any, **options: Any) -> tuple[onnx.ModelProto, CompressReport]:
    opts = CompressOptions.from_kwargs(**options)
    pipeline = resolve_pipeline(opts)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    original, working = load_for_compression(model)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
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
    seconds["passes"] = time.perf_counter() - t0

    changes: dict[str, int] = {}
    for label, pass_result in getattr(manager, "history", []):
        changes[label] = changes.get(label, 0) + pass_result.changes

    verification = None
    if opts.verify:
        t0 = time.perf_counter()
        real = load_feeds(opts.verify_inputs) if opts.verify_inputs else None
        verification = verify_models(
            original,
            compressed,
            tolerance=opts.tolerance,
            samples=opts.verify_samples,
            seed=opts.seed,
            real_feeds=real,
            input_shapes=dict(opts.input_shapes),
        )
        seconds["verify"] = time.perf_counter() - t0
    report = CompressReport(
        before=model_stats(original),
        after=model_stats(compressed),
        size_before=file_size(original),
        size_after=file_size(compressed),
        pipeline=pipeline,
        pass_changes=changes,
        declined=result.declined,
        verification=verification,
        seconds=seconds,
    )
    if verification is not None and not verification.passed and verification.skipped_reason is None:
        raise VerificationError(f"verification failed: {verification.summary()}", report)
    return compressed, report


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

"""Verification: run the original and the compressed model side by side in ONNX Runtime.

Both run on ``CPUExecutionProvider`` with ``ORT_DISABLE_ALL`` so that ORT's own fusions cannot
hide (or cause) a difference. Inputs are seeded random tensors (float: standard normal; integer:
uniform in ``[0, 10)``; bool: fair coin) for each graph input, with symbolic dimensions set from
``input_shapes`` or, failing that, 1 for the first axis and 64 for the others; plus any real
inputs the user gives.

Per output we report ``max_abs_diff``, ``rel_diff = max_abs_diff / scale`` where
``scale = max(y) - min(y)`` of the original (or ``max|y|`` when the output is constant, or 1),
the cosine similarity of the flattened outputs and, for outputs whose last axis has at least two
entries, top-1 agreement of ``argmax`` over that axis. A run passes when every float output has
``rel_diff <= tolerance`` (or a max |diff| within ``ROUNDING_STEPS`` float32 epsilons of
``max(max|y|, 1)``, about 1e-6 for outputs in [0, 1]: the absolute error of ORT's own vectorised
transcendental kernels, which matters when an output spans only a few float steps) and
every non-float output is identical.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx

from .ir.errors import InvalidModelError, OnnxCompressError, UnsupportedModelError

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

#: differences up to this many float32 epsilons of max|y| count as rounding noise
ROUNDING_STEPS = 8


def reference_session(model: onnx.ModelProto):
    """An ORT session with every graph optimization off, on the CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {first}") from exc


@dataclass
class OutputComparison:
    name: str
    max_abs_diff: float
    rel_diff: float
    cosine: float
    top1_agreement: float | None
    exact_required: bool
    passed: bool


@dataclass
class VerificationReport:
    tolerance: float
    feeds: int
    real_feeds: int
    outputs: list[OutputComparison] = field(default_factory=list)
    skipped_reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped_reason is None and all(o.passed for o in self.outputs)

    @property
    def max_rel_diff(self) -> float:
        return max((o.rel_diff for o in self.outputs), default=0.0)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def top1_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    def summary(self) -> str:
        if self.skipped_reason:
            return f"not verified: {self.skipped_reason}"
        verdict = "passed" if self.passed else "FAILED"
        top1 = self.top1_agreement
        top1_text = "" if top1 is None else f", top-1 agreement {top1 * 100:.1f}%"
        noise = ""
        if self.passed and self.max_rel_diff > self.tolerance:
            noise = "; the outputs span only a few float32 steps, and every difference is within rounding noise"
        return (
            f"{verdict}: max |diff| {self.max_abs_diff:.3g} ({self.max_rel_diff:.3g} of output range, "
            f"tolerance {self.tolerance:g}), cosine {self.min_cosine:.6f}{top1_text} "
            f"on {self.feeds} input set(s) ({self.real_feeds} real){noise}"
        )

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "skipped_reason": self.skipped_reason,
            "tolerance": self.tolerance,
            "input_sets": self.feeds,
            "real_input_sets": self.real_feeds,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "min_cosine": self.min_cosine,
            "top1_agreement": self.top1_agreement,
            "outputs": [o.__dict__ for o in self.outputs],
        }


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def random_feeds(
    model: onnx.ModelProto,
    *,
    count: int = 2,
    seed: int = 0,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs for every graph input (initializer-backed inputs excluded)."""
    input_shapes = dict(input_shapes or {})
    init_names = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for vi in model.graph.input:
            if vi.name in init_names:
                continue
            ttype = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                raise UnsupportedModelError(f"input '{vi.name}' is not a tensor; give real inputs with --inputs")
            if vi.name in input_shapes:
                shape = tuple(input_shapes[vi.name])
            else:
                shape = []
                for axis, dim in enumerate(ttype.shape.dim):
                    if dim.HasField("dim_value") and dim.dim_value > 0:
                        shape.append(int(dim.dim_value))
                    else:
                        shape.append(1 if axis == 0 else 64)
                shape = tuple(shape)
            dtype = _np_dtype(ttype.elem_type)
            if np.issubdtype(dtype, np.floating):
                value = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                value = rng.random(shape) < 0.5
            elif np.issubdtype(dtype, np.integer):
                value = rng.integers(0, 10, size=shape).astype(dtype)
            else:
                raise UnsupportedModelError(f"input '{vi.name}' has dtype {dtype}; give real inputs with --inputs")
            feed[vi.name] = value
        feeds.append(feed)
    return feeds


def load_feeds(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Real inputs: an .npz keyed by input name (batch axis = first), or a folder of .npz files.

    An .npz holds one feed dict; a folder holds one feed dict per file, read in name order.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise InvalidModelError(f"{path}: folder holds no .npz files")
    elif path.is_file():
        files = [path]
    else:
        raise InvalidModelError(f"{path}: no such input file or folder")
    feeds = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as data:
                feeds.append({k: data[k] for k in data.files})
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{file}: not a readable .npz ({exc})") from exc
    return feeds


def compare_outputs(
    reference: Iterable[np.ndarray], candidate: Iterable[np.ndarray], names: Iterable[str], tolerance: float
) -> list[OutputComparison]:
    out = []
    for name, ref, cand in zip(names, reference, candidate):
        ref = np.asarray(ref)
        cand = np.asarray(cand)
        if ref.shape != cand.shape:
            out.append(OutputComparison(name, float("inf"), float("inf"), 0.0, None, False, False))
            continue
        if not np.issubdtype(ref.dtype, np.floating):
            same = bool(np.array_equal(ref, cand))
            out.append(OutputComparison(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"),
                                        1.0 if same else 0.0, None, True, same))
            continue
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        finite = np.isfinite(r) & np.isfinite(c)
        same_nonfinite = bool(np.array_equal(np.isnan(r), np.isnan(c)) and np.array_equal(r[~finite & ~np.isnan(r)], c[~finite & ~np.isnan(c)]))
        diff = float(np.max(np.abs(r[finite] - c[finite]))) if finite.any() else 0.0
        scale = float(np.ptp(r[finite])) if finite.any() else 0.0
        if scale == 0.0:
            scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
        if scale == 0.0:
            scale = 1.0
        rel = diff / scale
        rf, cf = r[finite].ravel(), c[finite].ravel()
        denom = float(np.linalg.norm(rf) * np.linalg.norm(cf))
        cosine = float(np.dot(rf, cf) / denom) if denom > 0 else (1.0 if np.array_equal(rf, cf) else 0.0)
        top1 = None
        if r.ndim >= 2 and r.shape[-1] >= 2:
            top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
        # Below a few float32 steps at the output's magnitude (at least 1.0) a difference is
        # rounding noise, whatever the range: ORT's vectorised Sigmoid/Exp have an absolute error
        # near 1e-7 close to zero, and a saturated sigmoid map can span only a few such steps.
        magnitude = max(float(np.max(np.abs(r[finite]))) if finite.any() else 0.0, 1.0)
        rounding_floor = ROUNDING_STEPS * float(np.finfo(np.float32).eps) * magnitude
        passed = (rel <= tolerance or diff <= rounding_floor) and same_nonfinite
        out.append(OutputComparison(name, diff, rel, cosine, top1, False, passed))
    return out


def verify_models(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    *,
    tolerance: float = 1e-4,
    samples: int = 2,
    seed: int = 0,
    real_feeds: list[Feed] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> VerificationReport:
    """Compare the two models output by output; the report says whether they agree."""
    real_feeds = list(real_feeds or [])
    report = VerificationReport(tolerance=tolerance, feeds=0, real_feeds=len(real_feeds))
    ref_sess = reference_session(original)
    try:
        new_sess = reference_session(compressed)
    except UnsupportedModelError as exc:
        # The original loads, so this is our bug, not the user's model: exit code 1, not 3.
        raise OnnxCompressError(f"internal error: the compressed model does not load in ONNX Runtime ({exc})") from exc
    names = [o.name for o in ref_sess.get_outputs()]
    new_names = [o.name for o in new_sess.get_outputs()]
    if names != new_names:
        raise UnsupportedModelError(f"outputs differ: original {names}, compressed {new_names}")
    try:
        feeds = random_feeds(original, count=samples, seed=seed, input_shapes=input_shapes)
    except UnsupportedModelError as exc:
        if not real_feeds:
            report.skipped_reason = str(exc)
            return report
        feeds = []
    if not feeds and not real_feeds:  # comparing on nothing must not read as "passed"
        report.skipped_reason = "no inputs to compare on (--samples 0 and no --inputs)"
        return report
    per_output: dict[str, list[OutputComparison]] = {}
    for index, feed in enumerate(list(feeds) + real_feeds):
        is_real = index >= len(feeds)
        try:
            ref = ref_sess.run(None, dict(feed))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if is_real:
                raise InvalidModelError(f"the original model rejects real input set {index - len(feeds)}: {first}") from exc
            report.skipped_reason = (
                f"the original model rejects random inputs ({first}); give --input-shape or --inputs"
            )
            return report
        cand = new_sess.run(None, dict(feed))
        for comparison in compare_outputs(ref, cand, names, tolerance):
            per_output.setdefault(comparison.name, []).append(comparison)
        report.feeds += 1
    for name in names:
        runs = per_output.get(name, [])
        if not runs:
            continue
        tops = [r.top1_agreement for r in runs if r.top1_agreement is not None]
        report.outputs.append(
            OutputComparison(
                name=name,
                max_abs_diff=max(r.max_abs_diff for r in runs),
                rel_diff=max(r.rel_diff for r in runs),
                cosine=min(r.cosine for r in runs),
                top1_agreement=float(np.mean(tops)) if tops else None,
                exact_required=runs[0].exact_required,
                passed=all(r.passed for r in runs),
            )
        )
    return report

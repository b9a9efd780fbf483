"""Structured pruning from Python: ``prune(model, ratio=0.3) -> (ModelProto, PruneReport)``.

The model (path, bytes or ModelProto; never mutated) is shape-inferred, lifted into the
coupled-channel graph (:mod:`onnx_compress.dependency_graph`), every prunable group is scored
(``importance``) and keeps ``kept_count(C, ratio, round_to)`` channels, and the plan is applied:
weights are sliced, attributes and shape constants rewritten. Groups touching an op without a
channel rule, a graph input/output or a node matched by ``ignore`` are frozen and the report
says why. ``ratio=0`` (or a plan that removes nothing) returns the model unchanged, weights
bit-identical.

``masked_reference(model, report.plan)`` returns the original with the removed channels made
inert instead of removed (see :mod:`onnx_compress.dependency_graph.apply`); the pruned model
must compute the same outputs. ``list_groups(model)`` lists the groups without pruning.

Before lifting, the model goes through the project's constant folding and no-op elimination
(:class:`~onnx_compress.passes.FoldConstantsPass`, :class:`~onnx_compress.passes.EliminateNoOpPass`)
so that ``Shape``-computed Slice bounds (torch's ``chunk``) and Identity-wrapped weights become
plain constants the channel rules can read. BatchNormalization is *not* folded here: ``bn_scale``
importance reads its gamma, and the pruned BN is sliced like any per-channel op. When ONNX's
shape inference leaves a Reshape output dimension unknown (transformers' ``[batch, seq, -1, d]``
head split), ONNX Runtime's symbolic shape inference fills it in so the head count is provable.

Options (keyword-only, one per CLI flag):

* ``importance``: ``l1``, ``l2``, ``random``, ``bn_scale`` (BN gamma) or ``activation`` (mean
  ``|x|`` of what the next layer reads, measured on ``calib`` with ONNX Runtime);
* ``global_ranking`` / ``max_group_ratio``: one threshold over per-group-normalised scores
  instead of the same ratio in every group (``ratio`` is then the fraction of all prunable
  channels removed), no group losing more than ``max_group_ratio``;
* ``target_macs``: keep at most this fraction of the MACs (bisection; ``ratio`` is ignored);
  without global ranking the per-group ratios follow a latency cost model unless
  ``latency_aware=False`` (:mod:`onnx_compress.dependency_graph.strategy`);
* ``round_to``: kept counts are multiples of it or the whole group (default 8; 16 matches ONNX
  Runtime's convolution block on AVX-512 CPUs; ``"auto"``: the block of the CPU at hand; see
  :mod:`onnx_compress.dependency_graph.strategy`);
* ``ignore``: see :mod:`onnx_compress.dependency_graph.graph`;
* ``calib``: an ``.npz`` keyed by input name (stacked on axis 0), a folder of ``.npz`` feeds, a
  folder of images (made into tensors by ``calib_preprocessing``, an ``ImagePreprocessing``), a
  dict of arrays or an iterable of feed dicts (loaded by
  :func:`onnx_compress.passes.calibration.load_calibration`; give a list, not a generator, when
  both ``activation`` and ``reconstruct`` need it: it is read twice);
* ``reconstruct``: refit the consumers of removed channels by least squares on ``calib``, with a
  ridge toward the plain pruned weights (strength ``ridge`` relative to the features' mean
  variance; :mod:`onnx_compress.dependency_graph.reconstruct`); the result then no longer equals the
  masked reference, by design. ``reconstruct_rounds - 1`` further rounds refit every layer at once on the
  pruned model's own inputs, with a ridge ``refit_ridge`` toward the previous round's weights.
  Measured (``benchmarks/bench_prune_accuracy.py``): the digits CNN needs the second round (30 %:
  98.19 % with it, 97.18 % without; original 98.59 %); MobileNetV2 does better without it (20 %:
  logit cosine 0.300 with one round, 0.104 with two), because a joint round over-corrects deep
  nets. ``refit_ridge`` 0.1 rather than 1e-3 keeps that over-correction tame: at 1e-3 MobileNetV2's
  weights grew to 23x the original's, so sensitive that float32 rounding in the lossless passes
  exceeded the CLI's verification tolerance; at 0.1 they stay below 7.2 and it verifies. Judging
  the round on held-back feeds by output MSE was tried and rejected: it refuses the round that
  lifts digits accuracy.

Calibration statistics are streamed (per-channel sums; per-layer Gram matrices): memory does not
grow with the number of samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from .dependency_graph import (
    IMPORTANCE,
    DependencyGraph,
    PruningGroup,
    apply_mask,
    apply_plan,
    build_dependency_graph,
    global_plan,
    keep_masks,
    score_groups,
    target_plan,
    uniform_plan,
)
from .dependency_graph.importance import activation_members
from .dependency_graph.reconstruct import plan_fits, second_round, write_fit
from .dependency_graph.strategy import resolve_round_to
from .ir import io as ir_io
from .ir.graph import to_graph, to_model
from .ir.stats import ModelStats, model_stats
from .ir.validate import infer_shapes
from .passes.base import PassManager
from .passes.eliminate_noop import EliminateNoOpPass
from .passes.fold_constants import FoldConstantsPass

logger = logging.getLogger(__name__)


@dataclass
class MemberReport:
    tensor: str
    axis: int
    kind: str  # "activation" or the constant's role ("weight", "bias", "scale", ...)
    size: int  # size of the axis before pruning
    removed: int  # indices removed along the axis by this group

    def __str__(self) -> str:
        return f"{self.tensor}:{self.axis} ({self.kind})"


@dataclass
class GroupReport:
    id: int
    channels: int
    kept: int
    frozen: bool
    reasons: list[str]
    members: list[MemberReport]
    nodes: list[str]

    @property
    def removed(self) -> int:
        return self.channels - self.kept

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channels": self.channels,
            "kept": self.kept,
            "removed": self.removed,
            "frozen": self.frozen,
            "reasons": list(self.reasons),
            "members": [
                {"tensor": m.tensor, "axis": m.axis, "kind": m.kind, "size": m.size, "removed": m.removed}
                for m in self.members
            ],
            "nodes": list(self.nodes),
        }


@dataclass
class PruneReport:
    ratio: float
    importance: str
    round_to: int
    groups: list[GroupReport]
    before: ModelStats
    after: ModelStats
    plan: dict[int, list[int]] = field(default_factory=dict)
    strategy: str = "uniform"
    target_macs: float | None = None
    reconstructed: list[str] = field(default_factory=list)  # consumer nodes refitted
    calib_samples: int = 0

    @property
    def macs_before(self) -> int:
        return self.before.macs

    @property
    def macs_after(self) -> int:
        return self.after.macs

    @property
    def params_before(self) -> int:
        return self.before.parameters

    @property
    def params_after(self) -> int:
        return self.after.parameters

    @property
    def frozen(self) -> list[GroupReport]:
        return [g for g in self.groups if g.frozen]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "importance": self.importance,
            "round_to": self.round_to,
            "strategy": self.strategy,
            "target_macs": self.target_macs,
            "reconstructed": list(self.reconstructed),
            "calib_samples": self.calib_samples,
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "parameters": {"before": self.params_before, "after": self.params_after},
            "groups": [g.as_dict() for g in self.groups],
        }


def _group_report(group: PruningGroup, kept: np.ndarray | None) -> GroupReport:
    members = []
    for m in group.members:
        removed = 0 if kept is None else int(m.removed_indices(kept).size)
        kind = m.role if m.is_param else "activation"
        members.append(MemberReport(m.tensor, m.axis, kind, m.dim.size, removed))
    return GroupReport(
        id=group.id,
        channels=group.channels,
        kept=group.channels if kept is None else int(kept.size),
        frozen=group.frozen,
        reasons=list(group.reasons),
        members=members,
        nodes=list(group.nodes),
    )


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return infer_shapes(model, data_prop=True)  # on a weightless copy: no 100 MB serialisations
    except Exception as exc:  # pruning still works on whatever shapes the model carries
        logger.warning("shape inference failed (%s); groups need known channel sizes", str(exc).splitlines()[0])
        return model


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding + no-op elimination (Shape-computed Slice bounds become constants)."""
    graph = to_graph(_infer(model))
    try:
        graph = PassManager([FoldConstantsPass(), EliminateNoOpPass()], steps=2).call(graph).graph
    except Exception as exc:  # folding is a help, not a requirement: lift the model as it is
        logger.warning("constant folding before pruning failed (%s); lifting the model unfolded", str(exc).splitlines()[0])
        return model
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return to_model(graph, like=model)


def _unknown_shapes(model: onnx.ModelProto) -> bool:
    """Whether some node output has no shape at all (e.g. GroupNormalization-21, which ONNX's
    inference leaves untyped), or some Reshape output has a dimension it could not name."""
    known = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape"):
            continue
        if any(name and (name not in known or not known[name].type.tensor_type.HasField("shape"))
               for name in node.output):
            return True
        if node.op_type != "Reshape":
            continue
        vi = known[node.output[0]]
        if any(not d.HasField("dim_value") and d.dim_param.startswith("unk__") or
               not d.HasField("dim_value") and not d.dim_param for d in vi.type.tensor_type.shape.dim):
            return True
    return False


def _infer_symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference when ONNX's inference left outputs unknown.

    ``Reshape(x, [batch, seq, -1, 32])`` with batch and seq read from another tensor's Shape (the
    way transformers exports attention) defeats ONNX's inference: it cannot prove that the -1 is
    the head count. The symbolic engine carries ``batch``/``seq`` through and solves it (12 for
    MiniLM), which is what the Reshape channel rule needs; on any failure the model is kept.
    """
    if not _unknown_shapes(model):
        return model
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # a help, not a requirement
        logger.debug("symbolic shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return model
    return inferred if inferred is not None else model


def _lift(model: Any, ignore: Sequence[str]) -> tuple[onnx.ModelProto, DependencyGraph]:
    original = ir_io.load_model(model)
    working = _infer_symbolic(_infer(_fold(original)))
    graph = to_graph(working)
    return original, build_dependency_graph(graph, ignore=tuple(ignore))


def _restore_constant_nodes(out: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Weights that were ``Constant`` nodes in the original (paddle2onnx) stay ``Constant`` nodes:
    folding lifted them into initializers, the written model keeps the original's form."""
    names = {n.output[0] for n in original.graph.node if n.op_type == "Constant" and n.output}
    graph_inputs = {vi.name for vi in out.graph.input}
    moved = [t for t in out.graph.initializer if t.name in names and t.name not in graph_inputs]
    if not moved:
        return
    keep = [t for t in out.graph.initializer if t.name not in {m.name for m in moved}]
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"{t.name}_const", value=t) for t in moved]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    rest = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + rest)


def _export(dg: DependencyGraph, original: onnx.ModelProto) -> onnx.ModelProto:
    out = to_model(dg.graph, like=original)
    _restore_constant_nodes(out, original)
    keep = {vi.name for vi in original.graph.value_info}
    vis = [vi for vi in out.graph.value_info if vi.name in keep]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vis)
    return out


def _check_ignore(ignore: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(ignore, str):
        return (ignore,)
    return tuple(ignore)


def list_groups(model: Any, *, ignore: Iterable[str] = ()) -> list[GroupReport]:
    """Every coupled-channel group of ``model`` (nothing is pruned)."""
    _, dg = _lift(model, _check_ignore(ignore))
    return [_group_report(g, None) for g in dg.groups]


def _calibration(calib: Any, model: onnx.ModelProto, limit: int | None, preprocessing: Any = None):
    from .passes.calibration import load_calibration

    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    return load_calibration(calib, input_names=names, limit=limit, preprocessing=preprocessing)


def _stream(model: onnx.ModelProto, calib, names: Sequence[str], *, batch_size: int = 16):
    """Yield ``(outputs by name, samples)`` for each batch of ``calib`` run through ``model``.

    The next batch runs in ONNX Runtime (a worker thread; ``run`` releases the GIL) while the
    caller digests the current one, so at most two batches of outputs are alive.
    """
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    from .passes.calibration import _batch_axis_free, _batches, with_outputs

    probe = with_outputs(model, list(names))
    options = ort.SessionOptions()
    # graph outputs survive every level; ALL (NCHWc conv kernels) is ~1.4x faster than BASIC here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # long runs: spinning only burns CPU
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for feed, n in _batches(calib, batch_size, _batch_axis_free(model)):
            missing = [k for k in inputs if k not in feed]
            if missing:
                raise ValueError(f"calibration feed lacks input(s) {', '.join(missing)}")
            job = (pool.submit(session.run, list(names), {k: feed[k] for k in inputs}), n)
            if pending is not None:
                yield dict(zip(names, pending[0].result())), pending[1]
            pending = job
        if pending is not None:
            yield dict(zip(names, pending[0].result())), pending[1]


def _activation_means(dg: DependencyGraph, working: onnx.ModelProto, calib) -> tuple[dict[str, np.ndarray], int]:
    """Mean ``|x|`` per index of each activation member's channel axis (streamed sums)."""
    axes: dict[str, int] = {}
    for group in dg.prunable:
        for m in activation_members(group):
            axes.setdefault(m.tensor, m.axis)
    sums = {name: np.zeros(dg.dim_of(name, axis).size) for name, axis in axes.items()}
    counts = dict.fromkeys(axes, 0)
    samples = 0
    for outputs, n in _stream(working, calib, list(axes)):
        samples += n
        for name, value in outputs.items():
            axis = axes[name]
            a = np.abs(np.moveaxis(np.asarray(value, dtype=np.float32), axis, 0))
            a = a.reshape(a.shape[0], -1)
            sums[name] += a.sum(axis=1, dtype=np.float64)
            counts[name] += a.shape[1]
    if samples == 0:
        raise ValueError("calibration data is empty")
    return {k: sums[k] / max(counts[k], 1) for k in sums}, samples


def _reconstruct(dg, working, calib, masks, *, ridge: float, rows_per_sample: int | None, seed: int):
    fits = plan_fits(dg, masks)
    if not fits:
        return [], 0
    names = list(dict.fromkeys(f.input_name for f in fits))
    rng = np.random.default_rng(seed)
    samples = 0
    for outputs, n in _stream(working, calib, names):
        samples += n
        for f in fits:
            f.update(outputs[f.input_name], rows_per_sample=rows_per_sample, rng=rng)
    if samples == 0:
        raise ValueError("calibration data is empty")
    return fits, samples


def _refit_on_pruned(dg, working, original, calib, fits, *, ridge: float, rows_per_sample, seed: int) -> None:
    """Round 2: the pruned model's layer inputs against the original layers' outputs.

    Round 1 fits each layer on the original activations; the refitted layers before it still
    leave a residual error, which this round (one joint pass) lets every layer compensate. Both
    models are asked for the same tensors (the layers' inputs); the original outputs ``W x + b``
    are formed from the original inputs at the sampled positions only (cheaper than asking ONNX
    Runtime for whole output maps, which also blocks its Conv fusions).
    """
    pruned = _export(dg, original)
    fresh = [second_round(f) for f in fits]
    for f in fits:
        f.drop_statistics()
    names = list(dict.fromkeys(f.input_name for f in fits))
    rng_a = np.random.default_rng(seed + 1)
    for (xo, _), (xp, _) in zip(_stream(working, calib, names), _stream(pruned, calib, names)):
        for f, old in zip(fresh, fits):
            f.update_pair(xp[f.input_name], xo[old.input_name], old, rows_per_sample=rows_per_sample, rng=rng_a)
    for f in fresh:
        w, b = f.solve(ridge)
        write_fit(dg.graph, f, w, b)


def prune(
    model: Any,
    ratio: float = 0.3,
    *,
    importance: str = "l1",
    target_macs: float | None = None,
    round_to: int | str = 8,
    ignore: Iterable[str] = (),
    calib: Any = None,
    calib_limit: int | None = None,
    calib_preprocessing: Any = None,
    reconstruct: bool = False,
    global_ranking: bool = False,
    max_group_ratio: float = 0.9,
    latency_aware: bool = True,
    ridge: float = 1e-3,
    rows_per_sample: int | None = 64,
    reconstruct_rounds: int = 2,
    refit_ridge: float = 0.1,
    seed: int = 0,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune ``model``; returns (model, report). See the module docstring for the options."""
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    round_to = resolve_round_to(round_to)
    if not 0.0 < max_group_ratio < 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1), got {max_group_ratio}")
    if target_macs is not None and not 0.0 < target_macs <= 1.0:
        raise ValueError(f"target_macs must be in (0, 1], got {target_macs}")
    if (importance == "activation" or reconstruct) and calib is None:
        raise ValueError(f"{'reconstruct' if reconstruct else 'activation importance'} needs calibration data (calib)")
    original, dg = _lift(model, _check_ignore(ignore))
    before = model_stats(original)
    working = to_model(dg.graph, like=original) if calib is not None else None  # before any slicing
    data = _calibration(calib, original, calib_limit, calib_preprocessing) if calib is not None else None
    activations, samples = None, 0
    if importance == "activation":
        activations, samples = _activation_means(dg, working, data)
    scores = score_groups(dg, importance, seed=seed, activations=activations)
    if target_macs is not None:
        plan = target_plan(dg, scores, target_macs, round_to=round_to, global_ranking=global_ranking,
                           max_group_ratio=max_group_ratio, latency_aware=latency_aware)
    elif global_ranking:
        plan = global_plan(dg, scores, ratio, round_to=round_to, max_group_ratio=max_group_ratio)
    else:
        plan = uniform_plan(dg, scores, ratio, round_to=round_to)
    refitted: list[str] = []
    if plan:
        fits = []
        if reconstruct:
            fits, n = _reconstruct(dg, working, data, keep_masks(dg, plan), ridge=ridge,
                                   rows_per_sample=rows_per_sample, seed=seed)
            samples = max(samples, n)
        solved = [(f, *f.solve(ridge)) for f in fits]
        apply_plan(dg, plan)
        for f, w, b in solved:
            write_fit(dg.graph, f, w, b)
            refitted.append(f.node.name)
        for _ in range(1, reconstruct_rounds if fits else 1):
            _refit_on_pruned(dg, working, original, data, fits, ridge=refit_ridge, rows_per_sample=rows_per_sample, seed=seed)
        result = _export(dg, original)
    else:
        result = onnx.ModelProto()
        result.CopyFrom(original)
    after = model_stats(result) if plan else before
    groups = [_group_report(g, plan.get(g.id)) for g in dg.groups]
    report = PruneReport(
        ratio=ratio,
        importance=importance,
        round_to=round_to,
        groups=groups,
        before=before,
        after=after,
        plan={gid: [int(i) for i in kept] for gid, kept in plan.items()},
        strategy="target-macs" if target_macs is not None else ("global" if global_ranking else "uniform"),
        target_macs=target_macs,
        reconstructed=refitted,
        calib_samples=samples,
    )
    logger.info(
        "pruned %d of %d groups (%d frozen); MACs %d -> %d; %d layers refitted",
        len(plan), len(dg.groups), len(report.frozen), before.macs, after.macs, len(refitted),
    )
    return result, report


def masked_reference(model: Any, plan: dict[int, Sequence[int]], *, ignore: Iterable[str] = ()) -> onnx.ModelProto:
    """The original model with the channels ``plan`` removes made inert (same shapes)."""
    original, dg = _lift(model, _check_ignore(ignore))
    apply_mask(dg, {int(k): np.asarray(v, dtype=np.int64) for k, v in plan.items()})
    return _export(dg, original)

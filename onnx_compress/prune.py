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
    score_groups,
    uniform_plan,
)
from .ir import io as ir_io
from .ir.graph import to_graph, to_model
from .ir.stats import ModelStats, model_stats

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


def _lift(model: Any, ignore: Sequence[str]) -> tuple[onnx.ModelProto, DependencyGraph]:
    original = ir_io.load_model(model)
    try:
        working = onnx.shape_inference.infer_shapes(original, data_prop=True)
    except Exception as exc:  # pruning still works on whatever shapes the model carries
        logger.warning("shape inference failed (%s); groups need known channel sizes", str(exc).splitlines()[0])
        working = original
    graph = to_graph(working)
    return original, build_dependency_graph(graph, ignore=tuple(ignore))


def _export(dg: DependencyGraph, original: onnx.ModelProto) -> onnx.ModelProto:
    out = to_model(dg.graph, like=original)
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


def prune(
    model: Any,
    ratio: float = 0.3,
    *,
    importance: str = "l1",
    round_to: int = 8,
    ignore: Iterable[str] = (),
    seed: int = 0,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove ``ratio`` of the channels of every prunable group; returns (model, report)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    original, dg = _lift(model, _check_ignore(ignore))
    before = model_stats(original)
    scores = score_groups(dg, importance, seed=seed)
    plan = uniform_plan(dg, scores, ratio, round_to=round_to)
    if plan:
        apply_plan(dg, plan)
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
    )
    logger.info(
        "pruned %d of %d groups (%d frozen); MACs %d -> %d",
        len(plan), len(dg.groups), len(report.frozen), before.macs, after.macs,
    )
    return result, report


def masked_reference(model: Any, plan: dict[int, Sequence[int]], *, ignore: Iterable[str] = ()) -> onnx.ModelProto:
    """The original model with the channels ``plan`` removes made inert (same shapes)."""
    original, dg = _lift(model, _check_ignore(ignore))
    apply_mask(dg, {int(k): np.asarray(v, dtype=np.int64) for k, v in plan.items()})
    return _export(dg, original)

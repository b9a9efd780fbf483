"""Applying a pruning plan, and the masked reference it must equal.

A plan maps group id -> kept group channels. For every dim ``d`` the keep mask is

    keep_d[i] = False  iff  i in m.indices[~isin(m.channels, kept_g)]  for a member m of d in g

(a dim shared by several groups, like a Concat output, collects the removals of each).

:func:`apply_plan` then, in this order,

1. lets every rule rewrite what depends on channel counts (Conv ``group``, Split sizes, Slice
   ``starts``/``ends``, Resize ``sizes``, Reshape/Expand targets, GroupNormalization
   ``num_groups``, Gather indices) while the old shapes are still readable;
2. slices every constant member with ``np.take(value, flatnonzero(keep_d), axis)`` - initializers
   and ``Constant``-node values alike (a constant with two pruned axes, a Conv weight, is sliced
   on both);
3. sets the static size of every activation member's axis to ``keep_d.sum()``.

The graph stays valid because every consumer of a changed dim is either linked (and therefore
changed consistently) or a barrier (and then the group is frozen and nothing changes).

:func:`apply_mask` builds the *masked reference* instead: nothing is removed, but every constant
slice that pruning would remove is overwritten with the value that makes the channel inert:
``0`` for weights, biases, BatchNormalization gamma/beta, PRelu slopes and additive/multiplicative
constants, ``1`` for divisors, exponents and running variances (so nothing becomes inf/nan). The
consumer-side weight slices (``W_next[:, c]``, Gemm columns after Flatten) are zero, so whatever
value channel ``c`` holds when it reaches a contraction - including ``f(0) != 0`` after
HardSigmoid/Sigmoid, or ``beta`` after BatchNormalization - contributes exactly nothing, which is
what removing it does. Pruned model == masked model therefore holds exactly in real arithmetic
for every activation, and up to float summation order in practice.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, producer, unique_name
from .graph import DependencyGraph
from .rules import MASK_FILL, RULES

logger = logging.getLogger(__name__)


def keep_masks(dg: DependencyGraph, plan: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """dim id -> boolean keep mask, only for dims that lose at least one index."""
    masks: dict[int, np.ndarray] = {}
    for gid, kept in plan.items():
        group = dg.groups[gid]
        if group.frozen:
            raise ValueError(f"group {gid} is frozen ({'; '.join(group.reasons)}) and cannot be pruned")
        kept = np.asarray(kept, dtype=np.int64)
        if kept.size == 0:
            raise ValueError(f"group {gid} would lose every channel")
        if kept.min() < 0 or kept.max() >= group.channels:
            raise ValueError(f"kept channels of group {gid} out of range 0..{group.channels - 1}")
        for member in group.members:
            removed = member.removed_indices(kept)
            if removed.size == 0:
                continue
            mask = masks.setdefault(member.dim.id, np.ones(member.dim.size, dtype=bool))
            mask[removed] = False
    return masks


def _set_constant_value(tensor: gs.Tensor, value: np.ndarray) -> None:
    """Replace the value of an initializer or of a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        tensor.values = value
        return
    node = producer(tensor)
    assert node is not None and node.op == "Constant", f"'{tensor.name}' is not a constant"
    old = node.attrs.get("value")
    name = old.name if isinstance(old, gs.Constant) else tensor.name
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        node.attrs.pop(key, None)
    node.attrs["value"] = gs.Constant(name, value)
    tensor.shape = list(value.shape)
    tensor.dtype = value.dtype


class _ApplyContext:
    def __init__(self, dg: DependencyGraph, masks: dict[int, np.ndarray]):
        self.dg = dg
        self.graph = dg.graph
        self.opset = dg.opset
        self.masks = masks

    def kept(self, tensor: gs.Tensor, axis: int) -> np.ndarray | None:
        d = self.dg.dim_of(tensor.name, axis)
        return None if d is None else self.masks.get(d.id)

    def set_input_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and old.name and isinstance(old, gs.Constant) and len(old.outputs) == 1:
            old.values = values
            return
        base = old.name if old is not None and old.name else f"{node.name or node.op}_input{index}"
        new = gs.Constant(unique_name(self.graph, f"{base}_pruned"), values)
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        if index < len(node.inputs):
            node.inputs[index] = new
        else:
            node.inputs.append(new)


def apply_plan(dg: DependencyGraph, plan: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Prune ``dg.graph`` in place; returns the keep masks that were applied."""
    masks = keep_masks(dg, plan)
    if not masks:
        return masks
    touched = {id(dg.dims[d].tensor) for d in masks}
    actx = _ApplyContext(dg, masks)
    for node in dg.graph.nodes:
        tensors = list(node.inputs) + list(node.outputs)
        if not any(id(t) in touched for t in tensors):
            continue
        rule = RULES.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        if rule is not None:
            rule.apply(actx, node)
    for did, mask in masks.items():
        d = dg.dims[did]
        keep = np.flatnonzero(mask)
        if d.is_param:
            value = constant_value(d.tensor)
            _set_constant_value(d.tensor, np.ascontiguousarray(np.take(value, keep, axis=d.axis)))
        else:
            shape = list(d.tensor.shape)
            shape[d.axis] = int(keep.size)
            d.tensor.shape = shape
    logger.debug("pruned %d dims over %d groups", len(masks), len(plan))
    return masks


def apply_mask(dg: DependencyGraph, plan: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Masked reference in place: removed slices of every constant member made inert."""
    masks = keep_masks(dg, plan)
    for did, mask in masks.items():
        d = dg.dims[did]
        if not d.is_param:
            continue
        value = np.array(constant_value(d.tensor), copy=True)
        index = [slice(None)] * value.ndim
        index[d.axis] = np.flatnonzero(~mask)
        value[tuple(index)] = MASK_FILL.get(d.role, 0)
        _set_constant_value(d.tensor, value)
    return masks

"""The coupled-channel graph and its pruning groups.

Building (``build_dependency_graph(graph)``, after shape inference so ranks and channel sizes
are known):

1. *Seeds*: every node whose rule anchors channels (Conv, ConvTranspose, Gemm, MatMul with a
   constant matrix) creates the dims of its output and input channel axes.
2. *Propagation* (worklist): each new dim ``(tensor, axis)`` is shown to the tensor's producer and
   to every consumer; their rule (:mod:`.rules`) links it to other dims, creating them (which are
   shown to their own producers/consumers in turn), or raises ``Barrier``. A node without a rule,
   a node matched by ``ignore``, a node inside a subgraph, a graph input or a graph output freezes
   the dim with a reason that names the op and the node.
3. *Union-find* over elements: dim ``d`` owns the global element ids ``offset_d .. offset_d +
   size_d - 1``; every link unites elements pairwise. A connected set of elements is one
   *channel* (for a grouped conv a channel is a whole conv group; after Flatten it is ``H*W``
   features).
4. *Groups*: channels that occur in exactly the same set of dims form one :class:`PruningGroup`
   (a plain Conv chain, a whole residual stream, ...). Concat makes one dim hold channels of
   several groups, and Split/Slice cut a group into several; element-level union-find keeps both
   exact. Group channel ``k`` maps, in member ``m``, to ``m.indices[m.channels == k]``: the
   explicit index map. A group is frozen when any of its dims is frozen (reasons kept) or when no
   member is a weight.

The dim-level coupling graph is also kept as a ``networkx.MultiGraph`` (``DependencyGraph.nx``):
nodes are dims, edges carry the ONNX node that linked them; it answers "which nodes does this
group touch" and is the object later strategies (global ranking, attention heads) walk.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value
from .rules import IMPORTANCE_ROLES, OPERAND, RULES, WEIGHT, Barrier, norm_axis, tensor_rank

logger = logging.getLogger(__name__)


@dataclass
class Dim:
    """One axis of one tensor that carries channels."""

    id: int
    tensor: gs.Tensor
    axis: int
    size: int
    offset: int
    is_param: bool
    role: str = OPERAND
    frozen: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.tensor.name}[axis {self.axis}]"


@dataclass
class Member:
    """A dim as seen by one group: which of its indices belong to which group channel."""

    dim: Dim
    indices: np.ndarray  # indices along dim.axis that belong to the group (sorted)
    channels: np.ndarray  # group channel of each of those indices

    @property
    def tensor(self) -> str:
        return self.dim.tensor.name

    @property
    def axis(self) -> int:
        return self.dim.axis

    @property
    def is_param(self) -> bool:
        return self.dim.is_param

    @property
    def role(self) -> str:
        return self.dim.role

    def removed_indices(self, kept_channels: np.ndarray) -> np.ndarray:
        return self.indices[~np.isin(self.channels, kept_channels)]


@dataclass
class PruningGroup:
    id: int
    channels: int
    members: list[Member]
    frozen: bool
    reasons: list[str]
    nodes: list[str]

    @property
    def atom_width(self) -> int:
        """Weight channels per group channel, on the narrowest weight member: 1 for plain
        channels, the channels per conv group of a grouped convolution (or GroupNorm group),
        ``head_dim`` for attention heads. (Per-group constants such as GroupNorm's
        InstanceNormalization scale have one entry per atom and do not count.)"""
        weights = [m for m in self.members if m.is_param and m.role == WEIGHT and m.channels.size]
        widths = [int(np.bincount(m.channels, minlength=self.channels).min())
                  for m in weights or [m for m in self.members if m.channels.size]]
        return max(1, min(widths, default=1))

    @property
    def weight_members(self) -> list[Member]:
        return [m for m in self.members if m.is_param and m.role in IMPORTANCE_ROLES]

    def describe(self) -> str:
        state = "frozen: " + "; ".join(self.reasons) if self.frozen else "prunable"
        names = ", ".join(f"{m.tensor}:{m.axis}" for m in self.members[:6])
        more = f" (+{len(self.members) - 6})" if len(self.members) > 6 else ""
        return f"group {self.id}: {self.channels} channels, {len(self.members)} members [{names}{more}], {state}"


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` elements: the smallest element id of its connected set.

    Vectorised union-find: hook the larger root of every edge onto the smaller one, then pointer
    jumping until every label is a root; repeat until no edge joins two different roots.
    """
    labels = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return labels
    while True:
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not differ.any():
            return labels
        la, lb = la[differ], lb[differ]
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


def _matches(node: gs.Node, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if pattern == node.op or pattern == node.name:
            return pattern
        try:
            if node.name and re.fullmatch(pattern, node.name):
                return pattern
        except re.error:
            continue
    return None


class DependencyGraph:
    """Coupled-channel graph of a ``gs.Graph``; see the module docstring."""

    def __init__(self, graph: gs.Graph, *, ignore: Iterable[str] = ()):
        self.graph = graph
        self.opset = int(graph.opset) if graph.opset else 13
        self.ignore = tuple(ignore)
        self.dims: list[Dim] = []
        self.nx = nx.MultiGraph()
        self._by_key: dict[tuple[str, int], Dim] = {}
        self._links_a: list[np.ndarray] = []
        self._links_b: list[np.ndarray] = []
        self._n_elements = 0
        self._queue: deque[Dim] = deque()
        self._pending_roles: dict[tuple[str, int], str] = {}
        self._visited: set[tuple[int, int]] = set()
        self._current: gs.Node | None = None
        self._top_nodes = {id(n) for n in graph.nodes}
        self._inputs = {id(t) for t in graph.inputs}
        self._outputs = {id(t) for t in graph.outputs}
        self.groups: list[PruningGroup] = []
        self._build()

    # --- CouplingContext --------------------------------------------------------------------

    def axis_size(self, tensor: gs.Tensor, axis: int) -> int | None:
        value = constant_value(tensor)
        if value is not None:
            return int(value.shape[axis]) if axis < value.ndim else None
        shape = tensor.shape
        if shape is None or axis >= len(shape):
            return None
        d = shape[axis]
        return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None

    def is_used(self, tensor: gs.Tensor) -> bool:
        return bool(tensor.outputs) or id(tensor) in self._outputs

    def dim(self, tensor: gs.Tensor, axis: int, role: str = OPERAND) -> int:
        axis = norm_axis(axis, tensor_rank(tensor))
        role = self._pending_roles.pop((tensor.name, axis), role) if role == OPERAND else role
        src = tensor.inputs[0] if tensor.inputs else None
        if role != OPERAND and src is not None and src.op == "Identity" and src.inputs:
            # a weight read through Identity (torch legacy export): the constant keeps the role
            self._pending_roles[(src.inputs[0].name, axis)] = role
        found = self._by_key.get((tensor.name, axis))
        if found is not None:
            if found.is_param and found.role == OPERAND and role != OPERAND:
                found.role = role
            return found.id
        size = self.axis_size(tensor, axis)
        if size is None:
            raise Barrier(f"size of '{tensor.name}' axis {axis} is unknown")
        d = Dim(
            id=len(self.dims),
            tensor=tensor,
            axis=axis,
            size=size,
            offset=self._n_elements,
            is_param=constant_value(tensor) is not None,
            role=role,
        )
        self._n_elements += size
        self.dims.append(d)
        self._by_key[(tensor.name, axis)] = d
        self.nx.add_node(d.id, tensor=tensor.name, axis=axis, size=size)
        if id(tensor) in self._inputs:
            d.frozen.append(f"graph input '{tensor.name}'")
        if id(tensor) in self._outputs:
            d.frozen.append(f"graph output '{tensor.name}'")
        self._queue.append(d)
        return d.id

    def size(self, dim: int) -> int:
        return self.dims[dim].size

    def link(self, a: int, ia: np.ndarray | None, b: int, ib: np.ndarray | None) -> None:
        da, db = self.dims[a], self.dims[b]
        ia = np.arange(da.size) if ia is None else np.asarray(ia, dtype=np.int64)
        ib = np.arange(db.size) if ib is None else np.asarray(ib, dtype=np.int64)
        if ia.shape != ib.shape:
            raise Barrier(f"'{da.tensor.name}' and '{db.tensor.name}' have different channel counts")
        if ia.size and (ia.max() >= da.size or ib.max() >= db.size or ia.min() < 0 or ib.min() < 0):
            raise Barrier("index map out of range")
        self._links_a.append(ia + da.offset)
        self._links_b.append(ib + db.offset)
        node = self._current
        if node is not None:
            self._visited.add((id(node), a))
            self._visited.add((id(node), b))
        if a != b:
            self.nx.add_edge(a, b, node=node.name if node is not None else "")

    # --- building ---------------------------------------------------------------------------

    def _call(self, node: gs.Node, fn) -> None:
        self._current = node
        try:
            fn()
        finally:
            self._current = None

    def _freeze(self, d: Dim, node: gs.Node, reason: str) -> None:
        text = f"{node.op} node '{node.name}': {reason}"
        if text not in d.frozen:
            d.frozen.append(text)

    def _visit(self, d: Dim, node: gs.Node) -> None:
        key = (id(node), d.id)
        if key in self._visited:
            return
        self._visited.add(key)
        if id(node) not in self._top_nodes:
            self._freeze(d, node, "used inside a subgraph")
            return
        pattern = _matches(node, self.ignore)
        if pattern is not None:
            self._freeze(d, node, f"ignored (matches '{pattern}')")
            return
        rule = RULES.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        if rule is None:
            domain = f"{node.domain}." if node.domain not in (None, "", "ai.onnx") else ""
            self._freeze(d, node, f"no channel rule for {domain}{node.op}")
            return
        try:
            self._call(node, lambda: rule.couple(self, node, d.tensor, d.axis))
        except Barrier as exc:
            self._freeze(d, node, str(exc))

    def _build(self) -> None:
        for node in self.graph.nodes:
            rule = RULES.get(node.op) if node.domain in (None, "", "ai.onnx") else None
            if rule is None or not rule.seeds:
                continue
            for tensor, axis in rule.seed(node):
                try:
                    self.dim(tensor, axis)
                except Barrier as exc:
                    logger.debug("no channel dim for %s axis %s of %s: %s", tensor.name, axis, node.name, exc)
        while self._queue:
            d = self._queue.popleft()
            users = list(d.tensor.inputs) + list(d.tensor.outputs)
            for node in users:
                self._visit(d, node)
        self._make_groups()

    def _make_groups(self) -> None:
        if not self.dims:
            return
        a = np.concatenate(self._links_a) if self._links_a else np.zeros(0, np.int64)
        b = np.concatenate(self._links_b) if self._links_b else np.zeros(0, np.int64)
        labels = _components(self._n_elements, a, b)
        self.labels = labels
        # (root, dim) pairs -> each root's signature (the dims it occurs in)
        roots_parts, dims_parts = [], []
        for d in self.dims:
            roots = np.unique(labels[d.offset : d.offset + d.size])
            roots_parts.append(roots)
            dims_parts.append(np.full(roots.size, d.id, dtype=np.int64))
        roots_all = np.concatenate(roots_parts)
        dims_all = np.concatenate(dims_parts)
        order = np.lexsort((dims_all, roots_all))
        roots_all, dims_all = roots_all[order], dims_all[order]
        cuts = np.flatnonzero(np.diff(roots_all)) + 1
        signatures: dict[tuple[int, ...], list[int]] = {}
        starts = [0] + cuts.tolist()
        ends = cuts.tolist() + [int(roots_all.size)]
        dims_list = dims_all.tolist()
        for lo, hi, root in zip(starts, ends, roots_all[starts].tolist()):
            signatures.setdefault(tuple(dims_list[lo:hi]), []).append(root)
        # deterministic order: by the smallest element of each group
        ordered = sorted(signatures.items(), key=lambda kv: min(kv[1]))
        for gid, (dim_ids, roots) in enumerate(ordered):
            roots_arr = np.asarray(sorted(roots), dtype=np.int64)
            members = []
            reasons: list[str] = []
            for did in dim_ids:
                d = self.dims[did]
                local = labels[d.offset : d.offset + d.size]
                idx = np.flatnonzero(np.isin(local, roots_arr))
                members.append(Member(d, idx, np.searchsorted(roots_arr, local[idx])))
                for r in d.frozen:
                    if r not in reasons:
                        reasons.append(r)
            if not any(m.is_param and m.role in IMPORTANCE_ROLES for m in members):
                reasons.append("no weight among the members")
            nodes = sorted(
                {data["node"] for _, _, data in self.nx.subgraph(dim_ids).edges(data=True) if data["node"]}
            )
            self.groups.append(
                PruningGroup(
                    id=gid,
                    channels=int(roots_arr.size),
                    members=members,
                    frozen=bool(reasons),
                    reasons=reasons,
                    nodes=nodes,
                )
            )

    # --- queries ----------------------------------------------------------------------------

    def dim_of(self, tensor_name: str, axis: int) -> Dim | None:
        return self._by_key.get((tensor_name, axis))

    @property
    def prunable(self) -> list[PruningGroup]:
        return [g for g in self.groups if not g.frozen]


def build_dependency_graph(graph: gs.Graph, *, ignore: Iterable[str] = ()) -> DependencyGraph:
    """Coupled-channel groups of ``graph`` (which should carry inferred shapes)."""
    return DependencyGraph(graph, ignore=ignore)

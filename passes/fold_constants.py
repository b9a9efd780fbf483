"""FoldConstantsPass: evaluate nodes whose inputs are all constant, with a size limit.

A node is folded when every input is a weight (initializer or ``Constant`` node) or a shape that
is statically known (``Shape`` of a tensor whose dimensions are all integers), and its outputs
stay below ``size_limit_bytes`` (default 4 MiB for newly created tensors, so a
``ConstantOfShape`` or ``Tile`` of a big shape is not baked into the file). The evaluation is done
by ONNX Runtime through graphsurgeon's ``fold_constants``; ``Constant`` nodes themselves become
initializers. Non-deterministic ops (``RandomNormal`` and friends) and sequence/optional ops are
never folded. ``Shape`` with ``start``/``end`` (opset 15) is folded here, not by graphsurgeon,
whose shape folding ignores those attributes.

The result of a folded node is exactly what the runtime would compute at inference time, so the
rewrite is exact up to the runtime's own determinism.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from ..ir.graph import static_shape, unique_name
from .base import Pass, PassResult

logger = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT_BYTES = 4 << 20


def _never_fold(node: gs.Node) -> bool:
    """Non-deterministic ops, and ops producing sequences/optionals (graphsurgeon folds values
    into numpy arrays, which a sequence is not: folding ``SequenceEmpty`` recursed without end)."""
    op = node.op
    return (
        op.startswith("Random")
        or op in ("Multinomial", "Bernoulli")
        or "Sequence" in op
        or op.startswith("Optional")
    )


def _fold_sliced_shapes(graph: gs.Graph) -> int:
    """Fold ``Shape(x, start, end)`` (opset 15) of a statically shaped ``x`` ourselves.

    graphsurgeon's shape folding ignores ``start``/``end`` and writes the whole shape, which
    silently breaks every graph using them (onnx's expanded Attention tests). ONNX clamps
    ``start``/``end`` after adding the rank to negative values, which is Python's slicing.
    """
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Shape" or node.domain not in (None, "", "ai.onnx"):
            continue
        if "start" not in node.attrs and "end" not in node.attrs:
            continue
        shape = static_shape(node.inputs[0])
        if shape is None:
            continue
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", len(shape)))
        value = np.array(shape[start:end], dtype=np.int64)
        # becomes a Constant node writing the same tensor (a graph output keeps its name)
        node.op = "Constant"
        node.attrs = {"value": gs.Constant(unique_name(graph, node.outputs[0].name + "_value"), value)}
        node.inputs.clear()
        folded += 1
    return folded


def _signature(graph: gs.Graph) -> tuple[int, int]:
    consts = sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return len(graph.nodes), consts


class FoldConstantsPass(Pass):
    name = "fold-constants"

    def __init__(self, *, size_limit_bytes: int = DEFAULT_SIZE_LIMIT_BYTES):
        self.size_limit_bytes = size_limit_bytes

    def call(self, graph: gs.Graph) -> PassResult:
        nodes_before = len(graph.nodes)
        constant_nodes = sum(1 for n in graph.nodes if n.op == "Constant")
        # graphsurgeon prints its warnings (failed partitions) to stdout; keep library output
        # quiet and restore its setting afterwards.
        sliced = _fold_sliced_shapes(graph)
        severity = G_LOGGER.severity
        G_LOGGER.severity = max(severity, G_LOGGER.CRITICAL)
        try:
            for partitioning in ("basic", None):
                try:
                    graph.fold_constants(
                        fold_shapes=True,
                        recurse_subgraphs=True,
                        partitioning=partitioning,
                        error_ok=True,
                        flatten_subgraphs=False,
                        size_threshold=self.size_limit_bytes,
                        should_exclude_node=_never_fold,
                    )
                    break
                except RecursionError:
                    # graphsurgeon's "basic" partitioning recurses without end on some subgraphs
                    # ORT cannot evaluate; without partitioning it folds what it can in one go.
                    if partitioning is None:
                        raise
                    logger.debug("constant folding: partitioned folding recursed; retrying unpartitioned")
        finally:
            G_LOGGER.severity = severity
        graph.cleanup(remove_unused_graph_inputs=False)
        removed = nodes_before - len(graph.nodes)
        # Lifting a Constant node into an initializer is a change, but not a computation folded.
        folded = max(0, removed - constant_nodes, sliced)
        return PassResult(graph, removed > 0 or sliced > 0, folded)

"""RemoveDeadNodesPass: drop nodes no graph output depends on, and unused initializers.

A node is live when one of its outputs reaches a graph output (directly or through a subgraph
that reads it from the outer scope). Everything else, including initializers nothing reads, is
removed. Graph inputs are kept even when unused: they are the model's interface.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult


def _constant_count(graph: gs.Graph) -> int:
    return sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))


class RemoveDeadNodesPass(Pass):
    name = "remove-dead-nodes"

    def call(self, graph: gs.Graph) -> PassResult:
        before = (len(graph.nodes), _constant_count(graph))
        graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        after = (len(graph.nodes), _constant_count(graph))
        removed = (before[0] - after[0]) + (before[1] - after[1])
        return PassResult(graph, removed > 0, removed)

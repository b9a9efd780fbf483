"""Keep the weight storage style of the input: initializers vs ``Constant`` nodes.

paddle2onnx exports (PP-OCR) hold every weight in a ``Constant`` node and have no initializers.
graphsurgeon's constant folding lifts such weights into initializers. When the input model had
no initializers, :func:`initializers_to_constant_nodes` moves every initializer of the result
back into a ``Constant`` node (inserted before its first reader, so the graph stays
topologically sorted), so the output keeps the form the input had. The values are the same
TensorProto bytes, so the rewrite is exact.
"""

from __future__ import annotations

import onnx
from onnx import helper


def uses_constant_node_weights(model: onnx.ModelProto) -> bool:
    """True when weights live in Constant nodes only (no initializers at all)."""
    return len(model.graph.initializer) == 0 and any(
        n.op_type == "Constant" and n.domain in ("", "ai.onnx") for n in model.graph.node
    )


def initializers_to_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer of the main graph into a Constant node (in place; returns model)."""
    graph = model.graph
    if not graph.initializer:
        return model
    input_names = {vi.name for vi in graph.input}
    movable = [t for t in graph.initializer if t.name not in input_names]
    if not movable:
        return model
    names = {t.name for t in movable}
    constant_nodes = {}
    for tensor in movable:
        value = onnx.TensorProto()
        value.CopyFrom(tensor)
        value.name = ""
        constant_nodes[tensor.name] = helper.make_node("Constant", [], [tensor.name], name=f"{tensor.name}_Constant", value=value)
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    emitted: set[str] = set()
    for node in nodes:
        for name in node.input:
            if name in constant_nodes and name not in emitted:
                ordered.append(constant_nodes[name])
                emitted.add(name)
        ordered.append(node)
    for name, node in constant_nodes.items():  # read only by subgraphs or graph outputs
        if name not in emitted:
            ordered.insert(0, node)
    del graph.node[:]
    graph.node.extend(ordered)
    return model

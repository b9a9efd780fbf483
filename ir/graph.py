"""The graph type (onnx-graphsurgeon ``gs.Graph``), lossless conversion, and small helpers.

``to_graph`` / ``to_model`` convert between ``onnx.ModelProto`` and ``gs.Graph``. graphsurgeon
drops several things on the way: model ``metadata_props`` (PP-OCR keeps its character list
there), ``model_version``, ``domain``, model ``doc_string``, per-node ``doc_string`` and
``metadata_props``, graph ``metadata_props`` and opset imports of domains no node uses. We keep
them: node-level extras ride on each ``gs.Node`` as the plain attribute :data:`NODE_EXTRAS`
(copied with the node by our passes, ignored by graphsurgeon), and ``to_model(graph, like=model)``
copies the model-level fields from the model the graph came from.

Helpers: :func:`constant_value` reads a weight whether it is an initializer (``gs.Constant``) or
the output of a ``Constant`` node (paddle2onnx exports have no initializers at all);
:func:`producer`, :func:`consumers` and :func:`is_graph_output` answer the questions every rewrite
asks; :func:`unique_name` makes fresh tensor names.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.logger import G_LOGGER

from .errors import UnsupportedModelError

#: name of the Python attribute on gs.Node that carries ``doc_string`` / ``metadata_props``.
NODE_EXTRAS = "onnx_compress_extras"
#: the domain of the model-local functions onnx-compress writes (fused Conv+activation)
OWN_DOMAIN = "onnx_compress.fused"


@dataclass
class NodeExtras:
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def quiet_graphsurgeon():
    """graphsurgeon prints its warnings to stdout (library code must not print); silence them
    for the duration and restore its setting."""
    severity = G_LOGGER.severity
    G_LOGGER.severity = max(severity, G_LOGGER.CRITICAL)
    try:
        yield
    finally:
        G_LOGGER.severity = severity


#: name of the Python attribute on gs.Graph holding defaults of overridable inputs (IR >= 4).
INPUT_DEFAULTS = "onnx_compress_input_defaults"


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into graphsurgeon, keeping per-node doc strings and metadata.

    A graph input that also has an initializer is, from IR 4 on, an input the user may feed
    (the initializer is only its default). graphsurgeon would turn it into a constant and drop
    it from the inputs; we keep it a graph input (so no pass treats it as a weight) and restore
    its default in :func:`to_model`. Below IR 4 the format *required* every initializer to be
    listed as an input, so there they are weights, as graphsurgeon treats them.
    """
    for vi in list(model.graph.input) + list(model.graph.output):
        kind = vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type", "sequence_type"):
            raise UnsupportedModelError(
                f"graph {'input' if vi in model.graph.input else 'output'} '{vi.name}' has type "
                f"{kind}; onnx-compress handles tensor and sequence inputs/outputs only"
            )
    defaults: dict[str, onnx.TensorProto] = {}
    if model.ir_version >= 4:
        input_names = {vi.name for vi in model.graph.input}
        overridable = [t for t in model.graph.initializer if t.name in input_names]
        if overridable:
            defaults = {t.name: t for t in overridable}
            stripped = onnx.ModelProto()
            stripped.CopyFrom(model)
            kept = [t for t in stripped.graph.initializer if t.name not in defaults]
            del stripped.graph.initializer[:]
            stripped.graph.initializer.extend(kept)
            model = stripped
    with quiet_graphsurgeon():
        graph = gs.import_onnx(model)
    if defaults:
        setattr(graph, INPUT_DEFAULTS, defaults)
    for node, proto in zip(graph.nodes, model.graph.node):
        props = [(p.key, p.value) for p in getattr(proto, "metadata_props", [])]
        if proto.doc_string or props:
            setattr(node, NODE_EXTRAS, NodeExtras(proto.doc_string, props))
    return graph


def _used_domains(model: onnx.ModelProto) -> set[str]:
    domains: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            domains.add(node.domain)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    for func in model.functions:
        for node in func.node:
            domains.add(node.domain)
    return {"" if d == "ai.onnx" else d for d in domains}


def to_model(graph: gs.Graph, *, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph; with ``like``, restore every model-level field of that model.

    Opset imports: those of ``like`` are kept as they were (even for domains no node uses any
    more); a domain the graph newly uses (our fused functions' domain) is added. The IR version is
    the larger of ``like``'s and what graphsurgeon needs (local functions need IR 8).
    """
    with quiet_graphsurgeon():
        model = gs.export_onnx(graph, do_type_check=False)
    defaults = vars(graph).get(INPUT_DEFAULTS, {})  # gs.Graph.__getattr__ logs misses
    if defaults:
        input_names = {vi.name for vi in model.graph.input}
        model.graph.initializer.extend(t for name, t in defaults.items() if name in input_names)
    for node, proto in zip(graph.nodes, model.graph.node):
        extras = getattr(node, NODE_EXTRAS, None)
        if extras is not None:
            proto.doc_string = extras.doc_string
            if extras.metadata_props and hasattr(proto, "metadata_props"):
                for key, value in extras.metadata_props:
                    proto.metadata_props.add(key=key, value=value)
    if like is None:
        return model

    exported_opsets = {entry.domain: entry.version for entry in model.opset_import}
    del model.opset_import[:]
    seen = set()
    used = _used_domains(model)
    for entry in like.opset_import:
        if entry.domain == OWN_DOMAIN and OWN_DOMAIN not in used:
            continue  # our own fused-op domain, no longer used (e.g. after unfusing)
        model.opset_import.append(helper.make_opsetid(entry.domain, entry.version))
        seen.add(entry.domain)
    for domain in sorted(_used_domains(model) - seen - {"ai.onnx"}):
        version = exported_opsets.get(domain, 1)
        if domain == "" and "ai.onnx" in seen:
            continue
        model.opset_import.append(helper.make_opsetid(domain, version))

    ir_version = like.ir_version
    if model.functions:
        ir_version = max(ir_version, 8)
    input_names = {vi.name for vi in model.graph.input}
    if ir_version < 4 and any(t.name not in input_names for t in model.graph.initializer):
        # IR 3 made every initializer a graph input; graphsurgeon imports them as weights, so the
        # result is written at IR 4, where weights need not be listed as inputs.
        ir_version = 4
    model.ir_version = ir_version
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    if hasattr(model.graph, "metadata_props"):
        del model.graph.metadata_props[:]
        model.graph.metadata_props.extend(like.graph.metadata_props)
    model.graph.name = like.graph.name
    model.graph.doc_string = like.graph.doc_string
    return model


# ---------------------------------------------------------------------------------------------
# helpers on gs.Graph


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes ``tensor`` (None for graph inputs and initializers)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(inp is tensor for inp in graph.inputs)


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a weight: an initializer or a ``Constant`` node's output; else None.

    Graph inputs are never constant, even when an initializer of the same name gives them a
    default (IR < 4 style): the user may feed them.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is None or node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
        return None
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def is_constant(tensor: gs.Tensor | None) -> bool:
    return constant_value(tensor) is not None


def constant_users(tensor: gs.Tensor) -> list[gs.Node]:
    """Every node that reads a weight (for a Constant-node weight: readers of its output)."""
    return consumers(tensor)




class NameScope:
    """Fresh tensor/node names for a pass that adds many: the names in use are gathered once (the
    names ``graph.tensors()`` would give, plus node names), and every name handed out is recorded.

    Only valid while the names added to the graph come from this scope (a pass that inserts
    hundreds of Q/DQ nodes would otherwise rescan the graph for each: 1084 scans on ResNet-50)."""

    def __init__(self, graph: gs.Graph):
        # the names graph.tensors() would give, without building its checked OrderedDict (10x faster)
        taken = {tensor.name for tensor in itertools.chain(graph.inputs, graph.outputs)}
        for node in graph.nodes:
            taken.update(tensor.name for tensor in itertools.chain(node.inputs, node.outputs))
        taken.discard("")  # empty (omitted optional) tensors have no name; graph.tensors() skips them
        taken.update(n.name for n in graph.nodes)
        self._taken = taken

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first one not in use; now taken."""
        name = base
        for i in itertools.count(1):
            if name not in self._taken:
                break
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used anywhere in ``graph``."""
    return NameScope(graph).fresh(base)


def make_constant(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(unique_name(graph, base), np.ascontiguousarray(values))


def copy_extras(src: gs.Node, dst: gs.Node) -> None:
    extras = getattr(src, NODE_EXTRAS, None)
    if extras is not None:
        setattr(dst, NODE_EXTRAS, extras)


def opset_version(graph: gs.Graph) -> int:
    return int(graph.opset)


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of ``old`` read ``new`` instead (graph outputs are not touched)."""
    for user in list(old.outputs):
        for i, inp in enumerate(user.inputs):
            if inp is old:
                user.inputs[i] = new


def bypass_node(graph: gs.Graph, node: gs.Node, keep: gs.Tensor) -> str | None:
    """Remove a node whose single output equals ``keep`` (one of its inputs).

    Returns None on success or the reason it cannot be bypassed. Graph output names are kept:
    when the node's output is a graph output, the producer of ``keep`` is made to write that
    output directly, which is only possible when ``keep`` is an intermediate tensor read by
    nothing else.
    """
    out = node.outputs[0]
    if is_graph_output(graph, out):
        src = producer(keep)
        if src is None or is_graph_output(graph, keep) or len(keep.outputs) != 1:
            return "output is a graph output and its input cannot be renamed"
        idx = next(i for i, t in enumerate(src.outputs) if t is keep)
        node.inputs.clear()
        node.outputs.clear()
        src.outputs[idx] = out
        return None
    replace_all_uses(out, keep)
    node.inputs.clear()
    node.outputs.clear()
    return None


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known integer, else None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.values.shape)
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def rank(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    return None if tensor.shape is None else len(tensor.shape)

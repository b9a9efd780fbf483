"""FuseConvActivationPass / UnfuseConvActivationPass: Conv + activation as one function node.

``Conv`` followed by an element-wise activation (any form :mod:`.activations` recognises,
including the decomposed HardSwish and SiLU chains of real exports, and BatchNorm already folded
into the Conv by ``fold-batchnorm``) becomes one node of a model-local ONNX function::

    y = act(Conv(x, W, b))   ->   y = onnx_compress.fused.Conv<Act>(x, W, b, [act inputs])

The fused node writes the activation's output tensor under its original name, so nothing
downstream changes. Domain ``onnx_compress.fused``, version 1; one ``FunctionProto`` per kind:

=================  =====================================  =============================
function           inputs                                 attributes (by reference)
=================  =====================================  =============================
ConvRelu           X, W, B                                Conv's
ConvClip           X, W, B, min, max                      Conv's
ConvLeakyRelu      X, W, B                                Conv's, alpha
ConvPRelu          X, W, B, slope                         Conv's
ConvHardSigmoid    X, W, B                                Conv's, alpha, beta
ConvHardSwish      X, W, B                                Conv's
ConvSiLU           X, W, B                                Conv's
ConvSigmoid        X, W, B                                Conv's
ConvTanh           X, W, B                                Conv's
=================  =====================================  =============================

"Conv's" attributes are ``auto_pad, dilations, group, kernel_shape, pads, strides``, passed by
``AttributeProto.ref_attr_name`` so one function serves every Conv: the fused node carries exactly
the attributes the Conv had (an absent one stays absent and takes the ONNX default inside the
body, ``group`` included). ``B`` is always given: a Conv without a bias gets a zero bias
``[C_out]`` (``conv + 0`` is exact). A Clip without ``min`` (``max``) gets ``-inf`` (``+inf``),
which ``max``/``min`` leave unchanged. Bodies use the model's default-domain opset:
``ConvHardSwish`` is ``Conv -> HardSwish`` from opset 14 and ``Conv -> HardSigmoid(alpha=1/6,
beta=0.5) -> Mul(C, .)`` before (``x * max(0, min(1, x/6 + 1/2)) = x * clip(x + 3, 0, 6) / 6``);
``ConvSiLU`` is ``Conv -> Sigmoid -> Mul(C, .)``. A decomposed chain and the canonical body
compute the same real function and differ in float32 only by rounding (a few ulp).

Why this representation:

- It is still plain, valid ONNX: ``onnx.checker`` (``full_check``) and shape inference accept
  model-local functions (IR version >= 8; ``ir.graph.to_model`` raises the IR version when a model
  gains functions), and ONNX Runtime inlines the function bodies and runs them, so the fused model
  verifies against the original like any other pass result, and onnx-graphsurgeon round-trips it.
- Our INT8 runtime can lower one node to one kernel call ``conv + act`` (the activation applied in
  the accumulator's epilogue) by reading the op type, instead of re-discovering every decomposed
  activation form itself.
- No custom op that only our runtime understands: exports stay runnable everywhere ONNX
  functions are supported.

It is opt-in (``--fuse``, ``fuse_activations=True``; not in the default pipeline) because some
toolchains (older converters, some inference engines, Netron's older versions) do not read local
functions. :class:`UnfuseConvActivationPass` inlines the functions back to plain ops (the Conv
keeps its name), so passes that want to see a plain ``Conv`` (pruning, quantization) can run
after it; ``onnx.inliner.inline_local_functions`` gives the same plain graph outside this project.

Declined (graph unchanged, reason reported): the Conv output is a graph output or read by
anything besides the activation; the activation is declined by :mod:`.activations` (non-constant
Clip bounds or PRelu slope, constants that are not 3/0/6/(1/6), an intermediate with another
reader or that is a graph output); a Conv without bias whose output-channel count or dtype is
unknown; the model already defines a different function of the same name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import AttributeProto, helper
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

from ..ir.graph import (
    constant_value,
    copy_extras,
    is_graph_output,
    rank,
    static_shape,
    unique_name,
)
from .activations import ActivationMatch, Declined, match_activation
from .base import Match, Pass, PassResult, RewriteRule, RewriteRulePass

logger = logging.getLogger(__name__)

#: domain (and version) of the fused functions
FUSED_DOMAIN = "onnx_compress.fused"
FUSED_DOMAIN_VERSION = 1

_STANDARD_DOMAINS = (None, "", "ai.onnx")

#: Conv's attributes, passed to the body by reference
CONV_ATTRS: tuple[tuple[str, int], ...] = (
    ("auto_pad", AttributeProto.STRING),
    ("dilations", AttributeProto.INTS),
    ("group", AttributeProto.INT),
    ("kernel_shape", AttributeProto.INTS),
    ("pads", AttributeProto.INTS),
    ("strides", AttributeProto.INTS),
)


@dataclass(frozen=True)
class FusedKind:
    function: str
    #: function inputs after X, W, B
    inputs: tuple[str, ...] = ()
    #: float attributes of the activation, passed by reference
    attrs: tuple[str, ...] = ()


#: canonical activation kind -> its fused function
FUSED_KINDS: dict[str, FusedKind] = {
    "Relu": FusedKind("ConvRelu"),
    "Clip": FusedKind("ConvClip", inputs=("min", "max")),
    "LeakyRelu": FusedKind("ConvLeakyRelu", attrs=("alpha",)),
    "PRelu": FusedKind("ConvPRelu", inputs=("slope",)),
    "HardSigmoid": FusedKind("ConvHardSigmoid", attrs=("alpha", "beta")),
    "HardSwish": FusedKind("ConvHardSwish"),
    "SiLU": FusedKind("ConvSiLU"),
    "Sigmoid": FusedKind("ConvSigmoid"),
    "Tanh": FusedKind("ConvTanh"),
}

#: function name -> canonical kind
FUNCTION_KINDS = {k.function: kind for kind, k in FUSED_KINDS.items()}


def _ref(name: str, attr_type: int) -> AttributeProto:
    attr = AttributeProto()
    attr.name = name
    attr.ref_attr_name = name
    attr.type = attr_type
    return attr


def function_proto(kind: str, opset: int) -> onnx.FunctionProto:
    """The ``FunctionProto`` of ``kind`` with a body at default-domain ``opset``."""
    spec = FUSED_KINDS[kind]
    conv = helper.make_node("Conv", ["X", "W", "B"], ["C"], name="conv")
    conv.attribute.extend(_ref(name, t) for name, t in CONV_ATTRS)
    body = [conv]
    if kind in ("Relu", "Sigmoid", "Tanh"):
        body.append(helper.make_node(kind, ["C"], ["Y"], name="act"))
    elif kind == "Clip":
        body.append(helper.make_node("Clip", ["C", "min", "max"], ["Y"], name="act"))
    elif kind == "PRelu":
        body.append(helper.make_node("PRelu", ["C", "slope"], ["Y"], name="act"))
    elif kind in ("LeakyRelu", "HardSigmoid"):
        act = helper.make_node(kind, ["C"], ["Y"], name="act")
        act.attribute.extend(_ref(name, AttributeProto.FLOAT) for name in spec.attrs)
        body.append(act)
    elif kind == "HardSwish":
        if opset >= 14:
            body.append(helper.make_node("HardSwish", ["C"], ["Y"], name="act"))
        else:
            body.append(helper.make_node("HardSigmoid", ["C"], ["H"], name="gate", alpha=1.0 / 6.0, beta=0.5))
            body.append(helper.make_node("Mul", ["C", "H"], ["Y"], name="act"))
    elif kind == "SiLU":
        body.append(helper.make_node("Sigmoid", ["C"], ["S"], name="gate"))
        body.append(helper.make_node("Mul", ["C", "S"], ["Y"], name="act"))
    else:  # pragma: no cover - FUSED_KINDS and this list are kept together
        raise ValueError(f"no fused function for activation {kind!r}")
    return helper.make_function(
        FUSED_DOMAIN,
        spec.function,
        ["X", "W", "B", *spec.inputs],
        ["Y"],
        body,
        [helper.make_opsetid("", opset)],
        attributes=[name for name, _ in CONV_ATTRS] + list(spec.attrs),
        doc_string=f"Y = {kind}(Conv(X, W, B)); written by onnx-compress fuse-conv-activation",
    )


def _gs_function(kind: str, opset: int) -> gs.Function:
    return OnnxImporter.import_function(function_proto(kind, opset), model_opset=opset)


def _find_function(graph: gs.Graph, name: str) -> gs.Function | None:
    for func in graph.functions:
        if func.domain == FUSED_DOMAIN and func.name == name:
            return func
    return None


def _same_definition(func: gs.Function, proto: onnx.FunctionProto) -> bool:
    return (
        [t.name for t in func.inputs] == list(proto.input)
        and [t.name for t in func.outputs] == list(proto.output)
        and [n.op for n in func.nodes] == [n.op_type for n in proto.node]
        and set(func.attrs) == set(proto.attribute)
    )


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    value = constant_value(tensor)
    if value is not None:
        return value.dtype
    try:
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


class FuseConvActivationRule(RewriteRule):
    """Conv -> activation => one ``onnx_compress.fused.Conv<Act>`` node."""

    def match(self, graph, node):
        if node.op != "Conv" or node.domain not in _STANDARD_DOMAINS:
            return None
        if len(node.outputs) != 1 or len(node.inputs) < 2:
            return None
        y = node.outputs[0]
        w_rank = rank(node.inputs[1])
        found = match_activation(graph, y, opset=int(graph.opset), x_rank=w_rank)
        if found is None:
            return None
        return Match(node, {"activation": found})

    def check(self, graph, match):
        conv = match.anchor
        found = match["activation"]
        if isinstance(found, Declined):
            return found.reason
        assert isinstance(found, ActivationMatch)
        if is_graph_output(graph, conv.outputs[0]):
            return "Conv output is a graph output"
        if _bias_of(conv) is None:
            channels, dtype = _zero_bias_spec(conv)
            if channels is None:
                return "Conv has no bias and its output-channel count is unknown"
            if dtype is None or not np.issubdtype(dtype, np.floating):
                return "Conv has no bias and its weight dtype is unknown or not floating point"
        if found.kind == "Clip" and (found.inputs["min"] is None or found.inputs["max"] is None):
            if found.inputs["min"] is None and found.inputs["max"] is None and _dtype(conv.inputs[1]) is None:
                return "Clip without bounds and the Conv dtype is unknown"
        spec = FUSED_KINDS[found.kind]
        existing = _find_function(graph, spec.function)
        if existing is not None and not _same_definition(existing, function_proto(found.kind, int(graph.opset))):
            return f"the model already defines a different {FUSED_DOMAIN}.{spec.function}"
        return None

    def rewrite(self, graph, match):
        conv = match.anchor
        found: ActivationMatch = match["activation"]
        spec = FUSED_KINDS[found.kind]
        opset = int(graph.opset)
        if _find_function(graph, spec.function) is None:
            graph.functions.append(_gs_function(found.kind, opset))

        x, w = conv.inputs[0], conv.inputs[1]
        bias = _bias_of(conv)
        if bias is None:
            channels, dtype = _zero_bias_spec(conv)
            bias = gs.Constant(unique_name(graph, f"{conv.name or 'conv'}_zero_bias"), np.zeros(channels, dtype=dtype))
        extra: list[gs.Tensor] = []
        if found.kind == "Clip":
            ref = found.inputs["min"] if found.inputs["min"] is not None else found.inputs["max"]
            dtype = _dtype(ref) if ref is not None else _dtype(w)
            for key, fill in (("min", -np.inf), ("max", np.inf)):
                tensor = found.inputs[key]
                if tensor is None:
                    tensor = gs.Constant(unique_name(graph, f"{conv.name or 'conv'}_clip_{key}"), np.array(fill, dtype=dtype))
                extra.append(tensor)
        elif found.kind == "PRelu":
            extra.append(found.inputs["slope"])

        attrs = {k: v for k, v in conv.attrs.items() if k in dict(CONV_ATTRS)}
        attrs.update({k: float(found.attrs[k]) for k in spec.attrs})
        out = found.output
        name = conv.name
        for node in [conv, *found.nodes]:
            node.inputs.clear()
            node.outputs.clear()
        fused = gs.Node(
            spec.function,
            name=name,
            attrs=attrs,
            inputs=[x, w, bias, *extra],
            outputs=[out],
            domain=FUSED_DOMAIN,
        )
        copy_extras(conv, fused)
        graph.nodes.append(fused)
        logger.debug("fused %s + %s (%s) into %s", name, found.kind, found.form, spec.function)


def _bias_of(conv: gs.Node) -> gs.Tensor | None:
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        return conv.inputs[2]
    return None


def _zero_bias_spec(conv: gs.Node) -> tuple[int | None, np.dtype | None]:
    w = conv.inputs[1]
    shape = static_shape(w)
    if shape is None and w.shape is not None and w.shape and isinstance(w.shape[0], (int, np.integer)):
        shape = (int(w.shape[0]),)
    channels = int(shape[0]) if shape else None
    dtype = _dtype(w)
    if dtype is None:
        dtype = _dtype(conv.inputs[0])
    return channels, dtype


class FuseConvActivationPass(RewriteRulePass):
    """Fuse every Conv + recognised activation into one ``onnx_compress.fused`` function node."""

    name = "fuse-conv-activation"

    def __init__(self) -> None:
        self.rules = (FuseConvActivationRule(),)


class UnfuseConvActivationPass(Pass):
    """Inline every ``onnx_compress.fused`` function node back into plain ONNX ops.

    The body's Conv takes the fused node's name; a zero bias is dropped again (``conv + 0`` is
    exact); functions of the domain that no node uses any more are removed from the model.
    """

    name = "unfuse-conv-activation"

    def call(self, graph: gs.Graph) -> PassResult:
        functions = {(f.domain, f.name): f for f in graph.functions if f.domain == FUSED_DOMAIN}
        changes = 0
        for node in list(graph.nodes):
            if node.domain != FUSED_DOMAIN:
                continue
            func = functions.get((node.domain, node.op))
            if func is None:
                continue
            _inline(graph, node, func)
            changes += 1
        if changes:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        used = {n.op for n in graph.nodes if n.domain == FUSED_DOMAIN}
        kept = [f for f in graph.functions if f.domain != FUSED_DOMAIN or f.name in used]
        removed = len(graph.functions) - len(kept)
        if removed:
            graph.functions = kept
        return PassResult(graph, bool(changes or removed), changes)


def _inline(graph: gs.Graph, node: gs.Node, func: gs.Function) -> None:
    """Replace ``node`` by a copy of ``func``'s body."""
    tensors: dict[int, gs.Tensor] = {}
    for i, formal in enumerate(func.inputs):
        actual = node.inputs[i] if i < len(node.inputs) else None
        tensors[id(formal)] = actual if actual is not None and actual.name else gs.Variable.empty()
    for formal, actual in zip(func.outputs, node.outputs):
        tensors[id(formal)] = actual
    out_dtype = node.outputs[0].dtype if node.outputs else None
    base = node.name or node.op

    def mapped(t: gs.Tensor) -> gs.Tensor:
        if id(t) not in tensors:
            if isinstance(t, gs.Constant):
                tensors[id(t)] = gs.Constant(unique_name(graph, f"{base}/{t.name}"), np.asarray(t.values))
            elif not t.name:
                tensors[id(t)] = gs.Variable.empty()
            else:
                tensors[id(t)] = gs.Variable(unique_name(graph, f"{base}/{t.name}"), dtype=out_dtype)
        return tensors[id(t)]

    attrs_in = dict(node.attrs)
    body: list[tuple[gs.Node, list[gs.Tensor], list[gs.Tensor], dict]] = []
    for inner in func.nodes:
        attrs = {}
        for key, value in inner.attrs.items():
            if isinstance(value, gs.Node.AttributeRef):
                if value.name in attrs_in:
                    attrs[key] = attrs_in[value.name]
                elif func.attrs.get(value.name) is not None:
                    attrs[key] = func.attrs[value.name]
            else:
                attrs[key] = value
        body.append((inner, [mapped(t) for t in inner.inputs], [mapped(t) for t in inner.outputs], attrs))

    node.inputs.clear()
    node.outputs.clear()
    first_conv = True
    for inner, inputs, outputs, attrs in body:
        if inner.op == "Conv" and first_conv:
            name, first_conv = node.name, False
            if len(inputs) > 2:
                b = constant_value(inputs[2])
                if b is not None and not np.any(b):
                    inputs = inputs[:2]
        else:
            name = unique_name(graph, f"{base}/{inner.name or inner.op}")
        new = gs.Node(inner.op, name=name, attrs=attrs, inputs=inputs, outputs=outputs, domain=inner.domain)
        if name == node.name:
            copy_extras(node, new)
        graph.nodes.append(new)

"""Recognising activations, including the decomposed forms real exports write.

:func:`match_activation` looks at the readers of one tensor ``x`` (for the fusion pass: a Conv
output) and says which element-wise activation ``y = f(x)`` they compute, as an
:class:`ActivationMatch` (the canonical kind, the nodes, the output tensor and the parameters), a
:class:`Declined` with the reason when the readers look like an activation but are not exactly
one, or ``None`` when they are not an activation at all.

Canonical kinds and the forms recognised (``c`` are constants; ``≈`` is equality within a few
units in the last place of the constant's own float type, so paddle's ``0.1666667`` counts as
``1/6``)::

    Relu         Relu(x)                                     = max(x, 0)
    Clip         Clip(x, lo, hi), lo/hi constant (opset>=11) = min(max(x, lo), hi); ReLU6 is (0, 6)
    LeakyRelu    LeakyRelu(x, alpha)                         = x if x >= 0 else alpha*x
    PRelu        PRelu(x, slope), slope constant             = x if x >= 0 else slope*x
    HardSigmoid  HardSigmoid(x, alpha, beta)                 = max(0, min(1, alpha*x + beta))
    Sigmoid      Sigmoid(x);   Tanh   Tanh(x)
    HardSwish    HardSwish(x) (opset >= 14)                  = x * max(0, min(1, x/6 + 1/2))
                 x * HardSigmoid(x, alpha≈1/6, beta≈0.5)     (paddle, torch at opset < 14)
                 Mul(x, Clip(Add(x, 3), 0, 6)) / 6           (Div by 6 or Mul by 1/6, after or
                 Mul(x, Clip(Add(x, 3), 0, 6) / 6)            before the Mul by x)
                 Relu(Add(x, 3)) -> Min(., 6) instead of the Clip
    SiLU         x * Sigmoid(x)                              (Mul operands in either order)
                 x * Sigmoid(x * 1)                          (paddle's Swish with beta = 1)

``x*clip(x+3, 0, 6)/6 = x*max(0, min(1, x/6 + 1/2))`` exactly in real arithmetic, so every
HardSwish form computes the same function; in float32 they differ only by rounding (a few ulp).

A match is strict: every intermediate tensor is read only by the next node of the chain (``x``
itself is read by the chain's head and by the final ``Mul``, as the formula says) and is not a
graph output; every constant has one element, a floating dtype, and no more dimensions than
``x`` (so it cannot broadcast ``x`` to a larger shape); and it has the expected value. Anything
else is declined with a reason naming what differs, and the graph is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, is_graph_output

_STANDARD_DOMAINS = (None, "", "ai.onnx")

#: the canonical kinds :func:`match_activation` returns
KINDS = ("Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "SiLU", "Sigmoid", "Tanh")

#: ONNX defaults of the activations' attributes
_DEFAULTS = {"LeakyRelu": {"alpha": 0.01}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}}


@dataclass
class ActivationMatch:
    """An activation ``output = kind(x)`` computed by ``nodes`` (first to last)."""

    kind: str
    #: which written form matched, e.g. ``"HardSwish"`` or ``"Add-Clip-Mul-Div"``
    form: str
    x: gs.Tensor
    output: gs.Tensor
    nodes: list[gs.Node]
    #: float attributes of the canonical op (``alpha``/``beta``), defaults filled in
    attrs: dict[str, float] = field(default_factory=dict)
    #: tensor inputs of the canonical op after ``x``: Clip ``min``/``max`` (None when absent),
    #: PRelu ``slope``
    inputs: dict[str, gs.Tensor | None] = field(default_factory=dict)


@dataclass
class Declined:
    """The readers of ``x`` look like an activation but are not exactly one."""

    reason: str


def is_op(node: gs.Node, *ops: str) -> bool:
    return node.op in ops and node.domain in _STANDARD_DOMAINS


def readers(tensor: gs.Tensor) -> list[gs.Node]:
    """Distinct nodes reading ``tensor`` (a node reading it twice is listed once)."""
    seen: dict[int, gs.Node] = {}
    for node in tensor.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def close_to(value: float, expected: float, dtype: np.dtype) -> bool:
    """``value`` equals ``expected`` within 8 units in the last place of ``dtype``."""
    eps = float(np.finfo(dtype).eps)
    return abs(value - expected) <= 8 * eps * abs(expected)


def match_activation(
    graph: gs.Graph, x: gs.Tensor, *, opset: int, x_rank: int | None = None
) -> ActivationMatch | Declined | None:
    """The activation the readers of ``x`` compute (see the module docstring)."""
    users = readers(x)
    if len(users) == 1:
        return _single(users[0], x, opset, x_rank)
    if len(users) == 2:
        declined: Declined | None = None
        for head, tail in ((users[0], users[1]), (users[1], users[0])):
            found = _two_reader_form(graph, x, head, tail, x_rank)
            if isinstance(found, ActivationMatch):
                return found
            if isinstance(found, Declined) and declined is None:
                declined = found
        if declined is not None:
            return declined
        if any(_single(u, x, opset, x_rank) is not None for u in users):
            ops = ", ".join(u.op for u in users)
            return Declined(f"output is read by {ops}, not only by the activation")
    elif len(users) > 2 and any(_single(u, x, opset, x_rank) is not None for u in users):
        ops = ", ".join(u.op for u in users)
        return Declined(f"output is read by {ops}, not only by the activation")
    return None


# ---------------------------------------------------------------------------------------------
# one reader: the activation is a single op


def _single(node: gs.Node, x: gs.Tensor, opset: int, x_rank: int | None):
    if node.domain not in _STANDARD_DOMAINS or len(node.outputs) != 1 or not node.inputs:
        return None
    if node.inputs[0] is not x or any(t is x for t in node.inputs[1:]):
        return None
    op = node.op
    out = node.outputs[0]
    if op in ("Relu", "Sigmoid", "Tanh", "HardSwish") and len(node.inputs) == 1:
        return ActivationMatch(op, op, x, out, [node])
    if op in ("LeakyRelu", "HardSigmoid") and len(node.inputs) == 1:
        attrs = {k: float(node.attrs.get(k, v)) for k, v in _DEFAULTS[op].items()}
        return ActivationMatch(op, op, x, out, [node], attrs=attrs)
    if op == "PRelu" and len(node.inputs) == 2:
        slope = node.inputs[1]
        value = constant_value(slope)
        if value is None:
            return Declined("PRelu slope is not a constant")
        if not np.issubdtype(value.dtype, np.floating):
            return Declined("PRelu slope is not floating point")
        return ActivationMatch(op, op, x, out, [node], inputs={"slope": slope})
    if op == "Clip":
        if opset < 11 or "min" in node.attrs or "max" in node.attrs:
            return Declined("Clip with min/max attributes (opset < 11) is not fused")
        bounds: dict[str, gs.Tensor | None] = {}
        for key, idx in (("min", 1), ("max", 2)):
            tensor = node.inputs[idx] if len(node.inputs) > idx else None
            if tensor is not None and not tensor.name:
                tensor = None  # an omitted optional input
            if tensor is not None:
                reason = _scalar_reason(tensor, x_rank, f"Clip {key}")
                if reason is not None:
                    return Declined(reason)
            bounds[key] = tensor
        return ActivationMatch("Clip", "Clip", x, out, [node], inputs=bounds)
    return None


# ---------------------------------------------------------------------------------------------
# two readers: x * g(x) forms (HardSwish, SiLU)


def _two_reader_form(graph, x, head, tail, x_rank):
    """``head`` starts the chain, ``tail`` is the final ``Mul`` that reads ``x`` again."""
    if not is_op(tail, "Mul") or len(head.outputs) != 1 or head.domain not in _STANDARD_DOMAINS:
        return None
    if is_op(head, "Add") and _other_operand(head, x) is not None:
        return _hardswish_add(graph, x, head, tail, x_rank)
    if is_op(head, "HardSigmoid") and len(head.inputs) == 1 and head.inputs[0] is x:
        hs = head.outputs[0]
        if not _is_product(tail, x, hs):
            return None
        reason = _intermediate_reason(graph, hs, tail)
        if reason is not None:
            return Declined(f"x*HardSigmoid(x): {reason}")
        alpha = float(head.attrs.get("alpha", 0.2))
        beta = float(head.attrs.get("beta", 0.5))
        dtype = np.dtype(np.float32)
        if not (close_to(alpha, 1 / 6, dtype) and close_to(beta, 0.5, dtype)):
            return Declined(
                f"x*HardSigmoid(x) with alpha={alpha:g}, beta={beta:g} is not HardSwish "
                "(needs alpha=1/6, beta=0.5)"
            )
        return ActivationMatch("HardSwish", "HardSigmoid-Mul", x, tail.outputs[0], [head, tail])
    if is_op(head, "Sigmoid") and len(head.inputs) == 1 and head.inputs[0] is x:
        s = head.outputs[0]
        if not _is_product(tail, x, s):
            return None
        reason = _intermediate_reason(graph, s, tail)
        if reason is not None:
            return Declined(f"x*Sigmoid(x): {reason}")
        return ActivationMatch("SiLU", "Sigmoid-Mul", x, tail.outputs[0], [head, tail])
    if is_op(head, "Mul") and _other_operand(head, x) is not None:
        scaled = head.outputs[0]
        sig = _reader(scaled, "Sigmoid")
        if sig is None or not is_op(sig, "Sigmoid") or sig.inputs[0] is not scaled:
            return None
        s = sig.outputs[0]
        if not _is_product(tail, x, s):
            return None
        for tensor, nxt in ((scaled, sig), (s, tail)):
            reason = _intermediate_reason(graph, tensor, nxt)
            if reason is not None:
                return Declined(f"x*Sigmoid(x*1): {reason}")
        reason = _constant_reason(_other_operand(head, x), 1.0, x_rank, "x*Sigmoid(x*c)", "c")
        if reason is not None:
            return Declined(reason)
        return ActivationMatch("SiLU", "Mul-Sigmoid-Mul", x, tail.outputs[0], [head, sig, tail])
    return None


def _hardswish_add(graph, x, add, tail, x_rank):
    """x * clip(x + 3, 0, 6) / 6 in its variants; ``tail`` is the Mul reading x."""
    what = "HardSwish-like chain"
    t1 = add.outputs[0]
    clip = _reader(t1, "Clip")
    if clip is None:
        clip = _reader(t1, "Relu")
    checks: list[tuple[gs.Tensor, float, str]] = [(_other_operand(add, x), 3.0, "x + c")]
    nodes = [add]
    if clip is not None and is_op(clip, "Clip") and clip.inputs[0] is t1:
        if "min" in clip.attrs or "max" in clip.attrs or len(clip.inputs) != 3:
            return Declined(f"{what}: Clip without both min and max inputs")
        checks += [(clip.inputs[1], 0.0, "Clip min"), (clip.inputs[2], 6.0, "Clip max")]
        nodes.append(clip)
        clipped = clip.outputs[0]
        clip_form = "Clip"
        inner = [(t1, clip)]
    elif clip is not None and is_op(clip, "Relu") and clip.inputs[0] is t1:
        relu_out = clip.outputs[0]
        mn = _reader(relu_out, "Min")
        if mn is None or not is_op(mn, "Min") or len(mn.inputs) != 2 or _other_operand(mn, relu_out) is None:
            return None
        checks.append((_other_operand(mn, relu_out), 6.0, "Min(relu(x + 3), c)"))
        nodes += [clip, mn]
        clipped = mn.outputs[0]
        clip_form = "Relu-Min"
        inner = [(t1, clip), (relu_out, mn)]
    else:
        return None

    if _is_product(tail, x, clipped):
        # (x * clipped) / 6  or  (x * clipped) * (1/6)
        prod = tail.outputs[0]
        scale = _reader(prod, "Div", "Mul")
        if scale is None:
            return None
        factor = _scale_factor(scale, prod)
        if factor is None:
            return None
        inner += [(clipped, tail), (prod, scale)]
        nodes += [tail, scale]
        out = scale.outputs[0]
        form = f"Add-{clip_form}-Mul-{scale.op}"
    else:
        scale = _reader(clipped, "Div", "Mul", exclude=tail)
        if scale is None:
            return None
        factor = _scale_factor(scale, clipped)
        if factor is None or not _is_product(tail, x, scale.outputs[0]):
            return None
        inner += [(clipped, scale), (scale.outputs[0], tail)]
        nodes += [scale, tail]
        out = tail.outputs[0]
        form = f"Add-{clip_form}-{scale.op}-Mul"
    const, expected, label = factor
    checks.append((const, expected, label))

    for tensor, nxt in inner:
        reason = _intermediate_reason(graph, tensor, nxt)
        if reason is not None:
            return Declined(f"{what}: {reason}")
    for tensor, value, label in checks:
        reason = _constant_reason(tensor, value, x_rank, what, label)
        if reason is not None:
            return Declined(reason)
    return ActivationMatch("HardSwish", form, x, out, nodes)


def _scale_factor(node: gs.Node, t: gs.Tensor):
    """(constant, expected value, label) when ``node`` is ``t / c`` or ``t * c``; else None."""
    if is_op(node, "Div") and len(node.inputs) == 2 and node.inputs[0] is t and node.inputs[1] is not t:
        return node.inputs[1], 6.0, "Div by c"
    if is_op(node, "Mul") and _other_operand(node, t) is not None:
        return _other_operand(node, t), 1.0 / 6.0, "Mul by c"
    return None


# ---------------------------------------------------------------------------------------------
# small helpers


def _other_operand(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node reading ``t`` exactly once, its other input."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if a is t and b is not t:
        return b
    if b is t and a is not t:
        return a
    return None


def _is_product(node: gs.Node, a: gs.Tensor, b: gs.Tensor) -> bool:
    """``node`` is ``Mul(a, b)`` or ``Mul(b, a)``."""
    return is_op(node, "Mul") and len(node.inputs) == 2 and len(node.outputs) == 1 and (
        (node.inputs[0] is a and node.inputs[1] is b) or (node.inputs[0] is b and node.inputs[1] is a)
    )


def _reader(t: gs.Tensor, *ops: str, exclude: gs.Node | None = None) -> gs.Node | None:
    """The one reader of ``t`` that is one of ``ops`` (other readers are judged later)."""
    found = [u for u in readers(t) if is_op(u, *ops) and u is not exclude]
    return found[0] if len(found) == 1 else None


def _intermediate_reason(graph: gs.Graph, t: gs.Tensor, expected: gs.Node) -> str | None:
    if is_graph_output(graph, t):
        return f"intermediate '{t.name}' is a graph output"
    others = [u for u in readers(t) if u is not expected]
    if others:
        return f"intermediate '{t.name}' is also read by {', '.join(u.op for u in others)}"
    return None


def _scalar_reason(t: gs.Tensor, x_rank: int | None, label: str) -> str | None:
    value = constant_value(t)
    if value is None:
        return f"{label} is not a constant"
    if value.size != 1 or not np.issubdtype(value.dtype, np.floating):
        return f"{label} is not a floating-point scalar"
    if value.ndim > (x_rank if x_rank is not None else 1):
        return f"{label} has more dimensions than the activation input"
    return None


def _constant_reason(t: gs.Tensor, expected: float, x_rank: int | None, what: str, label: str) -> str | None:
    reason = _scalar_reason(t, x_rank, label)
    if reason is not None:
        return f"{what}: {reason}"
    value = constant_value(t)
    got = float(value.reshape(-1)[0])
    if not close_to(got, expected, value.dtype):
        return f"{what}: {label} is {got:g}, expected {expected:g}"
    return None

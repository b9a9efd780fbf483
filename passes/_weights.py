"""Shared helpers for passes that fold a per-output-channel affine map into a linear op's weights.

A per-output-channel affine map ``y[o] = x[o] * s[o] + t[o]`` applied to the output of a linear
op ``x = W (*) a + b`` whose output channel ``o`` depends only on the slice of ``W`` along its
output-channel axis is absorbed exactly::

    y[o] = (W' (*) a)[o] + b'[o],    W' = W * s  (per output channel),    b' = b * s + t

:func:`fold_scale_shift` computes ``(W', b')`` per op (Conv axis 0, ConvTranspose axis 1 per
``group``, Gemm per ``transB`` with ``alpha``/``beta`` absorbed, MatMul columns); see
:mod:`.fold_batchnorm` for the derivation per op. Used by :mod:`.fold_batchnorm` (``s``, ``t`` from
BatchNormalization statistics) and :mod:`.fold_affine_into_conv` (``s``, ``t`` from a following
Mul/Div/Add/Sub by a constant).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, is_graph_input, make_constant, producer, unique_name

_STANDARD_DOMAINS = (None, "", "ai.onnx")

#: ops whose weight and bias can absorb a per-output-channel affine map
FOLDABLE_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_standard(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in _STANDARD_DOMAINS


def present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or None when absent (missing or empty name)."""
    if len(node.inputs) <= index:
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Variable) and not tensor.name:
        return None
    return tensor


def new_weight(graph: gs.Graph, base: str, values: np.ndarray, like: gs.Tensor | None) -> gs.Tensor:
    """A new constant holding ``values``, in the same form as ``like``.

    An initializer (``gs.Constant``) normally; the output of a new ``Constant`` node when ``like``
    is itself a Constant node's output (models whose weights live in Constant nodes keep that form).
    """
    values = np.ascontiguousarray(values)
    src = producer(like) if like is not None and not isinstance(like, gs.Constant) else None
    if src is None:
        return make_constant(graph, base, values)
    out_name = unique_name(graph, base)
    out = gs.Variable(out_name, dtype=values.dtype, shape=list(values.shape))
    node = gs.Node(
        op="Constant",
        name=unique_name(graph, f"{out_name}/Constant"),
        attrs={"value": gs.Constant(f"{out_name}/value", values)},
        outputs=[out],
    )
    graph.nodes.append(node)
    return out


def output_channels(node: gs.Node, w: np.ndarray) -> int | None:
    """Number of output channels of a linear op with constant weight ``w`` (None if malformed)."""
    if node.op in ("Conv", "ConvTranspose") and w.ndim < 3:
        return None
    if node.op in ("Gemm", "MatMul") and w.ndim != 2:
        return None
    if node.op == "Conv":
        return int(w.shape[0])
    if node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        if group < 1 or w.shape[0] % group != 0:
            return None
        return int(w.shape[1]) * group
    if node.op == "Gemm":
        return int(w.shape[0 if int(node.attrs.get("transB", 0)) else 1])
    if node.op == "MatMul":
        return int(w.shape[1])
    return None


def fold_scale_shift(
    node: gs.Node, w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, *, label: str = "BN"
) -> tuple[np.ndarray, np.ndarray] | str:
    """``(W', b')`` in float64 for ``y = (W (*) a + b) * s + t`` per output channel, or a reason.

    ``s`` and ``t`` have shape ``[C]``. For Gemm, ``alpha`` and ``beta`` are absorbed (the caller
    sets both to 1). For MatMul ``bias`` is the constant of a following ``Add`` (or None).
    ``label`` names the affine map in reasons ("... do not match the BN channel count").
    """
    channels = s.size
    return getattr(_Fold, node.op)(node, w, bias, s, t, channels, label)


class _Fold:
    @staticmethod
    def _conv_bias(bias, s, t, channels, label):
        if bias is None:
            return t
        b = np.asarray(bias, dtype=np.float64)
        if b.shape != (channels,):
            return f"bias shape does not match the {label} channel count"
        return b * s + t

    @staticmethod
    def Conv(node, w, bias, s, t, channels, label):
        if w.ndim < 3 or w.shape[0] != channels:
            return f"Conv weight's output channels do not match the {label} channel count"
        b = _Fold._conv_bias(bias, s, t, channels, label)
        if isinstance(b, str):
            return b
        scale = s.reshape((channels,) + (1,) * (w.ndim - 1))
        return w.astype(np.float64) * scale, b

    @staticmethod
    def ConvTranspose(node, w, bias, s, t, channels, label):
        group = int(node.attrs.get("group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group != 0 or w.shape[1] * group != channels:
            return f"ConvTranspose weight's output channels do not match the {label} channel count"
        b = _Fold._conv_bias(bias, s, t, channels, label)
        if isinstance(b, str):
            return b
        c_in, c_out_g = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        grouped = w.astype(np.float64).reshape((group, c_in // group, c_out_g) + kernel)
        scale = s.reshape((group, 1, c_out_g) + (1,) * len(kernel))
        return (grouped * scale).reshape(w.shape), b

    @staticmethod
    def Gemm(node, w, bias, s, t, channels, label):
        if w.ndim != 2:
            return "Gemm weight is not 2-D"
        trans_b = int(node.attrs.get("transB", 0))
        axis = 0 if trans_b else 1
        if w.shape[axis] != channels:
            return f"Gemm output columns do not match the {label} channel count"
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        scale = s.reshape((channels, 1) if trans_b else (1, channels))
        w_new = alpha * w.astype(np.float64) * scale
        if bias is None:
            b_new = t
        else:
            c = np.asarray(bias, dtype=np.float64)
            if c.ndim > 2:
                return "Gemm C has rank > 2"
            try:
                shape = np.broadcast_shapes(c.shape, (1, channels))
            except ValueError:
                return "Gemm C does not broadcast to the output columns"
            if shape[-1] != channels:
                return "Gemm C does not broadcast to the output columns"
            b_new = beta * c * s + t
            if b_new.ndim == 2 and b_new.shape[0] == 1:
                b_new = b_new.reshape(channels)
        return w_new, b_new

    @staticmethod
    def MatMul(node, w, bias, s, t, channels, label):
        if w.ndim != 2:
            return "MatMul weight is not 2-D"
        if w.shape[1] != channels:
            return f"MatMul output columns do not match the {label} channel count"
        b_new = t
        if bias is not None:
            b = np.asarray(bias, dtype=np.float64)
            if b.shape != (channels,):
                return f"bias shape does not match the {label} channel count"
            b_new = b * s + t
        return w.astype(np.float64) * s.reshape(1, channels), b_new


def constant_float_weight(graph: gs.Graph, node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | str:
    """``(tensor, value)`` of ``node``'s weight (input 1), or the reason it cannot be folded into."""
    weight = present(node, 1)
    if weight is None:
        return f"{node.op} has no weight"
    if is_graph_input(graph, weight):
        return "weight is a graph input"
    w = constant_value(weight)
    if w is None:
        return "weight is not constant"
    if not np.issubdtype(w.dtype, np.floating):
        return "weight is not floating point"
    return weight, w


def constant_float_bias(graph: gs.Graph, node: gs.Node) -> tuple[gs.Tensor | None, np.ndarray | None] | str:
    """``(tensor, value)`` of ``node``'s optional bias (input 2; ``(None, None)`` when absent), or
    the reason it cannot be folded into."""
    bias_tensor = present(node, 2)
    if bias_tensor is None:
        return None, None
    if is_graph_input(graph, bias_tensor):
        return "bias is a graph input"
    bias = constant_value(bias_tensor)
    if bias is None:
        return "bias is not constant"
    if not np.issubdtype(bias.dtype, np.floating):
        return "bias is not floating point"
    return bias_tensor, bias

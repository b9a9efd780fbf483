"""FoldBatchNormPass: fold an inference BatchNormalization into the linear op that feeds it.

In inference BatchNormalization is a per-channel affine map along axis 1::

    y = (x - mean) / sqrt(var + eps) * gamma + beta = x * s + t
    s = gamma / sqrt(var + eps)
    t = beta - mean * s

When ``x = W (*) a + b`` comes from a linear op whose weight ``W`` and bias ``b`` are constants,
and output channel ``o`` of that op only depends on the slice of ``W`` along its output-channel
axis, then::

    y[o] = (W (*) a)[o] * s[o] + b[o] * s[o] + t[o]
         = (W' (*) a)[o] + b'[o]
    W'   = W * s            (each output channel's slice of W scaled by s[o])
    b'   = (b - mean) * s + beta      (b = 0 when the op has no bias)

Where the output-channel axis is, per op:

- ``Conv``: ``W`` is ``[C_out, C_in/group, k...]``; axis 0, for any ``group``.
- ``ConvTranspose``: ``W`` is ``[C_in, C_out/group, k...]``. Input channel ``i`` belongs to group
  ``g = i // (C_in/group)`` and column ``j`` of that row feeds output channel
  ``o = g * (C_out/group) + j``. So ``W`` is viewed as ``[group, C_in/group, C_out/group, k...]``
  and scaled by ``s`` viewed as ``[group, 1, C_out/group, 1...]``. With ``group == 1`` this is
  axis 1.
- ``Gemm``: ``Y = alpha * A' B' + beta * C`` with ``B' = B`` (``transB=0``, ``B`` is ``[K, N]``,
  channel axis 1) or ``B' = B^T`` (``transB=1``, ``B`` is ``[N, K]``, channel axis 0). The output is
  ``[M, N]`` so the BN channel is ``N``. Folded: ``B'' = alpha * B * s`` along that axis,
  ``C'' = beta * C * s + t`` (``C`` absent = 0; a scalar or ``[N]``/``[1, N]`` ``C`` gives ``[N]``,
  an ``[M, 1]``/``[M, N]`` one gives ``[M, N]``), and then ``alpha = beta = 1``.
- ``MatMul`` with a constant 2-D right operand ``W`` (``[K, N]``) and a 2-D output: channel axis 1
  of the output is the last axis, so ``W' = W * s`` column-wise and an ``Add(., t)`` follows. A
  MatMul output of rank > 2 is declined: BN's channel axis 1 is then not MatMul's last axis.

Everything is computed in float64 and cast back to the weight's dtype. ``W'`` and ``b'`` are always
written as *new* constants (the originals are never mutated); they take the form of the weight
they replace (an initializer, or a ``Constant`` node for models that keep weights in Constant
nodes). A Conv/ConvTranspose without bias gets one.

Declined (graph untouched, the reason is returned by ``check``): BN in training mode
(``training_mode=1``) or with ``spatial=0``; BN's running-statistics outputs in use; BN statistics
not constant or not of shape ``[C]``; the linear op's output read by anything else or being a
graph output; the weight a graph input, not constant, not floating point, or read by another node
(a weight shared outside the match stays as it is; the BN then falls to
:class:`~.batchnorm_to_mul_add.BatchNormToMulAddPass`); the bias not constant; shapes that do not
line up with the BN's channel count. A bias shared with other nodes is fine: the folded bias is a
new constant and the shared one is left as it was.

Graph output names never change: the BN node is removed by rewiring (``bypass_node``), so when
its output is a graph output, the linear op (or the new Add) writes that tensor directly.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import (
    bypass_node,
    constant_value,
    copy_extras,
    is_graph_input,
    is_graph_output,
    make_constant,
    producer,
    rank,
    unique_name,
)
from .base import Match, RewriteRule, RewriteRulePass

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = (None, "", "ai.onnx")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_standard(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in _STANDARD_DOMAINS


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or None when absent (missing or empty name)."""
    if len(node.inputs) <= index:
        return None
    tensor = node.inputs[index]
    if isinstance(tensor, gs.Variable) and not tensor.name:
        return None
    return tensor


def batchnorm_decline_reason(graph: gs.Graph, bn: gs.Node) -> str | None:
    """Why ``bn`` cannot be treated as a constant per-channel affine map (None if it can)."""
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "BatchNormalization is in training mode"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    if int(bn.attrs.get("is_test", 1)) == 0:
        return "BatchNormalization has is_test=0 (training mode)"
    if len(bn.inputs) < 5 or len(bn.outputs) < 1:
        return "BatchNormalization has too few inputs or outputs"
    for extra in bn.outputs[1:]:
        if extra.outputs or is_graph_output(graph, extra):
            return "BatchNormalization's running-statistics outputs are used"
    return None


def batchnorm_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, t)`` in float64 for a BN with constant statistics, or the reason it has none.

    ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``; each of shape ``[C]``.
    """
    names = ("scale", "bias", "mean", "var")
    values = []
    for name, tensor in zip(names, bn.inputs[1:5]):
        value = constant_value(tensor)
        if value is None:
            return f"BatchNormalization {name} is not constant"
        if not np.issubdtype(value.dtype, np.floating):
            return f"BatchNormalization {name} is not floating point"
        values.append(np.asarray(value, dtype=np.float64))
    sizes = {v.size for v in values}
    if any(v.ndim != 1 for v in values) or len(sizes) != 1:
        return "BatchNormalization statistics are not all of shape [C]"
    gamma, beta, mean, var = values
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    t = beta - mean * s
    return s, t


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


class _FoldBatchNormRule(RewriteRule):
    def match(self, graph, node):
        if not is_standard(node, "BatchNormalization") or not node.inputs:
            return None
        x = node.inputs[0]
        src = producer(x)
        if src is None or src.domain not in _STANDARD_DOMAINS or src.op not in _FOLDABLE:
            return None
        if not src.outputs or src.outputs[0] is not x:
            return None
        return Match(node, {"bn": node, "x": x, "src": src})

    # -- check ----------------------------------------------------------------------------------

    def check(self, graph, match):
        bn, x, src = match["bn"], match["x"], match["src"]
        reason = batchnorm_decline_reason(graph, bn)
        if reason:
            return reason
        if is_graph_output(graph, x):
            return f"{src.op} output is a graph output"
        if len(x.outputs) != 1:
            return f"{src.op} output has other consumers"
        stats = batchnorm_scale_shift(bn)
        if isinstance(stats, str):
            return stats
        s, t = stats
        channels = s.size

        weight = _present(src, 1)
        if weight is None:
            return f"{src.op} has no weight"
        if is_graph_input(graph, weight):
            return "weight is a graph input"
        w = constant_value(weight)
        if w is None:
            return "weight is not constant"
        if not np.issubdtype(w.dtype, np.floating):
            return "weight is not floating point"
        if len(weight.outputs) != 1:
            return "weight initializer shared outside the match"
        bias_tensor = _present(src, 2)
        bias = None
        if bias_tensor is not None:
            if is_graph_input(graph, bias_tensor):
                return "bias is a graph input"
            bias = constant_value(bias_tensor)
            if bias is None:
                return "bias is not constant"
            if not np.issubdtype(bias.dtype, np.floating):
                return "bias is not floating point"

        folded = getattr(self, f"_fold_{src.op}")(src, w, bias, s, t, channels)
        if isinstance(folded, str):
            return folded
        match.parts.update(weight=weight, bias_tensor=bias_tensor, folded=folded)
        return None

    # each _fold_* returns (W', b') as float64 arrays, or a reason

    @staticmethod
    def _conv_bias(bias, s, t, channels):
        if bias is None:
            return t
        b = np.asarray(bias, dtype=np.float64)
        if b.shape != (channels,):
            return "bias shape does not match the BN channel count"
        return b * s + t  # = (b - mean) * s + beta

    def _fold_Conv(self, node, w, bias, s, t, channels):
        if w.ndim < 3 or w.shape[0] != channels:
            return "Conv weight's output channels do not match the BN channel count"
        b = self._conv_bias(bias, s, t, channels)
        if isinstance(b, str):
            return b
        scale = s.reshape((channels,) + (1,) * (w.ndim - 1))
        return w.astype(np.float64) * scale, b

    def _fold_ConvTranspose(self, node, w, bias, s, t, channels):
        group = int(node.attrs.get("group", 1))
        if w.ndim < 3 or group < 1 or w.shape[0] % group != 0 or w.shape[1] * group != channels:
            return "ConvTranspose weight's output channels do not match the BN channel count"
        b = self._conv_bias(bias, s, t, channels)
        if isinstance(b, str):
            return b
        c_in, c_out_g = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        grouped = w.astype(np.float64).reshape((group, c_in // group, c_out_g) + kernel)
        scale = s.reshape((group, 1, c_out_g) + (1,) * len(kernel))
        return (grouped * scale).reshape(w.shape), b

    def _fold_Gemm(self, node, w, bias, s, t, channels):
        if w.ndim != 2:
            return "Gemm weight is not 2-D"
        trans_b = int(node.attrs.get("transB", 0))
        axis = 0 if trans_b else 1
        if w.shape[axis] != channels:
            return "Gemm output columns do not match the BN channel count"
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

    def _fold_MatMul(self, node, w, bias, s, t, channels):
        if w.ndim != 2:
            return "MatMul weight is not 2-D"
        if w.shape[1] != channels:
            return "MatMul output columns do not match the BN channel count"
        a = node.inputs[0]
        out_rank = rank(node.outputs[0])
        if out_rank is None:
            out_rank = rank(a)
        if out_rank is None:
            return "MatMul output rank is unknown"
        if out_rank != 2:
            return f"MatMul output has rank {out_rank}: BN channel axis 1 is not its last axis"
        return w.astype(np.float64) * s.reshape(1, channels), t

    # -- rewrite --------------------------------------------------------------------------------

    def rewrite(self, graph, match):
        bn, x, src = match["bn"], match["x"], match["src"]
        weight, bias_tensor = match["weight"], match["bias_tensor"]
        w_new, b_new = match["folded"]
        dtype = constant_value(weight).dtype
        stem = src.name or bn.name or src.op
        w_const = new_weight(graph, f"{stem}.weight_bnfolded", w_new.astype(dtype), weight)
        b_const = new_weight(graph, f"{stem}.bias_bnfolded", b_new.astype(dtype), bias_tensor or weight)
        src.inputs[1] = w_const
        keep = x
        if src.op == "MatMul":
            added = gs.Variable(unique_name(graph, f"{x.name}_bnfolded"), dtype=x.dtype, shape=x.shape)
            add = gs.Node(op="Add", name=unique_name(graph, f"{bn.name or stem}/Add"), inputs=[x, b_const], outputs=[added])
            copy_extras(bn, add)
            graph.nodes.append(add)
            bn.inputs[0] = added  # BN now reads the Add, so bypassing it rewires exactly as for Conv
            keep = added
        elif len(src.inputs) > 2:
            src.inputs[2] = b_const
        else:
            src.inputs.append(b_const)
        if src.op == "Gemm":
            src.attrs["alpha"] = 1.0
            src.attrs["beta"] = 1.0
        reason = bypass_node(graph, bn, keep)
        if reason is not None:  # check() guarantees this cannot happen
            raise AssertionError(f"cannot bypass {bn.name}: {reason}")
        logger.debug("folded %s into %s %s", bn.name, src.op, src.name)


class FoldBatchNormPass(RewriteRulePass):
    """Fold inference BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul."""

    name = "fold-batchnorm"
    rules = (_FoldBatchNormRule(),)

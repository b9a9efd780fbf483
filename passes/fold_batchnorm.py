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
    is_graph_output,
    producer,
    rank,
    unique_name,
)
from ._weights import _STANDARD_DOMAINS, FOLDABLE_LINEAR_OPS, constant_float_bias, constant_float_weight, fold_scale_shift, is_standard, new_weight, present
from .base import Match, RewriteRule, RewriteRulePass

logger = logging.getLogger(__name__)

_FOLDABLE = FOLDABLE_LINEAR_OPS
_present = present


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

        found = constant_float_weight(graph, src)
        if isinstance(found, str):
            return found
        weight, w = found
        if len(weight.outputs) != 1:
            return "weight initializer shared outside the match"
        found = constant_float_bias(graph, src)
        if isinstance(found, str):
            return found
        bias_tensor, bias = found

        folded = fold_scale_shift(src, w, bias, s, t)
        if isinstance(folded, str):
            return folded
        if src.op == "MatMul":
            reason = self._matmul_rank_reason(src)
            if reason:
                return reason
        match.parts.update(weight=weight, bias_tensor=bias_tensor, folded=folded)
        return None

    @staticmethod
    def _matmul_rank_reason(node):
        a = node.inputs[0]
        out_rank = rank(node.outputs[0])
        if out_rank is None:
            out_rank = rank(a)
        if out_rank is None:
            return "MatMul output rank is unknown"
        if out_rank != 2:
            return f"MatMul output has rank {out_rank}: BN channel axis 1 is not its last axis"
        return None

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

"""BatchNormToMulAddPass: an inference BatchNormalization that could not be folded becomes Mul+Add.

In inference BatchNormalization is a per-channel affine map along axis 1::

    y = (x - mean) / sqrt(var + eps) * gamma + beta = x * s + t
    s = gamma / sqrt(var + eps)
    t = beta - mean * s

so ``y = Add(Mul(x, S), T)`` with ``S`` and ``T`` holding ``s`` and ``t`` reshaped to
``[C, 1, ..., 1]`` (``rank(x) - 2`` trailing ones), which broadcasts along axis 1 of
``[N, C, d1, ...]``. ``s`` and ``t`` are computed in float64 and cast to the dtype of ``x``.
This runs after :class:`~.fold_batchnorm.FoldBatchNormPass`, so it only sees BNs that had no
foldable producer (a BN after a Relu, an Add, a graph input, a shared weight, ...). Mul+Add is
what every back end (and our INT8 runtime, and later passes that fold Mul/Add into neighbours)
understands, and it drops the two statistics vectors.

Declined (graph untouched, reason returned): BN in training mode / ``spatial=0`` / running
statistics outputs in use; statistics not constant or not of shape ``[C]``; the rank of ``x``
unknown (``S`` and ``T`` need it) or below 2; the dtype of ``x`` unknown. The BN's output tensor
is written by the new Add, so its name (a graph output's included) never changes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, copy_extras, rank, unique_name
from .base import Match, RewriteRule, RewriteRulePass
from .fold_batchnorm import batchnorm_decline_reason, batchnorm_scale_shift, is_standard, new_weight


def _dtype(tensor: gs.Tensor):
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    return None if tensor.dtype is None else np.dtype(tensor.dtype)


class _BatchNormToMulAddRule(RewriteRule):
    def match(self, graph, node):
        if not is_standard(node, "BatchNormalization") or not node.inputs or not node.outputs:
            return None
        return Match(node, {"bn": node, "x": node.inputs[0], "y": node.outputs[0]})

    def check(self, graph, match):
        bn, x, y = match["bn"], match["x"], match["y"]
        reason = batchnorm_decline_reason(graph, bn)
        if reason:
            return reason
        stats = batchnorm_scale_shift(bn)
        if isinstance(stats, str):
            return stats
        s, t = stats
        x_rank = rank(x)
        if x_rank is None:
            x_rank = rank(y)
        if x_rank is None:
            return "input rank is unknown"
        if x_rank < 2:
            return f"input has rank {x_rank} (BatchNormalization needs [N, C, ...])"
        dtype = _dtype(x) or _dtype(y)
        if dtype is None:
            if int(graph.opset) >= 15:  # scale/bias may have another dtype than x from opset 15
                return "input dtype is unknown"
            dtype = constant_value(bn.inputs[1]).dtype
        if not np.issubdtype(dtype, np.floating):
            return "input is not floating point"
        shape = (s.size,) + (1,) * (x_rank - 2)
        match.parts.update(scale=s.reshape(shape).astype(dtype), shift=t.reshape(shape).astype(dtype))
        return None

    def rewrite(self, graph, match):
        bn, x, y = match["bn"], match["x"], match["y"]
        stem = bn.name or "BatchNormalization"
        like = bn.inputs[1]
        scale = new_weight(graph, f"{stem}.mul_scale", match["scale"], like)
        shift = new_weight(graph, f"{stem}.add_shift", match["shift"], like)
        scaled = gs.Variable(unique_name(graph, f"{y.name}_scaled"), dtype=y.dtype, shape=y.shape)
        mul = gs.Node(op="Mul", name=unique_name(graph, f"{stem}/Mul"), inputs=[x, scale], outputs=[scaled])
        bn.inputs.clear()
        bn.outputs.clear()
        add = gs.Node(op="Add", name=unique_name(graph, f"{stem}/Add"), inputs=[scaled, shift], outputs=[y])
        copy_extras(bn, add)
        graph.nodes.extend([mul, add])


class BatchNormToMulAddPass(RewriteRulePass):
    """Replace each remaining inference BatchNormalization with a per-channel Mul and Add."""

    name = "batchnorm-to-mul-add"
    rules = (_BatchNormToMulAddRule(),)

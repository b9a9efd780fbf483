"""EliminateNoOpPass: remove nodes that compute their input unchanged.

Removed: ``Identity``; ``Dropout`` in inference (``training_mode`` absent or constant false,
``mask`` output unused); ``Add``/``Sub`` of a constant 0 and ``Mul``/``Div`` by a constant 1 when
the constant cannot broadcast the other operand to a larger shape (it has one element and no
more dimensions than the operand) and has the same dtype; ``Cast`` to the type the input already
has; ``Transpose`` with the identity permutation; ``Reshape`` to the static shape the input
already has.

``y = x`` in every case, so the rewrite is exact. A node whose output is a graph output is removed
only when the producer of its input can be made to write that output name directly; otherwise it
stays (graph output names are part of the model's interface), and the decline is reported. A
Dropout whose ``mask`` output is read or is a graph output stays.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import bypass_node, constant_value, is_graph_output, producer, rank, static_shape
from .base import Match, RewriteRule, RewriteRulePass


def _dtype_of(tensor: gs.Tensor):
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    if tensor.dtype is None:
        return None
    try:
        return np.dtype(tensor.dtype)
    except TypeError:  # graphsurgeon keeps the ONNX enum for types numpy lacks (bfloat16, float8)
        return None


class _NoOpRule(RewriteRule):
    def match(self, graph, node):
        keep = self._passthrough(node)
        return None if keep is None else Match(node, {"keep": keep})

    def check(self, graph, match):
        node, keep = match.anchor, match["keep"]
        if any(is_graph_output(graph, out) for out in node.outputs[1:]):
            return "a second output (Dropout mask) is a graph output"
        if is_graph_output(graph, node.outputs[0]):
            src = producer(keep)
            if src is None or is_graph_output(graph, keep) or len(keep.outputs) != 1:
                return "output is a graph output and its input cannot be renamed"
        return None

    def rewrite(self, graph, match):
        bypass_node(graph, match.anchor, match["keep"])

    def _passthrough(self, node: gs.Node) -> gs.Tensor | None:
        op = node.op if node.domain in (None, "", "ai.onnx") else None
        if op is None or not node.inputs or not node.outputs:
            return None
        x = node.inputs[0]
        if op == "Identity":
            return x
        if op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                return None
            if node.attrs.get("is_test", 1) == 0 and len(node.inputs) == 1 and "ratio" in node.attrs:
                return None  # opset < 7 training-mode Dropout
            if len(node.inputs) > 2 and node.inputs[2].name:
                mode = constant_value(node.inputs[2])
                if mode is None or bool(np.asarray(mode).item()):
                    return None
            return x
        if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            neutral = 0 if op in ("Add", "Sub") else 1
            candidates = [(0, 1)] if op in ("Sub", "Div") else [(0, 1), (1, 0)]
            for keep_idx, const_idx in candidates:
                keep = node.inputs[keep_idx]
                value = constant_value(node.inputs[const_idx])
                if value is None or value.size != 1 or not np.all(value == neutral):
                    continue
                keep_rank = rank(keep)
                if keep_rank is None or value.ndim > keep_rank:
                    continue
                if _dtype_of(keep) != value.dtype:
                    continue
                if constant_value(keep) is not None:
                    continue  # constant folding handles constant-by-constant
                return keep
            return None
        if op == "Cast":
            to = node.attrs.get("to")
            src = _dtype_of(x)
            if src is None or to is None:
                return None
            try:
                target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
            except (KeyError, TypeError, ValueError):
                return None
            # bfloat16/float8 map to ml_dtypes types; only a plain numpy type is compared
            return x if target == src and target.kind in "biufc?" else None
        if op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is not None and list(perm) == list(range(len(perm))):
                return x
            return None
        if op == "Reshape" and len(node.inputs) == 2:
            target = constant_value(node.inputs[1])
            shape = static_shape(x)
            if target is None or shape is None or node.attrs.get("allowzero", 0):
                return None
            target = [int(v) for v in np.asarray(target).reshape(-1)]
            if len(target) != len(shape):
                return None
            resolved = [shape[i] if t == 0 else t for i, t in enumerate(target)]
            if -1 in resolved:
                known = int(np.prod([d for d in resolved if d != -1]))
                if known == 0:
                    return None
                resolved = [int(np.prod(shape)) // known if d == -1 else d for d in resolved]
            return x if tuple(resolved) == shape else None
        return None


class EliminateNoOpPass(RewriteRulePass):
    """Remove Identity, inference Dropout and arithmetic/layout no-ops."""

    name = "eliminate-noop"
    rules = (_NoOpRule(),)

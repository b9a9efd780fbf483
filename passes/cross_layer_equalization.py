"""CrossLayerEqualizationPass: equalize per-channel weight ranges of consecutive convolutions.

Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019) uses the positive homogeneity of the activation between two layers.
For a pair ``Conv1 -> f -> Conv2`` where Conv1's output channel ``i`` is Conv2's input channel
``i``::

    y1[i] = W1[i] (*) x + b1[i]                     (W1 row i: output channel i, any group)
    a[i]  = f(y1[i])
    y2[o] = sum_i W2[o, i] (*) a[i] + b2[o]

and a positive scale ``s_i`` per channel::

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i    =>  y1'[i] = y1[i] / s_i
    f(y / s) = f(y) / s                               (f positively homogeneous, s > 0)
    W2'[o, i] = W2[o, i] * s_i                         =>  y2' = y2 exactly.

``f`` may be the identity (no activation), ``Relu``, ``Clip(0, +inf)`` (= Relu) or
``Clip(-inf, +inf)`` (= identity): those are positively homogeneous. **ReLU6 is not**: ``Clip(0, 6)(y / s) = min(max(y, 0), 6 s) / s``, so the pair is exact only if the upper
bound becomes ``6 s_i`` *per channel*, which a scalar ``Clip`` cannot express (it would need a
per-channel ``Min`` that breaks ONNX Runtime's Clip-into-Q fusion and leaves the activation range
per channel again). Such pairs are declined ("Clip upper bound does not scale per channel"); the
paper's remedy, replacing ReLU6 by ReLU, changes the function and is available only as the
explicit opt-in ``relu6_to_relu=True`` (not exact: it differs wherever ``y1 > 6``).

With ``r1_i = max |W1[i]|`` (the range of Conv1's output channel ``i``) and
``r2_i = max_o |W2[o, i]|`` (the range of Conv2's input channel ``i``) the choice
``s_i = sqrt(r1_i r2_i) / r2_i`` gives both ranges ``sqrt(r1_i r2_i)`` (channels with a zero range
keep ``s_i = 1``). Conv2 may be grouped: input channel ``i = g * (C_in/G) + j`` is column ``j``
of the output channels of group ``g``, so ``W2`` is viewed as ``[G, C_out/G, C_in/G, k...]`` and
``s`` as ``[G, 1, C_in/G, 1...]`` (a depthwise Conv2, ``G = C``, scales its row ``i``). Depthwise
chains ``Conv -> depthwise -> Conv`` form two pairs sharing the depthwise layer; the scales are
applied pair after pair, repeatedly, until every ``s`` is within ``tol`` of 1 (at most
``max_iterations`` rounds), as in the paper. The product of all applied scales is what is written.

Exactness: every step is an exact identity of real arithmetic; in float the new weights are
computed in float64 and rounded once to float32, so outputs agree to float32 rounding (the parity
test asserts 1e-5 of the output range).

Declined pairs (graph untouched for that pair, reason recorded): Conv1's output, or the
activation's output, read by anything but the next node, or a graph output; a non-homogeneous
activation; weights not constant float, shared with other nodes (the scaled weight is always a new
constant, but a shared original would leave other readers out of step) or a graph input; channel
counts that do not line up; a bias that is not a constant vector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, is_graph_input, is_graph_output
from ._weights import new_weight, present
from .base import Pass, PassResult

logger = logging.getLogger(__name__)

_STANDARD = (None, "", "ai.onnx")


@dataclass
class _Layer:
    node: gs.Node
    w: np.ndarray  # float64, current (scaled) value
    b: np.ndarray | None
    dtype: np.dtype
    changed: bool = False


@dataclass
class _Pair:
    first: _Layer
    act: gs.Node | None
    second: _Layer


def _clip_range(node: gs.Node) -> tuple[float, float] | None:
    if "min" in node.attrs or "max" in node.attrs:
        return float(node.attrs.get("min", -math.inf)), float(node.attrs.get("max", math.inf))
    lo, hi = -math.inf, math.inf
    for i in (1, 2):
        t = present(node, i)
        if t is None:
            continue
        v = constant_value(t)
        if v is None or v.size != 1:
            return None
        if i == 1:
            lo = float(v.reshape(()))
        else:
            hi = float(v.reshape(()))
    return lo, hi


class CrossLayerEqualizationPass(Pass):
    """Equalize weight ranges across Conv -> (Relu | none) -> Conv pairs (see module docstring)."""

    name = "cross-layer-equalization"

    def __init__(self, *, max_iterations: int = 20, tol: float = 1e-4, relu6_to_relu: bool = False):
        self.max_iterations = max_iterations
        self.tol = tol
        self.relu6_to_relu = relu6_to_relu

    # -- matching -------------------------------------------------------------------------

    def _weight_reason(self, graph: gs.Graph, node: gs.Node, allowed: set[int]) -> str | None:
        w_t = present(node, 1)
        if w_t is None or is_graph_input(graph, w_t):
            return "weight is a graph input or missing"
        w = constant_value(w_t)
        if w is None or w.dtype.kind != "f" or w.ndim < 3:
            return "weight is not a constant float kernel"
        if any(id(u) not in allowed for u in w_t.outputs):
            return "weight is shared with other nodes"
        b_t = present(node, 2)
        if b_t is not None:
            b = constant_value(b_t)
            if b is None or b.shape != (w.shape[0],) or is_graph_input(graph, b_t):
                return "bias is not a constant vector"
            if any(id(u) not in allowed for u in b_t.outputs):
                return "bias is shared with other nodes"
        return None

    def _activation_reason(self, node: gs.Node) -> str | None:
        if node.domain not in _STANDARD:
            return f"activation {node.op} is not homogeneous"
        if node.op == "Relu":
            return None
        if node.op == "Clip":
            rng = _clip_range(node)
            if rng is None:
                return "Clip bounds are not constant"
            lo, hi = rng
            if lo in (0.0, -math.inf) and hi == math.inf:
                return None
            if self.relu6_to_relu and lo == 0.0:
                return None
            return "Clip upper bound does not scale per channel"
        return f"activation {node.op} is not homogeneous"

    def _match(self, graph: gs.Graph, node: gs.Node) -> tuple[gs.Node | None, gs.Node] | str | None:
        """(activation or None, Conv2) for Conv1 ``node``; a reason string; None if no candidate."""
        out = node.outputs[0]
        if is_graph_output(graph, out) or len(out.outputs) != 1:
            return None
        nxt = out.outputs[0]
        act = None
        if nxt.op in ("Relu", "Clip") and nxt.inputs[0] is out:
            reason = self._activation_reason(nxt)
            if reason is not None:
                after = nxt.outputs[0].outputs
                return reason if len(after) == 1 and after[0].op == "Conv" else None
            act, a_out = nxt, nxt.outputs[0]
            if is_graph_output(graph, a_out) or len(a_out.outputs) != 1:
                return None
            nxt = a_out.outputs[0]
        if nxt.op != "Conv" or nxt.domain not in _STANDARD or present(nxt, 0) is not (act.outputs[0] if act else out):
            return None
        return act, nxt

    # -- the pass -------------------------------------------------------------------------

    def call(self, graph: gs.Graph) -> PassResult:
        layers: dict[int, _Layer] = {}
        pairs: list[_Pair] = []
        declined: list[tuple[str, str]] = []

        def layer(node: gs.Node) -> _Layer:
            if id(node) not in layers:
                w = constant_value(node.inputs[1])
                b_t = present(node, 2)
                b = None if b_t is None else constant_value(b_t).astype(np.float64)
                layers[id(node)] = _Layer(node, w.astype(np.float64), b, w.dtype)
            return layers[id(node)]

        for node in graph.nodes:
            if node.op != "Conv" or node.domain not in _STANDARD:
                continue
            found = self._match(graph, node)
            if found is None:
                continue
            label = node.name or node.op
            if isinstance(found, str):
                declined.append((label, found))
                continue
            act, second = found
            reason = self._weight_reason(graph, node, {id(node)}) or self._weight_reason(graph, second, {id(second)})
            if reason is None:
                w1, w2 = constant_value(node.inputs[1]), constant_value(second.inputs[1])
                group = int(second.attrs.get("group", 1))
                if w2.shape[1] * group != w1.shape[0] or w2.shape[0] % group:
                    reason = "channel counts do not line up"
            if reason is not None:
                declined.append((label, reason))
                continue
            pairs.append(_Pair(layer(node), act, layer(second)))

        if not pairs:
            return PassResult(graph, False, 0, declined)

        for iteration in range(self.max_iterations):
            worst = 0.0
            for pair in pairs:
                s = self._scales(pair)
                worst = max(worst, float(np.max(np.abs(np.log(s)))))
                self._apply(pair, s)
            if worst < self.tol:
                break
        logger.info("cross-layer equalization: %d pairs, %d rounds", len(pairs), iteration + 1)

        for lay in layers.values():
            if not lay.changed:
                continue
            node = lay.node
            node.inputs[1] = new_weight(graph, f"{node.inputs[1].name}_cle", lay.w.astype(lay.dtype), node.inputs[1])
            if lay.b is not None:
                b_t = node.inputs[2]
                node.inputs[2] = new_weight(graph, f"{b_t.name}_cle", lay.b.astype(constant_value(b_t).dtype), b_t)
        if self.relu6_to_relu:
            for pair in pairs:
                if pair.act is not None and pair.act.op == "Clip":
                    pair.act.op, pair.act.attrs = "Relu", {}
                    while len(pair.act.inputs) > 1:
                        pair.act.inputs.pop()
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(graph, True, len(pairs), declined)

    @staticmethod
    def _in_view(pair: _Pair) -> tuple[np.ndarray, tuple[int, ...]]:
        """Conv2's weight viewed as [G, O/G, I/G, k...] and the shape ``s`` broadcasts to."""
        w2 = pair.second.w
        group = int(pair.second.node.attrs.get("group", 1))
        view = w2.reshape(group, w2.shape[0] // group, w2.shape[1], *w2.shape[2:])
        s_shape = (group, 1, w2.shape[1]) + (1,) * (w2.ndim - 2)
        return view, s_shape

    def _scales(self, pair: _Pair) -> np.ndarray:
        w1 = pair.first.w
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
        view, _ = self._in_view(pair)
        # range of input channel i = g * (I/G) + j over every output channel reading it
        r2 = np.abs(np.moveaxis(view, 2, 1)).reshape(view.shape[0], view.shape[2], -1).max(axis=2).reshape(-1)
        ok = (r1 > 0) & (r2 > 0)
        s = np.ones_like(r1)
        s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
        return s

    def _apply(self, pair: _Pair, s: np.ndarray) -> None:
        first, second = pair.first, pair.second
        first.w = first.w / s.reshape((-1,) + (1,) * (first.w.ndim - 1))
        if first.b is not None:
            first.b = first.b / s
        view, s_shape = self._in_view(pair)
        second.w = (view * s.reshape(s_shape)).reshape(second.w.shape)
        first.changed = second.changed = True


__all__ = ["CrossLayerEqualizationPass"]

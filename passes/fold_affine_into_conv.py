"""FoldAffineIntoConvPass: fold an Add/Sub/Mul/Div by a per-channel constant into the linear op before it.

A linear op ``x = W (*) a + b`` (Conv, ConvTranspose of any ``group``, Gemm with ``transB`` either
way, or MatMul with a constant 2-D weight) followed by an element-wise op with a constant ``c``
that is the same for every position of one output channel ``o`` (``c[o]`` per channel, or one
scalar) is itself a per-output-channel affine map ``y[o] = x[o] * s[o] + t[o]``::

    Add(x, c) = Add(c, x):  s = 1,    t = c       ->  W' = W,      b' = b + c
    Sub(x, c):              s = 1,    t = -c      ->  W' = W,      b' = b - c
    Mul(x, c) = Mul(c, x):  s = c,    t = 0       ->  W' = W * c,  b' = b * c
    Div(x, c):              s = 1/c,  t = 0       ->  W' = W / c,  b' = b / c

and ``y[o] = (W (*) a)[o] * s[o] + b[o] * s[o] + t[o] = (W' (*) a)[o] + b'[o]`` with
``W' = W * s`` scaled along the weight's output-channel axis and ``b' = b * s + t`` (``b = 0`` when
absent). The per-op axes (Conv axis 0; ConvTranspose ``[C_in, C_out/group, k...]`` viewed as
``[group, C_in/group, C_out/group, k...]``; Gemm ``B`` axis 1, or 0 with ``transB=1``, with
``alpha`` and ``beta`` absorbed into ``B'`` and ``C'``; MatMul ``W`` columns) are derived in
:mod:`.fold_batchnorm` and computed by the shared :func:`._weights.fold_scale_shift`.
Everything is computed in float64 and cast back to the weight's dtype; new weights keep the form
of the ones they replace (initializer or ``Constant`` node), the originals are never mutated.

MatMul has no bias input: a MatMul followed by ``Add(c)`` is already the canonical linear op with
bias, so that pair is left alone; a further ``Add``/``Sub`` merges into that bias Add's constant
(``b' = b + t``), and a ``Mul``/``Div`` after MatMul (or after MatMul + bias Add) scales ``W`` (and
the bias constant).

"Per output channel" means: padded on the left with ones to the output's rank ``r``, the
constant's shape is 1 on every axis except the channel axis (axis 1 of ``[N, C, ...]`` for
Conv/ConvTranspose; the last axis for Gemm ``[M, N]`` and MatMul ``[..., N]``), where it is 1 or
``C``. So ``[C, 1, 1]``, ``[1, C, 1, 1]``, ``[C]`` for Gemm/MatMul, or a single element. A
constant of rank greater than ``r`` (it would broadcast the output to a higher rank) or with
extent along any other axis (batch, spatial, MatMul rows) would change the output's shape or make
the map position-dependent, and is declined. For a MatMul whose output rank is unknown only a
constant of rank <= 1 is accepted (the output has rank >= 1, so that cannot broadcast it).

Declined (graph untouched, the reason is returned by ``check``): the linear op's output (or the
MatMul bias Add's output) read by anything else or being a graph output; the weight a graph input,
not constant or not floating point; for Mul/Div (and an Add into a Gemm with ``alpha != 1``, whose
``alpha`` must be moved into ``B``) the weight read by another node; the bias not constant; the
constant of another dtype than the weight, not finite, or (Div) containing zero; a constant whose
broadcast is not per output channel (see above); ``Sub(c, x)`` or ``Div(c, x)`` (operand order: the
linear output is the second operand; ``c / x`` is not affine in ``x``, and ``c - x`` is left
alone too). An Add/Sub leaves ``W``
untouched, so a weight shared with other nodes is fine there; a shared bias is fine everywhere
(the folded bias is a new constant).

Graph output names never change: the Add/Sub/Mul/Div is removed by rewiring (``bypass_node``),
so when its output is a graph output, the linear op (or the MatMul's bias Add) writes that tensor
directly.

This pass runs right before ``fold-batchnorm`` in the default pipeline: paddle2onnx writes
``ConvTranspose -> Add(bias) -> BatchNormalization`` (PP-OCRv4 det), and the BN fold only reaches
the ConvTranspose once the Add is folded into its bias.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import bypass_node, constant_value, is_graph_input, is_graph_output, producer, rank
from ._weights import (
    FOLDABLE_LINEAR_OPS,
    constant_float_bias,
    constant_float_weight,
    fold_scale_shift,
    is_standard,
    new_weight,
    output_channels,
)
from .base import Match, RewriteRule, RewriteRulePass

logger = logging.getLogger(__name__)

_AFFINE_OPS = ("Add", "Sub", "Mul", "Div")


def _linear_producer(x: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """``(linear op, MatMul bias Add or None)`` when ``x`` is a foldable linear op's output."""
    src = producer(x)
    if src is None or not src.outputs or src.outputs[0] is not x:
        return None
    if any(is_standard(src, op) for op in FOLDABLE_LINEAR_OPS):
        return src, None
    if is_standard(src, "Add") and len(src.inputs) == 2:
        for i in (0, 1):
            mm = producer(src.inputs[i])
            if (
                mm is not None
                and is_standard(mm, "MatMul")
                and mm.outputs
                and mm.outputs[0] is src.inputs[i]
                and constant_value(src.inputs[1 - i]) is not None
            ):
                return mm, src
    return None


def _sole_reader_reason(graph: gs.Graph, tensor: gs.Tensor, what: str) -> str | None:
    if is_graph_output(graph, tensor):
        return f"{what} output is a graph output"
    if len(tensor.outputs) != 1:
        return f"{what} output has other consumers"
    return None


def per_channel(c: np.ndarray, out_rank: int | None, axis: int | None, channels: int) -> np.ndarray | str:
    """``c`` as a float64 vector ``[channels]`` when it broadcasts per output channel, else a reason.

    ``axis`` is the channel axis of the rank-``out_rank`` output (None: the last axis).
    ``out_rank=None`` (unknown, MatMul only) accepts only a constant of rank <= 1.
    """
    if out_rank is None:
        if c.ndim > 1:
            return f"output rank is unknown, so a rank-{c.ndim} constant may broadcast it"
        out_rank = 1
    if axis is None:
        axis = out_rank - 1
    if c.ndim > out_rank:
        return f"constant of rank {c.ndim} would broadcast the rank-{out_rank} output to a higher rank"
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    for i, d in enumerate(shape):
        if i == axis:
            if d not in (1, channels):
                return f"constant has {d} channels, the output has {channels}"
        elif d != 1:
            return f"constant varies along output axis {i} (not per output channel)"
    return np.broadcast_to(np.asarray(c, dtype=np.float64).reshape(-1), (channels,)).copy()


class _FoldAffineRule(RewriteRule):
    def match(self, graph, node):
        if node.op not in _AFFINE_OPS or not is_standard(node, node.op):
            return None
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        for i in (0, 1):
            x, other = node.inputs[i], node.inputs[1 - i]
            if constant_value(other) is None or is_graph_input(graph, other):
                continue
            found = _linear_producer(x)
            if found is None:
                continue
            linear, bias_add = found
            if is_standard(linear, "MatMul") and bias_add is None and node.op in ("Add", "Sub"):
                return None  # MatMul + Add(c) is already the linear op with bias
            return Match(node, {"op": node, "x": x, "index": i, "const": other, "linear": linear, "bias_add": bias_add})
        return None

    # -- check ----------------------------------------------------------------------------------

    def check(self, graph, match):
        op, x, linear, bias_add = match["op"], match["x"], match["linear"], match["bias_add"]
        kind = op.op
        if match["index"] != 0 and kind in ("Sub", "Div"):
            return f"{linear.op} output is the second operand of {kind} (operand order)"
        reason = _sole_reader_reason(graph, x, "MatMul bias Add" if bias_add is not None else linear.op)
        if reason:
            return reason
        if bias_add is not None:
            reason = _sole_reader_reason(graph, linear.outputs[0], linear.op)
            if reason:
                return reason

        found = constant_float_weight(graph, linear)
        if isinstance(found, str):
            return found
        weight, w = found
        channels = output_channels(linear, w)
        if channels is None:
            return f"{linear.op} weight has an unexpected shape {tuple(w.shape)}"

        c = constant_value(match["const"])
        if c.dtype != w.dtype:
            return f"constant dtype {c.dtype} differs from the weight dtype {w.dtype}"
        if not np.all(np.isfinite(c)):
            return "constant is not finite"
        if kind == "Div" and np.any(c == 0):
            return "Div by a constant containing zero"

        if linear.op in ("Conv", "ConvTranspose"):
            out_rank, axis = w.ndim, 1
        elif linear.op == "Gemm":
            out_rank, axis = 2, 1
        else:  # MatMul: the channel axis is the last one
            out_rank, axis = rank(linear.outputs[0]), None
            if out_rank is None and rank(linear.inputs[0]) is not None:
                out_rank = max(rank(linear.inputs[0]), 1)
        v = per_channel(c, out_rank, axis, channels)
        if isinstance(v, str):
            return v

        ones, zeros = np.ones(channels), np.zeros(channels)
        s, t = {"Add": (ones, v), "Sub": (ones, -v), "Mul": (v, zeros), "Div": (1.0 / v, zeros)}[kind]
        alpha = float(linear.attrs.get("alpha", 1.0)) if linear.op == "Gemm" else 1.0
        scales_weight = kind in ("Mul", "Div") or alpha != 1.0
        if scales_weight and len(weight.outputs) != 1:
            return "weight initializer shared outside the match"

        if bias_add is not None:
            bias_tensor = next(inp for inp in bias_add.inputs if inp is not linear.outputs[0])
            b = constant_value(bias_tensor)
            if b.dtype != w.dtype:
                return f"bias dtype {b.dtype} differs from the weight dtype {w.dtype}"
            bias = per_channel(b, out_rank, axis, channels)
            if isinstance(bias, str):
                return f"MatMul bias Add: {bias}"
        else:
            found = constant_float_bias(graph, linear)
            if isinstance(found, str):
                return found
            bias_tensor, bias = found

        folded = fold_scale_shift(linear, w, bias, s, t, label="affine map")
        if isinstance(folded, str):
            return folded
        match.parts.update(weight=weight, bias_tensor=bias_tensor, folded=folded, scales_weight=scales_weight)
        return None

    # -- rewrite --------------------------------------------------------------------------------

    def rewrite(self, graph, match):
        op, x, linear, bias_add = match["op"], match["x"], match["linear"], match["bias_add"]
        weight, bias_tensor = match["weight"], match["bias_tensor"]
        w_new, b_new = match["folded"]
        dtype = constant_value(weight).dtype
        stem = linear.name or op.name or linear.op
        if match["scales_weight"]:
            linear.inputs[1] = new_weight(graph, f"{stem}.weight_affinefolded", w_new.astype(dtype), weight)
        if linear.op == "MatMul":
            if bias_add is not None:
                b_const = new_weight(graph, f"{stem}.bias_affinefolded", b_new.astype(dtype), bias_tensor)
                idx = next(i for i, inp in enumerate(bias_add.inputs) if inp is bias_tensor)
                bias_add.inputs[idx] = b_const
            # without a bias Add only Mul/Div match, and then b' = t = 0: nothing to add
        else:
            b_const = new_weight(graph, f"{stem}.bias_affinefolded", b_new.astype(dtype), bias_tensor or weight)
            if len(linear.inputs) > 2:
                linear.inputs[2] = b_const
            else:
                linear.inputs.append(b_const)
            if linear.op == "Gemm":
                linear.attrs["alpha"] = 1.0
                linear.attrs["beta"] = 1.0
        reason = bypass_node(graph, op, x)
        if reason is not None:  # check() guarantees this cannot happen
            raise AssertionError(f"cannot bypass {op.name}: {reason}")
        logger.debug("folded %s %s into %s %s", op.op, op.name, linear.op, linear.name)


class FoldAffineIntoConvPass(RewriteRulePass):
    """Fold Add/Sub/Mul/Div by a per-channel constant into a preceding Conv, ConvTranspose, Gemm or MatMul."""

    name = "fold-affine-into-conv"
    rules = (_FoldAffineRule(),)

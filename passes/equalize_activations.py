"""Activation range equalization: per-channel rescaling of the ReLU / ReLU6 outputs that feed a depthwise Conv.

Why. An activation tensor is quantized with one scale for all its channels (ONNX Runtime's
QLinearConv takes a per-tensor input scale), so a channel whose values stay far below the
tensor's range is quantized with a step far too coarse for it. A depthwise Conv then passes
that channel's rounding noise on with no averaging over channels (each output channel sees 9
values of one input channel). On MobileNetV2, the ReLU6 outputs read by depthwise convs carry
about a third of the activation noise in the logits, ``features.0``'s alone 16.8 %; with this
rewrite the activations' noise falls from 16.8 to 18.8 dB below the logits and ``features.0``'s
share to 6.1 % (``python benchmarks/bench_quantize_noise.py --per-tensor [--no-equalize]``).

The rewrite, for ``Conv1 -> f -> DW`` with ``f`` a ``Relu`` or ``Clip(0, hi)`` and ``DW`` a Conv
with one input channel per group (depthwise; channel multiplier ``k`` allowed), and a scale
``s_i >= 1`` per channel ``i``::

    W1'[i] = s_i W1[i],   b1'[i] = s_i b1[i]          =>  y1'[i] = s_i y1[i]
    a'[i]  = f(s_i y1[i])
    W_dw'[i k + j] = W_dw[i k + j] / s_i               (the k output channels of group i)

``Relu`` is positively homogeneous, ``Relu(s y) / s = Relu(y)``: the rewrite is exact. ``Clip(0,
hi)`` is not: ``Clip(s y) / s = min(max(y, 0), hi / s)``, i.e. channel ``i`` is now clipped at
``hi / s_i`` instead of ``hi``. With ``m_i`` the largest value channel ``i`` takes on the
calibration data, the scale is

    s_i = clip(t / m_i, 1, max_scale),   t = hi / margin  (Clip)   or   t = max_i m_i  (Relu)

so ``hi / s_i >= margin * m_i``: a value is clipped only where it exceeds ``margin`` (default 2)
times anything the calibration data showed in that channel -- the same kind of bet, far more
conservative, as the percentile range the quantizer then sets for the whole tensor (99.99 clips
every channel at one level). ``s_i >= 1`` only lifts channels toward the tensor's range;
``max_scale`` (16) stops near-dead channels (``m_i ~ 0``) from being stretched over it. After
the rewrite channel ``i``'s rounding step, in its original units, is ``1 / s_i`` of what it was
(the tensor's range barely moves: its largest channels keep ``s = 1``).

Why only depthwise consumers. A depthwise Conv's weights are quantized per output channel, and
each output channel reads one input channel, so dividing its weights by ``s_i`` changes no
quantization error. A dense consumer mixes channels within each per-output-channel weight scale:
its weight rounding error on channel ``i`` is amplified by ``s_i``. On MobileNetV2 (32
calibration views, 72 evaluation views, ORT ``ENABLE_ALL``) rescaling the projections' inputs as
well, at several strengths (``s``, ``s^0.5``, ``s^0.25``, scales balanced against the weight
columns), lowered the logits SQNR below the depthwise-only rewrite in every variant; that
experiment's script is not kept, so no figures are quoted for it. The depthwise-only figures:
``python benchmarks/bench_quantize_noise.py [--no-equalize]``.

Declined (left as they are): ``Conv1``'s output or ``f``'s output read by anything else or a graph
output; weights or bias not constant float or shared with other nodes; ``Clip`` bounds that are
not constant or a lower bound other than 0; channel counts that do not line up; channels with
no positive value on the calibration data (``s = 1``).

The statistics are one running maximum per channel (:func:`~onnx_compress.passes.smooth_activations.channel_absmax`
over every axis but the channel axis): memory flat in the number of samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, is_graph_output, to_graph, to_model
from ._weights import constant_float_bias, constant_float_weight, new_weight, present
from .cross_layer_equalization import _clip_range
from .smooth_activations import channel_absmax

logger = logging.getLogger(__name__)

MARGIN = 2.0
MAX_SCALE = 16.0


@dataclass
class EqualizedPair:
    """One rewritten ``Conv1 -> activation -> depthwise Conv`` chain."""

    producer: str
    consumer: str
    tensor: str  # the activation output whose channels were rescaled
    scales: np.ndarray  # s_i per channel

    @property
    def mean_scale(self) -> float:
        return float(np.exp(np.mean(np.log(self.scales))))


@dataclass
class _Chain:
    conv: gs.Node
    act: gs.Node
    dw: gs.Node
    upper: float | None  # Clip's upper bound; None for Relu


def _only_reader(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def _owned(graph: gs.Graph, node: gs.Node) -> bool:
    """Constant float weight (and bias, if any) read by ``node`` alone."""
    weight = constant_float_weight(graph, node)
    bias = constant_float_bias(graph, node)
    if isinstance(weight, str) or isinstance(bias, str):
        return False
    tensors = [weight[0]] + ([bias[0]] if bias[0] is not None else [])
    return all(len(t.outputs) == 1 for t in tensors)


def find_chains(graph: gs.Graph, select=lambda node: True) -> list[_Chain]:
    """Every ``Conv -> Relu | Clip(0, hi) -> depthwise Conv`` the rewrite applies to."""
    chains = []
    for conv in graph.nodes:
        if conv.op != "Conv" or not conv.outputs or not select(conv):
            continue
        act = _only_reader(graph, conv.outputs[0])
        if act is None or act.op not in ("Relu", "Clip") or act.inputs[0] is not conv.outputs[0]:
            continue
        upper = None
        if act.op == "Clip":
            bounds = _clip_range(act)
            if bounds is None or bounds[0] != 0.0 or not math.isfinite(bounds[1]):
                continue
            upper = bounds[1]
        dw = _only_reader(graph, act.outputs[0])
        if dw is None or dw.op != "Conv" or present(dw, 0) is not act.outputs[0] or not select(dw):
            continue
        if not (_owned(graph, conv) and _owned(graph, dw)):
            continue
        w1, w2 = constant_value(conv.inputs[1]), constant_value(dw.inputs[1])
        channels, group = w1.shape[0], int(dw.attrs.get("group", 1))
        if w1.ndim < 3 or w2.ndim < 3 or group != channels or w2.shape[1] != 1 or w2.shape[0] % channels:
            continue
        chains.append(_Chain(conv, act, dw, upper))
    return chains


def channel_scales(channel_max: np.ndarray, upper: float | None, *, margin: float = MARGIN,
                   max_scale: float = MAX_SCALE) -> np.ndarray:
    """``s_i = clip(t / m_i, 1, max_scale)`` (module docstring); 1 where ``m_i <= 0``."""
    m = np.asarray(channel_max, dtype=np.float64)
    positive = m > 0
    if not positive.any():
        return np.ones_like(m)
    target = upper / margin if upper is not None else float(m.max())
    s = np.ones_like(m)
    s[positive] = np.clip(target / m[positive], 1.0, max_scale)
    return s


def equalize_activations(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    margin: float = MARGIN,
    max_scale: float = MAX_SCALE,
    select=lambda node: True,
    progress: bool | None = None,
) -> tuple[onnx.ModelProto, list[EqualizedPair]]:
    """(rewritten model, the chains rewritten); see the module docstring.

    ``select(node)``: only chains whose two Convs it accepts (e.g. those that will be quantized).
    """
    if margin < 1.0:
        raise ValueError(f"margin must be >= 1 (values seen in calibration are never clipped), got {margin}")
    if max_scale < 1.0:
        raise ValueError(f"max_scale must be >= 1, got {max_scale}")
    graph = to_graph(model)
    chains = find_chains(graph, select)
    if not chains:
        return model, []
    names = [c.act.outputs[0].name for c in chains]
    maxima = channel_absmax(model, names, feeds, axis=1, progress=progress, desc="equalization statistics")
    done: list[EqualizedPair] = []
    for chain, name in zip(chains, names):
        if name not in maxima:
            continue
        s = channel_scales(maxima[name], chain.upper, margin=margin, max_scale=max_scale)
        if np.all(s == 1.0):
            continue
        conv, dw = chain.conv, chain.dw
        w1 = constant_value(conv.inputs[1])
        shape1 = (-1,) + (1,) * (w1.ndim - 1)
        conv.inputs[1] = new_weight(graph, f"{conv.inputs[1].name}_aeq", (w1.astype(np.float64) * s.reshape(shape1)).astype(w1.dtype),
                                    conv.inputs[1])
        bias = present(conv, 2)
        if bias is not None:
            b = constant_value(bias)
            conv.inputs[2] = new_weight(graph, f"{bias.name}_aeq", (b.astype(np.float64) * s).astype(b.dtype), bias)
        w2 = constant_value(dw.inputs[1])
        per_group = np.repeat(s, w2.shape[0] // s.size)  # output channel o reads input channel o // k
        dw.inputs[1] = new_weight(graph, f"{dw.inputs[1].name}_aeq",
                                  (w2.astype(np.float64) / per_group.reshape(shape1)).astype(w2.dtype), dw.inputs[1])
        done.append(EqualizedPair(conv.name, dw.name, name, s))
    graph.cleanup(remove_unused_graph_inputs=False)
    logger.info("activation equalization: %d of %d Conv -> activation -> depthwise chains rescaled", len(done), len(chains))
    return to_model(graph, like=model), done


__all__ = ["MARGIN", "MAX_SCALE", "EqualizedPair", "channel_scales", "equalize_activations", "find_chains"]

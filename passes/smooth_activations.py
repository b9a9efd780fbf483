"""Activation smoothing before INT8 quantization of MatMuls (SmoothQuant, Xiao et al., ICML 2023).

A MatMul ``y = x W`` with a constant weight ``W [K, N]`` gives the same ``y`` from ``x' = x / s``
and ``W' = diag(s) W`` for any ``s > 0`` (one factor per input channel ``k``):

    y = sum_k x_k W[k, :] = sum_k (x_k / s_k) (s_k W[k, :]).

Transformer activations carry a few channels 10 to 30 times larger than the rest (all-MiniLM-L6-v2:
a LayerNorm output channel reaches 28.8 where the median channel's maximum is 1.5), so a
per-tensor activation scale spends most of its 255 levels on them; the per-output-channel weight
scales (along ``N``) cannot absorb a per-``K`` spread. With

    s_k = max|x_k|^alpha / max_j max|W_j[k, :]|^(1 - alpha)      (alpha = 0.5)

the largest channel magnitude of ``x'`` and of ``W'`` row ``k`` become equal
(``max|x_k|^(1-alpha) max|W[k,:]|^alpha``) and the outliers are shared between both.
``max|x_k|`` is a running maximum over the calibration data (memory flat in the number of
samples); the ``W_j`` are every smoothed MatMul reading the same ``x`` (Q/K/V projections share
their input, so they share ``s``). Channels that are always 0 or whose weight rows are 0 keep
``s_k = 1``.

The rewrite inserts ``x' = Mul(x, 1/s)`` read only by the smoothed MatMuls (other readers, e.g. a
residual Add, keep ``x``) and replaces their weights by ``diag(s) W`` (a new initializer: a weight
shared elsewhere is left as it is). The function is unchanged up to float32 rounding. The Mul
nodes are float (the quantizer must not quantize them: they read the outliers); their names are
returned so the caller can exclude them.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, to_graph, to_model, unique_name
from .calibration import progress_bar, with_outputs

logger = logging.getLogger(__name__)


def smoothing_targets(graph: gs.Graph, select=lambda node: True) -> dict[str, list[gs.Node]]:
    """Activation tensor name -> the MatMuls with a constant float32 2-D weight ``[K, N]`` reading it."""
    targets: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2 or not select(node):
            continue
        x, w_tensor = node.inputs
        w = constant_value(w_tensor)
        if w is None or w.ndim != 2 or w.dtype != np.float32 or constant_value(x) is not None or not x.name:
            continue
        targets.setdefault(x.name, []).append(node)
    return targets


def channel_absmax(model: onnx.ModelProto, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                   *, axis: int = -1, progress: bool | None = None, desc: str = "smoothing statistics") -> dict[str, np.ndarray]:
    """Running ``max |x|`` over every axis but ``axis`` (the channel axis), per tensor in ``names``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(with_outputs(model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    absmax: dict[str, np.ndarray] = {}
    for feed in progress_bar(feeds, desc=desc, enabled=progress):
        for name, value in zip(names, session.run(names, {k: feed[k] for k in inputs})):
            channels = np.moveaxis(value, axis, -1)
            m = np.abs(channels.reshape(-1, channels.shape[-1])).max(axis=0)
            absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
    return absmax


def smooth_activations(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]], *, alpha: float = 0.5,
                       select=lambda node: True, progress: bool | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """(smoothed model, names of the inserted Mul nodes); see the module docstring."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    graph = to_graph(model)
    targets = smoothing_targets(graph, select)
    if not targets:
        return model, []
    absmax = channel_absmax(model, list(targets), feeds, progress=progress)
    tensors = graph.tensors()
    muls: list[str] = []
    for name, readers in targets.items():
        x_max = absmax.get(name)
        weights = [constant_value(r.inputs[1]) for r in readers]
        if x_max is None or any(w.shape[0] != x_max.shape[0] for w in weights):
            continue
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        ok = (x_max > 0) & (w_max > 0)
        s = np.ones_like(x_max, dtype=np.float64)
        s[ok] = np.power(x_max[ok], alpha) / np.power(w_max[ok], 1.0 - alpha)
        x = tensors[name]
        inv = gs.Constant(unique_name(graph, f"{name}_smooth_inv"), (1.0 / s).astype(np.float32))
        out = gs.Variable(unique_name(graph, f"{name}_smoothed"), dtype=np.float32, shape=x.shape)
        mul = gs.Node("Mul", name=unique_name(graph, f"{name}_Smooth"), inputs=[x, inv], outputs=[out])
        graph.nodes.append(mul)
        muls.append(mul.name)
        for reader, w in zip(readers, weights):
            scaled = (w.astype(np.float64) * s[:, None]).astype(np.float32)
            reader.inputs[1] = gs.Constant(unique_name(graph, f"{reader.inputs[1].name}_smoothed"), scaled)
            reader.inputs[0] = out
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    logger.info("smoothed the inputs of %d MatMuls (%d tensors)", sum(len(v) for v in targets.values()), len(muls))
    return to_model(graph, like=model), muls


__all__ = ["channel_absmax", "smooth_activations", "smoothing_targets"]

"""Empirical bias correction of a QDQ model from calibration data (Nagel et al., ICCV 2019, sec. 4.2).

Quantization error is not zero-mean: a weight rounding error ``eps = W_q - W`` shifts the output
of a layer by ``E[eps (*) x]`` per channel, and rounding/clipping of its input adds a shift of its
own. For every quantized ``Conv``/``ConvTranspose``/``Gemm`` ``L`` (output channel axis 1) the
correction is ``b_L[c] <- b_L[c] - (mu_q[c] - mu_fp[c])`` with ``mu`` per-channel means over
samples, batch and spatial positions. Two ways to measure ``mu_q``:

- ``mode="local"`` (default): one run of the *float* model in which every quantized layer has a
  twin ``L_q(x) = DQ(Q(x)) (*) DQ(W_q)`` (the same Q/DQ parameters and int8 weight as in the QDQ
  model) reading the float model's own input ``x`` of ``L``::

      mu_q[c] = mean(L_q(x)[c]) + b_L[c],   mu_fp[c] = mean(L(x)[c])

  so the shift removed is the layer's *own* error (weights and input quantization); layers do not
  interact, so all are corrected from one pass. When every layer is locally unbiased the
  composition is too, up to the second-order effect of noise through non-linearities.
- ``mode="sequential"``: the QDQ model itself, layer after layer in graph order, each step with
  the corrections of the layers before it applied (``mu_q`` then includes the upstream error).
  One run over the data per layer (``group_size`` layers per run when > 1, which over-corrects
  where they interact: on MobileNetV2 any grouping was catastrophic).

Measured on MobileNetV2 (ImageNet weights; 32 calibration views of 8 real photos, agreement with
FP32 on 72 views of 12 other photos, ORT integer kernels): no correction 70.8 %, sequential
81.9 % (350 s), local 84.7 % (12 s); correcting every layer at once from the QDQ model's total
error instead: 0 %.

Means are streamed (a running per-channel sum and count per layer): memory does not grow with the
number of samples. ONNX Runtime runs the probes with basic optimisations (float emulation of
Q/DQ, which the fused integer kernels match exactly when they do not saturate). In sequential
mode each corrected layer's bias is a float graph input of the probe, so one session serves every
step. The corrected float bias is re-quantized to int32 at the layer's existing bias scale
``s_x * s_w[c]`` (``q = round(b / s)``); a layer without bias gets one (int32 at ``s_x * s_w``,
through a new per-axis DequantizeLinear), which ORT's QDQ fusions accept.
:func:`apply_biases` writes corrected biases into the float model instead, so that a later QDQ
insertion (mixed precision, with some layers kept float) quantizes the corrected values.

Layers are found by node name in both models: a node of the QDQ model whose weight is read
through a DequantizeLinear of an int8 constant and whose input comes from a DequantizeLinear (its
scale is ``s_x``), with a same-named node in the float model. Others are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibration import _batch_axis_free, _batches, progress_bar, with_outputs

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class _Target:
    index: int  # node index in the QDQ graph
    name: str
    q_output: str
    fp_output: str
    bias: np.ndarray  # current float bias (float64)
    bias_scale: np.ndarray  # float32, per output channel
    bias_init: str | None  # name of the int32 initializer of the bias (None: no bias yet)


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _channel_sums(y: np.ndarray) -> tuple[np.ndarray, int]:
    y = np.asarray(y, dtype=np.float64)
    axes = tuple(i for i in range(y.ndim) if i != 1)
    return y.sum(axis=axes), y.size // y.shape[1]


def _find_targets(qdq: onnx.ModelProto, float_model: onnx.ModelProto, names: set[str] | None) -> list[_Target]:
    graph = qdq.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    fp_outputs = {n.name: n.output[0] for n in float_model.graph.node if n.name}

    def dq_of(tensor: str):
        node = producers.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    targets = []
    for index, node in enumerate(graph.node):
        if node.op_type not in CORRECTED_OPS or not node.name or node.name not in fp_outputs:
            continue
        if names is not None and node.name not in names:
            continue
        if node.op_type == "Gemm" and any(a.name in ("alpha", "beta") and a.f != 1.0 for a in node.attribute):
            continue
        x_dq, w_dq = dq_of(node.input[0]), dq_of(node.input[1]) if len(node.input) > 1 else None
        if x_dq is None or w_dq is None:
            continue
        w_q, w_s = value(w_dq.input[0]), value(w_dq.input[1])
        x_s = value(x_dq.input[1])
        if w_q is None or w_q.dtype != np.int8 or w_s is None or x_s is None or x_s.size != 1:
            continue
        if node.op_type == "Conv":
            channels = w_q.shape[0]
        elif node.op_type == "ConvTranspose":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            channels = w_q.shape[1] * group
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            channels = w_q.shape[0] if trans_b else w_q.shape[1]
        bias_init = None
        if len(node.input) > 2 and node.input[2]:
            b_dq = dq_of(node.input[2])
            if b_dq is None:
                continue
            b_q, b_s = value(b_dq.input[0]), value(b_dq.input[1])
            if b_q is None or b_q.dtype != np.int32 or b_s is None or b_q.shape != (channels,):
                continue
            bias_scale = np.broadcast_to(b_s.astype(np.float32), (channels,)).copy()
            bias = b_q.astype(np.float64) * bias_scale.astype(np.float64)
            bias_init = b_dq.input[0]
        else:
            s_w = np.broadcast_to(w_s.astype(np.float32), (w_s.size,)).astype(np.float32)
            if node.op_type == "ConvTranspose" and s_w.size != channels:
                s_w = np.tile(s_w, channels // s_w.size)
            bias_scale = np.broadcast_to(np.float32(x_s.reshape(())) * s_w, (channels,)).astype(np.float32)
            bias = np.zeros(channels, np.float64)
        targets.append(_Target(index, node.name, node.output[0], fp_outputs[node.name], bias, bias_scale, bias_init))
    return targets


def _float_means(float_model: onnx.ModelProto, feeds, names: Sequence[str], batch_size: int, progress) -> dict[str, np.ndarray]:
    session = _session(with_outputs(float_model, names))
    inputs = [i.name for i in session.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed, _ in _batches(progress_bar(feeds, desc="bias correction: float", enabled=progress), batch_size,
                            _batch_axis_free(float_model)):
        for name, y in zip(names, session.run(list(names), {k: feed[k] for k in inputs})):
            s, n = _channel_sums(y)
            sums[name] = sums.get(name, 0.0) + s
            counts[name] = counts.get(name, 0) + n
    return {name: sums[name] / counts[name] for name in names}


def empirical_bias_correction(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    nodes: Iterable[str] | None = None,
    group_size: int = 1,
    rounds: int = 1,
    mode: str = "local",
    batch_size: int = 16,
    progress: bool | None = None,
) -> tuple[onnx.ModelProto, dict[str, float], dict[str, np.ndarray]]:
    """Correct the int32 biases of ``qdq_model`` (see the module docstring).

    ``feeds`` must be re-iterable (a list or a ``CalibrationSet``). Returns the corrected model (a
    copy); per corrected node, the largest ``|mu_q - mu_fp|`` over its channels before its
    correction; and per corrected node its corrected float bias (float32), which
    :func:`apply_biases` writes into the float model so that a later QDQ insertion (with some
    layers kept float) quantizes the corrected values.
    """
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    if mode not in ("sequential", "local"):
        raise ValueError(f"mode must be 'sequential' or 'local', got {mode!r}")
    targets = _find_targets(qdq_model, float_model, None if nodes is None else set(nodes))
    if not targets:
        logger.info("bias correction: no quantized Conv/Gemm found")
        return qdq_model, {}, {}
    if mode == "local":
        shifts = _local_correction(float_model, qdq_model, targets, feeds, batch_size, progress)
        return _write(qdq_model, targets), shifts, {t.name: t.bias.astype(np.float32) for t in targets}
    fp_means = _float_means(float_model, feeds, [t.fp_output for t in targets], batch_size, progress)

    # probe: each target's bias is a float graph input, outputs are the targets' outputs
    probe = with_outputs(qdq_model, [t.q_output for t in targets])
    bias_inputs = []
    for k, t in enumerate(targets):
        node = probe.graph.node[t.index]
        name = f"__bias_correction_{k}"
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        probe.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(t.bias)]))
        bias_inputs.append(name)
    session = _session(probe)
    data_inputs = [i.name for i in session.get_inputs() if i.name not in set(bias_inputs)]
    can_batch = _batch_axis_free(qdq_model)

    shifts: dict[str, float] = {}
    steps = [targets[i : i + group_size] for i in range(0, len(targets), group_size)] * rounds
    for group in progress_bar(steps, desc="bias correction", enabled=progress):
        outputs = [t.q_output for t in group]
        bias_feed = {name: t.bias.astype(np.float32) for name, t in zip(bias_inputs, targets)}
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for feed, _ in _batches(iter(feeds), batch_size, can_batch):
            run_feed = {k: feed[k] for k in data_inputs}
            run_feed.update(bias_feed)
            for name, y in zip(outputs, session.run(outputs, run_feed)):
                s, n = _channel_sums(y)
                sums[name] = sums.get(name, 0.0) + s
                counts[name] = counts.get(name, 0) + n
        for t in group:
            shift = sums[t.q_output] / counts[t.q_output] - fp_means[t.fp_output]
            shifts.setdefault(t.name, float(np.max(np.abs(shift))))
            t.bias = t.bias - shift

    return _write(qdq_model, targets), shifts, {t.name: t.bias.astype(np.float32) for t in targets}


def apply_biases(float_model: onnx.ModelProto, biases: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``float_model`` whose Conv/ConvTranspose/Gemm named in ``biases`` use those biases
    (a node without bias gets one; a Gemm's ``C`` is its bias only with ``beta == 1``)."""
    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    graph = out.graph
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in biases or node.op_type not in CORRECTED_OPS:
            continue
        if node.op_type == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            raise ValueError(f"Gemm '{node.name}' has beta != 1; its C is not a bias")
        name, i = f"{node.name}_bias_corrected", 0
        while name in taken:
            i += 1
            name = f"{node.name}_bias_corrected_{i}"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(np.asarray(biases[node.name], np.float32), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return out


def _local_correction(float_model, qdq_model, targets, feeds, batch_size, progress) -> dict[str, float]:
    """One run: each layer's quantized twin reads the *float* model's input (through the same Q/DQ)
    so that its error is its own (weights and input quantization), not its upstream's."""
    qgraph = qdq_model.graph
    producers = {o: n for n in qgraph.node for o in n.output}
    q_inits = {t.name: t for t in qgraph.initializer}
    fp_nodes = {n.name: n for n in float_model.graph.node if n.name}
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    copied: set[str] = set()
    made: dict[str, list[str]] = {}  # output -> inputs: layers sharing a quantized input share its twin

    def copy_node(node: onnx.NodeProto, suffix: str, inputs: list[str]) -> str:
        for name in inputs:
            if name and name in q_inits and name not in copied:
                probe.graph.initializer.append(q_inits[name])
                copied.add(name)
        out = f"{node.output[0]}__{suffix}"
        while out in made and made[out] != inputs:
            suffix += "_"
            out = f"{node.output[0]}__{suffix}"
        if out in made:
            return out
        made[out] = list(inputs)
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        del clone.input[:]
        clone.input.extend(inputs)
        del clone.output[:]
        clone.output.append(out)
        clone.name = f"{node.name}__{suffix}"
        probe.graph.node.append(clone)
        return out

    outputs = []
    for t in targets:
        qnode = qgraph.node[t.index]
        x_dq = producers[qnode.input[0]]
        x_q = producers[x_dq.input[0]]
        q_out = copy_node(x_q, "bc_q", [fp_nodes[t.name].input[0], *x_q.input[1:]])
        x_twin = copy_node(x_dq, "bc_dq", [q_out, *x_dq.input[1:]])
        w_dq = producers[qnode.input[1]]
        w_twin = copy_node(w_dq, "bc_w", list(w_dq.input))
        outputs.append(copy_node(qnode, "bc_twin", [x_twin, w_twin]))  # no bias: added below
    names = [t.fp_output for t in targets] + outputs
    session = _session(with_outputs(probe, names))
    inputs = [i.name for i in session.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed, _ in _batches(progress_bar(feeds, desc="bias correction", enabled=progress), batch_size,
                            _batch_axis_free(float_model)):
        for name, y in zip(names, session.run(names, {k: feed[k] for k in inputs})):
            s, n = _channel_sums(y)
            sums[name] = sums.get(name, 0.0) + s
            counts[name] = counts.get(name, 0) + n
    shifts = {}
    for t, twin in zip(targets, outputs):
        # twin mean + the layer's bias - float mean
        shift = sums[twin] / counts[twin] + t.bias - sums[t.fp_output] / counts[t.fp_output]
        shifts[t.name] = float(np.max(np.abs(shift)))
        t.bias = t.bias - shift
    return shifts


def _write(qdq_model: onnx.ModelProto, targets: Sequence[_Target]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(qdq_model)
    graph = out.graph
    index_of = {init.name: i for i, init in enumerate(graph.initializer)}
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    info = np.iinfo(np.int32)
    new_nodes: dict[int, onnx.NodeProto] = {}
    for t in targets:
        q = np.clip(np.round(t.bias / t.bias_scale.astype(np.float64)), info.min, info.max).astype(np.int32)
        if t.bias_init is not None:
            graph.initializer[index_of[t.bias_init]].CopyFrom(numpy_helper.from_array(q, t.bias_init))
            continue
        base = f"{t.name}_bias_corrected"
        names = []
        for suffix in ("quantized", "scale", "zero_point", "dequantized", "DequantizeLinear"):
            name, i = f"{base}_{suffix}", 0
            while name in taken:
                i += 1
                name = f"{base}_{suffix}_{i}"
            taken.add(name)
            names.append(name)
        graph.initializer.extend([
            numpy_helper.from_array(q, names[0]),
            numpy_helper.from_array(t.bias_scale.astype(np.float32), names[1]),
            numpy_helper.from_array(np.zeros_like(q), names[2]),
        ])
        new_nodes[t.index] = helper.make_node("DequantizeLinear", names[:3], [names[3]], name=names[4], axis=0)
        node = graph.node[t.index]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = names[3]
    if new_nodes:
        nodes = list(graph.node)
        del graph.node[:]
        for i, node in enumerate(nodes):
            if i in new_nodes:
                graph.node.append(new_nodes[i])
            graph.node.append(node)
    return out


__all__ = ["apply_biases", "empirical_bias_correction"]

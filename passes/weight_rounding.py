"""Data-aware weight rounding for INT8 quantization: GPTQ (Frantar et al., ICLR 2023) on Conv/Gemm.

Rounding every weight to its nearest level minimises the *weight* error, not the layer's *output*
error. For a layer ``y = W x`` (a Conv is a matrix product on its im2col patches ``x`` of length
``d = C_in/g * prod(k)``; a Gemm on its input rows) and a quantized ``W_q = s * q`` the expected
squared output error of output channel ``r`` is

    E ||(W_q - W)_r x||^2 = e_r^T H e_r,     H = E[x x^T]  (d x d, from calibration data),

with ``e_r`` the row's rounding error. GPTQ/OBQ quantizes the columns one at a time and spreads the
error of column ``i`` over the not-yet-quantized columns ``j > i`` so that ``e^T H e`` is
minimised given the choices made so far (the optimal least-squares update):

    Hinv = (H + lambda I)^-1 = U^T U      (U upper triangular, Cholesky of the inverse)
    q_i   = clamp(round(w_i / s), -qmax, qmax)
    err   = (w_i - s q_i) / U[i, i]
    w_j  <- w_j - err * U[i, j]           for j > i

``lambda = damp * mean(diag H)`` (damp 0.01) keeps the inverse well conditioned; inputs that are
always zero (``H[i, i] = 0``) get ``H[i, i] = 1`` and do not matter. The scale ``s`` of each output
channel is fixed first, ``max |W_r| / qmax`` (symmetric, as the nearest rounding uses), so the
integer range and therefore the saturation bound of :mod:`~onnx_compress.passes.insert_qdq` are
unchanged: only *which* integer each weight gets changes. Depthwise convolutions
(``group == C_out``, one input channel per group) have one ``H_c`` (``prod(k) x prod(k)``) per
channel, handled as a batch. Grouped convolutions with several channels per group keep nearest
rounding.

``H`` is accumulated as a running sum over the calibration data (``sum x x^T`` and a count per
layer; the float model's own inputs of each layer), so memory is flat in the number of samples:
``d^2`` doubles per layer (``1280^2`` for MobileNetV2's classifier, 13 MB).

Measured on MobileNetV2 (ImageNet weights; weights only quantized, activations float; logits SQNR
against FP32 on the 72 held-out views of ``benchmarks/bench_quantize.py``): 8-bit depthwise and
7-bit other layers 14.5 dB with nearest rounding, 25.5 dB with GPTQ; all 8-bit 17.1 -> 30.1 dB.

**Sequential error-compensating GPTQ** (:func:`sequential_compensation`, opt-in, not in the
default pipeline). With activations quantized a layer reads ``x_q`` (the quantized prefix's output,
dequantized), not ``x``. Layer by layer in graph order, with every earlier layer already replaced
in the QDQ model, it solves ``min E(w̃' x̃_q - w̃ x̃)^2 + lambda ||w' - w||^2`` per output row with
the augmented ``w̃ = [w, b]``, ``x̃ = [x; 1]`` (the bias unpenalised, so it absorbs the mean shift):

    H_q = E[x̃_q x̃_q^T],   C = E[x̃ x̃_q^T],   w̃' = w̃ + w̃ (C - H_q)(H_q + Lambda)^-1,

``Lambda = ridge * mean(diag H_q)`` on the weight entries, then GPTQ-rounds ``w̃'`` with ``H_q`` and
the bias column last, kept float (:func:`gptq_rows_with_tail`): the total error is the
least-squares residual plus ``(w_q - w') H_q (w_q - w')^T`` (normal equations), which GPTQ
minimises. It must be sequential: computed for all layers from one QDQ model, each layer corrects
an upstream error that its upstream layer also corrects, and the double correction diverged
(1.4 % agreement). Measured on MobileNetV2 with the default activation ranges (p99.99; split of
``benchmarks/bench_quantize.py``; ``ridge=0.01``): every layer compensated: 55.6 % agreement,
6.3 dB (on the *calibration* views the logits reach 68 dB: the classifier (32 samples for 1281
unknowns per row) and the 7x7 layers overfit 32 views of 8 photos; per-layer SQNR on the held-out
views rises by up to 15 dB in the 14x14 blocks and falls in the last four layers); compensation
dropped after the fact on layers with fewer than 20 input columns per unknown (38 of 53 layers
keep it, the others GPTQ): 87.5 %, 17.0 dB, against 87.5 %, 16.2 dB for the default (GPTQ + local
bias correction); the same restriction applied during the pass (``min_ratio=20``, so later layers
see the uncompensated ones) with ``ridge=0.1``: 83.3 %, 13.9 dB. It costs one pass over the
calibration data per layer (MobileNetV2: 361 to 373 s CPU against 28 s for GPTQ), so it stays out
of the default.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .calibration import _batch_axis_free, _batches, progress_bar, with_outputs

logger = logging.getLogger(__name__)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _layers(model: onnx.ModelProto, names: set[str] | None) -> list[tuple[onnx.NodeProto, np.ndarray, dict]]:
    """(node, float weight, attributes) of every Conv (2-D, group 1 or depthwise) / Gemm with a
    constant weight, by node name."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or not node.name or len(node.input) < 2:
            continue
        if names is not None and node.name not in names:
            continue
        if node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32:
            continue
        a = _attrs(node)
        if node.op_type == "Gemm":
            if w.ndim != 2 or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
                continue
        else:
            if w.ndim != 4:
                continue
            g = int(a.get("group", 1))
            if g != 1 and not (g == w.shape[0] and w.shape[1] == 1):
                continue
        out.append((node, w, a))
    return out


def _unfold(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations) -> np.ndarray:
    """im2col of ``x [N, C, H, W]``: ``[N, C, kh*kw, Ho, Wo]`` (zero padding, as Conv pads)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    return np.stack(cols, axis=2)


def collect_hessians(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    nodes: Iterable[str] | None = None,
    batch_size: int = 4,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """``H = E[x x^T]`` of every supported layer's input patches (``[d, d]``, or ``[C, k, k]`` for a
    depthwise Conv), streamed over ``feeds`` with the float ``model``."""
    import onnxruntime as ort

    layers = _layers(model, None if nodes is None else set(nodes))
    if not layers:
        return {}
    names = list(dict.fromkeys(n.input[0] for n, _, _ in layers))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(with_outputs(model, names).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed, _ in _batches(progress_bar(feeds, desc="GPTQ statistics", enabled=progress), batch_size,
                            _batch_axis_free(model)):
        values = dict(zip(names, session.run(names, {k: feed[k] for k in inputs})))
        for node, w, a in layers:
            x = np.asarray(values[node.input[0]], np.float32)  # products in float32, sums in float64
            if node.op_type == "Gemm":
                rows = x.reshape(-1, x.shape[-1])
                h, n = (rows.T @ rows).astype(np.float64), rows.shape[0]
            else:
                patches = _unfold(x, tuple(w.shape[2:]), a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]),
                                  a.get("dilations", [1, 1]))
                batch, channels, k = patches.shape[:3]
                if int(a.get("group", 1)) == 1:
                    # columns ordered (c_in, kernel position), as W.reshape(C_out, -1)
                    cols = patches.reshape(batch, channels * k, -1).transpose(1, 0, 2).reshape(channels * k, -1)
                    h, n = (cols @ cols.T).astype(np.float64), cols.shape[1]
                else:
                    cols = patches.transpose(1, 2, 0, 3, 4).reshape(channels, k, -1)
                    h, n = np.matmul(cols, cols.transpose(0, 2, 1)).astype(np.float64), cols.shape[2]
            sums[node.name] = sums.get(node.name, 0.0) + h
            counts[node.name] = counts.get(node.name, 0) + n
    return {name: sums[name] / counts[name] for name in sums}


def _columns(x: np.ndarray, node: onnx.NodeProto, w: np.ndarray, a: dict) -> np.ndarray:
    """The layer's input as columns: ``[d, N]`` (Gemm rows, or group-1 Conv patches ordered
    ``(c_in, kernel position)`` as ``W.reshape(C_out, -1)``) or ``[C, k, N]`` (depthwise)."""
    x = np.asarray(x, np.float32)
    if node.op_type == "Gemm":
        return x.reshape(-1, x.shape[-1]).T
    patches = _unfold(x, tuple(w.shape[2:]), a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]),
                      a.get("dilations", [1, 1]))
    batch, channels, k = patches.shape[:3]
    if int(a.get("group", 1)) == 1:
        return patches.reshape(batch, channels * k, -1).transpose(1, 0, 2).reshape(channels * k, -1)
    return patches.transpose(1, 2, 0, 3, 4).reshape(channels, k, -1)


def _with_ones(cols: np.ndarray) -> np.ndarray:
    ones = np.ones(cols.shape[:-2] + (1, cols.shape[-1]), cols.dtype)
    return np.concatenate([cols, ones], axis=-2)


def _patch_layer(qdq: onnx.ModelProto, name: str, q: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> bool:
    """Write ``(q, scale)`` and the float ``bias`` (int32 at ``s_x * s_w``) of node ``name`` into the
    initializers of ``qdq`` in place; False when its Q/DQ layout is not the expected one."""
    graph = qdq.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    node = next((n for n in graph.node if n.name == name), None)
    if node is None or len(node.input) < 3 or not node.input[2]:
        return False
    x_dq, w_dq, b_dq = (producers.get(node.input[i]) for i in range(3))
    if any(n is None or n.op_type != "DequantizeLinear" for n in (x_dq, w_dq, b_dq)):
        return False
    if not all(t in inits for t in (x_dq.input[1], w_dq.input[0], w_dq.input[1], b_dq.input[0], b_dq.input[1])):
        return False
    old_q = numpy_helper.to_array(inits[w_dq.input[0]])
    if old_q.shape != q.shape:
        return False
    s_x = np.float32(numpy_helper.to_array(inits[x_dq.input[1]]).reshape(()))
    s_b = (s_x * np.asarray(scale, np.float32)).astype(np.float32)
    info = np.iinfo(np.int32)
    b_q = np.clip(np.round(np.asarray(bias, np.float64) / s_b.astype(np.float64)), info.min, info.max).astype(np.int32)
    for key, value in ((w_dq.input[0], np.asarray(q, np.int8)), (w_dq.input[1], np.asarray(scale, np.float32)),
                       (b_dq.input[0], b_q), (b_dq.input[1], s_b)):
        inits[key].CopyFrom(numpy_helper.from_array(value, key))
    return True


def _solve_layer(node, w, a, bias, h, c, qmax, *, damp: float, ridge: float):
    if node.op_type == "Gemm":
        trans_b = int(a.get("transB", 0))
        rows = w if trans_b else w.T
    else:
        rows = w.reshape(w.shape[0], -1)
    full = np.concatenate([rows.astype(np.float64), bias.astype(np.float64)[:, None]], axis=1)  # [R, d + 1]
    d = full.shape[1]
    penalty = np.ones(d)
    penalty[-1] = 0.0
    diag = h[..., np.arange(d - 1), np.arange(d - 1)]
    lam = ridge * np.maximum(np.mean(diag, axis=-1), 1e-12)
    if h.ndim == 3:  # depthwise: one system per channel (= row)
        reg = h + lam[:, None, None] * np.eye(d) * penalty
        delta = np.einsum("rd,rde->re", full, c - h)
        target = full + np.linalg.solve(reg, delta[..., None])[..., 0]
    else:
        reg = h + lam * np.diag(penalty)
        target = full + np.linalg.solve(reg, (full @ (c - h)).T).T
    q, scale, tail = gptq_rows_with_tail(target, h, qmax, damp=damp, keep_float=1)
    if node.op_type == "Gemm":
        q = q if trans_b else np.ascontiguousarray(q.T)
    else:
        q = q.reshape(w.shape)
    return q, scale, tail[:, 0].astype(np.float32)


def sequential_compensation(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    feeds,
    qmax_of,
    *,
    nodes: Iterable[str] | None = None,
    damp: float = 0.01,
    ridge: float = 0.01,
    min_ratio: float = 20.0,
    batch_size: int = 4,
    progress: bool | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Sequential error-compensating GPTQ (see the module docstring), layer by layer in graph order.

    For each layer: stream ``feeds`` (re-iterable) through the float model and through the QDQ
    model whose earlier layers already carry their compensated weights, accumulate
    ``H_q = E[x̃_q x̃_q^T]`` and ``C = E[x̃ x̃_q^T]`` (``x̃ = [x; 1]``), solve
    ``w̃' = w̃ + w̃ (C - H_q)(H_q + Lambda)^-1`` and GPTQ-round ``w̃'`` with ``H_q`` (bias column
    last, kept float), then write the layer into the QDQ model. Returns ``(weights, biases)`` by
    node name, for :class:`~onnx_compress.passes.insert_qdq.InsertQDQPass` and
    :func:`~onnx_compress.passes.bias_correction.apply_biases`. Layers with fewer than
    ``min_ratio * (d + 1)`` input columns (samples x output positions) are left as they are in
    ``qdq_model`` and not returned: their least-squares fit overfits the calibration data.
    """
    import onnxruntime as ort

    layers = _layers(float_model, None if nodes is None else set(nodes))
    work = onnx.ModelProto()
    work.CopyFrom(qdq_model)
    q_inputs = {n.name: n.input[0] for n in work.graph.node if n.name and n.op_type in ("Conv", "Gemm")}
    layers = [layer for layer in layers if layer[0].name in q_inputs]
    fp_inits = {t.name: t for t in float_model.graph.initializer}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3

    def session(model, names):
        return ort.InferenceSession(with_outputs(model, names).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    fp_names = list(dict.fromkeys(n.input[0] for n, _, _ in layers))
    fp_session = session(float_model, fp_names)
    fp_feed_names = [i.name for i in fp_session.get_inputs()]
    can_batch = _batch_axis_free(float_model)
    weights, biases = {}, {}
    for node, w, a in progress_bar(layers, desc="GPTQ (sequential, compensating)", enabled=progress):
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in fp_inits:
                continue
            bias = numpy_helper.to_array(fp_inits[node.input[2]]).astype(np.float64).reshape(-1)
        else:
            bias = np.zeros(w.shape[0] if node.op_type == "Conv" or int(a.get("transB", 0)) else w.shape[1])
        q_name = q_inputs[node.name]
        q_session = session(work, [q_name])
        q_feed_names = [i.name for i in q_session.get_inputs()]
        h = c = None
        count = 0
        for feed, _ in _batches(iter(feeds), batch_size, can_batch):
            x = fp_session.run([node.input[0]], {k: feed[k] for k in fp_feed_names})[0]
            x_q = q_session.run([q_name], {k: feed[k] for k in q_feed_names})[0]
            cols = _with_ones(_columns(x, node, w, a))
            cols_q = _with_ones(_columns(x_q, node, w, a))
            cols_q_t = np.swapaxes(cols_q, -1, -2)
            hb = np.matmul(cols_q, cols_q_t).astype(np.float64)
            cb = np.matmul(cols, cols_q_t).astype(np.float64)
            h, c = (hb, cb) if h is None else (h + hb, c + cb)
            count += cols.shape[-1]
        if h is None or count < min_ratio * h.shape[-1]:
            continue
        q, scale, b = _solve_layer(node, w, a, bias, h / count, c / count, int(qmax_of(node, w)),
                                   damp=damp, ridge=ridge)
        if bias.shape != b.shape or not _patch_layer(work, node.name, q, scale, b):
            logger.info("compensating GPTQ: '%s' has an unexpected Q/DQ layout, left as it was", node.name)
            continue
        weights[node.name], biases[node.name] = (q, scale), b
    return weights, biases


def gptq_rows(
    w: np.ndarray, h: np.ndarray, qmax: int, *, damp: float = 0.01, keep_float: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of the rows of ``w [R, d]`` with ``h [d, d]`` (shared) or ``[R, d, d]`` (one per row).

    Returns ``(q int8 [R, d - keep_float], scale float32 [R])`` with ``scale = max|w_r| / qmax``
    over the rounded columns. The last ``keep_float`` columns (a bias column) are not rounded: they
    only receive the error updates, and :func:`gptq_rows_with_tail` returns them.
    """
    q, scale, _ = gptq_rows_with_tail(w, h, qmax, damp=damp, keep_float=keep_float)
    return q, scale


def gptq_rows_with_tail(
    w: np.ndarray, h: np.ndarray, qmax: int, *, damp: float = 0.01, keep_float: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`gptq_rows` that also returns the updated float tail columns ``[R, keep_float]``."""
    w = np.asarray(w, np.float64).copy()
    rows, d = w.shape
    n = d - keep_float
    absmax = np.abs(w[:, :n]).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    s = scale.astype(np.float64)
    h = np.array(h, np.float64, copy=True)
    idx = np.arange(d)
    diag = h[..., idx, idx]
    dead = diag <= 0
    h[..., idx, idx] = np.where(dead, 1.0, diag + damp * np.mean(diag, axis=-1, keepdims=True) + 1e-12)
    try:
        hinv = np.linalg.inv(h)
        upper = np.swapaxes(np.linalg.cholesky(hinv), -1, -2)
    except np.linalg.LinAlgError:
        logger.warning("GPTQ: Hessian not positive definite, nearest rounding kept for this layer")
        return np.clip(np.round(w[:, :n] / s[:, None]), -qmax, qmax).astype(np.int8), scale, w[:, n:]
    q = np.zeros((rows, n), np.int8)
    for i in range(n):
        col = w[:, i]
        qi = np.clip(np.round(col / s), -qmax, qmax)
        q[:, i] = qi
        if i + 1 < d:
            if upper.ndim == 3:
                err = (col - qi * s) / upper[:, i, i]
                w[:, i + 1:] -= err[:, None] * upper[:, i, i + 1:]
            else:
                err = (col - qi * s) / upper[i, i]
                w[:, i + 1:] -= np.outer(err, upper[i, i + 1:])
    return q, scale, w[:, n:]


def gptq_weights(
    model: onnx.ModelProto,
    hessians: Mapping[str, np.ndarray],
    qmax_of,
    *,
    damp: float = 0.01,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per node name, ``(q, scale)`` in the layout :class:`InsertQDQPass` writes (per output
    channel: axis 0 for Conv and Gemm with ``transB=1``, axis 1 for Gemm with ``transB=0``).
    ``qmax_of(node, weight)`` gives the integer bound of each layer."""
    result = {}
    for node, w, a in _layers(model, set(hessians)):
        qmax = int(qmax_of(node, w))
        if node.op_type == "Gemm":
            trans_b = int(a.get("transB", 0))
            rows = w if trans_b else w.T  # [N, K]
            q, scale = gptq_rows(rows, hessians[node.name], qmax, damp=damp)
            result[node.name] = (q if trans_b else np.ascontiguousarray(q.T), scale)
        else:
            q, scale = gptq_rows(w.reshape(w.shape[0], -1), hessians[node.name], qmax, damp=damp)
            result[node.name] = (q.reshape(w.shape), scale)
    return result


__all__ = ["collect_hessians", "gptq_rows", "gptq_rows_with_tail", "gptq_weights", "sequential_compensation"]

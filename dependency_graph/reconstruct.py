"""Reconstruction without training: refit a consumer layer's remaining weights by least squares.

When input channels of a layer ``y = W x + b`` are removed, the layer loses their contribution.
Given calibration activations ``x`` of the *original* model, we refit the kept input weights and
the bias so that the pruned layer's pre-activation output matches the original one, shrinking
toward the plain pruned weights ``W_K`` (the original weights restricted to the kept inputs), not
toward zero:

    min_{A, c}  E || (W x + b) - (A x_K + c) ||^2  +  lam || A - W_K ||^2

where ``x_K`` are the kept input features. For a Conv the features are im2col columns
``x_col[(ci, ky, kx)]`` of each output position (one row per position and sample; ``W`` reshaped
to ``[C_out, C_in * prod(k)]``, same ordering), for Gemm/MatMul the rows of the flattened input.
With ``mu_x = E[x_K]``, ``mu_y = E[W x]`` and the centred moments ``S = E[x_K x_K^T] - mu_x
mu_x^T``, ``R = E[x_K (W x)^T] - mu_x mu_y^T``, the solution is

    A^T = (S + lam I)^{-1} (R + lam W_K^T),        c = mu_y + b - A mu_x

(the intercept is free, not penalised: it absorbs whatever constant the removed channels carried,
see below). ``lam = ridge * trace(S) / |K|`` scales the penalty to the features' mean variance.
Why the prior: the calibration rows may not determine the fit. A classifier Gemm gets one row per
sample (48 rows for ~1000 kept inputs in MobileNetV2), a 7x7 map 49 per sample; ``S`` is then
rank-deficient, and a ridge toward zero sets every direction the data does not see to zero (the
minimum-norm interpolant), which generalises worse than not refitting at all. With the prior, the
directions ``S`` does not see keep ``W_K``; with many rows (``S >> lam``) the fit is ordinary
least squares. Limits: no rows, or ``lam -> inf``, give ``A = W_K`` and (no rows) the original
bias, i.e. plain pruning.

A removed channel that carried a constant (a ReLU of a bias, HardSigmoid of zero = 0.5)
contributes ``W[:, c] * const`` to every output: exactly what ``c`` absorbs, so such channels are
folded into the bias. (With padding the contribution is not constant at the borders; the fit then
takes the best constant.) Layers without a bias slot (a MatMul not followed by a per-feature Add)
are fitted without intercept, ``A^T = (E[x_K x_K^T] + lam I)^{-1} (E[x_K (W x)^T] + lam W_K^T)``.

The statistics are sums over rows accumulated batch by batch into float64 (``sum x_K``,
``sum W x``, ``sum x_K x_K^T``, ``sum x_K (W x)^T``, the row count; each batch's products in
``dtype``, float32 by default for speed), each taken of the data minus a fixed shift (the first
batch's means: centring ``E[x x^T] - mu mu^T`` then cancels nothing large, which is what makes
float32 products safe; the raw moments follow by adding the shift back), so memory is ``O(|K|^2 + |K| C_out)`` per
layer whatever the number of samples. ``rows_per_sample`` optionally subsamples output positions
(seeded, gathered before im2col) to bound time on large feature maps.

Grouped and depthwise Conv consumers are skipped: their input channels are pruned in whole conv
groups, which removes the groups' outputs too, so nothing of what they keep lost an input.
ConvTranspose and ``transA`` Gemm are skipped as well (logged).

This module is numpy only; the activations come from the caller (ONNX Runtime in
:mod:`onnx_compress.prune`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, unique_name
from .graph import DependencyGraph

logger = logging.getLogger(__name__)


def _conv_geometry(node: gs.Node, x_shape, w_shape):
    spatial = len(w_shape) - 2
    kernel = [int(k) for k in w_shape[2:]]
    strides = [int(s) for s in node.attrs.get("strides", [1] * spatial)]
    dilations = [int(d) for d in node.attrs.get("dilations", [1] * spatial)]
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * spatial))]
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        begin, end = [], []
        for i in range(spatial):
            size = int(x_shape[2 + i])
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(big if auto_pad == "SAME_LOWER" else small)
            end.append(small if auto_pad == "SAME_LOWER" else big)
        pads = begin + end
    return kernel, strides, dilations, pads


def _as_2d(kernel, strides, dilations, pads):
    """1-D geometry as 2-D with a unit leading axis (a 1-D input gets ``[:, :, None, :]``)."""
    if len(kernel) == 1:
        return [1, *kernel], [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
    return kernel, strides, dilations, pads


def _output_hw(shape, kernel, strides, dilations, pads) -> tuple[int, int]:
    """Output height and width of a 2-D conv (geometry already made 2-D) on a ``[N, C, H, W]`` input."""
    h, w = int(shape[-2]), int(shape[-1])
    oh = (h + pads[0] + pads[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    return oh, ow


def im2col(x: np.ndarray, kernel, strides, dilations, pads, rows: np.ndarray | None = None) -> np.ndarray:
    """``[N, C, *spatial]`` (1-D or 2-D) -> ``[N * positions, C * prod(kernel)]``, (c, ky, kx) order.

    ``rows`` (flat indices into ``N * positions``, sample-major) gathers only those rows, straight
    from ``x`` (no padded copy: taps that fall into the padding are zero).
    """
    if x.ndim == 3:
        x = x[:, :, None, :]
    (kh, kw), (sh, sw), (dh, dw), pads = _as_2d(kernel, strides, dilations, pads)
    n, c, h, w = x.shape
    oh, ow = _output_hw(x.shape, (kh, kw), (sh, sw), (dh, dw), pads)
    if rows is not None:
        b, pos = np.divmod(np.asarray(rows, dtype=np.int64), oh * ow)
        r, q = np.divmod(pos, ow)
        out = np.zeros((b.size, c, kh, kw), dtype=x.dtype)
        for i in range(kh):
            ys = r * sh + i * dh - pads[0]
            inside_y = (ys >= 0) & (ys < h)
            for j in range(kw):
                xs = q * sw + j * dw - pads[1]
                inside = inside_y & (xs >= 0) & (xs < w)
                if inside.all():
                    out[:, :, i, j] = x[b, :, ys, xs]
                else:
                    idx = np.flatnonzero(inside)
                    out[idx, :, i, j] = x[b[idx], :, ys[idx], xs[idx]]
        return out.reshape(b.size, c * kh * kw)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
    return cols.reshape(n, c * kh * kw, oh * ow).transpose(0, 2, 1).reshape(n * oh * ow, c * kh * kw)


def _positions(x: np.ndarray, kind: str, geometry) -> int:
    if kind != "conv":
        return int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
    shape = x.shape if x.ndim == 4 else (*x.shape[:2], 1, x.shape[-1])
    oh, ow = _output_hw(shape, *_as_2d(*geometry))
    return oh * ow


@dataclass
class LayerFit:
    """Streaming least-squares refit of one consumer node (see the module docstring).

    Two ways to gather the same statistics, picked by cost per row (``full_gram=None``: the
    cheaper): the kept features' Gram and their product with the targets ``W x`` (``|K|^2 +
    2 |K| C' + 2 D C'`` multiply-adds per row, ``C'`` kept outputs, ``D`` all features), or the
    Gram of *all* ``D`` features (``D^2``), from which ``E[x_K x_K^T]`` is a sub-block and
    ``E[x_K (W x)^T] = E[x_K x^T] W^T`` follows once at solve time (1x1 convs that expand).
    """

    node: gs.Node
    kind: str  # "conv", "gemm" or "matmul"
    input_name: str
    w2d: np.ndarray  # original weight as [C_out, D] (float64)
    bias: np.ndarray  # original bias [C_out] (zeros if none)
    col_keep: np.ndarray  # bool [D]: features kept
    out_keep: np.ndarray  # bool [C_out]: output channels kept
    intercept: bool
    geometry: tuple | None = None
    dtype: type = np.float32  # of the per-batch products (sums are float64)
    full_gram: bool | None = None  # None: whichever costs less per row
    n: int = 0
    sum_x: np.ndarray = field(default=None)
    sum_y: np.ndarray = field(default=None)
    xx: np.ndarray = field(default=None)
    xy: np.ndarray = field(default=None)

    def __post_init__(self):
        k, d = int(self.col_keep.sum()), self.w2d.shape[1]
        out = int(self.out_keep.sum())
        if self.full_gram is None:
            self.full_gram = d * d < k * k + 2 * k * out + 2 * d * out
        m = d if self.full_gram else k
        self.sum_x = np.zeros(m)
        self.xx = np.zeros((m, m))
        if not self.full_gram:
            self.sum_y = np.zeros(out)
            self.xy = np.zeros((k, out))
        self._shift_x: np.ndarray | None = None
        self._shift_y: np.ndarray | None = None
        self._w = np.ascontiguousarray(self.w2d[self.out_keep].T, dtype=np.float32)  # [D, C']

    @property
    def nbytes(self) -> int:
        """Size of the accumulated statistics (independent of the number of rows seen)."""
        return sum(a.nbytes for a in (self.sum_x, self.sum_y, self.xx, self.xy) if a is not None)

    def drop_statistics(self) -> None:
        """Free the accumulators (after :meth:`solve`); the fit can still provide targets."""
        self.sum_x = self.sum_y = self.xx = self.xy = None

    def rows(self, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.kind == "conv":
            return im2col(x, *self.geometry, rows=pick)
        flat = x.reshape(-1, x.shape[-1])
        return flat if pick is None else flat[pick]

    def targets(self, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
        """The original layer's output ``W x + b`` at the kept output channels, one row per position."""
        return self.rows(x, pick) @ self._w + self.bias[self.out_keep].astype(np.float32)

    def _pick(self, x: np.ndarray, rows_per_sample: int | None, rng: np.random.Generator | None):
        """Sorted row indices to keep (None: all), ``rows_per_sample`` of each sample at most."""
        if rows_per_sample is None or x.shape[0] == 0:
            return None
        per = _positions(x, self.kind, self.geometry)
        if per <= rows_per_sample:
            return None
        rng = rng or np.random.default_rng(0)
        picks = [s * per + np.sort(rng.choice(per, rows_per_sample, replace=False)) for s in range(x.shape[0])]
        return np.concatenate(picks)

    def update(self, x: np.ndarray, *, rows_per_sample: int | None = None, rng: np.random.Generator | None = None) -> None:
        """Accumulate one batch of the layer's (original) input ``x``; targets ``W x``."""
        rows = self.rows(x, self._pick(x, rows_per_sample, rng))
        if self.full_gram:
            self.accumulate(rows, None)
        else:
            self.accumulate(rows[:, self.col_keep], rows @ self._w)

    def update_pair(self, x_pruned: np.ndarray, x_original: np.ndarray, target: "LayerFit", *,
                    rows_per_sample: int | None = None, rng: np.random.Generator | None = None) -> None:
        """Accumulate the *pruned* model's input against the original layer's output (round 2).

        ``x_original`` is the original model's input of the same node, ``target`` its round-1
        fit: the targets are ``target.targets(x_original)`` at the same (sampled) positions.
        """
        pick = self._pick(x_pruned, rows_per_sample, rng)
        self.accumulate(self.rows(x_pruned, pick), target.targets(x_original, pick))

    def accumulate(self, xk: np.ndarray, y: np.ndarray | None) -> None:
        """Add rows of features (and their targets; ``None`` for a full-Gram fit) to the sums."""
        if self._shift_x is None:  # shifted moments: no cancellation when centring (docstring)
            self._shift_x = xk.mean(axis=0, dtype=np.float64)
            if y is not None:
                self._shift_y = y.mean(axis=0, dtype=np.float64)
        xk = np.subtract(xk, self._shift_x.astype(self.dtype), dtype=self.dtype)
        self.n += xk.shape[0]
        self.sum_x += xk.sum(axis=0, dtype=np.float64)
        self.xx += xk.T @ xk
        if y is not None:
            y = np.subtract(y, self._shift_y.astype(self.dtype), dtype=self.dtype)
            self.sum_y += y.sum(axis=0, dtype=np.float64)
            self.xy += xk.T @ y

    def _moments(self):
        """(E[x~_K x~_K^T], E[x~_K y~^T], mean x~_K, mean y~, shift x, shift y) of the shifted data."""
        if not self.full_gram:
            return (self.xx / self.n, self.xy / self.n, self.sum_x / self.n, self.sum_y / self.n,
                    self._shift_x, self._shift_y)
        keep = self.col_keep
        w = self._w.astype(np.float64)  # y = W x: shifted targets are W x~, shift W s
        g = self.xx[keep] / self.n
        mean = self.sum_x / self.n
        return g[:, keep], g @ w, mean[keep], mean @ w, self._shift_x[keep], self._shift_x @ w

    def prior(self) -> np.ndarray:
        """The plain pruned weights ``W_K`` ``[C', |K|]`` the fit shrinks toward (module docstring)."""
        return self.w2d[np.ix_(self.out_keep, self.col_keep)]

    def solve(self, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """(weights ``[C', |K|]``, bias ``[C']``) for the kept output channels ``C'``, in order.

        No rows seen: the prior itself (``W_K``, original bias), i.e. plain pruning.
        """
        prior = self.prior()
        if self.n == 0:
            logger.warning("reconstruct: no calibration rows reached '%s'; kept the pruned weights", self.node.name)
            return prior.copy(), self.bias[self.out_keep].copy()
        exx, exy, mx, my, sx, sy = self._moments()
        k = exx.shape[0]
        if self.intercept:
            s = exx - np.outer(mx, mx)
            r = exy - np.outer(mx, my)
        else:  # raw moments: undo the shift
            s = exx + np.outer(mx, sx) + np.outer(sx, mx) + np.outer(sx, sx)
            r = exy + np.outer(mx, sy) + np.outer(sx, my) + np.outer(sx, sy)
        lam = ridge * max(float(np.trace(s)) / max(k, 1), 1e-12)
        s[np.diag_indices(k)] += lam
        # [K, C'] (float64; numpy's float32 LU and Cholesky measured no faster)
        a = np.linalg.solve(s, r + lam * prior.T)
        if self.intercept:
            b = (my + sy) + self.bias[self.out_keep] - (mx + sx) @ a
        else:
            b = self.bias[self.out_keep].copy()
        return a.T, b


def _weight_matrix(node: gs.Node) -> tuple[str, np.ndarray] | None:
    w = constant_value(node.inputs[1])
    if w is None:
        return None
    w = np.asarray(w, dtype=np.float64)
    if node.op == "Conv":
        return "conv", w.reshape(w.shape[0], -1)
    if node.op == "Gemm":
        return "gemm", (w if node.attrs.get("transB", 0) else w.T)
    if w.ndim != 2:
        return None
    return "matmul", w.T


def _matmul_bias(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add right after a MatMul that adds a per-feature constant (its node and input slot)."""
    y = node.outputs[0]
    if len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    for i, t in enumerate(add.inputs):
        if t is y:
            continue
        v = constant_value(t)
        if v is not None and v.ndim == 1 and v.shape[0] == constant_value(node.inputs[1]).shape[1]:
            return add, i
    return None


def plan_fits(dg: DependencyGraph, masks: dict[int, np.ndarray]) -> list[LayerFit]:
    """One :class:`LayerFit` per consumer whose input channels lose something (original shapes)."""
    fits: list[LayerFit] = []
    for node in dg.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        x, wt, y = node.inputs[0], node.inputs[1], node.outputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank is None:
            continue
        axis = 1 if node.op == "Conv" else rank - 1
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            logger.debug("reconstruct: skip '%s' (transA)", node.name)
            continue
        din = dg.dim_of(x.name, axis)
        if din is None or din.id not in masks:
            continue
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            continue
        found = _weight_matrix(node)
        if found is None:
            continue
        if len(wt.outputs) != 1:
            logger.info("reconstruct: skip '%s' (weight shared with other nodes)", node.name)
            continue
        kind, w2d = found
        in_keep = masks[din.id]
        geometry = None
        if kind == "conv":
            ws = constant_value(wt).shape
            if len(ws) not in (3, 4) or x.shape is None:
                logger.info("reconstruct: skip '%s' (%d-D conv)", node.name, len(ws) - 2)
                continue
            geometry = _conv_geometry(node, x.shape, ws)
            col_keep = np.repeat(in_keep, int(np.prod(ws[2:])))
        else:
            col_keep = in_keep
        out_axis = 1 if node.op in ("Conv", "Gemm") else len(y.shape) - 1 if y.shape is not None else None
        dout = dg.dim_of(y.name, out_axis) if out_axis is not None else None
        out_keep = masks.get(dout.id) if dout is not None else None
        if out_keep is None:
            out_keep = np.ones(w2d.shape[0], dtype=bool)
        bias = np.zeros(w2d.shape[0])
        intercept = True
        if node.op == "Conv" and len(node.inputs) > 2 and node.inputs[2].name:
            b = constant_value(node.inputs[2])
            if b is None:
                continue
            bias = np.asarray(b, dtype=np.float64)
        elif node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            b = constant_value(node.inputs[2])
            if b is None or float(node.attrs.get("beta", 1.0)) != 1.0 or np.asarray(b).size not in (1, w2d.shape[0]):
                continue
            bias = np.broadcast_to(np.asarray(b, dtype=np.float64).reshape(-1), (w2d.shape[0],)).copy()
        elif node.op == "MatMul":
            slot = _matmul_bias(node)
            if slot is None:
                intercept = False
            else:
                add, i = slot
                bias = np.asarray(constant_value(add.inputs[i]), dtype=np.float64)
        if node.op == "Gemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
            continue
        fits.append(LayerFit(node, kind, x.name, w2d, bias, col_keep, out_keep, intercept, geometry))
    return fits


def _write(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, base: str) -> None:
    old = node.inputs[index] if index < len(node.inputs) else None
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = value
        return
    new = gs.Constant(unique_name(graph, f"{base}_reconstructed"), value)
    if old is None:
        node.inputs.append(new)
    else:
        node.inputs[index] = new


def write_fit(graph: gs.Graph, fit: LayerFit, weights: np.ndarray, bias: np.ndarray) -> None:
    """Store a solved fit (kept output channels only, see :meth:`LayerFit.solve`) into the *pruned* node."""
    node = fit.node
    wt = node.inputs[1]
    old = constant_value(wt)
    dtype = old.dtype
    w = weights
    b = bias.astype(dtype)
    name = node.name or node.op
    if fit.kind == "conv":
        value = w.reshape(old.shape).astype(dtype)
        _write(graph, node, 1, value, wt.name or name)
        if len(node.inputs) < 3 or not node.inputs[2].name:
            while len(node.inputs) > 2:
                node.inputs.pop()
        _write(graph, node, 2, b, f"{name}_bias")
    elif fit.kind == "gemm":
        value = (w if node.attrs.get("transB", 0) else w.T).astype(dtype).reshape(old.shape)
        _write(graph, node, 1, value, wt.name or name)
        if len(node.inputs) < 3 or not node.inputs[2].name:
            while len(node.inputs) > 2:
                node.inputs.pop()
        _write(graph, node, 2, b, f"{name}_bias")
    else:
        _write(graph, node, 1, w.T.astype(dtype).reshape(old.shape), wt.name or name)
        if fit.intercept:
            add, i = _matmul_bias(node)
            _write(graph, add, i, b, f"{name}_bias")


def second_round(fit: LayerFit) -> LayerFit:
    """A fresh fit of the same (now pruned and refitted) node, for :meth:`LayerFit.update_pair`.

    Targets are the original layer's outputs at the kept output channels (bias included, and
    for a MatMul the bias of its Add; computed by ``fit.targets``), so the new fit carries a
    zero bias of its own and keeps every (already kept) input. Its prior ``W_K`` is the node's
    current weight, the round-1 solution.
    """
    node = fit.node
    found = _weight_matrix(node)
    kind, w2d = found
    geometry = None
    if kind == "conv":
        ws = constant_value(node.inputs[1]).shape
        geometry = _conv_geometry(node, node.inputs[0].shape, ws)
    return LayerFit(node, kind, fit.input_name, w2d, np.zeros(w2d.shape[0]),
                    np.ones(w2d.shape[1], dtype=bool), np.ones(w2d.shape[0], dtype=bool), fit.intercept, geometry,
                    full_gram=False)

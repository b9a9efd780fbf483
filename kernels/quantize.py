"""QuantizeLinear, DequantizeLinear and Requantize (``Q(DQ(q))``), per tensor or per axis.

Math (see ``reference``): ``q = clamp(rne(x / s), lo - z, hi - z) + z`` with one float32 IEEE
division (NaN -> ``z``); ``x = float32(int32(q) - z) * s``. Requantize is the composition, in
float32, exactly as the Q/DQ pair evaluates in ONNX Runtime.

The tensor is viewed as ``(outer, C, inner)`` around the quantization axis (``C = 1`` per tensor)
and the kernels parallelise over ``outer * C`` rows. Any layout: these are element-wise.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import QTYPES, check_array, check_out, check_out_range, check_scale, check_zero_point, rne_clamped
from . import microkernel as mk
from .config import jit_parallel


@jit_parallel
def _quantize_kernel(x3, scale, zp, lo, hi, out3):
    outer, c_n, inner = x3.shape
    for r in prange(outer * c_n):
        o = r // c_n
        c = r % c_n
        s = scale[c]
        z = zp[c]
        lo_f = np.float32(lo - z)
        hi_f = np.float32(hi - z)
        for i in range(inner):
            out3[o, c, i] = (rne_clamped(x3[o, c, i] / s, lo_f, hi_f) + z) & 0xFF


@jit_parallel
def _quantize_to_nhwc_kernel(x4, scale, zp, lo, hi, out4):
    """Per-tensor QuantizeLinear of an NCHW float32 tensor written straight into NHWC order (the
    runtime's layout): one pass instead of quantize-then-transpose, parallel over ``N * H`` rows."""
    n_b, c_n, h, w = x4.shape
    lo_f = np.float32(lo - zp)
    hi_f = np.float32(hi - zp)
    w16 = w - w % 16 if c_n == 3 else 0
    for r in prange(n_b * h):
        n = r // h
        i = r % h
        row = np.empty((c_n, w), np.uint8)  # contiguous per channel: the division loop vectorises
        for c in range(c_n):
            src = x4[n, c, i]
            dst = row[c]
            for j in range(w):
                dst[j] = (rne_clamped(src[j] / scale, lo_f, hi_f) + zp) & 0xFF
        flat = row.reshape(-1)
        ob = out4[n, i].reshape(-1)
        for j in range(0, w16, 16):  # RGB images: 16 pixels per byte shuffle
            mk.interleave3_16(flat, j, w, ob, 3 * j)
        for j in range(w16, w):
            for c in range(c_n):
                out4[n, i, j, c] = row[c, j]


@jit_parallel
def _dequantize_kernel(q3, scale, zp, out3):
    outer, c_n, inner = q3.shape
    for r in prange(outer * c_n):
        o = r // c_n
        c = r % c_n
        s = scale[c]
        z = zp[c]
        for i in range(inner):
            out3[o, c, i] = np.float32(np.int32(q3[o, c, i]) - z) * s


@jit_parallel
def _requantize_kernel(q, sx, zx, sy, zy, lo, hi, out):
    lo_f = np.float32(lo - zy)
    hi_f = np.float32(hi - zy)
    for i in prange(q.shape[0]):
        f = np.float32(np.int32(q[i]) - zx) * sx
        out[i] = (rne_clamped(f / sy, lo_f, hi_f) + zy) & 0xFF


def _axis_view(x: np.ndarray, per_axis: bool, axis: int) -> tuple[np.ndarray, int]:
    if not per_axis:
        return x.reshape(1, 1, -1), 1
    if x.ndim == 0:
        raise ValueError("a per-axis scale needs a tensor with at least one dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {x.ndim}")
    axis %= x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(outer, x.shape[axis], -1), x.shape[axis]


def quantize_linear(x, scale, zero_point, *, axis: int = 1, out_range=None, out=None) -> np.ndarray:
    """ONNX QuantizeLinear (float32 in; uint8/int8 out, the zero point's dtype). A 1-D ``scale``
    quantizes per ``axis``; bit-exact with ``reference.quantize_linear``."""
    check_array("x", x, dtypes=(np.float32,))
    per_axis = np.ndim(scale) == 1
    x3, c_n = _axis_view(np.ascontiguousarray(x), per_axis, axis)
    s = check_scale("scale", scale, size=c_n if per_axis else None)
    z = check_zero_point("zero_point", zero_point, size=c_n if per_axis else None)
    if per_axis and np.ndim(zero_point) != 1:
        raise ValueError("zero_point must be 1-D when scale is 1-D")
    dtype = np.asarray(zero_point).dtype
    lo, hi = check_out_range(out_range, dtype)
    out = check_out("out", out, x.shape, dtype)
    _quantize_kernel(x3, s, z, lo, hi, out.view(np.uint8).reshape(x3.shape))
    return out


def prepare_quantize_to_nhwc(scale, zero_point, *, out_range=None):
    """Validate a per-tensor scale and zero point once; returns ``run(x, out=None)``: the ONNX
    QuantizeLinear of a 4-D NCHW float32 ``x`` in NHWC order (``quantize_linear(x, scale,
    zero_point).transpose(0, 2, 3, 1)``, bit for bit, in one pass), checking only ``x`` and
    ``out`` per call."""
    if np.ndim(scale) != 0 or np.ndim(zero_point) != 0:
        raise ValueError("quantize_linear_to_nhwc takes a per-tensor (scalar) scale and zero_point")
    s = check_scale("scale", scale)[0]
    z = int(check_zero_point("zero_point", zero_point)[0])
    dtype = np.asarray(zero_point).dtype
    lo, hi = check_out_range(out_range, dtype)
    kernel = _quantize_to_nhwc_kernel

    def run(x, out=None) -> np.ndarray:
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4):
            check_array("x", x, dtypes=(np.float32,), ndim=4)
        n, c, h, w = x.shape
        if out is None or out.shape != (n, h, w, c) or out.dtype != dtype or not out.flags.c_contiguous:
            out = check_out("out", out, (n, h, w, c), dtype)
        kernel(x, s, z, lo, hi, out.view(np.uint8))
        return out

    return run


def quantize_linear_to_nhwc(x, scale, zero_point, *, out_range=None, out=None) -> np.ndarray:
    """Per-tensor ONNX QuantizeLinear of a 4-D NCHW float32 ``x``, returned in NHWC order:
    ``quantize_linear(x, scale, zero_point).transpose(0, 2, 3, 1)``, bit for bit, in one pass."""
    check_array("x", x, dtypes=(np.float32,), ndim=4)
    return prepare_quantize_to_nhwc(scale, zero_point, out_range=out_range)(x, out)


def dequantize_linear(q, scale, zero_point=None, *, axis: int = 1, out=None) -> np.ndarray:
    """ONNX DequantizeLinear (uint8/int8/int32 in, float32 out); bit-exact with the reference."""
    check_array("q", q, dtypes=QTYPES + (np.dtype(np.int32),))
    per_axis = np.ndim(scale) == 1
    q3, c_n = _axis_view(np.ascontiguousarray(q), per_axis, axis)
    s = check_scale("scale", scale, size=c_n if per_axis else None)
    if zero_point is None:
        z = np.zeros(c_n, np.int32)
    else:
        if np.asarray(zero_point).dtype != q.dtype:
            raise TypeError(f"zero_point dtype {np.asarray(zero_point).dtype} differs from q's dtype {q.dtype}")
        z = check_zero_point("zero_point", zero_point, dtypes=(q.dtype,), size=c_n if per_axis else None)
    out = check_out("out", out, q.shape, np.float32)
    _dequantize_kernel(q3, s, z, out.reshape(q3.shape))
    return out


def requantize(q, x_scale, x_zp, y_scale, y_zp, *, out_range=None, out=None) -> np.ndarray:
    """``Q(DQ(q))`` from per-tensor ``(x_scale, x_zp)`` to ``(y_scale, y_zp)``; also the standalone
    Relu/Clip clamp when the scales are equal."""
    check_array("q", q)
    if np.asarray(x_zp).dtype != q.dtype:
        raise TypeError(f"x_zero_point dtype {np.asarray(x_zp).dtype} differs from q's dtype {q.dtype}")
    zx = check_zero_point("x_zero_point", x_zp)
    zy = check_zero_point("y_zero_point", y_zp)
    sx = check_scale("x_scale", x_scale)
    sy = check_scale("y_scale", y_scale)
    dtype = np.asarray(y_zp).dtype
    lo, hi = check_out_range(out_range, dtype)
    out = check_out("out", out, q.shape, dtype)
    _requantize_kernel(np.ascontiguousarray(q).reshape(-1), sx[0], int(zx[0]), sy[0], int(zy[0]), lo, hi,
                       out.view(np.uint8).reshape(-1))
    return out

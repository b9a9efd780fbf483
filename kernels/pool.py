"""MaxPool, AveragePool and GlobalAveragePool on uint8/int8 (2-D).

Math (see ``reference.max_pool``/``average_pool``): MaxPool is the max of the quantized values
over the window (pads never win; exact, scale and zero point unchanged). The averaging pools sum
``q - z_x`` in int32 (padded positions add 0), then requantize once:
``clamp(rne(float32(acc) * float32(float32(s_x / s_y) / float32(count))), lo - z_y, hi - z_y) + z_y``
with ``count`` the window positions inside the input (or inside the padded input with
``count_include_pad``). ``ceil_mode`` and dilations follow ONNX.

Internal layout NHWC (channels innermost, vectorised); ``layout="NCHW"`` wrappers transpose.
Parallel over output rows ``(n, oh)``; GlobalAveragePool over ``n``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import (
    QTYPES,
    check_array,
    check_ints,
    check_out,
    check_layout,
    check_out_range,
    check_scale,
    check_zero_point,
    from_nhwc,
    requant,
    to_nhwc,
)
from .config import jit_parallel
from .reference import output_size, qrange


@jit_parallel
def _max_pool_kernel(x, kh_n, kw_n, sh, sw, pt, pl, dh, dw, lo, out):
    n_b, h, w, c_n = x.shape
    oh_n, ow_n = out.shape[1], out.shape[2]
    for r in prange(n_b * oh_n):
        n = r // oh_n
        oh = r % oh_n
        best = np.empty(c_n, np.int32)
        for ow in range(ow_n):
            for c in range(c_n):
                best[c] = lo
            for kh in range(kh_n):
                ih = oh * sh - pt + kh * dh
                if ih < 0 or ih >= h:
                    continue
                for kw in range(kw_n):
                    iw = ow * sw - pl + kw * dw
                    if iw < 0 or iw >= w:
                        continue
                    for c in range(c_n):
                        v = np.int32(x[n, ih, iw, c])
                        if v > best[c]:
                            best[c] = v
            for c in range(c_n):
                out[n, oh, ow, c] = best[c] & 0xFF


@jit_parallel
def _avg_pool_kernel(x, x_zp, ratio, y_zp, lo, hi, kh_n, kw_n, sh, sw, pt, pl, pb, pr, dh, dw, include_pad, out):
    n_b, h, w, c_n = x.shape
    oh_n, ow_n = out.shape[1], out.shape[2]
    for r in prange(n_b * oh_n):
        n = r // oh_n
        oh = r % oh_n
        acc = np.empty(c_n, np.int32)
        cnt_h = 0
        for kh in range(kh_n):
            ih = oh * sh - pt + kh * dh
            if include_pad:
                if ih >= -pt and ih < h + pb:
                    cnt_h += 1
            elif ih >= 0 and ih < h:
                cnt_h += 1
        for ow in range(ow_n):
            for c in range(c_n):
                acc[c] = 0
            cnt_w = 0
            for kw in range(kw_n):
                iw = ow * sw - pl + kw * dw
                if include_pad:
                    if iw >= -pl and iw < w + pr:
                        cnt_w += 1
                elif iw >= 0 and iw < w:
                    cnt_w += 1
            for kh in range(kh_n):
                ih = oh * sh - pt + kh * dh
                if ih < 0 or ih >= h:
                    continue
                for kw in range(kw_n):
                    iw = ow * sw - pl + kw * dw
                    if iw < 0 or iw >= w:
                        continue
                    for c in range(c_n):
                        acc[c] += np.int32(x[n, ih, iw, c]) - x_zp
            count = cnt_h * cnt_w
            if count < 1:
                count = 1
            m = ratio / np.float32(count)
            for c in range(c_n):
                out[n, oh, ow, c] = requant(acc[c], m, y_zp, lo, hi) & 0xFF


@jit_parallel
def _global_avg_pool_kernel(x, x_zp, ratio, y_zp, lo, hi, out):
    n_b, h, w, c_n = x.shape
    m = ratio / np.float32(h * w)
    for n in prange(n_b):
        acc = np.zeros(c_n, np.int32)
        for i in range(h):
            for j in range(w):
                for c in range(c_n):
                    acc[c] += np.int32(x[n, i, j, c]) - x_zp
        for c in range(c_n):
            out[n, 0, 0, c] = requant(acc[c], m, y_zp, lo, hi) & 0xFF


def _window_args(x, kernel_shape, strides, pads, dilations, ceil_mode):
    kernel_shape = check_ints("kernel_shape", kernel_shape, 2, 1)
    strides = check_ints("strides", strides, 2, 1)
    pads = check_ints("pads", pads, 4, 0)
    dilations = check_ints("dilations", dilations, 2, 1)
    n, h, w, c = x.shape
    oh = output_size(h, kernel_shape[0], strides[0], pads[0], pads[2], dilations[0], bool(ceil_mode))
    ow = output_size(w, kernel_shape[1], strides[1], pads[1], pads[3], dilations[1], bool(ceil_mode))
    if oh < 1 or ow < 1:
        raise ValueError(f"x of shape {x.shape} is too small for kernel_shape {kernel_shape} and pads {pads}")
    return kernel_shape, strides, pads, dilations, (n, oh, ow, c)


def _scale_ratio(x_scale, y_scale) -> np.float32:
    sx = check_scale("x_scale", x_scale)
    sy = check_scale("y_scale", y_scale)
    return np.float32(sx[0] / sy[0])


def _pool_out(out, shape, dtype, layout):
    """The NHWC result buffer: caller-supplied ``out`` (NHWC layout only) or a new one."""
    if out is not None and layout != "NHWC":
        raise ValueError("out is only accepted with layout='NHWC'")
    return check_out("out", out, shape, dtype)


def max_pool(x, kernel_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False,
             layout="NCHW", out=None) -> np.ndarray:
    """MaxPool on a quantized tensor; bit-exact with ``reference.max_pool``."""
    check_layout(layout)
    check_array("x", x, ndim=4)
    xn = to_nhwc(x, layout)
    kernel_shape, strides, pads, dilations, shape = _window_args(xn, kernel_shape, strides, pads, dilations, ceil_mode)
    out = _pool_out(out, shape, x.dtype, layout)
    _max_pool_kernel(xn, kernel_shape[0], kernel_shape[1], strides[0], strides[1], pads[0], pads[1],
                     dilations[0], dilations[1], qrange(x.dtype)[0], out.view(np.uint8))
    return from_nhwc(out, layout)


def average_pool(x, x_scale, x_zp, y_scale, y_zp, kernel_shape, *, strides=(1, 1), pads=(0, 0, 0, 0),
                 dilations=(1, 1), ceil_mode=False, count_include_pad=False, out_range=None,
                 layout="NCHW", out=None) -> np.ndarray:
    """AveragePool in QDQ form; bit-exact with ``reference.average_pool``."""
    check_layout(layout)
    check_array("x", x, ndim=4)
    if np.asarray(x_zp).dtype != x.dtype:
        raise TypeError(f"x_zero_point dtype {np.asarray(x_zp).dtype} differs from x's dtype {x.dtype}")
    zx = check_zero_point("x_zero_point", x_zp)
    zy = check_zero_point("y_zero_point", y_zp, dtypes=QTYPES)
    dtype = np.asarray(y_zp).dtype
    lo, hi = check_out_range(out_range, dtype)
    ratio = _scale_ratio(x_scale, y_scale)
    xn = to_nhwc(x, layout)
    kernel_shape, strides, pads, dilations, shape = _window_args(xn, kernel_shape, strides, pads, dilations, ceil_mode)
    if kernel_shape[0] * kernel_shape[1] * 255 > 2**31 - 1:
        raise ValueError(f"kernel_shape {kernel_shape} could overflow the int32 accumulator")
    out = _pool_out(out, shape, dtype, layout)
    _avg_pool_kernel(xn, int(zx[0]), ratio, int(zy[0]), lo, hi, kernel_shape[0], kernel_shape[1], strides[0],
                     strides[1], pads[0], pads[1], pads[2], pads[3], dilations[0], dilations[1],
                     bool(count_include_pad), out.view(np.uint8))
    return from_nhwc(out, layout)


def bind_global_average_pool(x, x_scale, x_zp, y_scale, y_zp, out, *, out_range=None):
    """Validate once and return a zero-argument callable equal to ``global_average_pool(x, ...,
    layout="NHWC", out=out)`` on exactly these NHWC buffers, without the per-call checks."""
    check_array("x", x, ndim=4)
    if np.asarray(x_zp).dtype != x.dtype:
        raise TypeError(f"x_zero_point dtype {np.asarray(x_zp).dtype} differs from x's dtype {x.dtype}")
    zx = int(check_zero_point("x_zero_point", x_zp)[0])
    zy = int(check_zero_point("y_zero_point", y_zp)[0])
    lo, hi = check_out_range(out_range, np.asarray(y_zp).dtype)
    ratio = _scale_ratio(x_scale, y_scale)
    n, h, w, c = x.shape
    if h * w == 0:
        raise ValueError(f"x must have a non-empty spatial plane, got NHWC shape {x.shape}")
    check_out("out", out, (n, 1, 1, c), np.asarray(y_zp).dtype)
    y = out.view(np.uint8)
    kernel = _global_avg_pool_kernel
    return lambda: kernel(x, zx, ratio, zy, lo, hi, y)


def global_average_pool(x, x_scale, x_zp, y_scale, y_zp, *, out_range=None, layout="NCHW", out=None) -> np.ndarray:
    """GlobalAveragePool in QDQ form (output ``(N, C, 1, 1)`` or ``(N, 1, 1, C)``)."""
    check_layout(layout)
    check_array("x", x, ndim=4)
    xn = to_nhwc(x, layout)
    out = _pool_out(out, (xn.shape[0], 1, 1, xn.shape[3]), np.asarray(y_zp).dtype, layout)
    bind_global_average_pool(xn, x_scale, x_zp, y_scale, y_zp, out, out_range=out_range)()
    return from_nhwc(out, layout)

"""NumPy references of the ONNX integer semantics the Numba kernels implement (convention 8).

Everything here is plain NumPy in ONNX's NCHW layout, written for clarity, not speed; the
kernels must equal these functions bit for bit. Notation: ``q`` a quantized tensor (uint8 or
int8), ``s`` a float32 scale, ``z`` a zero point, ``[lo, hi]`` the output type's range.

Rounding: ``rne`` is round-half-to-even (``np.rint``), as ONNX and ONNX Runtime specify.

QuantizeLinear  ``q = clamp(rne(x / s), lo - z, hi - z) + z``, the division in float32 (one
    correctly rounded IEEE division, exactly as ONNX Runtime's MLAS kernel), per tensor or per
    axis. NaN quantizes to ``z`` (documented choice: ONNX leaves it undefined).
DequantizeLinear  ``x = float32(int32(q) - z) * s`` (one float32 multiply; int32 input too).

Requantization of an integer accumulator -- defined ONCE, here, and used by QLinearConv,
QLinearMatMul/Gemm and the averaging pools. We chose ONNX Runtime's own float definition (MLAS
``MlasRequantizeOutput``), not fixed-point multipliers, so that the reference equals ORT's
QLinearConv/QLinearMatMul bit for bit:

    m   = float32( float32(s_x * s_w[c]) / s_y )            (per output channel c)
    y   = clamp( rne( float32(acc) * m ), lo - z_y, hi - z_y ) + z_y

where ``float32(acc)`` is the int32 -> float32 conversion (round to nearest even) and every
operation is one float32 IEEE operation. Clamping before or after ``rne`` is the same, since the
bounds are integers.

QLinearConv  ``acc[n,m,p] = bias[m] + sum_{c,k} (x[n, g*Cg + c, p*s + k*d - pad] - z_x) *
    (w[m, c, k] - z_w[m])`` with ``g = m // (M/group)``; padded positions hold the real value 0,
    i.e. they contribute nothing. Accumulation is exact (int64 here, asserted to fit int32, as the
    kernels accumulate in int32). Per-channel ``s_w``/``z_w`` along axis 0.
QLinearMatMul / Gemm in QDQ form  ``acc[i, j] = bias[j] + sum_k (a[i,k] - z_a)(b[k,j] - z_b[j])``,
    same requantization with ``s_w = s_b[j]``; ``a`` may have leading batch axes, ``b`` is 2-D.
QLinearAdd / QLinearMul  defined as the float32 QDQ graph ``Q(DQ(a) op DQ(b))`` evaluated
    element-wise in float32 (one IEEE add or multiply), with NumPy broadcasting. This equals ORT
    running the DQ -> Add/Mul -> Q graph bit for bit.
Requantize  ``Q(DQ(q))`` to another scale/zero point (same float32 semantics).
MaxPool  max over the window of the quantized values (pads never win); exact, no requantization.
AveragePool / GlobalAveragePool  ``acc = sum_window (q - z_x)`` (padded positions add 0),
    ``count`` = number of window positions inside the input (``count_include_pad=0``) or inside
    the padded input (``count_include_pad=1``), then
    ``y = clamp(rne(float32(acc) * float32(float32(s_x / s_y) / float32(count))), lo - z_y,
    hi - z_y) + z_y``.
Relu / Clip epilogues  clamps in the quantized domain: because ``Q`` is monotone and
    ``Q(DQ(q)) = q``, ``Q(relu(DQ(q))) = max(q, z)`` and ``Q(clip(DQ(q), a, b)) =
    clamp(q, Q(a), Q(b))``. Every function taking ``out_range=(lo, hi)`` clamps its result to it.

Output size of a window op (conv and pools): ``O = floor((I + pad_b + pad_e - d*(k-1) - 1) / s)
+ 1`` (``ceil`` with ``ceil_mode=1``, dropping a last window that would start in the end padding).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QTYPES = (np.dtype(np.uint8), np.dtype(np.int8))


def qrange(dtype) -> tuple[int, int]:
    """``(lo, hi)`` of a quantized dtype (uint8, int8, or int32)."""
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def requant_multiplier(x_scale, w_scale, y_scale) -> np.ndarray:
    """``float32(float32(s_x * s_w) / s_y)`` as a 1-D float32 array (one entry per channel)."""
    sx = F32(np.asarray(x_scale, dtype=F32).reshape(()))
    sy = F32(np.asarray(y_scale, dtype=F32).reshape(()))
    sw = np.atleast_1d(np.asarray(w_scale, dtype=F32))
    return ((sx * sw).astype(F32) / sy).astype(F32)


def requantize_acc(acc, multiplier, y_zp, out_dtype, out_range=None) -> np.ndarray:
    """The one requantization: ``clamp(rne(float32(acc) * m), lo - z, hi - z) + z``."""
    lo, hi = out_range if out_range is not None else qrange(out_dtype)
    z = int(y_zp)
    v = np.asarray(acc).astype(F32) * np.asarray(multiplier, dtype=F32)
    v = np.clip(v.astype(F32), F32(lo - z), F32(hi - z))
    return (np.rint(v).astype(np.int32) + z).astype(out_dtype)


def _axis_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def quantize_linear(x, scale, zero_point, axis: int = 1, out_range=None) -> np.ndarray:
    """ONNX QuantizeLinear (per tensor when ``scale`` is a scalar, else per ``axis``)."""
    x = np.asarray(x, dtype=F32)
    zp = np.asarray(zero_point)
    scale = np.asarray(scale, dtype=F32)
    dtype = zp.dtype
    lo, hi = out_range if out_range is not None else qrange(dtype)
    if scale.ndim == 1 and x.ndim > 0:
        axis = axis % x.ndim
        scale = scale.reshape(_axis_shape(x.ndim, axis))
        zp = zp.reshape(_axis_shape(x.ndim, axis))
    z = zp.astype(np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = (x / scale).astype(F32)
    v = np.where(np.isnan(v), F32(0), v)
    v = np.clip(v, (lo - z).astype(F32), (hi - z).astype(F32))
    return (np.rint(v).astype(np.int32) + z).astype(dtype)


def dequantize_linear(q, scale, zero_point=None, axis: int = 1) -> np.ndarray:
    """ONNX DequantizeLinear: ``float32(int32(q) - z) * s``."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=F32)
    zp = np.zeros((), np.int32) if zero_point is None else np.asarray(zero_point).astype(np.int32)
    if scale.ndim == 1 and q.ndim > 0:
        axis = axis % q.ndim
        scale = scale.reshape(_axis_shape(q.ndim, axis))
        zp = zp.reshape(_axis_shape(q.ndim, axis)) if zp.ndim == 1 else zp
    return ((q.astype(np.int32) - zp).astype(F32) * scale).astype(F32)


def requantize(q, x_scale, x_zp, y_scale, y_zp, out_range=None) -> np.ndarray:
    """``Q(DQ(q))`` from one (per-tensor) scale/zero point to another, float32 semantics."""
    return quantize_linear(dequantize_linear(q, x_scale, x_zp), y_scale, y_zp, out_range=out_range)


def output_size(size: int, k: int, stride: int, pad_b: int, pad_e: int, dil: int, ceil_mode: bool = False) -> int:
    """Output length of a window op along one axis (see the module docstring)."""
    span = size + pad_b + pad_e - dil * (k - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_b:
        out -= 1
    return out


def conv_accumulate(x, x_zp, w, w_zp, bias=None, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    """Exact int64 accumulators of the quantized 2-D convolution (NCHW), asserted to fit int32."""
    x = np.asarray(x)
    w = np.asarray(w)
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    oh = output_size(h, kh, sh, pt, pb, dh)
    ow = output_size(wd, kw, sw, pl, pr, dw)
    xs = x.astype(np.int64) - int(x_zp)
    wz = np.asarray(w_zp).astype(np.int64).reshape(-1, 1, 1, 1)
    ws = w.astype(np.int64) - wz
    xp = np.zeros((n, c, h + pt + pb + sh, wd + pl + pr + sw), np.int64)
    xp[:, :, pt : pt + h, pl : pl + wd] = xs
    mg = m // group
    acc = np.zeros((n, group, mg, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            patch = patch.reshape(n, group, cg, oh, ow)
            wk = ws[:, :, i, j].reshape(group, mg, cg)
            acc += np.einsum("ngchw,gmc->ngmhw", patch, wk)
    acc = acc.reshape(n, m, oh, ow)
    if bias is not None:
        acc += np.asarray(bias).astype(np.int64).reshape(1, m, 1, 1)
    lo, hi = qrange(np.int32)
    assert acc.size == 0 or (acc.min() >= lo and acc.max() <= hi), "int32 accumulator overflow"
    return acc


def qlinear_conv(
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None, *,
    strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, out_range=None,
) -> np.ndarray:
    """ONNX QLinearConv (2-D, NCHW) with the module's requantization and optional clamp epilogue."""
    acc = conv_accumulate(x, x_zp, w, w_zp, bias, strides=strides, pads=pads, dilations=dilations, group=group)
    m = requant_multiplier(x_scale, w_scale, y_scale)
    m = np.broadcast_to(m, (acc.shape[1],)).reshape(1, -1, 1, 1)
    zp = np.asarray(y_zp)
    return requantize_acc(acc, m, zp, zp.dtype, out_range)


def qlinear_matmul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None, out_range=None) -> np.ndarray:
    """ONNX QLinearMatMul with a 2-D right operand (per-column ``s_b``/``z_b`` allowed), plus bias."""
    a = np.asarray(a)
    b = np.asarray(b)
    acc = (a.astype(np.int64) - int(a_zp)) @ (b.astype(np.int64) - np.asarray(b_zp).astype(np.int64).reshape(1, -1))
    if bias is not None:
        acc = acc + np.asarray(bias).astype(np.int64)
    lo, hi = qrange(np.int32)
    assert acc.size == 0 or (acc.min() >= lo and acc.max() <= hi), "int32 accumulator overflow"
    m = requant_multiplier(a_scale, b_scale, y_scale)
    zp = np.asarray(y_zp)
    return requantize_acc(acc, m, zp, zp.dtype, out_range)


def qgemm(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None, *, trans_b=False, out_range=None):
    """Gemm in QDQ form (``alpha = beta = 1``; int32 bias in scale ``s_a*s_b``)."""
    b = np.asarray(b)
    return qlinear_matmul(a, a_scale, a_zp, b.T if trans_b else b, b_scale, b_zp, y_scale, y_zp, bias, out_range)


def _qdq_binary(op, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range=None):
    fa = dequantize_linear(a, a_scale, a_zp)
    fb = dequantize_linear(b, b_scale, b_zp)
    return quantize_linear(op(fa, fb).astype(F32), y_scale, y_zp, out_range=out_range)


def qlinear_add(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range=None) -> np.ndarray:
    """``Q(DQ(a) + DQ(b))`` in float32, broadcasting."""
    return _qdq_binary(np.add, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range)


def qlinear_mul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range=None) -> np.ndarray:
    """``Q(DQ(a) * DQ(b))`` in float32, broadcasting."""
    return _qdq_binary(np.multiply, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range)


def clamp(q, out_range) -> np.ndarray:
    """Relu/Clip in the quantized domain."""
    q = np.asarray(q)
    return np.clip(q, out_range[0], out_range[1]).astype(q.dtype)


def relu_range(y_zp) -> tuple[int, int]:
    """``out_range`` of a fused Relu: ``[max(lo, z), hi]``."""
    zp = np.asarray(y_zp)
    lo, hi = qrange(zp.dtype)
    return max(lo, min(hi, int(zp))), hi


def clip_range(min_value, max_value, y_scale, y_zp) -> tuple[int, int]:
    """``out_range`` of a fused Clip(min, max): ``[Q(min), Q(max)]`` (None = unbounded)."""
    zp = np.asarray(y_zp)
    lo, hi = qrange(zp.dtype)
    if min_value is not None:
        lo = int(quantize_linear(np.float32(min_value), y_scale, zp))
    if max_value is not None:
        hi = int(quantize_linear(np.float32(max_value), y_scale, zp))
    return lo, hi


def _window_positions(size, k, stride, pad_b, dil, out):
    """Input index of every (output, tap) pair, shape (out, k)."""
    return np.arange(out)[:, None] * stride - pad_b + np.arange(k)[None, :] * dil


def max_pool(x, kernel_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False) -> np.ndarray:
    """ONNX MaxPool on uint8/int8 (NCHW); a window with no input element gives the dtype minimum."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    kh, kw = kernel_shape
    oh = output_size(h, kh, strides[0], pads[0], pads[2], dilations[0], ceil_mode)
    ow = output_size(w, kw, strides[1], pads[1], pads[3], dilations[1], ceil_mode)
    ih = _window_positions(h, kh, strides[0], pads[0], dilations[0], oh)
    iw = _window_positions(w, kw, strides[1], pads[1], dilations[1], ow)
    lo, _ = qrange(x.dtype)
    out = np.full((n, c, oh, ow), lo, dtype=np.int32)
    for a in range(kh):
        for b in range(kw):
            rows, cols = ih[:, a], iw[:, b]
            vr = (rows >= 0) & (rows < h)
            vc = (cols >= 0) & (cols < w)
            vals = x[:, :, np.clip(rows, 0, h - 1)][:, :, :, np.clip(cols, 0, w - 1)].astype(np.int32)
            mask = vr[:, None] & vc[None, :]
            out = np.where(mask, np.maximum(out, vals), out)
    return out.astype(x.dtype)


def average_pool(
    x, x_scale, x_zp, y_scale, y_zp, kernel_shape, *, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
    ceil_mode=False, count_include_pad=False, out_range=None,
) -> np.ndarray:
    """AveragePool in QDQ form with the integer-sum definition of the module docstring (NCHW)."""
    x = np.asarray(x)
    n, c, h, w = x.shape
    kh, kw = kernel_shape
    oh = output_size(h, kh, strides[0], pads[0], pads[2], dilations[0], ceil_mode)
    ow = output_size(w, kw, strides[1], pads[1], pads[3], dilations[1], ceil_mode)
    ih = _window_positions(h, kh, strides[0], pads[0], dilations[0], oh)
    iw = _window_positions(w, kw, strides[1], pads[1], dilations[1], ow)
    xs = x.astype(np.int64) - int(x_zp)
    acc = np.zeros((n, c, oh, ow), np.int64)
    count = np.zeros((oh, ow), np.int64)
    for a in range(kh):
        for b in range(kw):
            rows, cols = ih[:, a], iw[:, b]
            vr = (rows >= 0) & (rows < h)
            vc = (cols >= 0) & (cols < w)
            mask = vr[:, None] & vc[None, :]
            vals = xs[:, :, np.clip(rows, 0, h - 1)][:, :, :, np.clip(cols, 0, w - 1)]
            acc += np.where(mask, vals, 0)
            if count_include_pad:
                pr = (rows >= -pads[0]) & (rows < h + pads[2])
                pc = (cols >= -pads[1]) & (cols < w + pads[3])
                count += pr[:, None] & pc[None, :]
            else:
                count += mask
    ratio = (F32(np.asarray(x_scale, F32).reshape(())) / F32(np.asarray(y_scale, F32).reshape(()))).astype(F32)
    with np.errstate(divide="ignore"):
        m = (ratio / np.maximum(count, 1).astype(F32)).astype(F32)
    zp = np.asarray(y_zp)
    return requantize_acc(acc, m[None, None], zp, zp.dtype, out_range)


def global_average_pool(x, x_scale, x_zp, y_scale, y_zp, out_range=None) -> np.ndarray:
    """GlobalAveragePool in QDQ form: AveragePool with the whole plane as the window."""
    x = np.asarray(x)
    return average_pool(x, x_scale, x_zp, y_scale, y_zp, x.shape[2:], out_range=out_range)


def lookup(q, table) -> np.ndarray:
    """Element-wise table lookup ``table[q & 0xFF]`` (see ``kernels.lut``)."""
    q = np.asarray(q)
    return np.asarray(table)[q.view(np.uint8).astype(np.intp)]

"""Element-wise QLinearAdd / QLinearMul (QDQ form) and the quantized clamp (Relu/Clip).

Math (see ``reference.qlinear_add``): ``y = Q(DQ(a) op DQ(b))`` evaluated in float32 exactly as
ONNX Runtime evaluates the DQ -> Add/Mul -> Q graph: ``DQ(q) = float32(int32(q) - z) * s`` (one
multiply), one float32 add or multiply, one float32 division by ``s_y``, round half to even, add
``z_y``, clamp to ``out_range`` (the fused Relu/Clip epilogue). ``clamp(q, lo, hi)`` is Relu/Clip
on an already quantized tensor (see ``reference.relu_range``/``clip_range``).

Vectorised 16 elements at a time by ``microkernel.qdq_binary16`` (the same float32 operations,
IEEE division included). Broadcasting follows NumPy; operands that differ in shape are materialised by the wrapper (the
common residual Add has equal shapes and copies nothing). Any layout: element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from . import microkernel as mk
from ._common import (
    QTYPES,
    check_array,
    check_out,
    check_out_range,
    check_scale,
    check_zero_point,
    rne_clamped,
)
from .config import jit_parallel

_ADD, _MUL = 0, 1


@jit_parallel
def _qdq_binary_kernel(op, a, sa, za, b, sb, zb, sy, zy, lo, hi, out):
    """Blocks of 4096 elements in parallel, 16 at a time with ``microkernel.qdq_binary16``, the tail
    (fewer than 16 elements) in scalar code with the same float32 operations."""
    lo_f = np.float32(lo - zy)
    hi_f = np.float32(hi - zy)
    size = a.shape[0]
    n16 = size - size % 16
    for blk in prange((n16 + 4095) // 4096):
        for i in range(blk * 4096, min(n16, blk * 4096 + 4096), 16):
            mk.qdq_binary16(op, a, b, i, sa, za, sb, zb, sy, zy, lo, hi, out)
    for i in range(n16, size):
        fa = np.float32(np.int32(a[i]) - za) * sa
        fb = np.float32(np.int32(b[i]) - zb) * sb
        if op == 0:
            f = fa + fb
        else:
            f = fa * fb
        out[i] = (rne_clamped(f / sy, lo_f, hi_f) + zy) & 0xFF


@jit_parallel
def _clamp_kernel(q, lo, hi, out):
    for i in prange(q.shape[0]):
        v = q[i]
        if v < lo:
            v = lo
        elif v > hi:
            v = hi
        out[i] = v


@dataclass(frozen=True)
class QBinaryParams:
    """The constant operands of a QLinearAdd / QLinearMul, validated once (``prepare_qbinary``)."""

    op: int  # 0 add, 1 multiply
    a_dtype: np.dtype
    b_dtype: np.dtype
    sa: np.float32
    za: int
    sb: np.float32
    zb: int
    sy: np.float32
    zy: int
    y_dtype: np.dtype
    lo: int
    hi: int


def prepare_qbinary(op: str, a_dtype, a_scale, a_zp, b_dtype, b_scale, b_zp, y_scale, y_zp, out_range=None):
    """Validate the scales/zero points of ``Q(DQ(a) op DQ(b))`` once; ``op`` is "add" or "mul"."""
    if op not in ("add", "mul"):
        raise ValueError(f"op must be 'add' or 'mul', got {op!r}")
    dts = []
    for name, dt, zp in (("a", a_dtype, a_zp), ("b", b_dtype, b_zp)):
        dt = np.dtype(dt)
        if dt not in QTYPES:
            raise TypeError(f"{name} must have dtype uint8 or int8, got {dt}")
        if np.asarray(zp).dtype != dt:
            raise TypeError(f"{name}_zero_point dtype {np.asarray(zp).dtype} differs from its tensor's dtype {dt}")
        dts.append(dt)
    za = check_zero_point("a_zero_point", a_zp)
    zb = check_zero_point("b_zero_point", b_zp)
    zy = check_zero_point("y_zero_point", y_zp)
    sa = check_scale("a_scale", a_scale)
    sb = check_scale("b_scale", b_scale)
    sy = check_scale("y_scale", y_scale)
    dtype = np.asarray(y_zp).dtype
    lo, hi = check_out_range(out_range, dtype)
    return QBinaryParams(_ADD if op == "add" else _MUL, dts[0], dts[1], sa[0], int(za[0]), sb[0], int(zb[0]), sy[0],
                         int(zy[0]), dtype, lo, hi)


def run_qbinary(params: QBinaryParams, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Run a prepared QLinearAdd/Mul (NumPy broadcasting; equal C-contiguous shapes copy nothing)."""
    if not isinstance(a, np.ndarray) or a.dtype != params.a_dtype:
        check_array("a", a, dtypes=(params.a_dtype,))
    if not isinstance(b, np.ndarray) or b.dtype != params.b_dtype:
        check_array("b", b, dtypes=(params.b_dtype,))
    if a.shape == b.shape and a.flags.c_contiguous and b.flags.c_contiguous:
        shape, af, bf = a.shape, a.reshape(-1), b.reshape(-1)
    else:
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError as exc:
            raise ValueError(f"a {a.shape} and b {b.shape} do not broadcast") from exc
        af = np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(-1)
        bf = np.ascontiguousarray(np.broadcast_to(b, shape)).reshape(-1)
    if out is None or out.shape != shape or out.dtype != params.y_dtype or not out.flags.c_contiguous:
        out = check_out("out", out, shape, params.y_dtype)
    _qdq_binary_kernel(params.op, af, params.sa, params.za, bf, params.sb, params.zb, params.sy, params.zy,
                       params.lo, params.hi, out.view(np.uint8).reshape(-1))
    return out


def bind_qbinary(params: QBinaryParams, a: np.ndarray, b: np.ndarray, out: np.ndarray):
    """Validate once and return a zero-argument callable equal to ``run_qbinary(params, a, b, out)``
    on exactly these buffers, without the per-call checks (equal C-contiguous shapes; anything
    else falls back to ``run_qbinary``)."""
    check_array("a", a, dtypes=(params.a_dtype,))
    check_array("b", b, dtypes=(params.b_dtype,))
    if not (a.shape == b.shape and a.flags.c_contiguous and b.flags.c_contiguous):
        return lambda: run_qbinary(params, a, b, out)
    check_out("out", out, a.shape, params.y_dtype)
    if not out.flags.c_contiguous:
        return lambda: run_qbinary(params, a, b, out)
    call = (params.op, a.reshape(-1), params.sa, params.za, b.reshape(-1), params.sb, params.zb, params.sy, params.zy,
            params.lo, params.hi, out.view(np.uint8).reshape(-1))
    kernel = _qdq_binary_kernel
    return lambda: kernel(*call)


def _binary(op, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range, out=None):
    check_array("a", a)
    check_array("b", b)
    params = prepare_qbinary("add" if op == _ADD else "mul", a.dtype, a_scale, a_zp, b.dtype, b_scale, b_zp,
                             y_scale, y_zp, out_range)
    return run_qbinary(params, a, b, out)


def qlinear_add(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, out_range=None, out=None) -> np.ndarray:
    """``Q(DQ(a) + DQ(b))``; bit-exact with ``reference.qlinear_add``."""
    return _binary(_ADD, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range, out)


def qlinear_mul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, *, out_range=None, out=None) -> np.ndarray:
    """``Q(DQ(a) * DQ(b))``; bit-exact with ``reference.qlinear_mul``."""
    return _binary(_MUL, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, out_range, out)


def clamp(q, out_range) -> np.ndarray:
    """Relu/Clip in the quantized domain: ``min(max(q, lo), hi)``."""
    check_array("q", q)
    lo, hi = check_out_range(out_range, q.dtype)
    out = np.empty(q.shape, q.dtype)
    _clamp_kernel(np.ascontiguousarray(q).reshape(-1), lo, hi, out.reshape(-1))
    return out

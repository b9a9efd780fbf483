"""QLinearMatMul / Gemm in QDQ form: ``y = requant(bias + (a - z_a) @ (b - z_b))``.

Math and requantization: see ``reference.qlinear_matmul`` (the one float32 requantization,
per-column multipliers ``float32(float32(s_a * s_b[j]) / s_y)``).

Exact by construction: the constant right operand is packed once as ``int16(b - z_b)`` (range
[-255, 255]); each product of two int16-range values is formed in (at least) int32 and summed in
an int32 accumulator -- never a saturating int16 pair sum. The wrapper refuses shapes whose
worst-case accumulator could overflow int32 (``K * 255 * 255 + max|bias| >= 2**31``).

Fast path: s8 ``b`` with zero points 0 on an AVX512-VNNI / AVX2 CPU runs as a 1x1 convolution of
``(rows, 1, 1, K)`` on the ``igemm`` tiles (``params.isa``; ``isa=`` forces a path), exact by
the argument in ``igemm``. Otherwise the generic kernel below.

Layout: ``a`` is ``(..., K)`` row-major; ``b`` is ``(K, N)`` (or ``(N, K)`` with ``trans_b``).
The kernel parallelises over rows of ``a`` (``prange``) and vectorises over ``N``. ``prepare_qgemm``
does the packing once (the runtime keeps the result); ``qgemm``/``qlinear_matmul`` are the
one-shot wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from . import igemm
from . import microkernel as mk
from ._common import (
    INT32_MAX,
    check_array,
    check_out,
    check_out_range,
    check_scale,
    check_zero_point,
    requant,
)
from .config import jit_parallel
from .reference import requant_multiplier


@jit_parallel
def _qgemm_kernel(a, a_zp, bp, bias, mult, y_zp, lo, hi, out):
    rows, k_dim = a.shape
    n_dim = bp.shape[1]
    for i in prange(rows):
        acc = np.empty(n_dim, np.int32)
        for j in range(n_dim):
            acc[j] = bias[j]
        for k in range(k_dim):
            av = np.int32(a[i, k]) - a_zp
            if av != 0:
                for j in range(n_dim):
                    acc[j] += av * np.int32(bp[k, j])
        for j in range(n_dim):
            out[i, j] = requant(acc[j], mult[j], y_zp, lo, hi) & 0xFF


@dataclass(frozen=True)
class QGemmParams:
    """Everything constant about a quantized GEMM, packed once."""

    a_dtype: np.dtype
    a_zp: int
    packed_b: np.ndarray  # int16 (K, N) = b - z_b (None when ``fast`` is set)
    bias: np.ndarray  # int32 (N,)
    multiplier: np.ndarray  # float32 (N,)
    y_dtype: np.dtype
    y_zp: int
    lo: int
    hi: int
    k: int
    fast: igemm.IGemmPack | None = None  # VNNI/AVX2 packing (see ``igemm``)

    @property
    def n(self) -> int:
        return self.bias.shape[0]

    @property
    def isa(self) -> str:
        """The instruction set of the kernel chosen at packing time."""
        return mk.ISA_NAMES[self.fast.isa] if self.fast is not None else "generic"


def check_accumulator(name: str, k: int, bias: np.ndarray) -> None:
    """Refuse a reduction length whose worst-case int32 accumulator could overflow."""
    worst = k * 255 * 255 + (int(np.abs(bias.astype(np.int64)).max()) if bias.size else 0)
    if worst > INT32_MAX:
        raise ValueError(f"{name}: reduction length {k} could overflow the int32 accumulator")


def prepare_qgemm(a_dtype, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None, *, trans_b=False, out_range=None,
                  isa: str | None = None):
    """Validate and pack the constant operands of a quantized GEMM (``isa``: see ``prepare_qconv``)."""
    a_dtype = np.dtype(a_dtype)
    if a_dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise TypeError(f"a must have dtype uint8 or int8, got {a_dtype}")
    za = check_zero_point("a_zero_point", a_zp)
    if np.asarray(a_zp).dtype != a_dtype:
        raise TypeError(f"a_zero_point dtype {np.asarray(a_zp).dtype} differs from a's dtype {a_dtype}")
    b = check_array("b", b, ndim=2)
    bt = b.T if trans_b else b
    k_dim, n_dim = bt.shape
    if k_dim == 0 or n_dim == 0:
        raise ValueError(f"b must be non-empty, got shape {b.shape}")
    zb = check_zero_point("b_zero_point", b_zp, dtypes=(b.dtype,), size=n_dim)
    sa = check_scale("a_scale", a_scale)
    sb = check_scale("b_scale", b_scale, size=n_dim)
    sy = check_scale("y_scale", y_scale)
    zy = check_zero_point("y_zero_point", y_zp)
    y_dtype = np.asarray(y_zp).dtype
    lo, hi = check_out_range(out_range, y_dtype)
    if bias is None:
        bias_arr = np.zeros(n_dim, np.int32)
    else:
        bias_arr = check_array("bias", bias, dtypes=(np.int32,), ndim=1)
        if bias_arr.shape != (n_dim,):
            raise ValueError(f"bias must have shape ({n_dim},), got {bias_arr.shape}")
        bias_arr = np.ascontiguousarray(bias_arr)
    check_accumulator("b", k_dim, bias_arr)
    mult = requant_multiplier(sa[0], sb, sy[0])
    code = igemm.choose_isa(bt, zb, isa)
    if code != mk.GENERIC:
        w4 = np.ascontiguousarray(bt.T).reshape(n_dim, k_dim, 1, 1)
        fast = igemm.pack(code, w4, bias_arr, mult, a_dtype, int(za[0]), 1, int(zy[0]), lo, hi)
        return QGemmParams(a_dtype, int(za[0]), None, bias_arr, mult, y_dtype, int(zy[0]), lo, hi, k_dim, fast)
    packed = np.ascontiguousarray((bt.astype(np.int16) - zb.astype(np.int16)[None, :]))
    return QGemmParams(a_dtype, int(za[0]), packed, bias_arr, mult, y_dtype, int(zy[0]), lo, hi, k_dim)


def run_qgemm(params: QGemmParams, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a`` of shape ``(..., K)`` and the packed operands -> ``(..., N)`` quantized output."""
    check_array("a", a, dtypes=(params.a_dtype,))
    if a.ndim < 1 or a.shape[-1] != params.k:
        raise ValueError(f"a must have last dimension {params.k}, got shape {a.shape}")
    lead = a.shape[:-1]
    a2 = np.ascontiguousarray(a.reshape(-1, params.k))
    shape = lead + (params.n,)
    y = check_out("out", out, shape, params.y_dtype)
    if params.fast is not None:
        rows = a2.shape[0]
        igemm.run(params.fast, a2.reshape(rows, 1, 1, params.k), y.reshape(rows, 1, 1, params.n))
        return y
    _qgemm_kernel(a2, params.a_zp, params.packed_b, params.bias, params.multiplier, params.y_zp,
                  params.lo, params.hi, y.view(np.uint8).reshape(-1, params.n))
    return y


def bind_qgemm(params: QGemmParams, a: np.ndarray, out: np.ndarray):
    """Validate once and return a zero-argument callable equal to ``run_qgemm(params, a, out)`` on
    exactly these C-contiguous buffers, without the per-call checks."""
    check_array("a", a, dtypes=(params.a_dtype,))
    if a.ndim < 1 or a.shape[-1] != params.k:
        raise ValueError(f"a must have last dimension {params.k}, got shape {a.shape}")
    check_out("out", out, a.shape[:-1] + (params.n,), params.y_dtype)
    if params.fast is None or not (a.flags.c_contiguous and out.flags.c_contiguous):
        return lambda: run_qgemm(params, a, out)
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))
    x4, y4 = a.reshape(rows, 1, 1, params.k), out.reshape(rows, 1, 1, params.n)
    return igemm.bind(params.fast, igemm.plan(params.fast, x4.shape, y4.shape), x4, y4)


def qlinear_matmul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None, *, out_range=None):
    """One-shot QLinearMatMul (2-D constant-like ``b``), bit-exact with ``reference.qlinear_matmul``."""
    check_array("a", a)
    params = prepare_qgemm(a.dtype, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias, out_range=out_range)
    return run_qgemm(params, a)


def qgemm(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias=None, *, trans_b=False, out_range=None):
    """One-shot Gemm in QDQ form (``alpha = beta = 1``), bit-exact with ``reference.qgemm``."""
    check_array("a", a, ndim=2)
    params = prepare_qgemm(a.dtype, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp, bias,
                           trans_b=trans_b, out_range=out_range)
    return run_qgemm(params, a)

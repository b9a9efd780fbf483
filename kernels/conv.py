"""QLinearConv / Conv in QDQ form, 2-D, with groups, depthwise, strides, dilations, pads, zero
points, per-channel weight scales and a fused Relu/Clip clamp epilogue.

Math (see ``reference.qlinear_conv``): ``acc[n,oh,ow,m] = bias[m] + sum_{kh,kw,c} (x[n, ih, iw,
g*Cg + c] - z_x) * (w[m, c, kh, kw] - z_w[m])`` with ``ih = oh*s_h - pad_top + kh*d_h`` (taps
outside the input contribute 0: padding holds the real value 0), then the one float32
requantization ``clamp(rne(float32(acc) * m[m]), lo - z_y, hi - z_y) + z_y``.

Kernels, chosen once at packing time (``prepare_qconv``):

* **fast** (``igemm``, the ``microkernel`` tiles): non-depthwise convolutions with s8 weights of
  zero point 0 (what our quantizer and ORT's ``quantize_static`` produce) on a CPU with
  AVX512-VNNI (``vpdpbusd``) or AVX2 (``vpmaddubsw``, only when ``|w| <= 64``): im2col (or the
  NHWC rows directly for 1x1) times weights packed in 16-column panels, the activation zero
  point folded into the bias (``sum (x - z_x) w = sum x w - z_x colsum(w)``), exact int32
  accumulation, the requantization fused into the tile. ``params.isa`` says which; ``isa=``
  forces one. See ``igemm`` for the packing and the exactness argument.
* **generic** (every other case; the fallback on CPUs without AVX2): weights packed once as
  ``int16(w - z_w)``, each product formed in int32 and summed into an int32 accumulator (no
  saturating int16 pair sums), scalar loops that LLVM auto-vectorises. By shape class
  (``params.kind``): ``gemm`` (1x1, group 1, no padding, any stride: a strided view then the
  GEMM kernel), ``direct`` (weights ``(group, KH, KW, Cg, Mg)``) and ``depthwise``.
* **depthwise** (``group == C``, one output channel per input channel, at most
  ``DW_F32_MAX_TAPS`` taps): accumulated in float32, which is exact because every product
  ``(x - z_x)(w - z_w)`` is an integer of magnitude <= 255*255 and every partial sum of at most
  258 of them stays below 2**24; 16 channels per vector step (``microkernel.dw_*``), interior
  3x3/5x5 pixels with the accumulator in a register; the int32 bias is added after the exact
  conversion back to an integer. 3x3/5x5 with channels a multiple of 16 (MobileNet's depthwise
  layers), where ``_rows_pay_off``, take ``_conv_depthwise_rows_kernel`` instead:
  a task converts the input rows it reads once to float32 ``x - z_x`` in a zero-padded buffer
  and ``microkernel.dw_row*`` sweeps each output row with the weights held in registers.
  On AVX512-VNNI CPUs, 3x3 depthwise layers with uint8 activations, int8 weights of zero point 0
  and channels a multiple of 16 (MobileNet's, as ORT's ``quantize_static`` and our quantizer write
  them) use ``_conv_depthwise_vnni_kernel`` before either: input rows copied once per task into a
  zero-point-padded byte buffer, the nine taps of 16 channels interleaved into three 64-byte
  vectors and summed by three ``vpdpbusd`` (exact int32; the activation zero point folded into the
  bias as for the GEMM tiles). ``python benchmarks/bench_kernels.py --parts depthwise`` times the
  three side by side on MobileNetV2's shapes: measured 2026-11-28, the VNNI kernel was the fastest
  on all ten, 1.0-1.9x the better float kernel at 1 thread and 1.06-1.8x at 2 threads.
  Channel multipliers > 1 use the generic int32 kernel.

Shapes whose worst-case accumulator could overflow int32 are refused (``check_accumulator``).

Internal layout: **NHWC** activations (channels innermost). The wrappers take ``layout="NCHW"``
(ONNX's, transposed in and out) or ``"NHWC"`` (the runtime's, no copies). ``run_qconv``
validates an input shape once and caches the kernel arguments per shape in ``params.plans``.
All kernels parallelise with ``prange`` (output rows, or ``igemm`` tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import prange

from . import igemm
from . import microkernel as mk
from ._common import (
    check_array,
    check_ints,
    check_layout,
    check_out,
    check_out_range,
    check_scale,
    check_zero_point,
    from_nhwc,
    requant,
    to_nhwc,
)
from .config import jit_inline, jit_parallel
from .gemm import _qgemm_kernel, check_accumulator
from .reference import output_size, requant_multiplier


@jit_parallel
def _conv_direct_kernel(x, x_zp, wp, bias, mult, y_zp, lo, hi, sh, sw, pt, pl, dh, dw, out):
    n_b, h, w, _ = x.shape
    groups, kh_n, kw_n, cg, mg = wp.shape
    oh_n, ow_n = out.shape[1], out.shape[2]
    for r in prange(n_b * oh_n):
        n = r // oh_n
        oh = r % oh_n
        acc = np.empty(mg, np.int32)
        for ow in range(ow_n):
            for g in range(groups):
                for m in range(mg):
                    acc[m] = bias[g * mg + m]
                for kh in range(kh_n):
                    ih = oh * sh - pt + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    for kw in range(kw_n):
                        iw = ow * sw - pl + kw * dw
                        if iw < 0 or iw >= w:
                            continue
                        for c in range(cg):
                            xv = np.int32(x[n, ih, iw, g * cg + c]) - x_zp
                            if xv != 0:
                                for m in range(mg):
                                    acc[m] += xv * np.int32(wp[g, kh, kw, c, m])
                for m in range(mg):
                    out[n, oh, ow, g * mg + m] = requant(acc[m], mult[g * mg + m], y_zp, lo, hi) & 0xFF


@jit_parallel
def _conv_depthwise_kernel(x, x_zp, wp, bias, mult, y_zp, lo, hi, sh, sw, pt, pl, dh, dw, out):
    n_b, h, w, c_n = x.shape
    kh_n, kw_n, m_n = wp.shape
    mul = m_n // c_n
    oh_n, ow_n = out.shape[1], out.shape[2]
    for r in prange(n_b * oh_n):
        n = r // oh_n
        oh = r % oh_n
        acc = np.empty(m_n, np.int32)
        for ow in range(ow_n):
            for m in range(m_n):
                acc[m] = bias[m]
            for kh in range(kh_n):
                ih = oh * sh - pt + kh * dh
                if ih < 0 or ih >= h:
                    continue
                for kw in range(kw_n):
                    iw = ow * sw - pl + kw * dw
                    if iw < 0 or iw >= w:
                        continue
                    if mul == 1:
                        for c in range(c_n):
                            acc[c] += (np.int32(x[n, ih, iw, c]) - x_zp) * np.int32(wp[kh, kw, c])
                    else:
                        for c in range(c_n):
                            xv = np.int32(x[n, ih, iw, c]) - x_zp
                            for j in range(mul):
                                acc[c * mul + j] += xv * np.int32(wp[kh, kw, c * mul + j])
            for m in range(m_n):
                out[n, oh, ow, m] = requant(acc[m], mult[m], y_zp, lo, hi) & 0xFF


#: most taps for which the float32 depthwise accumulation is exact: T * 255 * 255 < 2**24
DW_F32_MAX_TAPS = 258


@jit_parallel
def _conv_depthwise_f32_kernel(x, x_zp, wf, bias, mult, y_zp, lo, hi, dims, geo, out):
    """Depthwise (one output channel per input channel), NHWC, flat arrays. Products of
    ``x - z_x`` and ``w - z_w`` (both integers of magnitude <= 255) and their sums over at most
    ``DW_F32_MAX_TAPS`` taps are integers below 2**24, hence exact in float32; the int32 bias is
    added after the exact conversion back to an integer. Channels in blocks of 16 with the
    ``microkernel.dw_fma16``/``requant16`` vector steps, the remainder in scalar code."""
    n_b, h, w, c_n, oh_n, ow_n = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    kh_n, kw_n, sh, sw, pt, pl, dh, dw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    zf = np.float32(x_zp)
    c16 = c_n - c_n % 16
    row = ow_n * c_n
    full = c16 == c_n and ((kh_n == 3 and kw_n == 3) or (kh_n == 5 and kw_n == 5))
    for r in prange(n_b * oh_n):
        n = r // oh_n
        oh = r % oh_n
        ih0 = oh * sh - pt
        if full and ih0 >= 0 and ih0 + (kh_n - 1) * dh < h:
            # interior row: pixels whose taps are all inside run with register accumulators
            ob = (n * oh_n + oh) * row
            for ow in range(ow_n):
                iw0 = ow * sw - pl
                if iw0 >= 0 and iw0 + (kw_n - 1) * dw < w:
                    xb = ((n * h + ih0) * w + iw0) * c_n
                    for cb in range(0, c_n, 16):
                        if kh_n == 3:
                            mk.dw3x3_16(x, xb + cb, w * c_n * dh, c_n * dw, wf, cb, c_n, zf, bias, mult, cb, y_zp,
                                        lo, hi, out, ob + ow * c_n + cb)
                        else:
                            mk.dw5x5_16(x, xb + cb, w * c_n * dh, c_n * dw, wf, cb, c_n, zf, bias, mult, cb, y_zp,
                                        lo, hi, out, ob + ow * c_n + cb)
                else:
                    acc = np.zeros(c_n, np.float32)
                    for kh in range(kh_n):
                        ih = ih0 + kh * dh
                        for kw in range(kw_n):
                            iw = iw0 + kw * dw
                            if iw < 0 or iw >= w:
                                continue
                            xb = ((n * h + ih) * w + iw) * c_n
                            wb = (kh * kw_n + kw) * c_n
                            for cb in range(0, c_n, 16):
                                mk.dw_fma16(acc, cb, x, xb + cb, wf, wb + cb, zf)
                    for cb in range(0, c_n, 16):
                        mk.requant16(acc, cb, bias, cb, mult, y_zp, lo, hi, out, ob + ow * c_n + cb)
            continue
        acc = np.zeros(row, np.float32)
        for kh in range(kh_n):
            ih = oh * sh - pt + kh * dh
            if ih < 0 or ih >= h:
                continue
            for kw in range(kw_n):
                # output columns whose tap (kh, kw) lies inside the input: 0 <= ow*sw - pl + kw*dw < w
                off = kw * dw - pl
                ow_lo = 0 if off >= 0 else (-off + sw - 1) // sw
                ow_hi = min(ow_n, (w - 1 - off) // sw + 1) if w - 1 - off >= 0 else 0
                wb = (kh * kw_n + kw) * c_n
                for ow in range(ow_lo, ow_hi):
                    xb = ((n * h + ih) * w + ow * sw + off) * c_n
                    ab = ow * c_n
                    for cb in range(0, c16, 16):
                        mk.dw_fma16(acc, ab + cb, x, xb + cb, wf, wb + cb, zf)
                    for c in range(c16, c_n):
                        acc[ab + c] += (np.float32(x[xb + c]) - zf) * wf[wb + c]
        ob = (n * oh_n + oh) * row
        for ow in range(ow_n):
            ab = ow * c_n
            for cb in range(0, c16, 16):
                mk.requant16(acc, ab + cb, bias, cb, mult, y_zp, lo, hi, out, ob + ab + cb)
            for c in range(c16, c_n):
                out[ob + ab + c] = requant(np.int64(acc[ab + c]) + bias[c], mult[c], y_zp, lo, hi) & 0xFF


@jit_inline
def _row_task(t, n_rt, rows_per_task, oh_n, sh, pt, span):
    """Task ``t`` of the row-buffered depthwise kernels: ``(image, first output row, end output
    row, first input row, input rows read)``; ``span = (KH - 1) * dh + 1`` input rows per output row."""
    oh0 = (t % n_rt) * rows_per_task
    oh1 = min(oh_n, oh0 + rows_per_task)
    return t // n_rt, oh0, oh1, oh0 * sh - pt, (oh1 - 1 - oh0) * sh + span


@jit_parallel
def _conv_depthwise_rows_kernel(x, x_zp, wf, bias, mult, y_zp, lo, hi, dims, geo, rows_per_task, out):
    """Depthwise 3x3 / 5x5, channels a multiple of 16, NHWC, flat arrays. A task (one image,
    ``rows_per_task`` output rows) converts every input row it reads once to float32 ``x - z_x``
    in a private zero-padded buffer (padding holds the real value 0, so no tap needs a bounds
    check), then ``microkernel.dw_row*`` sweeps each output row 16 channels at a time with the
    weights in registers. Exact in float32 for the reason given in ``_conv_depthwise_f32_kernel``."""
    n_b, h, w, c_n, oh_n, ow_n = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    kh_n, kw_n, sh, sw, pt, pl, dh, dw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    zf = np.float32(x_zp)
    wp = max(w + pl, (ow_n - 1) * sw + (kw_n - 1) * dw + 1)  # padded row width in pixels
    rl = wp * c_n
    wc = w * c_n
    n_rt = (oh_n + rows_per_task - 1) // rows_per_task
    for t in prange(n_b * n_rt):
        n, oh0, oh1, ih0, n_in = _row_task(t, n_rt, rows_per_task, oh_n, sh, pt, (kh_n - 1) * dh + 1)
        rows = np.empty(n_in * rl, np.float32)
        for r in range(n_in):
            ih = ih0 + r
            d = r * rl
            for i in range(pl * c_n):
                rows[d + i] = np.float32(0.0)
            for i in range(pl * c_n + wc, rl):
                rows[d + i] = np.float32(0.0)
            if ih < 0 or ih >= h:
                for i in range(pl * c_n, pl * c_n + wc):
                    rows[d + i] = np.float32(0.0)
            else:  # wc is a multiple of 16 (channels are)
                mk.to_f32_minus(rows, d + pl * c_n, x, (n * h + ih) * wc, wc // 16, zf)
        for oh in range(oh0, oh1):
            rb = (oh - oh0) * sh * rl
            ob = (n * oh_n + oh) * ow_n * c_n
            for cb in range(0, c_n, 16):
                if kh_n == 3:
                    mk.dw_row3x3_16(rows, rb + cb, dh * rl, dw * c_n, sw * c_n, ow_n, wf, cb, c_n, bias, mult, cb,
                                    y_zp, lo, hi, out, ob + cb, c_n)
                else:
                    mk.dw_row5x5_16(rows, rb + cb, dh * rl, dw * c_n, sw * c_n, ow_n, wf, cb, c_n, bias, mult, cb,
                                    y_zp, lo, hi, out, ob + cb, c_n)


@dataclass(frozen=True)
class QConvParams:
    """Everything constant about one quantized convolution, validated and packed once."""

    kind: str  # "gemm" | "depthwise" | "direct" (the shape class; ``fast`` set = VNNI/AVX2 kernel)
    x_dtype: np.dtype
    x_zp: int
    in_channels: int
    kernel_shape: tuple[int, int]
    packed_w: np.ndarray  # int16, layout depends on kind (see the module docstring); int8 ``fast.packed`` when fast
    bias: np.ndarray  # int32 (M,)
    multiplier: np.ndarray  # float32 (M,)
    y_dtype: np.dtype
    y_zp: int
    lo: int
    hi: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    group: int
    fast: igemm.IGemmPack | None = None  # packed operands of the VNNI/AVX2 kernel, when chosen
    dw_f32: np.ndarray | None = None  # depthwise: ``packed_w`` flat as float32 (exact integers)
    dw_vnni: tuple | None = None  # 3x3 depthwise on VNNI: (interleaved int8 weights, bias - z_x * sum(w))
    #: per input shape: (output shape, path, kernel arguments) -- filled by ``run_qconv``
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def isa(self) -> str:
        """The instruction set of the kernel chosen at packing time."""
        return mk.ISA_NAMES[self.fast.isa] if self.fast is not None else "generic"

    @property
    def out_channels(self) -> int:
        return self.bias.shape[0]

    def output_shape_nhwc(self, x_shape) -> tuple[int, int, int, int]:
        plan = self.plans.get(tuple(x_shape))
        if plan is not None:  # computed (and validated) before for this input shape
            return plan[0]
        n, h, w, _ = x_shape
        oh = output_size(h, self.kernel_shape[0], self.strides[0], self.pads[0], self.pads[2], self.dilations[0])
        ow = output_size(w, self.kernel_shape[1], self.strides[1], self.pads[1], self.pads[3], self.dilations[1])
        return n, oh, ow, self.out_channels


def prepare_qconv(
    x_dtype, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None, *,
    strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, out_range=None, isa: str | None = None,
) -> QConvParams:
    """Validate the constant operands of a QLinearConv and pack its weights for the kernel.

    ``isa``: None picks the fastest exact kernel for this CPU and these weights; "avx512vnni",
    "avx2" or "generic" forces one (ValueError if it cannot run here; depthwise convolutions
    always use their own kernel)."""
    x_dtype = np.dtype(x_dtype)
    if x_dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        raise TypeError(f"x must have dtype uint8 or int8, got {x_dtype}")
    if np.asarray(x_zp).dtype != x_dtype:
        raise TypeError(f"x_zero_point dtype {np.asarray(x_zp).dtype} differs from x's dtype {x_dtype}")
    zx = check_zero_point("x_zero_point", x_zp)
    w = check_array("w", w, ndim=4)
    m_n, cg, kh, kw = w.shape
    if min(w.shape) == 0:
        raise ValueError(f"w must be non-empty, got shape {w.shape}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"group must be a positive integer, got {group!r}")
    group = int(group)
    if m_n % group:
        raise ValueError(f"w: {m_n} output channels are not divisible by group={group}")
    strides = check_ints("strides", strides, 2, 1)
    dilations = check_ints("dilations", dilations, 2, 1)
    pads = check_ints("pads", pads, 4, 0)
    zw = check_zero_point("w_zero_point", w_zp, dtypes=(w.dtype,), size=m_n)
    sx = check_scale("x_scale", x_scale)
    sw = check_scale("w_scale", w_scale, size=m_n)
    sy = check_scale("y_scale", y_scale)
    zy = check_zero_point("y_zero_point", y_zp)
    y_dtype = np.asarray(y_zp).dtype
    lo, hi = check_out_range(out_range, y_dtype)
    if bias is None:
        bias_arr = np.zeros(m_n, np.int32)
    else:
        bias_arr = check_array("bias", bias, dtypes=(np.int32,), ndim=1)
        if bias_arr.shape != (m_n,):
            raise ValueError(f"bias must have shape ({m_n},), got {bias_arr.shape}")
        bias_arr = np.ascontiguousarray(bias_arr)
    check_accumulator("w", cg * kh * kw, bias_arr)
    c_n = cg * group
    mult = requant_multiplier(sx[0], sw, sy[0])
    depthwise = group == c_n and cg == 1
    code = mk.GENERIC if depthwise and isa is None else igemm.choose_isa(w, zw, isa)
    gemm_like = kh == kw == 1 and group == 1 and pads == (0, 0, 0, 0)
    if code != mk.GENERIC and not depthwise:
        fast = igemm.pack(code, w, bias_arr, mult, x_dtype, int(zx[0]), group, int(zy[0]), lo, hi)
        return QConvParams("gemm" if gemm_like else "direct", x_dtype, int(zx[0]), c_n, (kh, kw), fast.packed, bias_arr, mult, y_dtype,
                           int(zy[0]), lo, hi, strides, pads, dilations, group, fast)
    ws = w.astype(np.int16) - zw.astype(np.int16).reshape(-1, 1, 1, 1)  # (M, Cg, KH, KW)
    if gemm_like:
        kind, packed = "gemm", ws[:, :, 0, 0].T
    elif depthwise:
        kind, packed = "depthwise", ws[:, 0].transpose(1, 2, 0)  # (KH, KW, M)
    else:
        kind, packed = "direct", ws.reshape(group, m_n // group, cg, kh, kw).transpose(0, 3, 4, 2, 1)
    packed = np.ascontiguousarray(packed)
    dw_f32 = packed.reshape(-1).astype(np.float32) if kind == "depthwise" else None
    dw_vnni = None
    if (kind == "depthwise" and (kh, kw) == (3, 3) and c_n % 16 == 0 and x_dtype == np.uint8 and w.dtype == np.int8
            and not np.any(zw) and mk.VNNI in mk.supported_isas() and isa in (None, "avx512vnni")):
        dw_vnni = pack_depthwise_vnni(w, bias_arr, int(zx[0]))
    return QConvParams(kind, x_dtype, int(zx[0]), c_n, (kh, kw), packed, bias_arr, mult,
                       y_dtype, int(zy[0]), lo, hi, strides, pads, dilations, group, None, dw_f32, dw_vnni)


@jit_parallel
def _conv_depthwise_vnni_kernel(x, zx, wq, bias, mult, y_zp, lo, hi, dims, geo, rows_per_task, out):
    """Depthwise 3x3 on VNNI, uint8 NHWC input, channels a multiple of 16, flat arrays: a task
    copies the input rows it reads once into a private buffer padded with the zero point ``zx``
    (the real value 0), then ``microkernel.dw_row3x3_vnni16`` sweeps each output row: three
    ``vpdpbusd`` per pixel and 16 channels, exact in int32 (``bias`` holds ``bias - zx*sum(w)``)."""
    n_b, h, w, c_n, oh_n, ow_n = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    sh, sw, pt, pl, dh, dw = geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    wp = max(w + pl, (ow_n - 1) * sw + 2 * dw + 1)  # padded row width in pixels
    rl = wp * c_n
    wc = w * c_n
    n_rt = (oh_n + rows_per_task - 1) // rows_per_task
    for t in prange(n_b * n_rt):
        n, oh0, oh1, ih0, n_in = _row_task(t, n_rt, rows_per_task, oh_n, sh, pt, 2 * dh + 1)
        rows = np.empty(n_in * rl, np.uint8)
        for r in range(n_in):
            ih = ih0 + r
            d = r * rl
            if ih < 0 or ih >= h:
                mk.fill_bytes(rows, d, zx, rl)
            else:
                mk.fill_bytes(rows, d, zx, pl * c_n)
                mk.copy_bytes(rows, d + pl * c_n, x, (n * h + ih) * wc, wc)
                mk.fill_bytes(rows, d + pl * c_n + wc, zx, rl - pl * c_n - wc)
        for oh in range(oh0, oh1):
            rb = (oh - oh0) * sh * rl
            ob = (n * oh_n + oh) * ow_n * c_n
            for cb in range(0, c_n, 16):
                mk.dw_row3x3_vnni16(rows, rb + cb, dh * rl, dw * c_n, sw * c_n, ow_n, wq, cb * 12, bias, mult, cb,
                                    y_zp, lo, hi, out, ob + cb, c_n)


def pack_depthwise_vnni(w: np.ndarray, bias: np.ndarray, zx: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 3x3 depthwise weights ``(C, 1, 3, 3)`` (zero point 0, ``C % 16 == 0``) -> the interleaved
    layout of ``microkernel.dw_row3x3_vnni16`` (per 16 channels, three groups of 16 x 4 taps, taps
    9-11 zero) and ``bias - zx * sum(w)`` as int32 (exact modulo 2**32, like the accumulation)."""
    c_n = w.shape[0]
    w12 = np.zeros((c_n, 12), np.int8)
    w12[:, :9] = w.reshape(c_n, 9)
    packed = np.ascontiguousarray(w12.reshape(c_n // 16, 16, 3, 4).transpose(0, 2, 1, 3)).reshape(-1)
    b64 = bias.astype(np.int64) - int(zx) * w.reshape(c_n, 9).astype(np.int64).sum(axis=1)
    return packed, b64.astype(np.int32)


def _rows_pay_off(params: QConvParams, out_shape) -> bool:
    """Where the row-sweeping depthwise kernel is used instead of the per-pixel one: stride 1 with
    output maps of at least 14 rows, stride 2 with at least 28 (each converted input row serves
    fewer outputs there); 7x7 maps are too short to amortise a task's set-up. Chosen on timings
    of the kind ``benchmarks/bench_kernels.py --parts depthwise`` prints; its 2026-11-28 run: up to
    2.1x on 112x112 and 56x56 stride-1 maps, 0.9-1.3x at the chosen stride-2 and 14x14 shapes
    (about even), no better on 7x7 maps (0.74-1.02x), which therefore stay per pixel."""
    rows = out_shape[1]
    return (params.strides == (1, 1) and rows >= 14) or (params.strides == (2, 2) and rows >= 28)


def _rows_per_task(params: QConvParams, x_shape, out_shape, item_bytes: int) -> int:
    """Output rows per task of the row-buffered depthwise kernels: about 16 tasks for the threads,
    and a task's padded input rows (``item_bytes`` per element) within ~256 KB (L2)."""
    kh, kw = params.kernel_shape
    sh, sw = params.strides
    dh, dw = params.dilations
    width = max(x_shape[2] + params.pads[1], (out_shape[2] - 1) * sw + (kw - 1) * dw + 1)
    row_bytes = item_bytes * params.in_channels * width
    fit = max(1, ((256 << 10) // row_bytes - (kh - 1) * dh - 1) // sh + 1)
    return min(fit, max(1, -(-out_shape[1] * x_shape[0] // 16)))


#: the depthwise paths of ``_plan`` whose kernels take ``_depthwise_args``
DEPTHWISE_KERNELS = {"dw_f32": _conv_depthwise_f32_kernel, "dw_rows": _conv_depthwise_rows_kernel,
                     "dw_vnni": _conv_depthwise_vnni_kernel}


def _depthwise_args(params: QConvParams, path: str, extra: tuple, x: np.ndarray, out: np.ndarray) -> tuple:
    """``DEPTHWISE_KERNELS[path]``'s arguments on the C-contiguous NHWC ``x`` and ``out``; ``extra``:
    the plan's ``(dims, geo)``, plus rows per task for the row kernels."""
    weights = params.dw_vnni if path == "dw_vnni" else (params.dw_f32, params.bias)
    return (x.reshape(-1), params.x_zp, *weights, params.multiplier, params.y_zp, params.lo, params.hi, *extra,
            out.view(np.uint8).reshape(-1))


def _plan(params: QConvParams, x: np.ndarray) -> tuple:
    """Validate ``x``'s dtype and shape once per input shape and precompute the kernel arguments."""
    check_array("x", x, dtypes=(params.x_dtype,), ndim=4)
    if x.shape[3] != params.in_channels:
        raise ValueError(f"x must have {params.in_channels} channels (NHWC axis 3), got shape {x.shape}")
    shape = params.output_shape_nhwc(x.shape)
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"x of shape {x.shape} is too small for the kernel/padding (output {shape})")
    sh, sw = params.strides
    pt, pl = params.pads[0], params.pads[1]
    dh, dw = params.dilations
    if params.fast is not None:
        return shape, "fast", igemm.plan(params.fast, x.shape, shape, params.strides, params.pads, params.dilations)
    if params.kind == "depthwise" and params.packed_w.shape[2] == params.in_channels and \
            params.packed_w.shape[0] * params.packed_w.shape[1] <= DW_F32_MAX_TAPS:
        dims = np.array([x.shape[0], x.shape[1], x.shape[2], x.shape[3], shape[1], shape[2]], np.int64)
        geo = np.array([*params.kernel_shape, sh, sw, pt, pl, dh, dw], np.int64)
        if params.dw_vnni is not None:
            return shape, "dw_vnni", (dims, geo, _rows_per_task(params, x.shape, shape, 1))
        if params.kernel_shape in ((3, 3), (5, 5)) and params.in_channels % 16 == 0 and \
                _rows_pay_off(params, shape):
            return shape, "dw_rows", (dims, geo, _rows_per_task(params, x.shape, shape, 4))
        return shape, "dw_f32", (dims, geo)
    return shape, params.kind, None


def run_qconv(params: QConvParams, x: np.ndarray, out: np.ndarray | None = None, *,
              scratch: np.ndarray | None = None) -> np.ndarray:
    """Run a packed convolution on an NHWC activation; returns (or fills) the NHWC output.

    The input is validated (and the kernel arguments derived) once per input shape; later calls
    with that shape check only the dtype. ``scratch``: an optional buffer for the strided input of
    a strided 1x1 convolution on the generic path (shape ``x[:, ::s_h, ::s_w, :].shape``, x's
    dtype), so that repeated calls allocate nothing."""
    if not isinstance(x, np.ndarray) or x.dtype != params.x_dtype:
        check_array("x", x, dtypes=(params.x_dtype,), ndim=4)
    plan = params.plans.get(x.shape)
    if plan is None:
        plan = params.plans[x.shape] = _plan(params, x)
    shape, path, extra = plan
    if out is None or out.shape != shape or out.dtype != params.y_dtype or not out.flags.c_contiguous:
        y = check_out("out", out, shape, params.y_dtype)
    else:
        y = out
    x = np.ascontiguousarray(x)
    if path == "fast":
        igemm.execute(params.fast, extra, x, y)
        return y
    if path in DEPTHWISE_KERNELS:
        DEPTHWISE_KERNELS[path](*_depthwise_args(params, path, extra, x, y))
        return y
    sh, sw = params.strides
    pt, pl = params.pads[0], params.pads[1]
    dh, dw = params.dilations
    if path == "gemm":
        if (sh, sw) == (1, 1):
            xs = x
        elif scratch is not None:
            xs = check_out("scratch", scratch, x[:, ::sh, ::sw, :].shape, x.dtype)
            np.copyto(xs, x[:, ::sh, ::sw, :])
        else:
            xs = np.ascontiguousarray(x[:, ::sh, ::sw, :])
        _qgemm_kernel(xs.reshape(-1, params.in_channels), params.x_zp, params.packed_w, params.bias,
                      params.multiplier, params.y_zp, params.lo, params.hi,
                      y.view(np.uint8).reshape(-1, params.out_channels))
    elif path == "depthwise":
        _conv_depthwise_kernel(x, params.x_zp, params.packed_w, params.bias, params.multiplier, params.y_zp,
                               params.lo, params.hi, sh, sw, pt, pl, dh, dw, y.view(np.uint8))
    else:
        _conv_direct_kernel(x, params.x_zp, params.packed_w, params.bias, params.multiplier, params.y_zp,
                            params.lo, params.hi, sh, sw, pt, pl, dh, dw, y.view(np.uint8))
    return y


def bind_qconv(params: QConvParams, x: np.ndarray, out: np.ndarray, *, scratch: np.ndarray | None = None):
    """Validate once and return a zero-argument callable that runs this convolution from exactly
    these buffers (``x`` read, ``out`` written, both C-contiguous NHWC; see ``run_qconv`` for
    ``scratch``), equal to ``run_qconv(params, x, out, scratch=scratch)`` but without the per-call
    checks -- for callers that run the same shapes from the same buffers many times."""
    check_array("x", x, dtypes=(params.x_dtype,), ndim=4)
    plan = params.plans.get(x.shape)
    if plan is None:
        plan = params.plans[x.shape] = _plan(params, x)
    shape, path, extra = plan
    check_out("out", out, shape, params.y_dtype)
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("bind_qconv needs C-contiguous x and out")
    if path == "fast":
        return igemm.bind(params.fast, extra, x, out)
    if path in DEPTHWISE_KERNELS:
        kernel, call = DEPTHWISE_KERNELS[path], _depthwise_args(params, path, extra, x, out)
        return lambda: kernel(*call)
    return lambda: run_qconv(params, x, out, scratch=scratch)


def qlinear_conv(
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None, *,
    strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, out_range=None, layout="NCHW",
) -> np.ndarray:
    """One-shot QLinearConv, bit-exact with ``reference.qlinear_conv`` (which is NCHW)."""
    check_layout(layout)
    check_array("x", x, ndim=4)
    params = prepare_qconv(x.dtype, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias, strides=strides,
                           pads=pads, dilations=dilations, group=group, out_range=out_range)
    return from_nhwc(run_qconv(params, to_nhwc(x, layout)), layout)

"""Fast exact int8 convolution / GEMM on the ``microkernel`` tiles (VNNI or AVX2).

Math. For one group ``g`` of a convolution (a GEMM is a 1x1 convolution of a ``(rows, 1, 1, K)``
input), output pixel ``p`` and output channel ``m``:

    acc[p, m] = bias[m] + sum_k (A[p, k] - z_x) * W[k, m]
              = (bias[m] - z_x * colsum(W)[m]) + sum_k A[p, k] * W[k, m]

where ``A`` holds the im2col rows (``k = (kh*KW + kw)*Cg + c``, NHWC order; taps in the padding
hold ``z_x``, i.e. the real value 0, so they add nothing) and ``W`` the weights, s8 with zero
point 0. The first bracket, ``bias'``, is computed once at packing time (int64, then reduced
modulo 2**32); the micro-kernel starts its int32 accumulators at ``bias'`` and adds the u8 x s8
products with wrap-around. The true accumulator fits int32 (``gemm.check_accumulator``), so the
wrapped result is exact. Then the one float32 requantization of ``reference``.

int8 activations are flipped to uint8 once per call (``x ^ 0x80 = x + 128``, a vectorised NumPy
pass over the input) with ``z_x + 128`` as their zero point: ``(x + 128) - (z_x + 128) = x - z_x``.

Packing (once, ``pack_weights``): per group, output channels in panels of 16 (the last zero
padded), K padded to a multiple of 4 with zero weights: ``packed[g, p, kb, j, t] =
W_g[4*kb + t, 16*p + j]``, int8, shape ``(G, P, K4, 16, 4)``; ``bias'`` padded to ``(G, P*16)``.

Driver (``_igemm_kernel``, ``prange``): the work is cut into tasks ``(group, row block, panel
block)``; a task of up to ``rt_per * MR`` rows builds its slice of ``A`` in a private buffer
(im2col with ``microkernel.copy_bytes``/``fill_bytes``, one copy per kernel row when the KW taps
are adjacent in memory; skipped in the "direct" case -- 1x1 stride-1 unpadded convolutions and
GEMMs with ``K % 4 == 0``, whose NHWC rows already are ``A``), then for each group of up to
``NV`` panels sweeps its rows ``MR`` at a time; each tile requantizes straight into the NHWC
output. ``task_split`` sizes the blocks so that both threads get work even on 7x7 maps (columns
are split when rows are few) and cuts rows into blocks of nearly equal size. ``plan``/``execute`` split the per-shape set-up from the call.
Measured single-threaded here (Cascade Lake, AVX512-VNNI): the 6x64 tile reaches ~240 GMAC/s in
L1, ResNet-18's 3x3 convolutions 110-160 GMAC/s end to end including im2col.

Eligibility (``choose_isa``): s8 weights with all-zero zero points, a supported ISA, and for AVX2
``|w| <= 64`` (see ``microkernel``); otherwise the callers keep their generic exact kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from . import microkernel as mk
from .config import jit_inline, jit_parallel


def choose_isa(w: np.ndarray, w_zp: np.ndarray, isa: str | None = None) -> int:
    """The fastest exact path for weights ``w`` (zero points ``w_zp``) on this CPU.

    ``isa`` forces one ("avx512vnni", "avx2", "generic"); a forced path the CPU or the weights
    cannot run raises ValueError."""
    fit = w.dtype == np.int8 and not np.any(np.asarray(w_zp) != 0)
    small = fit and int(np.abs(w.astype(np.int16)).max(initial=0)) <= mk.AVX2_MAX_ABS_W
    ok = [i for i in mk.supported_isas() if i == mk.GENERIC or (fit and (i == mk.VNNI or small))]
    if isa is None:
        return ok[0]
    codes = {v: k for k, v in mk.ISA_NAMES.items()}
    if isa not in codes:
        raise ValueError(f"isa must be one of {sorted(codes)}, got {isa!r}")
    if codes[isa] not in ok:
        raise ValueError(f"isa {isa!r} is not available for these weights on this CPU")
    return codes[isa]


def pack_weights(wk: np.ndarray, bias: np.ndarray, zxu: int, mult: np.ndarray):
    """``wk`` int8 ``(G, K, Mg)``, ``bias`` int32 ``(G*Mg,)``, ``zxu`` the uint8-domain activation zero
    point, ``mult`` float32 ``(G*Mg,)`` -> ``(packed (G, P, K4, 16, 4) int8, bias' (G, P*16) int32,
    mult (G, P*16) float32)``."""
    g_n, k_n, m_n = wk.shape
    p_n, k4 = -(-m_n // 16), -(-k_n // 4)
    wpad = np.zeros((g_n, 4 * k4, 16 * p_n), np.int8)
    wpad[:, :k_n, :m_n] = wk
    packed = np.ascontiguousarray(wpad.reshape(g_n, k4, 4, p_n, 16).transpose(0, 3, 1, 4, 2))
    b64 = np.zeros((g_n, 16 * p_n), np.int64)
    b64[:, :m_n] = bias.astype(np.int64).reshape(g_n, m_n) - int(zxu) * wk.astype(np.int64).sum(axis=1)
    mp = np.ones((g_n, 16 * p_n), np.float32)
    mp[:, :m_n] = np.asarray(mult, np.float32).reshape(g_n, m_n)
    return packed, b64.astype(np.int32), mp  # astype wraps modulo 2**32


def task_split(rows: int, panels: int, groups: int, isa: int, want: int = 8) -> tuple[int, int]:
    """``(rt_per, pg_per)``: row tiles and panels per task, so that tasks are cache-sized (at most 96
    rows) and, when rows are few (7x7 maps), columns are split too until there are about ``want``
    tasks (enough for 2-4 threads; independent of the thread count, so plans can be reused)."""
    mr, nv = mk.MR[isa], mk.NV[isa]
    n_rt = -(-rows // mr)
    n_rb = -(-n_rt // max(1, 96 // mr))
    rt_per = -(-n_rt // n_rb)  # row blocks of (nearly) equal size: 196 rows -> 66+66+64, not 96+96+4
    n_rb = -(-n_rt // rt_per)
    pg_per = panels
    if groups * n_rb < want:
        n_pg = -(-panels // nv)
        cb = min(n_pg, -(-want // (groups * n_rb)))
        pg_per = nv * -(-n_pg // cb)
    return rt_per, pg_per


@jit_inline
def _tile(isa, nv, a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols):
    if isa == 2:
        if nv == 4:
            mk.tile_vnni_4(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)
        elif nv == 3:
            mk.tile_vnni_3(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)
        elif nv == 2:
            mk.tile_vnni_2(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)
        else:
            mk.tile_vnni_1(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)
    else:
        mk.tile_avx2_1(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)


@jit_parallel
def _igemm_kernel(x, dims, geo, zfill, direct, bp, biasp, multp, y_zp, lo, hi, isa, rt_per, pg_per, out):
    """x: flat uint8 NHWC input; dims = (N, H, W, C, OH, OW, G, Cg, Mg, P, K4);
    geo = (KH, KW, sh, sw, pt, pl, dh, dw); bp, biasp, multp: flat packed weights, bias', multipliers
    (panel padded); out: flat uint8 view of the (N*OH*OW, G*Mg) output."""
    n_b, h, w, c_n, oh_n, ow_n, g_n, cg, mg, p_n, k4 = (dims[0], dims[1], dims[2], dims[3], dims[4], dims[5],
                                                      dims[6], dims[7], dims[8], dims[9], dims[10])
    kh_n, kw_n, sh, sw, pt, pl, dh, dw = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    mr = 6 if isa == 2 else 4  # microkernel.MR / NV (dicts are not Numba constants)
    nvmax = 4 if isa == 2 else 1
    rows = n_b * oh_n * ow_n
    kp = 4 * k4
    k_n = kh_n * kw_n * cg
    rb_rows = rt_per * mr
    n_rb = (rows + rb_rows - 1) // rb_rows
    n_cb = (p_n + pg_per - 1) // pg_per
    n_tasks = g_n * n_rb * n_cb
    ohw = oh_n * ow_n
    ldo = g_n * mg
    contig = g_n == 1 and dw == 1
    kwcg = kw_n * cg
    row_step = dh * w * c_n
    for t in prange(n_tasks):
        g = t // (n_rb * n_cb)
        rem = t % (n_rb * n_cb)
        rb = rem // n_cb
        cb = rem % n_cb
        r0 = rb * rb_rows
        r1 = min(rows, r0 + rb_rows)
        if direct:
            a = x
            a_base = r0 * c_n
            lda = c_n
        else:
            a = np.empty((r1 - r0) * kp, np.uint8)
            a_base = 0
            lda = kp
            n = r0 // ohw
            oh = (r0 % ohw) // ow_n
            ow = r0 % ow_n - 1
            for rr in range(r0, r1):
                ow += 1  # (n, oh, ow) of row rr, stepped without divisions
                if ow == ow_n:
                    ow = 0
                    oh += 1
                    if oh == oh_n:
                        oh = 0
                        n += 1
                base = (rr - r0) * kp
                ih0 = oh * sh - pt
                iw0 = ow * sw - pl
                if contig and ih0 >= 0 and ih0 + (kh_n - 1) * dh < h and iw0 >= 0 and iw0 + kw_n <= w:
                    # the whole window inside: one copy per kernel row, no per-row checks
                    src = ((n * h + ih0) * w + iw0) * c_n
                    for kh in range(kh_n):
                        mk.copy_bytes(a, base + kh * kwcg, x, src + kh * row_step, kwcg)
                    if kp > k_n:
                        mk.fill_bytes(a, base + k_n, 0, kp - k_n)
                    continue
                for kh in range(kh_n):
                    ih = ih0 + kh * dh
                    dst = base + kh * kw_n * cg
                    if ih < 0 or ih >= h:
                        mk.fill_bytes(a, dst, zfill, kw_n * cg)
                    elif contig and iw0 >= 0 and iw0 + kw_n <= w:  # the KW taps are adjacent in x
                        mk.copy_bytes(a, dst, x, ((n * h + ih) * w + iw0) * c_n, kw_n * cg)
                    else:
                        for kw in range(kw_n):
                            iw = iw0 + kw * dw
                            if iw < 0 or iw >= w:
                                mk.fill_bytes(a, dst + kw * cg, zfill, cg)
                            else:
                                mk.copy_bytes(a, dst + kw * cg, x, ((n * h + ih) * w + iw) * c_n + g * cg, cg)
                if kp > k_n:
                    mk.fill_bytes(a, base + k_n, 0, kp - k_n)
        p0 = cb * pg_per
        p1 = min(p_n, p0 + pg_per)
        for pp in range(p0, p1, nvmax):
            nv = min(nvmax, p1 - pp)
            col0 = pp * 16
            ncols = min(16 * nv, mg - col0)
            for i in range(r0, r1, mr):
                _tile(isa, nv, a, a_base + (i - r0) * lda, lda, min(mr, r1 - i), bp, (g * p_n + pp) * k4 * 64, k4,
                      biasp, multp, g * p_n * 16 + col0, y_zp, lo, hi, out, i * ldo + g * mg + col0, ldo, ncols)


@dataclass(frozen=True)
class IGemmPack:
    """Packed operands of one convolution / GEMM for ``_igemm_kernel`` (see the module docstring)."""

    isa: int  # microkernel.VNNI or microkernel.AVX2
    packed: np.ndarray  # int8 (G, P, K4, 16, 4)
    bias: np.ndarray  # int32 (G, P*16): bias - z_x' * colsum(W), wrapped
    mult: np.ndarray  # float32 (G, P*16), padded with 1
    flip: int  # 0x80 for int8 activations (flipped to uint8 on the way in), else 0
    zfill: int  # the activation zero point in the uint8 domain (padding value)
    kernel_shape: tuple[int, int]
    cg: int  # input channels per group
    mg: int  # output channels per group
    y_zp: int
    lo: int
    hi: int

    @property
    def groups(self) -> int:
        return self.packed.shape[0]


def pack(isa: int, w: np.ndarray, bias: np.ndarray, mult: np.ndarray, x_dtype, x_zp: int, group: int,
         y_zp: int, lo: int, hi: int) -> IGemmPack:
    """Pack int8 conv weights ``w`` ``(M, Cg, KH, KW)`` (zero point 0) for ``isa``."""
    m_n, cg, kh, kw = w.shape
    mg = m_n // group
    wk = w.reshape(group, mg, cg, kh, kw).transpose(0, 3, 4, 2, 1).reshape(group, kh * kw * cg, mg)
    flip = 0x80 if np.dtype(x_dtype) == np.int8 else 0
    zfill = (int(x_zp) & 0xFF) ^ flip
    packed, bias_p, mult_p = pack_weights(wk, bias, zfill, mult)
    return IGemmPack(isa, packed, bias_p, mult_p, flip, zfill, (kh, kw), cg, mg, int(y_zp), int(lo), int(hi))


def plan(p: IGemmPack, x_shape, out_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> tuple:
    """The kernel arguments that depend on the input shape (computed once per shape)."""
    n, h, w, c = x_shape
    _, oh, ow, _ = out_shape
    kh, kw = p.kernel_shape
    direct = (kh == kw == 1 and tuple(strides) == (1, 1) and not any(pads) and p.groups == 1 and c % 4 == 0)
    g, pn, k4 = p.packed.shape[:3]
    dims = np.array([n, h, w, c, oh, ow, g, p.cg, p.mg, pn, k4], np.int64)
    geo = np.array([kh, kw, strides[0], strides[1], pads[0], pads[1], dilations[0], dilations[1]], np.int64)
    rt_per, pg_per = task_split(n * oh * ow, pn, g, p.isa)
    return dims, geo, direct, rt_per, pg_per, n * oh * ow == 0


def _kernel_args(p: IGemmPack, args: tuple, xu: np.ndarray, out: np.ndarray) -> tuple:
    """``_igemm_kernel``'s arguments for a ``plan`` on the uint8 input ``xu`` (already flipped)."""
    dims, geo, direct, rt_per, pg_per, _ = args
    return (xu.reshape(-1), dims, geo, p.zfill, direct, p.packed.reshape(-1), p.bias.reshape(-1), p.mult.reshape(-1),
            p.y_zp, p.lo, p.hi, p.isa, rt_per, pg_per, out.view(np.uint8).reshape(-1))


def execute(p: IGemmPack, args: tuple, x: np.ndarray, out: np.ndarray) -> None:
    """Run ``_igemm_kernel`` with a ``plan`` on the C-contiguous NHWC ``x`` into the C-contiguous ``out``."""
    if args[-1]:  # empty
        return
    xu = x.view(np.uint8)
    if p.flip:
        xu = np.bitwise_xor(xu, np.uint8(p.flip))
    _igemm_kernel(*_kernel_args(p, args, xu, out))


def bind(p: IGemmPack, args: tuple, x: np.ndarray, out: np.ndarray):
    """A zero-argument callable running ``execute(p, args, x, out)`` on exactly these C-contiguous
    buffers, with every array argument flattened once (for callers that run the same shapes from
    the same buffers many times)."""
    if args[-1]:  # empty
        return lambda: None
    if p.flip:  # int8 activations are flipped into a private buffer on every call
        return lambda: execute(p, args, x, out)
    call = _kernel_args(p, args, x.view(np.uint8), out)
    kernel = _igemm_kernel
    return lambda: kernel(*call)


def run(p: IGemmPack, x: np.ndarray, out: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> None:
    """Convolve the NHWC ``x`` (uint8/int8, C-contiguous) into the NHWC ``out`` (uint8/int8,
    C-contiguous, shape already checked by the caller) with ``p``'s requantization."""
    execute(p, plan(p, x.shape, out.shape, strides, pads, dilations), x, out)

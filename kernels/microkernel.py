"""Register-blocked int8 GEMM micro-kernels written in LLVM IR (``numba.extending.intrinsic``).

Plain Numba loops compile integer dot products to ``vpmulld`` (int32 products, ~14 GMAC/s per
run here); the instructions that make int8 fast -- ``vpdpbusd`` (AVX512-VNNI) and
``vpmaddubsw`` + ``vpmaddwd`` (AVX2) -- are never selected by the auto-vectoriser. The
intrinsics below emit them directly, from the LLVM intrinsics ``llvm.x86.avx512.vpdpbusd.512``,
``llvm.x86.avx2.pmadd.ub.sw`` and ``llvm.x86.avx2.pmadd.wd``, inside a K loop whose
accumulators are SSA values (phi nodes), so they live in vector registers for the whole loop.

Tile intrinsics ``tile_<isa>_<nv>(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi,
out, o_off, ldo, ncols)`` (offsets in elements of their array, arrays 1-D C-contiguous views)
    ``a``     uint8 rows of the left operand (activations / im2col rows), row ``r`` of the tile at
              ``a_off + r * lda``, ``4 * k4`` bytes read per row (the caller pads K to a multiple
              of 4; padding bytes may hold anything, their weights are 0). Rows at or past
              ``rows`` re-read the last valid row and are not stored.
    ``b``     int8 packed weights, one *panel* of 16 output columns at a time, layout
              ``[k4][16][4]``: byte ``64*kb + 4*j + t`` holds ``w[4*kb + t, 16*p + j]``; panel ``v``
              of the tile starts at ``b_off + v * 64 * k4``.
    ``bias``  int32 and ``mult`` float32, panel-padded, the tile's first column at ``n_off``.
    ``out``   bytes; row ``r``, column ``j`` of the tile at ``o_off + r * ldo + j``; only the
              first ``ncols`` columns are stored (a partial 16-byte vector goes through the stack).

Computed (``MR`` rows x ``16*nv`` columns; accumulators are loop-carried SSA values, i.e.
registers: 6 x 4 zmm for VNNI, 4 x 2 ymm for AVX2):
``acc[r, j] = bias[j] + sum_k a[r, k] * b[k, j]`` in int32 with two's-complement wrap-around,
then the one requantization of ``reference.requantize_acc``:
``out[r, j] = clamp(rne(float32(acc) * mult[j]), lo - zp, hi - zp) + zp`` (``sitofp`` and
``fmul`` round to nearest even, ``llvm.rint`` rounds half to even in the default MXCSR mode,
no NaN can arise), stored as two's-complement bytes.

Also here: ``copy_bytes``/``fill_bytes`` (``llvm.memcpy``/``memset``: Numba byte loops keep a
negative-index fix-up per element and do not vectorise), and generic 16-lane vector steps (no x86
intrinsics, legal on any target) for the depthwise convolution (``dw_fma16``, ``requant16``,
``dw3x3_16``/``dw5x5_16`` per pixel; ``to_f32_minus`` and ``dw_row3x3_16``/``dw_row5x5_16``, which
sweep a whole output row from float rows with the weights held in registers), the element-wise
QDQ Add/Mul (``qdq_binary16``) and the RGB interleave of the input quantization
(``interleave3_16``). ``dw_row3x3_vnni16`` is the VNNI depthwise step: for each pixel the nine
16-byte tap vectors are interleaved into three 64-byte vectors (byte ``4c + j`` = tap ``j`` of
channel ``c``) so that ``vpdpbusd``'s four-way dot product runs over taps, exact like the tiles.

Exactness
    * ``vpdpbusd`` (VNNI): four u8 x s8 products summed into an int32 lane, *not* saturating
      (unlike ``vpdpbusds``): the result is the exact sum modulo 2**32.
    * ``vpmaddubsw`` (AVX2) sums two u8 x s8 products into a *saturating* int16: exact only
      while ``|a0*b0 + a1*b1| <= 32767``; with ``a <= 255`` that holds for ``|b| <= 64``
      (``2*255*64 = 32640``), which the packer checks before choosing this path. ``vpmaddwd``
      with ones then adds pairs of int16 into int32 exactly.
    (On VNNI hosts LLVM fuses ``vpmaddwd`` + ``vpaddd`` into ``vpdpwssd``, also non-saturating.)
    The caller folds the activation zero point into ``bias`` and guarantees (``check_accumulator``)
    that the true accumulator fits int32, so the wrapped int32 sum equals it.

Dispatch: ``host_isa()`` reads the compile target's CPU features (``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES`` when set, else llvmlite's host features). The kernels take the ISA as a
run-time argument chosen once when weights are packed; an intrinsic whose instructions the
target lacks compiles to nothing (it is never selected there), so one compiled driver serves
every path and Numba's disk cache -- keyed on the CPU name and features -- stays valid.
Numba caches functions that call these intrinsics like any other (``cache=True`` works).
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: ISA codes passed to the kernels
GENERIC, AVX2, VNNI = 0, 1, 2
ISA_NAMES = {GENERIC: "generic", AVX2: "avx2", VNNI: "avx512vnni"}
#: tile geometry per ISA: rows per tile (MR) and the most 16-column panels per tile (NV)
MR = {VNNI: 6, AVX2: 4}
NV = {VNNI: 4, AVX2: 1}
#: ``c`` tile row stride (int32 elements) -- the widest tile, 4 panels
TILE_LD = 64
#: |weight| bound for the saturating vpmaddubsw path
AVX2_MAX_ABS_W = 64

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


@cache
def host_features() -> frozenset:
    """The compile target's CPU features (names without the '+')."""
    from numba.core import config

    if config.CPU_FEATURES:
        feats = config.CPU_FEATURES.split(",")
        return frozenset(f[1:] for f in feats if f.startswith("+"))
    if config.CPU_NAME and config.CPU_NAME != "host":
        return frozenset()  # an explicit non-host target: assume nothing
    import llvmlite.binding as llvm

    fmap = llvm.get_host_cpu_features()
    return frozenset(k for k, v in fmap.items() if v)


def supported_isas() -> tuple[int, ...]:
    """ISAs the compile target can run, best first (GENERIC always)."""
    feats = host_features()
    out = []
    if {"avx512f", "avx512bw", "avx512vnni"} <= feats:
        out.append(VNNI)
    if "avx2" in feats:
        out.append(AVX2)
    out.append(GENERIC)
    return tuple(out)


def _vec(bits, n):
    return ir.VectorType(ir.IntType(bits), n)


def _intrinsic_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _splat_i32(builder, val, lanes):
    vt = _vec(32, lanes)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(vt, [0] * lanes))


def _rounding(builder, lo, hi, zp, lanes: int = 16) -> tuple:
    """The splatted constants of ``_round_bytes`` for the clamp range ``[lo, hi]`` and output zero
    point ``zp`` (int64 values): ``(lo - zp, hi - zp)`` as float32, ``zp`` as int32, ``llvm.rint``."""
    ft = ir.VectorType(ir.FloatType(), lanes)
    return (_splat(builder, builder.sitofp(builder.sub(lo, zp), ir.FloatType()), ft),
            _splat(builder, builder.sitofp(builder.sub(hi, zp), ir.FloatType()), ft),
            _splat(builder, builder.trunc(zp, _I32), _vec(32, lanes)),
            _intrinsic_fn(builder, f"llvm.rint.v{lanes}f32", ft, [ft]))


def _round_bytes(builder, v, rounding):
    """The tail of the one requantization (``reference.requantize_acc``), on a float32 vector ``v``:
    ``clamp(rne(v), lo - zp, hi - zp) + zp`` as two's-complement bytes. Clamping before rounding
    equals rounding before clamping (the bounds are integers); ``llvm.rint`` rounds half to even in
    the default MXCSR mode; no NaN can arise (finite operands)."""
    lo_v, hi_v, zp_v, rint = rounding
    v = builder.select(builder.fcmp_ordered("<", v, lo_v), lo_v, v)
    v = builder.select(builder.fcmp_ordered(">", v, hi_v), hi_v, v)
    q = builder.add(builder.fptosi(builder.call(rint, [v]), zp_v.type), zp_v)
    return builder.trunc(q, _vec(8, zp_v.type.count))


def _epilogue(builder, accs, mr, nvec, lanes, rows, mult_ptr, n_off, zp, lo, hi, out_ptr, o_off, ldo, ncols):
    """Requantize the accumulators and store the bytes: ``y = clamp(rne(float32(acc) * m), lo - zp,
    hi - zp) + zp`` (``reference.requantize_acc``) -- int32 -> float32 conversion and the multiply
    round to nearest even, ``llvm.rint`` rounds half to even in the default MXCSR mode; no NaN can
    arise (finite operands). Rows ``>= rows`` and columns ``>= ncols`` are not stored."""
    ft = ir.VectorType(ir.FloatType(), lanes)
    bt = _vec(8, lanes)
    rounding = _rounding(builder, lo, hi, zp, lanes)
    tmp = cgutils.alloca_once(builder, ir.ArrayType(_I8, lanes))
    tmp = builder.bitcast(tmp, _I8.as_pointer())
    ys = []
    for i in range(nvec):
        off = builder.mul(builder.add(n_off, ir.Constant(_I64, lanes * i)), ir.Constant(_I64, 4))
        m = builder.load(builder.bitcast(builder.gep(mult_ptr, [off]), ft.as_pointer()), align=4)
        for r in range(mr):
            v = builder.fmul(builder.sitofp(accs[r * nvec + i], ft), m)
            ys.append((r, i, _round_bytes(builder, v, rounding)))
    for r, i, y in ys:
        with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, r), rows)):
            col = lanes * i
            base = builder.add(o_off, builder.add(builder.mul(ir.Constant(_I64, r), ldo), ir.Constant(_I64, col)))
            ptr = builder.gep(out_ptr, [base])
            full = builder.icmp_signed("<=", ir.Constant(_I64, col + lanes), ncols)
            with builder.if_else(full, likely=True) as (then, otherwise):
                with then:
                    builder.store(y, builder.bitcast(ptr, bt.as_pointer()), align=1)
                with otherwise:  # a partial vector: bounce through the stack, copy the valid bytes
                    rem = builder.sub(ncols, ir.Constant(_I64, col))
                    with builder.if_then(builder.icmp_signed(">", rem, ir.Constant(_I64, 0))):
                        builder.store(y, builder.bitcast(tmp, bt.as_pointer()), align=1)
                        cgutils.raw_memcpy(builder, ptr, tmp, rem, 1)


def _splat(builder, val, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(32, vt.count), [0] * vt.count))


def _make_tile(isa: int, mr: int, nv: int):
    """An intrinsic computing one ``mr x 16*nv`` tile (see the module docstring)."""
    lanes = 16 if isa == VNNI else 8
    halves = 16 // lanes  # vectors per 16-column panel
    vt = _vec(32, lanes)

    @intrinsic
    def tile(typingctx, a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols):
        sig = types.void(a, a_off, lda, rows, b, b_off, k4, bias, mult, n_off, zp, lo, hi, out, o_off, ldo, ncols)

        def codegen(context, builder, signature, args):
            if isa not in supported_isas():  # never selected on this target: emit nothing
                return context.get_dummy_value()
            i8p = _I8.as_pointer()

            def data(idx):
                ary = context.make_array(signature.args[idx])(context, builder, args[idx])
                return builder.bitcast(ary.data, i8p)

            def as_i64(idx):
                return context.cast(builder, args[idx], signature.args[idx], types.int64)

            a_ptr, b_ptr, bias_ptr, mult_ptr, out_ptr = data(0), data(4), data(7), data(8), data(13)
            a_off, lda, rows, b_off, k4, n_off, zp, lo, hi, o_off, ldo, ncols = (
                as_i64(i) for i in (1, 2, 3, 5, 6, 9, 10, 11, 12, 14, 15, 16))
            # row pointers, clamped to the last valid row
            last = builder.sub(rows, ir.Constant(_I64, 1))
            rptr = []
            for r in range(mr):
                rc = ir.Constant(_I64, r)
                rr = builder.select(builder.icmp_signed("<", rc, rows), rc, last)
                rptr.append(builder.gep(a_ptr, [builder.add(a_off, builder.mul(rr, lda))]))
            pstride = builder.mul(k4, ir.Constant(_I64, 64))
            pptr = [builder.gep(b_ptr, [builder.add(b_off, builder.mul(ir.Constant(_I64, v), pstride))])
                    for v in range(nv)]
            init = []
            for v in range(nv):
                for h in range(halves):
                    off = builder.mul(builder.add(n_off, ir.Constant(_I64, 16 * v + lanes * h)), ir.Constant(_I64, 4))
                    init.append(builder.load(builder.bitcast(builder.gep(bias_ptr, [off]), vt.as_pointer()), align=4))
            pre = builder.basic_block
            loop = builder.append_basic_block("mk.loop")
            done = builder.append_basic_block("mk.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            kb = builder.phi(_I64)
            kb.add_incoming(ir.Constant(_I64, 0), pre)
            accs = []
            for r in range(mr):
                for i in range(nv * halves):
                    p = builder.phi(vt)
                    p.add_incoming(init[i], pre)
                    accs.append(p)
            boff = builder.mul(kb, ir.Constant(_I64, 64))
            aoff = builder.mul(kb, ir.Constant(_I64, 4))
            bvec = []
            for v in range(nv):
                for h in range(halves):
                    ptr = builder.gep(pptr[v], [builder.add(boff, ir.Constant(_I64, 4 * lanes * h))])
                    bvec.append(builder.load(builder.bitcast(ptr, vt.as_pointer()), align=1))
            new = []
            if isa == VNNI:
                fn = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", vt, [vt, vt, vt])
            else:
                v8 = _vec(8, 32)
                v16 = _vec(16, 16)
                fn_ub = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [v8, v8])
                fn_wd = _intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", vt, [v16, v16])
                ones = ir.Constant(v16, [1] * 16)
            for r in range(mr):
                aval = builder.load(builder.bitcast(builder.gep(rptr[r], [aoff]), _I32.as_pointer()), align=1)
                abc = _splat_i32(builder, aval, lanes)
                for i in range(nv * halves):
                    acc = accs[r * nv * halves + i]
                    if isa == VNNI:
                        new.append(builder.call(fn, [acc, abc, bvec[i]]))
                    else:
                        s16 = builder.call(fn_ub, [builder.bitcast(abc, v8), builder.bitcast(bvec[i], v8)])
                        new.append(builder.add(acc, builder.call(fn_wd, [s16, ones])))
            kb_next = builder.add(kb, ir.Constant(_I64, 1))
            end = builder.basic_block
            kb.add_incoming(kb_next, end)
            for p, n in zip(accs, new):
                p.add_incoming(n, end)
            builder.cbranch(builder.icmp_signed("<", kb_next, k4), loop, done)
            builder.position_at_end(done)
            _epilogue(builder, new, mr, nv * halves, lanes, rows, mult_ptr, n_off, zp, lo, hi, out_ptr, o_off,
                      ldo, ncols)
            return context.get_dummy_value()

        return sig, codegen

    tile.__name__ = f"tile_{ISA_NAMES[isa]}_{mr}x{nv}"
    return tile


tile_vnni_1 = _make_tile(VNNI, MR[VNNI], 1)
tile_vnni_2 = _make_tile(VNNI, MR[VNNI], 2)
tile_vnni_3 = _make_tile(VNNI, MR[VNNI], 3)
tile_vnni_4 = _make_tile(VNNI, MR[VNNI], 4)
tile_avx2_1 = _make_tile(AVX2, MR[AVX2], 1)


def _small_copy(builder, dp, sp, cnt):
    """Copy ``cnt <= 32`` bytes from ``sp`` to ``dp`` (non-overlapping ranges) without a call."""
    def two(width):
        vt = ir.IntType(8 * width) if width <= 8 else _vec(8, width)
        tail = builder.sub(cnt, ir.Constant(_I64, width))
        s0 = builder.load(builder.bitcast(sp, vt.as_pointer()), align=1)
        s1 = builder.load(builder.bitcast(builder.gep(sp, [tail]), vt.as_pointer()), align=1)
        builder.store(s0, builder.bitcast(dp, vt.as_pointer()), align=1)
        builder.store(s1, builder.bitcast(builder.gep(dp, [tail]), vt.as_pointer()), align=1)

    ge16 = builder.icmp_signed(">=", cnt, ir.Constant(_I64, 16))
    with builder.if_else(ge16) as (then16, else16):
        with then16:
            two(16)
        with else16:
            ge8 = builder.icmp_signed(">=", cnt, ir.Constant(_I64, 8))
            with builder.if_else(ge8) as (then8, else8):
                with then8:
                    two(8)
                with else8:
                    ge4 = builder.icmp_signed(">=", cnt, ir.Constant(_I64, 4))
                    with builder.if_else(ge4) as (then4, else4):
                        with then4:
                            two(4)
                        with else4:
                            for k in range(3):
                                with builder.if_then(builder.icmp_signed(">", cnt, ir.Constant(_I64, k))):
                                    kk = ir.Constant(_I64, k)
                                    builder.store(builder.load(builder.gep(sp, [kk])), builder.gep(dp, [kk]))


def _small_fill(builder, dp, val, cnt):
    """Store ``cnt <= 32`` copies of the byte ``val`` at ``dp`` without a call."""
    def two(width):
        vt = _vec(8, width)
        v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_I32, 0))
        v = builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(32, width), [0] * width))
        tail = builder.sub(cnt, ir.Constant(_I64, width))
        builder.store(v, builder.bitcast(dp, vt.as_pointer()), align=1)
        builder.store(v, builder.bitcast(builder.gep(dp, [tail]), vt.as_pointer()), align=1)

    with builder.if_else(builder.icmp_signed(">=", cnt, ir.Constant(_I64, 16))) as (then16, else16):
        with then16:
            two(16)
        with else16:
            with builder.if_else(builder.icmp_signed(">=", cnt, ir.Constant(_I64, 4))) as (then4, else4):
                with then4:
                    two(4)
                    with builder.if_then(builder.icmp_signed(">", cnt, ir.Constant(_I64, 8))):
                        for k in range(4, 12, 4):  # 9..15 bytes: cover the middle too
                            vt = _vec(8, 4)
                            v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_I32, 0))
                            v = builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(32, 4), [0] * 4))
                            builder.store(v, builder.bitcast(builder.gep(dp, [ir.Constant(_I64, k)]), vt.as_pointer()),
                                          align=1)
                with else4:
                    for k in range(3):
                        with builder.if_then(builder.icmp_signed(">", cnt, ir.Constant(_I64, k))):
                            builder.store(val, builder.gep(dp, [ir.Constant(_I64, k)]))


@intrinsic
def copy_bytes(typingctx, dst, dst_off, src, src_off, n):
    """``dst[dst_off : dst_off + n] = src[src_off : src_off + n]`` (byte offsets, ``llvm.memcpy``; the
    ranges must not overlap). Plain Numba byte loops keep a negative-index check per element and do
    not vectorise; this is one call."""
    sig = types.void(dst, dst_off, src, src_off, n)

    def codegen(context, builder, signature, args):
        i8p = _I8.as_pointer()
        d = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, i8p)
        s = builder.bitcast(context.make_array(signature.args[2])(context, builder, args[2]).data, i8p)
        do, so, cnt = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 3, 4))
        dp, sp = builder.gep(d, [do]), builder.gep(s, [so])
        # small copies (im2col of few-channel inputs) inline: two overlapping loads/stores of the
        # largest width w <= n (w in 16, 8, 4), each loaded before either store; n < 4 byte by byte
        big = builder.icmp_signed(">", cnt, ir.Constant(_I64, 32))
        with builder.if_else(big) as (then, otherwise):
            with then:
                cgutils.raw_memcpy(builder, dp, sp, cnt, 1)
            with otherwise:
                _small_copy(builder, dp, sp, cnt)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fill_bytes(typingctx, dst, dst_off, value, n):
    """``dst[dst_off : dst_off + n] = value & 0xFF`` (byte offsets, ``llvm.memset``)."""
    sig = types.void(dst, dst_off, value, n)

    def codegen(context, builder, signature, args):
        i8p = _I8.as_pointer()
        d = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, i8p)
        do, cnt = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 3))
        val = builder.trunc(context.cast(builder, args[2], signature.args[2], types.int64), _I8)
        dp = builder.gep(d, [do])
        with builder.if_else(builder.icmp_signed(">", cnt, ir.Constant(_I64, 32))) as (then, otherwise):
            with then:
                cgutils.memset(builder, dp, cnt, val)
            with otherwise:  # small fills inline: two overlapping stores of the widest fitting splat
                _small_fill(builder, dp, val, cnt)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------- 16-channel depthwise steps
# Generic LLVM vector IR (no x86 intrinsics): legal on every target, LLVM legalises <16 x float>
# into whatever registers the CPU has.
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, 16)
_VI = _vec(32, 16)
_VB = _vec(8, 16)


def _elem_ptr(context, builder, ty, val, idx, vt):
    ary = context.make_array(ty)(context, builder, val)
    return builder.bitcast(builder.gep(ary.data, [idx]), vt.as_pointer())


@intrinsic
def dw_fma16(typingctx, acc, acc_off, x, x_off, w, w_off, zf):
    """``acc[o:o+16] += (float32(x[xo:xo+16]) - zf) * w[wo:wo+16]`` (float32 ``acc``/``w``, uint8 or
    int8 ``x``; element offsets). Exact while every partial sum is an integer below 2**24."""
    sig = types.void(acc, acc_off, x, x_off, w, w_off, zf)
    signed = x.dtype == types.int8

    def codegen(context, builder, signature, args):
        a_t, _, x_t, _, w_t, _, _ = signature.args
        ao, xo, wo = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 3, 5))
        pa = _elem_ptr(context, builder, a_t, args[0], ao, _VF)
        px = _elem_ptr(context, builder, x_t, args[2], xo, _VB)
        pw = _elem_ptr(context, builder, w_t, args[4], wo, _VF)
        xv = builder.load(px, align=1)
        xi = builder.sext(xv, _VI) if signed else builder.zext(xv, _VI)
        zf_v = _splat(builder, context.cast(builder, args[6], signature.args[6], types.float32), _VF)
        prod = builder.fmul(builder.fsub(builder.sitofp(xi, _VF), zf_v), builder.load(pw, align=4))
        builder.store(builder.fadd(builder.load(pa, align=4), prod), pa, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def requant16(typingctx, acc, acc_off, bias, b_off, mult, zp, lo, hi, out, o_off):
    """16 channels of the one requantization from an exact float32 integer accumulator:
    ``out[o:o+16] = clamp(rne(float32(int32(acc) + bias) * mult), lo - zp, hi - zp) + zp`` (the bias
    and mult vectors start at element ``b_off``; bytes stored as two's complement)."""
    sig = types.void(acc, acc_off, bias, b_off, mult, zp, lo, hi, out, o_off)

    def codegen(context, builder, signature, args):
        t = signature.args
        ao, bo, oo = (context.cast(builder, args[i], t[i], types.int64) for i in (1, 3, 9))
        zp, lo, hi = (context.cast(builder, args[i], t[i], types.int64) for i in (5, 6, 7))
        pa = _elem_ptr(context, builder, t[0], args[0], ao, _VF)
        pb = _elem_ptr(context, builder, t[2], args[2], bo, _VI)
        pm = _elem_ptr(context, builder, t[4], args[4], bo, _VF)
        po = _elem_ptr(context, builder, t[8], args[8], oo, _VB)
        acc = builder.add(builder.fptosi(builder.load(pa, align=4), _VI), builder.load(pb, align=4))
        v = builder.fmul(builder.sitofp(acc, _VF), builder.load(pm, align=4))
        builder.store(_round_bytes(builder, v, _rounding(builder, lo, hi, zp)), po, align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def qdq_binary16(typingctx, op, a, b, off, sa, za, sb, zb, sy, zy, lo, hi, out):
    """16 elements of ``Q(DQ(a) op DQ(b))`` (``op`` 0 = add, 1 = multiply; ``reference.qlinear_add``):
    ``fa = float32(a - za) * sa``, ``fb`` alike, one float32 add/multiply, one IEEE division by
    ``sy`` (vector division is correctly rounded like the scalar one), ``rne``, ``+ zy``, clamp to
    ``[lo, hi]``. NaN cannot arise (finite operands; an infinite quotient is clamped)."""
    sig = types.void(op, a, b, off, sa, za, sb, zb, sy, zy, lo, hi, out)

    def codegen(context, builder, signature, args):
        t = signature.args

        def i64(i):
            return context.cast(builder, args[i], t[i], types.int64)

        def f32(i):
            return _splat(builder, context.cast(builder, args[i], t[i], types.float32), _VF)

        o = i64(3)
        fa_fb = []
        for arr, s_i, z_i in ((1, 4, 5), (2, 6, 7)):
            v = builder.load(_elem_ptr(context, builder, t[arr], args[arr], o, _VB), align=1)
            vi = builder.sext(v, _VI) if t[arr].dtype == types.int8 else builder.zext(v, _VI)
            vi = builder.sub(vi, _splat(builder, builder.trunc(i64(z_i), _I32), _VI))
            fa_fb.append(builder.fmul(builder.sitofp(vi, _VF), f32(s_i)))
        is_add = builder.icmp_signed("==", i64(0), ir.Constant(_I64, 0))
        f = builder.select(is_add, builder.fadd(*fa_fb), builder.fmul(*fa_fb))
        v = builder.fdiv(f, f32(8))
        q = _round_bytes(builder, v, _rounding(builder, i64(10), i64(11), i64(9)))
        builder.store(q, _elem_ptr(context, builder, t[12], args[12], o, _VB), align=1)
        return context.get_dummy_value()

    return sig, codegen


def _make_dw_full(kh_n: int, kw_n: int):
    """An intrinsic for one output pixel x 16 channels of a ``kh_n x kw_n`` depthwise convolution
    whose taps all lie inside the input: the accumulator stays in a register over the taps."""

    @intrinsic
    def dw_full(typingctx, x, xb, rs, cs, w, wb, wstride, zf, bias, mult, cb, zp, lo, hi, out, ob):
        """``x`` bytes of tap (0, 0) at ``xb``, tap (i, j) at ``xb + i*rs + j*cs``; weights of tap t at
        ``w[wb + t*wstride : +16]``; bias/mult at ``cb``; 16 output bytes at ``ob``."""
        sig = types.void(x, xb, rs, cs, w, wb, wstride, zf, bias, mult, cb, zp, lo, hi, out, ob)
        signed = x.dtype == types.int8

        def codegen(context, builder, signature, args):
            t = signature.args

            def i64(i):
                return context.cast(builder, args[i], t[i], types.int64)

            xb, rs, cs, wb, wst = i64(1), i64(2), i64(3), i64(5), i64(6)
            zf_v = _splat(builder, context.cast(builder, args[7], t[7], types.float32), _VF)
            prods = []
            for i in range(kh_n):
                for j in range(kw_n):
                    xo = builder.add(xb, builder.add(builder.mul(rs, ir.Constant(_I64, i)),
                                                     builder.mul(cs, ir.Constant(_I64, j))))
                    wo = builder.add(wb, builder.mul(wst, ir.Constant(_I64, i * kw_n + j)))
                    xv = builder.load(_elem_ptr(context, builder, t[0], args[0], xo, _VB), align=1)
                    xi = builder.sext(xv, _VI) if signed else builder.zext(xv, _VI)
                    wv = builder.load(_elem_ptr(context, builder, t[4], args[4], wo, _VF), align=4)
                    prod = builder.fmul(builder.fsub(builder.sitofp(xi, _VF), zf_v), wv)
                    prods.append(prod)
            while len(prods) > 1:  # tree sum: short dependency chains (exact in any order, see above)
                prods = [builder.fadd(prods[k], prods[k + 1]) if k + 1 < len(prods) else prods[k]
                         for k in range(0, len(prods), 2)]
            acc = prods[0]
            cb, zp, lo, hi, ob = i64(10), i64(11), i64(12), i64(13), i64(15)
            a32 = builder.add(builder.fptosi(acc, _VI),
                              builder.load(_elem_ptr(context, builder, t[8], args[8], cb, _VI), align=4))
            v = builder.fmul(builder.sitofp(a32, _VF),
                             builder.load(_elem_ptr(context, builder, t[9], args[9], cb, _VF), align=4))
            q = _round_bytes(builder, v, _rounding(builder, lo, hi, zp))
            builder.store(q, _elem_ptr(context, builder, t[14], args[14], ob, _VB), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return dw_full


dw3x3_16 = _make_dw_full(3, 3)
dw5x5_16 = _make_dw_full(5, 5)


def _make_dw_row(kh_n: int, kw_n: int):
    """An intrinsic for one output row x 16 channels of a ``kh_n x kw_n`` depthwise convolution read
    from *float rows*: ``kh_n`` rows of ``x - z_x`` already converted to float32 and zero padded
    (the padding's real value is 0), so every tap of every pixel is inside. The ``kh_n * kw_n``
    weight vectors, bias and multipliers are loaded once and stay in registers across the row."""

    @intrinsic
    def dw_row(typingctx, rows, rb, rs, cs, ps, ow_n, w, wb, wstride, bias, mult, cb, zp, lo, hi, out, ob, os):
        """Tap (i, j) of output pixel ``p`` at ``rows[rb + i*rs + j*cs + p*ps : +16]``; weights of tap
        t at ``w[wb + t*wstride : +16]``; bias/mult at ``cb``; the 16 bytes of pixel ``p`` at
        ``out[ob + p*os]``."""
        sig = types.void(rows, rb, rs, cs, ps, ow_n, w, wb, wstride, bias, mult, cb, zp, lo, hi, out, ob, os)

        def codegen(context, builder, signature, args):
            t = signature.args

            def i64(i):
                return context.cast(builder, args[i], t[i], types.int64)

            rb, rs, cs, ps, n, wb, wst, cb, ob, ostep = (i64(i) for i in (1, 2, 3, 4, 5, 7, 8, 11, 16, 17))
            zp, lo, hi = i64(12), i64(13), i64(14)
            taps = [(i, j) for i in range(kh_n) for j in range(kw_n)]
            wv = [builder.load(_elem_ptr(context, builder, t[6], args[6],
                                         builder.add(wb, builder.mul(wst, ir.Constant(_I64, k))), _VF), align=4)
                  for k in range(len(taps))]
            tap_off = [builder.add(builder.mul(rs, ir.Constant(_I64, i)), builder.mul(cs, ir.Constant(_I64, j)))
                       for i, j in taps]
            bias_v = builder.load(_elem_ptr(context, builder, t[9], args[9], cb, _VI), align=4)
            mult_v = builder.load(_elem_ptr(context, builder, t[10], args[10], cb, _VF), align=4)
            rounding = _rounding(builder, lo, hi, zp)
            fma = _intrinsic_fn(builder, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF])
            with cgutils.for_range(builder, n) as loop:
                p = loop.index
                base = builder.add(rb, builder.mul(p, ps))
                prods = []  # one fused multiply-add chain per kernel row, then their sum
                for i in range(kh_n):
                    chain = None
                    for j in range(kw_n):
                        k = i * kw_n + j
                        xv = builder.load(_elem_ptr(context, builder, t[0], args[0], builder.add(base, tap_off[k]),
                                                    _VF), align=4)
                        chain = builder.fmul(xv, wv[k]) if chain is None else builder.call(fma, [xv, wv[k], chain])
                    prods.append(chain)
                while len(prods) > 1:  # exact in any order and fused or not: integers below 2**24
                    prods = [builder.fadd(prods[k], prods[k + 1]) if k + 1 < len(prods) else prods[k]
                             for k in range(0, len(prods), 2)]
                acc = builder.add(builder.fptosi(prods[0], _VI), bias_v)
                v = builder.fmul(builder.sitofp(acc, _VF), mult_v)
                po = _elem_ptr(context, builder, t[15], args[15], builder.add(ob, builder.mul(p, ostep)), _VB)
                builder.store(_round_bytes(builder, v, rounding), po, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return dw_row


dw_row3x3_16 = _make_dw_row(3, 3)
dw_row5x5_16 = _make_dw_row(5, 5)


@intrinsic
def to_f32_minus(typingctx, dst, d_off, x, x_off, n16, zf):
    """``dst[d_off + i] = float32(x[x_off + i]) - zf`` for ``i < 16 * n16`` (uint8 or int8 ``x``,
    float32 ``dst``), 16 elements per vector step."""
    sig = types.void(dst, d_off, x, x_off, n16, zf)
    signed = x.dtype == types.int8

    def codegen(context, builder, signature, args):
        t = signature.args
        do, xo, n = (context.cast(builder, args[i], t[i], types.int64) for i in (1, 3, 4))
        zf_v = _splat(builder, context.cast(builder, args[5], t[5], types.float32), _VF)
        with cgutils.for_range(builder, n) as loop:
            k = builder.mul(loop.index, ir.Constant(_I64, 16))
            xv = builder.load(_elem_ptr(context, builder, t[2], args[2], builder.add(xo, k), _VB), align=1)
            xi = builder.sext(xv, _VI) if signed else builder.zext(xv, _VI)
            builder.store(builder.fsub(builder.sitofp(xi, _VF), zf_v),
                          _elem_ptr(context, builder, t[0], args[0], builder.add(do, k), _VF), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def interleave3_16(typingctx, src, s_off, plane, dst, d_off):
    """``dst[d_off + 3*j + c] = src[s_off + c*plane + j]`` for ``j < 16``, ``c < 3``: 16 pixels of three
    channel rows interleaved into channels-last order (48 bytes) by one byte shuffle."""
    sig = types.void(src, s_off, plane, dst, d_off)

    def codegen(context, builder, signature, args):
        t = signature.args
        so, pl, do = (context.cast(builder, args[i], t[i], types.int64) for i in (1, 2, 4))
        rows = [builder.load(_elem_ptr(context, builder, t[0], args[0],
                                       builder.add(so, builder.mul(pl, ir.Constant(_I64, c))), _VB), align=1)
                for c in range(3)]
        ab = builder.shuffle_vector(rows[0], rows[1], ir.Constant(_vec(32, 32), list(range(32))))
        cc = builder.shuffle_vector(rows[2], rows[2], ir.Constant(_vec(32, 32), [i % 16 for i in range(32)]))
        mask = [c * 16 + j if c < 2 else 32 + j for j in range(16) for c in range(3)]
        out = builder.shuffle_vector(ab, cc, ir.Constant(_vec(32, 48), mask))
        builder.store(out, _elem_ptr(context, builder, t[3], args[3], do, _vec(8, 48)), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dw_row3x3_vnni16(typingctx, rows, rb, rs, cs, ps, ow_n, wq, wb, bias, mult, cb, zp, lo, hi, out, ob, os):
    """One output row x 16 channels of a 3x3 depthwise convolution on VNNI, from *uint8 rows*
    (padding holds the activation zero point): for every pixel the nine 16-byte tap vectors are
    interleaved into three 64-byte vectors (byte ``4c + j`` = tap ``4g + j`` of channel ``c``; the
    three taps past the ninth reuse tap 8 against zero weights) and summed by three ``vpdpbusd``
    into int32 lanes that start at ``bias`` (which holds ``bias - z_x * sum(w)``); then the one
    float32 requantization. ``wq[wb + 64g : +64]``: the int8 weights of group ``g`` in that
    interleaved order. Tap (i, j) of pixel ``p`` at ``rows[rb + i*rs + j*cs + p*ps : +16]``; output
    bytes at ``out[ob + p*os]``."""
    sig = types.void(rows, rb, rs, cs, ps, ow_n, wq, wb, bias, mult, cb, zp, lo, hi, out, ob, os)

    def codegen(context, builder, signature, args):
        t = signature.args

        def i64(i):
            return context.cast(builder, args[i], t[i], types.int64)

        rb, rs, cs, ps, n, wb, cb, ob, ostep = (i64(i) for i in (1, 2, 3, 4, 5, 7, 10, 15, 16))
        zp, lo, hi = i64(11), i64(12), i64(13)
        v64 = _vec(8, 64)
        wv = [builder.bitcast(builder.load(_elem_ptr(context, builder, t[6], args[6],
                                                     builder.add(wb, ir.Constant(_I64, 64 * g)), v64), align=1), _VI)
              for g in range(3)]
        tap_off = [builder.add(builder.mul(rs, ir.Constant(_I64, i)), builder.mul(cs, ir.Constant(_I64, j)))
                   for i in range(3) for j in range(3)]
        bias_v = builder.load(_elem_ptr(context, builder, t[8], args[8], cb, _VI), align=4)
        mult_v = builder.load(_elem_ptr(context, builder, t[9], args[9], cb, _VF), align=4)
        rounding = _rounding(builder, lo, hi, zp)
        dot = _intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", _VI, [_VI, _VI, _VI])
        cat = ir.Constant(_vec(32, 32), list(range(32)))
        cat64 = ir.Constant(_vec(32, 64), list(range(64)))
        inter = ir.Constant(_vec(32, 64), [j * 16 + c for c in range(16) for j in range(4)])
        with cgutils.for_range(builder, n) as loop:
            base = builder.add(rb, builder.mul(loop.index, ps))
            taps = [builder.load(_elem_ptr(context, builder, t[0], args[0], builder.add(base, off), _VB), align=1)
                    for off in tap_off]
            taps += [taps[8]] * 3
            acc = bias_v
            for g in range(3):
                a, b, c, d = taps[4 * g: 4 * g + 4]
                quad = builder.shuffle_vector(builder.shuffle_vector(a, b, cat), builder.shuffle_vector(c, d, cat),
                                              cat64)
                xv = builder.shuffle_vector(quad, quad, inter)
                acc = builder.call(dot, [acc, builder.bitcast(xv, _VI), wv[g]])
            v = builder.fmul(builder.sitofp(acc, _VF), mult_v)
            po = _elem_ptr(context, builder, t[14], args[14], builder.add(ob, builder.mul(loop.index, ostep)), _VB)
            builder.store(_round_bytes(builder, v, rounding), po, align=1)
        return context.get_dummy_value()

    return sig, codegen

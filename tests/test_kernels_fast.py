"""The fast INT8 paths (``kernels.microkernel`` / ``kernels.igemm``: VNNI ``vpdpbusd`` and AVX2
``vpmaddubsw`` GEMM tiles; the vectorised depthwise and element-wise steps) are bit-exact against
``kernels.reference``, pick the instruction set they claim, and emit the instructions they claim.

Each ISA is tested only where the CPU has it (skipped with the reason otherwise); the generic path
always. Shapes are drawn so that K is rarely a multiple of 4, N rarely of 16 and rows rarely of the
tile height; weights are s8 with zero point 0 (the fast paths' domain), 7-bit for AVX2.
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx_compress.kernels import igemm
from onnx_compress.kernels import microkernel as mk
from onnx_compress.kernels import reference as R
from onnx_compress.kernels.config import SERIAL_OPTIONS

from onnx_compress import kernels as K

FEW = settings(max_examples=30, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUPPORTED = {mk.ISA_NAMES[i] for i in mk.supported_isas()}
ISAS = [pytest.param(name, marks=pytest.mark.skipif(name not in SUPPORTED, reason=f"this CPU lacks {name}"))
        for name in ("avx512vnni", "avx2", "generic")]
QDT = [np.uint8, np.int8]
scales = st.floats(0.0009765625, 0.5, allow_nan=False, width=32).map(np.float32)


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _q(rng, dtype, shape):
    lo, hi = R.qrange(dtype)
    return rng.integers(lo, hi + 1, size=shape).astype(dtype)


def _out_range(draw, y_zp):
    kind = draw(st.sampled_from([None, "relu", "clip"]))
    if kind == "relu":
        return R.relu_range(y_zp)
    if kind == "clip":
        lo, hi = R.qrange(y_zp.dtype)
        a = draw(st.integers(lo, hi))
        return a, draw(st.integers(a, hi))
    return None


@st.composite
def conv_cases(draw, wmax=127):
    """Dense / grouped convolutions with s8 weights, zero point 0 (``wmax`` bounds ``|w|``)."""
    rng = _rng(draw)
    xdt, ydt = draw(st.sampled_from(QDT)), draw(st.sampled_from(QDT))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    cg, mg = draw(st.integers(1, 11)), draw(st.integers(1, 37))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = (0, 0, 0, 0) if draw(st.booleans()) else tuple(draw(st.integers(0, 2)) for _ in range(4))
    assume(R.output_size(h, kh, strides[0], pads[0], pads[2], dilations[0]) >= 1)
    assume(R.output_size(w, kw, strides[1], pads[1], pads[3], dilations[1]) >= 1)
    m = group * mg
    per_channel = draw(st.booleans())
    y_zp = np.array(draw(st.integers(*R.qrange(ydt))), ydt)
    return dict(
        x=_q(rng, xdt, (draw(st.integers(1, 2)), cg * group, h, w)), x_scale=draw(scales),
        x_zp=np.array(draw(st.integers(*R.qrange(xdt))), xdt),
        w=rng.integers(-wmax - (wmax == 127), wmax + 1, (m, cg, kh, kw)).astype(np.int8),
        w_scale=np.array([draw(scales) for _ in range(m)], np.float32) if per_channel else draw(scales),
        w_zp=np.zeros(m if per_channel else (), np.int8), y_scale=draw(scales) * np.float32(8), y_zp=y_zp,
        bias=None if draw(st.booleans()) else rng.integers(-50000, 50000, m).astype(np.int32),
        kw=dict(strides=strides, pads=pads, dilations=dilations, group=group), out_range=_out_range(draw, y_zp))


def _run_conv(c, isa):
    args = (c["x_scale"], c["x_zp"], c["w"], c["w_scale"], c["w_zp"], c["y_scale"], c["y_zp"], c["bias"])
    params = K.prepare_qconv(c["x"].dtype, *args, **c["kw"], out_range=c["out_range"], isa=isa)
    got = K.run_qconv(params, np.ascontiguousarray(c["x"].transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    expected = R.qlinear_conv(c["x"], *args, **c["kw"], out_range=c["out_range"])
    return params, got, expected


@pytest.mark.parametrize("isa", ISAS)
@FEW
@given(data=st.data())
def test_conv_fast_paths_match_reference(isa, data):
    c = data.draw(conv_cases(wmax=64 if isa == "avx2" else 127))
    params, got, expected = _run_conv(c, isa)
    depthwise = c["w"].shape[1] == 1 and c["kw"]["group"] == c["x"].shape[1]  # keeps its own kernel
    assert params.isa == ("generic" if depthwise else isa) and (params.fast is None) == (params.isa == "generic")
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("isa", ISAS)
@FEW
@given(data=st.data())
def test_gemm_fast_paths_match_reference(isa, data):
    rng = _rng(data.draw)
    adt, ydt = data.draw(st.sampled_from(QDT)), data.draw(st.sampled_from(QDT))
    rows, k, n = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 90))
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    wmax = 64 if isa == "avx2" else 127
    a, b = _q(rng, adt, lead + (rows, k)), rng.integers(-wmax, wmax + 1, (k, n)).astype(np.int8)
    y_zp = np.array(data.draw(st.integers(*R.qrange(ydt))), ydt)
    a_zp = np.array(data.draw(st.integers(*R.qrange(adt))), adt)
    b_scale = np.array([data.draw(scales) for _ in range(n)], np.float32)
    bias = rng.integers(-99999, 99999, n).astype(np.int32)
    out_range = _out_range(data.draw, y_zp)
    args = (np.float32(0.02), a_zp, b, b_scale, np.zeros(n, np.int8), np.float32(3.0), y_zp, bias)
    params = K.prepare_qgemm(adt, *args, out_range=out_range, isa=isa)
    assert params.isa == isa
    np.testing.assert_array_equal(K.run_qgemm(params, a), R.qlinear_matmul(a, *args, out_range=out_range))


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_operands_are_exact(isa):
    """The longest reduction and the largest bias the accumulator check admits, with extreme
    activations, zero points and weights: partial int32 sums may wrap, the result must not."""
    wv = -64 if isa == "avx2" else -128
    k = 16000
    big = 2**31 - 1 - 255 * 255 * k
    x1 = np.full((1, k, 2, 3), 255, np.uint8)
    for x, zx in ((x1, 0), (np.zeros_like(x1), 255), (x1, 255)):
        w = np.full((3, k, 1, 1), wv, np.int8)
        w[2] = -wv - 1
        bias = np.array([big, -big, big], np.int32)
        args = (np.float32(1e-3), np.uint8(zx), w, np.float32(1e-3), np.int8(0), np.float32(1.0), np.uint8(128), bias)
        params = K.prepare_qconv(np.uint8, *args, isa=isa)
        got = K.run_qconv(params, np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got, R.qlinear_conv(x, *args))
        acc = R.conv_accumulate(x, zx, w, 0, bias)
        assert np.abs(acc).max() > 2**29  # the accumulators really are large


def test_isa_choice():
    w = np.full((4, 3, 1, 1), 100, np.int8)
    best = mk.VNNI if mk.VNNI in mk.supported_isas() else mk.GENERIC  # |w| = 100 > 64 rules AVX2 out
    assert igemm.choose_isa(w, np.zeros(4, np.int8)) == best
    small = mk.supported_isas()[0]
    assert igemm.choose_isa(w // 2, np.zeros(4, np.int8)) == small
    assert igemm.choose_isa(w, np.array([0, 1, 0, 0], np.int8)) == mk.GENERIC  # nonzero weight zero point
    assert igemm.choose_isa(w.view(np.uint8), np.zeros(4, np.uint8)) == mk.GENERIC  # u8 weights
    with pytest.raises(ValueError, match="avx2"):
        igemm.choose_isa(w, np.zeros(4, np.int8), "avx2")  # |w| > 64 would saturate vpmaddubsw (or no AVX2)
    with pytest.raises(ValueError, match="isa must be"):
        igemm.choose_isa(w, np.zeros(4, np.int8), "sse9")


def _tile_asm(isa):
    fn = numba.njit(**dict(SERIAL_OPTIONS, cache=False))(igemm._tile.py_func)
    a, b, bias, mult = np.zeros(64, np.uint8), np.zeros(4096, np.int8), np.zeros(64, np.int32), np.ones(64, np.float32)
    out = np.zeros(6 * 64, np.uint8)
    fn(isa, 4, a, 0, 4, 1, b, 0, 1, bias, mult, 0, 0, 0, 255, out, 0, 64, 64)
    return "\n".join(fn.inspect_asm().values())


@pytest.mark.skipif(mk.VNNI not in mk.supported_isas(), reason="this CPU lacks avx512_vnni")
def test_vnni_tile_emits_vpdpbusd():
    asm = _tile_asm(mk.VNNI)
    assert "vpdpbusd" in asm and "vpdpbusds" not in asm  # the non-saturating form only


@pytest.mark.skipif(mk.AVX2 not in mk.supported_isas(), reason="this CPU lacks avx2")
def test_avx2_tile_emits_pmaddubsw():
    asm = _tile_asm(mk.AVX2)
    # LLVM may fuse vpmaddwd + vpaddd into the (exact, non-saturating) vpdpwssd where VNNI exists
    assert "vpmaddubsw" in asm and ("vpmaddwd" in asm or "vpdpwssd" in asm)


def _depthwise_path(params, out_shape, w, w_zp):
    """The kernel ``conv._plan`` must pick for a depthwise convolution (see ``kernels/conv.py``)."""
    c, k = params.in_channels, params.kernel_shape[0]
    if (k == 3 and c % 16 == 0 and params.x_dtype == np.uint8 and w.dtype == np.int8 and not np.any(w_zp)
            and mk.VNNI in mk.supported_isas()):
        return "dw_vnni"
    rows_ok = out_shape[1] >= (14 if params.strides == (1, 1) else 28) and params.strides in ((1, 1), (2, 2))
    return "dw_rows" if k in (3, 5) and c % 16 == 0 and rows_ok else "dw_f32"


@pytest.mark.skipif(mk.VNNI not in mk.supported_isas(), reason="this CPU lacks avx512_vnni")
@FEW
@given(data=st.data())
def test_depthwise_vnni_path_matches_reference(data):
    """3x3 depthwise on VNNI (uint8 activations, int8 weights of zero point 0, channels % 16 == 0):
    zero-point padded byte rows, strides, dilations, asymmetric pads, tasks across rows and images."""
    rng = _rng(data.draw)
    ydt = data.draw(st.sampled_from(QDT))
    c = data.draw(st.sampled_from([16, 32, 48]))
    s, d = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 1, 2]))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    h, w = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 20))
    assume(R.output_size(h, 3, s, pads[0], pads[2], d) >= 1 and R.output_size(w, 3, s, pads[1], pads[3], d) >= 1)
    x = _q(rng, np.uint8, (data.draw(st.integers(1, 3)), c, h, w))
    wt, w_zp = _q(rng, np.int8, (c, 1, 3, 3)), np.zeros(c, np.int8)
    y_zp = np.array(data.draw(st.integers(*R.qrange(ydt))), ydt)
    args = (data.draw(scales), np.array(data.draw(st.integers(0, 255)), np.uint8), wt,
            np.array([data.draw(scales) for _ in range(c)], np.float32), w_zp, data.draw(scales) * np.float32(8), y_zp,
            rng.integers(-99999, 99999, c).astype(np.int32))
    kw = dict(strides=(s, s), pads=pads, dilations=(d, d), group=c, out_range=_out_range(data.draw, y_zp))
    params = K.prepare_qconv(x.dtype, *args, **kw)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = K.run_qconv(params, xn)
    assert params.plans[xn.shape][1] == "dw_vnni"
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), R.qlinear_conv(x, *args, **kw))


@pytest.mark.skipif(mk.VNNI not in mk.supported_isas(), reason="this CPU lacks avx512_vnni")
def test_depthwise_vnni_kernel_emits_vpdpbusd():
    from onnx_compress.kernels import conv

    fn = numba.njit(**dict(SERIAL_OPTIONS, cache=False))(conv._conv_depthwise_vnni_kernel.py_func)
    c = 16
    wq, bias = conv.pack_depthwise_vnni(np.ones((c, 1, 3, 3), np.int8), np.zeros(c, np.int32), 3)
    dims, geo = np.array([1, 4, 4, c, 4, 4], np.int64), np.array([3, 3, 1, 1, 1, 1, 1, 1], np.int64)
    fn(np.zeros(16 * c, np.uint8), 3, wq, bias, np.ones(c, np.float32), 0, 0, 255, dims, geo, 2, np.zeros(16 * c, np.uint8))
    asm = "\n".join(fn.inspect_asm().values())
    assert "vpdpbusd" in asm and "vpdpbusds" not in asm


@FEW
@given(data=st.data())
def test_depthwise_vector_path_matches_reference(data):
    rng = _rng(data.draw)
    xdt, ydt = data.draw(st.sampled_from(QDT)), data.draw(st.sampled_from(QDT))
    c = data.draw(st.sampled_from([1, 5, 16, 19, 32, 48]))
    k = data.draw(st.sampled_from([1, 3, 3, 5]))
    h, w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    strides = (data.draw(st.integers(1, 2)),) * 2
    dil = (data.draw(st.sampled_from([1, 1, 2])),) * 2
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    assume(R.output_size(h, k, strides[0], pads[0], pads[2], dil[0]) >= 1)
    assume(R.output_size(w, k, strides[1], pads[1], pads[3], dil[1]) >= 1)
    assume(not (c == 1 and k == 1 and not any(pads)))  # that one is a 1x1 GEMM
    x = _q(rng, xdt, (data.draw(st.integers(1, 2)), c, h, w))
    wdt = data.draw(st.sampled_from(QDT))
    wt, w_zp = _q(rng, wdt, (c, 1, k, k)), _q(rng, wdt, (c,))
    y_zp = np.array(data.draw(st.integers(*R.qrange(ydt))), ydt)
    args = (data.draw(scales), np.array(data.draw(st.integers(*R.qrange(xdt))), xdt), wt,
            np.array([data.draw(scales) for _ in range(c)], np.float32), w_zp, data.draw(scales) * np.float32(8), y_zp,
            rng.integers(-99999, 99999, c).astype(np.int32))
    kw = dict(strides=strides, pads=pads, dilations=dil, group=c, out_range=_out_range(data.draw, y_zp))
    params = K.prepare_qconv(x.dtype, *args, **kw)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = K.run_qconv(params, xn)
    assert params.kind == "depthwise" and params.plans[xn.shape][1] == _depthwise_path(params, got.shape, wt, w_zp)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), R.qlinear_conv(x, *args, **kw))


@FEW
@given(data=st.data())
def test_depthwise_row_sweeping_path_matches_reference(data):
    """The float-row kernel (channels % 16 == 0; >= 14 output rows at stride 1, >= 28 at stride 2):
    zero-padded rows, dilations, asymmetric pads, tasks split across rows and images."""
    rng = _rng(data.draw)
    xdt, ydt, wdt = (data.draw(st.sampled_from(QDT)) for _ in range(3))
    c, k = data.draw(st.sampled_from([16, 32])), data.draw(st.sampled_from([3, 5]))
    dil = (data.draw(st.sampled_from([1, 2])),) * 2
    s = data.draw(st.sampled_from([1, 2]))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    h = data.draw(st.integers((14 if s == 1 else 56) + (k - 1) * dil[0], (24 if s == 1 else 64)))
    w = data.draw(st.integers(1, 20))
    assume(R.output_size(w, k, s, pads[1], pads[3], dil[1]) >= 1)
    x = _q(rng, xdt, (data.draw(st.integers(1, 3)), c, h, w))
    wt, w_zp = _q(rng, wdt, (c, 1, k, k)), _q(rng, wdt, (c,))
    y_zp = np.array(data.draw(st.integers(*R.qrange(ydt))), ydt)
    args = (data.draw(scales), np.array(data.draw(st.integers(*R.qrange(xdt))), xdt), wt,
            np.array([data.draw(scales) for _ in range(c)], np.float32), w_zp, data.draw(scales) * np.float32(8), y_zp,
            rng.integers(-99999, 99999, c).astype(np.int32))
    kw = dict(strides=(s, s), pads=pads, dilations=dil, group=c, out_range=_out_range(data.draw, y_zp))
    params = K.prepare_qconv(x.dtype, *args, **kw)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = K.run_qconv(params, xn)
    assert params.plans[xn.shape][1] == _depthwise_path(params, got.shape, wt, w_zp) in ("dw_rows", "dw_vnni")
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), R.qlinear_conv(x, *args, **kw))


@FEW
@given(data=st.data())
def test_eltwise_vector_path_matches_reference(data):
    rng = _rng(data.draw)
    adt, bdt, ydt = (data.draw(st.sampled_from(QDT)) for _ in range(3))
    size = data.draw(st.sampled_from([1, 15, 16, 17, 100, 4096, 4111, 9000]))
    shape_b = data.draw(st.sampled_from([(size,), (1,)]))
    a, b = _q(rng, adt, (size,)), _q(rng, bdt, shape_b)
    y_zp = np.array(data.draw(st.integers(*R.qrange(ydt))), ydt)
    args = (a, data.draw(scales), np.array(data.draw(st.integers(*R.qrange(adt))), adt), b, data.draw(scales),
            np.array(data.draw(st.integers(*R.qrange(bdt))), bdt), data.draw(scales), y_zp)
    out_range = _out_range(data.draw, y_zp)
    op = data.draw(st.sampled_from(["add", "mul"]))
    got = (K.qlinear_add if op == "add" else K.qlinear_mul)(*args, out_range=out_range)
    expected = (R.qlinear_add if op == "add" else R.qlinear_mul)(*args, out_range=out_range)
    assert got.shape == expected.shape == (size,)
    np.testing.assert_array_equal(got, expected)


def test_fast_kernel_is_disk_cached():
    """``cache=True`` works with the intrinsics: compiling writes an index for the kernel."""
    x = np.zeros((1, 2, 2, 8), np.uint8)
    params = K.prepare_qconv(np.uint8, np.float32(1), np.uint8(0), np.ones((16, 8, 1, 1), np.int8), np.float32(1),
                             np.int8(0), np.float32(1), np.uint8(0))
    K.run_qconv(params, x)
    disp = igemm._igemm_kernel
    assert disp._cache.__class__.__name__ == "FunctionCache"
    if params.fast is not None:
        assert list(Path(disp._cache._cache_path).glob("igemm._igemm_kernel-*.nbi"))

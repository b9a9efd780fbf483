"""``kernels.bind_*``: a kernel call validated once and bound to its buffers must equal the
checked wrapper on every call, and read its input buffer afresh each time (a bound call that
copied its input would return stale results after the buffer is overwritten in place)."""

from __future__ import annotations

import numpy as np
import pytest

import kernels as K

RNG = np.random.default_rng(7)


def _conv_params(c_in, c_out, k, group, w_max, x_dtype=np.uint8):
    w = RNG.integers(-w_max, w_max + 1, (c_out, c_in // group, k, k)).astype(np.int8)
    zx = np.asarray(7 if x_dtype == np.uint8 else -3, x_dtype)
    return K.prepare_qconv(x_dtype, np.float32(0.02), zx, w, np.full(c_out, 0.004, np.float32),
                           np.zeros(c_out, np.int8), np.float32(0.05), np.uint8(3),
                           RNG.integers(-500, 500, c_out).astype(np.int32), strides=(2, 2) if k == 3 else (1, 1),
                           pads=(1, 1, 1, 1) if k == 3 else (0, 0, 0, 0), group=group, out_range=(3, 200))


def _fill(x):
    info = np.iinfo(x.dtype)
    x[...] = RNG.integers(info.min, info.max + 1, x.shape).astype(x.dtype)


@pytest.mark.parametrize("c_in, c_out, k, group, x_dtype", [
    (16, 32, 1, 1, np.uint8),   # 1x1 GEMM rows
    (8, 24, 3, 1, np.uint8),    # im2col
    (32, 32, 3, 32, np.uint8),  # depthwise, float32-exact path
    (8, 16, 3, 2, np.int8),     # grouped, int8 activations (flipped per call)
])
def test_bind_qconv_equals_run_and_rereads_its_input(c_in, c_out, k, group, x_dtype):
    params = _conv_params(c_in, c_out, k, group, 60, x_dtype)
    x = np.empty((2, 9, 9, c_in), x_dtype)
    _fill(x)
    out = np.empty(params.output_shape_nhwc(x.shape), np.uint8)
    call = K.bind_qconv(params, x, out)
    for _ in range(2):
        call()
        np.testing.assert_array_equal(out, K.run_qconv(params, x))
        _fill(x)  # in place: the bound call must see it


def test_bind_qgemm_and_qbinary_and_gap_equal_their_wrappers():
    b = RNG.integers(-60, 61, (40, 24)).astype(np.int8)
    gp = K.prepare_qgemm(np.uint8, np.float32(0.02), np.uint8(5), b, np.float32(0.01), np.int8(0), np.float32(0.1),
                         np.uint8(2), RNG.integers(-99, 99, 24).astype(np.int32))
    a = np.empty((3, 40), np.uint8)
    y = np.empty((3, 24), np.uint8)
    call = K.bind_qgemm(gp, a, y)

    bp = K.prepare_qbinary("add", np.uint8, np.float32(0.03), np.uint8(9), np.uint8, np.float32(0.05), np.uint8(1),
                           np.float32(0.04), np.uint8(4))
    p, q = np.empty((2, 5, 5, 40), np.uint8), np.empty((2, 5, 5, 40), np.uint8)
    s = np.empty_like(p)
    add = K.bind_qbinary(bp, p, q, s)

    g = np.empty((2, 1, 1, 40), np.uint8)
    gap = K.bind_global_average_pool(p, np.float32(0.03), np.uint8(9), np.float32(0.02), np.uint8(6), g)
    for _ in range(2):
        for arr in (a, p, q):
            _fill(arr)
        call(), add(), gap()
        np.testing.assert_array_equal(y, K.run_qgemm(gp, a))
        np.testing.assert_array_equal(s, K.run_qbinary(bp, p, q))
        np.testing.assert_array_equal(g, K.global_average_pool(p, np.float32(0.03), np.uint8(9), np.float32(0.02),
                                                               np.uint8(6), layout="NHWC"))


def test_bind_rejects_wrong_buffers_naming_them():
    params = _conv_params(16, 32, 1, 1, 60)
    x = np.zeros((1, 4, 4, 16), np.uint8)
    with pytest.raises(ValueError, match="out"):
        K.bind_qconv(params, x, np.zeros((1, 4, 4, 31), np.uint8))
    with pytest.raises(TypeError, match="x"):
        K.bind_qconv(params, x.astype(np.int8), np.zeros((1, 4, 4, 32), np.uint8))

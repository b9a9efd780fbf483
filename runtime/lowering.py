"""Lowering a QDQ ONNX graph into a plan of Numba kernel calls.

Patterns (``DQ`` = DequantizeLinear of a quantized activation, ``DQw`` = of a constant):

* ``QuantizeLinear(float graph input)``                         -> ``quantize_linear``
* ``DQ(x), DQw(W)[, DQw(B)] -> Conv -> [Relu | Clip] -> Q``       -> ``run_qconv`` (weights packed once)
* ``DQ(a), DQw(B)[, DQw(C)] -> MatMul | Gemm -> [Relu|Clip] -> Q``  -> ``run_qgemm``
* ``DQ(a), DQ(b) -> Add | Mul -> [Relu|Clip] -> Q``               -> ``qlinear_add`` / ``qlinear_mul``
* ``DQ(x) -> Relu | Clip -> Q``                                   -> ``requantize`` with a clamp range
* ``DQ(x) -> MaxPool -> Q``                                       -> ``max_pool`` (+ ``requantize`` if
  the scales differ), ``GlobalAveragePool``/``AveragePool`` -> the averaging kernels
* ``DQ(x) -> Flatten | Reshape -> Q``                             -> a reshape (+ ``requantize``)
* ``DQ(x) -> Q`` (scale change)                                   -> ``requantize``
* ``DQ(x)`` feeding a graph output                               -> ``dequantize_linear``
* a uint8/int8 graph input read by a DequantizeLinear is taken as already quantized; a quantized
  graph output (a QuantizeLinear output) is returned as the integer tensor, NCHW

Anything else raises ``UnsupportedOpError`` naming the node. The bias of a Conv/Gemm is an int32
constant in scale ``s_x * s_w``; a bias quantized with another scale is re-expressed in that scale
(``rne(b * s_b / (s_x * s_w))``). The float graph and the plan differ only by the requantization
definition (integer accumulation then one float32 rounding, instead of float accumulation): at
most one quantization step on a near-tie, as the tests measure.

4-D activations are kept NHWC between steps; they are transposed to NCHW only where ONNX
semantics need it (Flatten/Reshape, graph outputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .. import kernels as K
from ..ir.errors import UnsupportedOpError
from ..kernels import reference as R

logger = logging.getLogger(__name__)


@dataclass
class QValue:
    """A quantized activation at run time: the integer array, its layout and its parameters."""

    data: np.ndarray
    layout: str  # "NHWC" for 4-D tensors kept channels-last, "plain" otherwise

    def nchw(self) -> np.ndarray:
        return np.ascontiguousarray(self.data.transpose(0, 3, 1, 2)) if self.layout == "NHWC" else self.data

    def nhwc(self) -> np.ndarray:
        if self.layout == "NHWC":
            return self.data
        if self.data.ndim != 4:
            raise ValueError(f"expected a 4-D activation, got shape {self.data.shape}")
        return np.ascontiguousarray(self.data.transpose(0, 2, 3, 1))


@dataclass
class Step:
    name: str  # the ONNX node(s) this step implements
    fn: Callable[[dict], None]


@dataclass
class Plan:
    steps: list[Step]
    outputs: list[str]
    quantized_inputs: frozenset = frozenset()  # graph inputs that arrive already quantized

    def run(self, names, feeds) -> list[np.ndarray]:
        env: dict = {k: QValue(np.ascontiguousarray(v), "plain") if k in self.quantized_inputs else v
                     for k, v in feeds.items()}
        for step in self.steps:
            step.fn(env)
        return [env[n].nchw() if isinstance(env[n], QValue) else env[n] for n in names]


@dataclass(frozen=True)
class QParams:
    scale: np.float32
    zp: np.ndarray  # numpy scalar of the quantized dtype


@dataclass
class _Graph:
    model: onnx.ModelProto
    consts: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    outputs: set = field(default_factory=set)

    @classmethod
    def build(cls, model):
        g = cls(model)
        for init in model.graph.initializer:
            g.consts[init.name] = numpy_helper.to_array(init)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        g.consts[node.output[0]] = numpy_helper.to_array(a.t)
            for name in node.input:
                if name:
                    g.consumers.setdefault(name, []).append(node)
        g.outputs = {o.name for o in model.graph.output}
        return g


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _qparams(g: _Graph, node) -> QParams:
    """Scale and zero point of a per-tensor Q/DQ node."""
    scale = np.asarray(g.consts.get(node.input[1]))
    if node.input[1] not in g.consts or scale.size != 1:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only constant per-tensor scales are lowered")
    zp = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.uint8(0)
    return QParams(np.float32(scale.reshape(())), np.asarray(zp).reshape(()))


def lower(model: onnx.ModelProto) -> Plan:
    """Lower ``model`` (a QDQ graph) into a plan; raises ``UnsupportedOpError`` naming the first
    node that has no lowering."""
    g = _Graph.build(model)
    steps: list[Step] = []
    qinfo: dict[str, QParams] = {}  # quantized activation name -> its parameters
    alias: dict[str, str] = {}  # float name (DQ output) -> quantized activation name
    weights: dict[str, tuple] = {}  # float name (DQ of a constant) -> (int array, scale, zp, axis)
    done: set[int] = set()
    quantized_inputs: set[str] = set()
    graph_inputs = {i.name for i in model.graph.input} - set(g.consts)
    nodes = list(model.graph.node)

    def float_input(node, name):
        if name not in alias:
            raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): input '{name}' is not a dequantized activation")
        q = alias[name]
        return q, qinfo[q]

    def epilogue(node, out_name):
        """Follow ``out_name`` through an optional Relu/Clip to its QuantizeLinear."""
        chain = []
        out_range_fn = None
        cur = out_name
        for _ in range(2):
            users = g.consumers.get(cur, [])
            if len(users) != 1 or cur in g.outputs:
                break
            user = users[0]
            if user.op_type == "QuantizeLinear":
                qp = _qparams(g, user)
                chain.append(user)
                rng = out_range_fn(qp) if out_range_fn else None
                return user.output[0], qp, rng, chain
            if user.op_type in ("Relu", "Clip") and not chain:
                chain.append(user)
                out_range_fn = _clamp_range_fn(g, user)
                cur = user.output[0]
                continue
            break
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): output is not followed by QuantizeLinear")

    for node in nodes:
        if id(node) in done:
            continue
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"node '{node.name}': op {node.domain}::{op} has no numba lowering")
        if op == "Constant":
            continue
        if op == "DequantizeLinear":
            src = node.input[0]
            if src in g.consts:
                scale = np.asarray(g.consts[node.input[1]], np.float32)
                zp = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                weights[node.output[0]] = (g.consts[src], scale, zp, int(_attrs(node).get("axis", 1)))
                continue
            if src in graph_inputs and src not in qinfo:
                qinfo[src] = _qparams(g, node)  # an already quantized graph input
                quantized_inputs.add(src)
            if src not in qinfo:
                raise UnsupportedOpError(f"node '{node.name}' (DequantizeLinear): input '{src}' is not a quantized activation")
            alias[node.output[0]] = src
            if node.output[0] in g.outputs:
                steps.append(_dequantize_step(node, src, qinfo[src]))
            continue
        if op == "QuantizeLinear":
            src, qp = node.input[0], _qparams(g, node)
            if src in graph_inputs:
                steps.append(_quantize_step(node, src, qp))
            elif src in alias:
                steps.append(_requantize_step(node, alias[src], qinfo[alias[src]], qp, None))
            else:
                raise UnsupportedOpError(f"node '{node.name}' (QuantizeLinear): input '{src}' comes from an op with no lowering")
            qinfo[node.output[0]] = qp
            continue
        if op in ("Conv", "MatMul", "Gemm"):
            xq, xp = float_input(node, node.input[0])
            if node.input[1] not in weights:
                raise UnsupportedOpError(f"node '{node.name}' ({op}): weight '{node.input[1]}' is not a dequantized constant")
            out, yp, rng, chain = epilogue(node, node.output[0])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if op == "Conv":
                steps.append(_conv_step(node, xq, xp, weights[node.input[1]], bias and _bias(g, node, weights, bias, xp), yp, rng, out))
            else:
                steps.append(_gemm_step(node, xq, xp, weights[node.input[1]], bias and _bias(g, node, weights, bias, xp), yp, rng, out))
        elif op in ("Add", "Mul"):
            aq, ap = float_input(node, node.input[0])
            bq, bp = float_input(node, node.input[1])
            out, yp, rng, chain = epilogue(node, node.output[0])
            steps.append(_binary_step(node, aq, ap, bq, bp, yp, rng, out))
        elif op in ("Relu", "Clip", "MaxPool", "GlobalAveragePool", "AveragePool", "Flatten", "Reshape", "Identity"):
            xq, xp = float_input(node, node.input[0])
            users = g.consumers.get(node.output[0], [])
            if len(users) != 1 or users[0].op_type != "QuantizeLinear" or node.output[0] in g.outputs:
                raise UnsupportedOpError(f"node '{node.name}' ({op}): output is not followed by QuantizeLinear")
            chain = [users[0]]
            out, yp = users[0].output[0], _qparams(g, users[0])
            steps.append(_unary_step(g, node, xq, xp, yp, out))
        else:
            raise UnsupportedOpError(f"node '{node.name}': op {op} has no numba lowering")
        for c in chain:
            done.add(id(c))
        qinfo[out] = yp
    for name in g.outputs:
        if name not in alias and name not in qinfo:
            raise UnsupportedOpError(f"graph output '{name}' is not produced by a lowered node")
    plan_outputs = [o.name for o in model.graph.output]
    return Plan(steps, plan_outputs, frozenset(quantized_inputs))


def _clamp_range_fn(g, node):
    if node.op_type == "Relu":
        return lambda qp: R.relu_range(qp.zp)
    lo = hi = None
    a = _attrs(node)
    if "min" in a or "max" in a:  # Clip-6
        lo, hi = a.get("min"), a.get("max")
    else:
        for idx, target in ((1, "lo"), (2, "hi")):
            if len(node.input) > idx and node.input[idx]:
                if node.input[idx] not in g.consts:
                    raise UnsupportedOpError(f"node '{node.name}' (Clip): bound '{node.input[idx]}' is not constant")
                val = float(np.asarray(g.consts[node.input[idx]]).reshape(()))
                lo, hi = (val, hi) if target == "lo" else (lo, val)
    return lambda qp: R.clip_range(lo, hi, qp.scale, qp.zp)


def _bias(g, node, weights, name, xp):
    if name not in weights:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): bias '{name}' is not a dequantized constant")
    b, bs, bz, _ = weights[name]
    if b.dtype != np.int32 or (bz is not None and np.any(np.asarray(bz) != 0)):
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): bias '{name}' is not int32 with zero point 0")
    _, ws, _, _ = weights[node.input[1]]
    target = (np.float32(xp.scale) * np.asarray(ws, np.float32)).astype(np.float32)
    bs = np.broadcast_to(np.asarray(bs, np.float32), b.shape)
    target = np.broadcast_to(target, b.shape)
    if np.array_equal(bs, target):
        return np.ascontiguousarray(b)
    return np.rint(b.astype(np.float64) * bs / target).astype(np.int32)


def _conv_step(node, xq, xp, w, bias, yp, rng, out):
    wq, ws, wz, _axis = w
    a = _attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedOpError(f"node '{node.name}' (Conv): auto_pad={a['auto_pad']!r} has no numba lowering")
    if wq.ndim != 4:
        raise UnsupportedOpError(f"node '{node.name}' (Conv): only 2-D convolutions are lowered")
    wz = np.zeros((), wq.dtype) if wz is None else np.asarray(wz)
    params = K.prepare_qconv(xp.zp.dtype, xp.scale, xp.zp, wq, ws, wz, yp.scale, yp.zp, bias,
                             strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                             dilations=a.get("dilations", (1, 1)), group=a.get("group", 1), out_range=rng)

    def fn(env):
        env[out] = QValue(K.run_qconv(params, env[xq].nhwc()), "NHWC")

    return Step(node.name, fn)


def _gemm_step(node, xq, xp, w, bias, yp, rng, out):
    wq, ws, wz, _axis = w
    a = _attrs(node)
    trans_b = bool(a.get("transB", 0))
    if node.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
        raise UnsupportedOpError(f"node '{node.name}' (Gemm): only transA=0, alpha=beta=1 are lowered")
    if wq.ndim != 2:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only a 2-D constant right operand is lowered")
    wz = np.zeros((), wq.dtype) if wz is None else np.asarray(wz)
    params = K.prepare_qgemm(xp.zp.dtype, xp.scale, xp.zp, wq, ws, wz, yp.scale, yp.zp, bias, trans_b=trans_b,
                             out_range=rng)

    def fn(env):
        env[out] = QValue(K.run_qgemm(params, env[xq].nchw()), "plain")

    return Step(node.name, fn)


def _binary_step(node, aq, ap, bq, bp, yp, rng, out):
    kernel = K.qlinear_add if node.op_type == "Add" else K.qlinear_mul

    def fn(env):
        va, vb = env[aq], env[bq]
        if va.layout == vb.layout:
            a, b, layout = va.data, vb.data, va.layout
        else:
            a, b, layout = va.nchw(), vb.nchw(), "plain"
        env[out] = QValue(kernel(a, ap.scale, ap.zp, b, bp.scale, bp.zp, yp.scale, yp.zp, out_range=rng), layout)

    return Step(node.name, fn)


def _same(p: QParams, q: QParams) -> bool:
    return p.scale == q.scale and p.zp == q.zp and p.zp.dtype == q.zp.dtype


def _unary_step(g, node, xq, xp, yp, out):
    op = node.op_type
    a = _attrs(node)
    if op in ("Relu", "Clip"):
        rng = _clamp_range_fn(g, node)(yp)

        def fn(env):
            v = env[xq]
            env[out] = QValue(K.requantize(v.data, xp.scale, xp.zp, yp.scale, yp.zp, out_range=rng), v.layout)

        return Step(node.name, fn)
    if op in ("MaxPool", "AveragePool"):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(a.get("kernel_shape", ())) != 2:
            raise UnsupportedOpError(f"node '{node.name}' ({op}): only 2-D pools with explicit pads are lowered")
        kw = dict(strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                  dilations=a.get("dilations", (1, 1)), ceil_mode=bool(a.get("ceil_mode", 0)))
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise UnsupportedOpError(f"node '{node.name}' (MaxPool): the Indices output has no numba lowering")

            def fn(env):
                y = K.max_pool(env[xq].nhwc(), a["kernel_shape"], layout="NHWC", **kw)
                if not _same(xp, yp):
                    y = K.requantize(y, xp.scale, xp.zp, yp.scale, yp.zp)
                env[out] = QValue(y, "NHWC")
        else:
            include = bool(a.get("count_include_pad", 0))

            def fn(env):
                env[out] = QValue(K.average_pool(env[xq].nhwc(), xp.scale, xp.zp, yp.scale, yp.zp, a["kernel_shape"],
                                                 count_include_pad=include, layout="NHWC", **kw), "NHWC")

        return Step(node.name, fn)
    if op == "GlobalAveragePool":
        def fn(env):
            env[out] = QValue(K.global_average_pool(env[xq].nhwc(), xp.scale, xp.zp, yp.scale, yp.zp, layout="NHWC"), "NHWC")

        return Step(node.name, fn)
    # shape-only ops: Flatten / Reshape / Identity, in ONNX (NCHW) semantics
    if op == "Reshape":
        if node.input[1] not in g.consts:
            raise UnsupportedOpError(f"node '{node.name}' (Reshape): shape '{node.input[1]}' is not constant")
        shape = [int(s) for s in g.consts[node.input[1]]]
        if a.get("allowzero", 0):
            raise UnsupportedOpError(f"node '{node.name}' (Reshape): allowzero=1 has no numba lowering")

    def fn(env):
        x = env[xq].nchw()
        if op == "Flatten":
            axis = int(a.get("axis", 1)) % max(x.ndim, 1)
            y = x.reshape(int(np.prod(x.shape[:axis])), -1)
        elif op == "Reshape":
            y = x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])
        else:
            y = x
        if not _same(xp, yp):
            y = K.requantize(np.ascontiguousarray(y), xp.scale, xp.zp, yp.scale, yp.zp)
        env[out] = QValue(np.ascontiguousarray(y), "plain")

    return Step(node.name, fn)


def _quantize_step(node, src, qp):
    out = node.output[0]

    def fn(env):
        env[out] = QValue(K.quantize_linear(env[src], qp.scale, qp.zp), "plain")

    return Step(node.name, fn)


def _requantize_step(node, src, xp, yp, rng):
    out = node.output[0]

    def fn(env):
        v = env[src]
        env[out] = QValue(K.requantize(v.data, xp.scale, xp.zp, yp.scale, yp.zp, out_range=rng), v.layout)

    return Step(node.name, fn)


def _dequantize_step(node, src, qp):
    out = node.output[0]

    def fn(env):
        env[out] = K.dequantize_linear(env[src].nchw(), qp.scale, qp.zp)

    return Step(node.name, fn)

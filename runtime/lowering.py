"""Lowering a QDQ ONNX graph into a plan of Numba kernel calls.

Patterns (``DQ`` = DequantizeLinear of a quantized activation, ``DQw`` = of a constant):

* ``QuantizeLinear(float graph input)``                         -> ``quantize_linear``
* ``DQ(x), DQw(W)[, DQw(B)] -> Conv -> [Relu | Clip] -> Q``       -> ``run_qconv`` (weights packed once)
* ``DQ(a), DQw(B)[, DQw(C)] -> MatMul | Gemm -> [Relu|Clip] -> Q``  -> ``run_qgemm``
* ``DQ(a), DQ(b) -> Add | Mul -> [Relu|Clip] -> Q``               -> ``qlinear_add`` / ``qlinear_mul``
* ``DQ(x) -> Relu | Clip -> Q``                                   -> ``requantize`` with a clamp range
* ``DQ(x) -> MaxPool -> Q``                                       -> ``max_pool`` (+ ``requantize`` if
  the scales differ), ``GlobalAveragePool``/``AveragePool`` -> the averaging kernels
* ``DQ(x_i) -> Concat -> Q``                                       -> each input requantized to the
  output's scale, then concatenated (``Q(concat(DQ(x_i))) = concat(Q(DQ(x_i)))``, element-wise)
* ``DQ(x) -> Flatten | Reshape | Transpose | Squeeze | Unsqueeze | Slice | Identity -> Q``
  -> the same index operation on the integers (+ ``requantize`` if the scales differ). A Reshape
  shape may be computed at run time (``Shape`` of an activation is answered from its integer
  tensor, in ONNX's NCHW order)
* ``DQ(x) -> f -> Q`` where ``f`` is a chain of element-wise float ops whose only variable input
  is ``x`` (Sigmoid, Tanh, Erf, HardSigmoid, HardSwish, Gelu, SiLU as ``x * Sigmoid(x)``, GELU as
  its Erf chain, Add/Sub/Mul/Div by a scalar constant, ...) -> ``lookup`` in a 256-entry table.
  The table is ``table[c] = Q(f(DQ(c)))`` for every input code ``c``, computed ONCE at load by
  ONNX Runtime (``ORT_DISABLE_ALL``) on the very nodes of the region, so the lookup equals ORT's
  evaluation of the QDQ graph element for element.
* ``DQ(x) -> Q`` (scale change)                                   -> ``requantize``
* ``DQ(x)`` feeding a graph output                               -> ``dequantize_linear``
* **float islands**: any other standard op (Softmax, LayerNormalization, Resize, a Conv whose
  output is not quantized, ...) whose inputs are dequantized activations, constants (or
  dequantized constants) or outputs of other islands runs as a one-node ONNX Runtime session
  (``ORT_DISABLE_ALL``, one thread), with an explicit ``dequantize_linear`` of its quantized
  inputs; a QuantizeLinear after it is a ``quantize_linear`` step. Those are exactly the Q/DQ
  borders of the QDQ graph, so an island computes what ORT computes.
* a uint8/int8 graph input read by a DequantizeLinear is taken as already quantized; a quantized
  graph output (a QuantizeLinear output) is returned as the integer tensor, NCHW

A node that reads a float graph input directly (the graph is not quantized there), an op of a
non-standard domain, or an op with a subgraph raises ``UnsupportedOpError`` naming the node. The
bias of a Conv/Gemm is an int32 constant in scale ``s_x * s_w``; a bias quantized with another
scale is re-expressed in that scale (``rne(b * s_b / (s_x * s_w))``). The float graph and the plan
differ only by the requantization definition of Conv/Gemm/pools (integer accumulation then one
float32 rounding, instead of float accumulation): at most one quantization step on a near-tie, as
the tests measure.

4-D activations are kept NHWC between steps; they are transposed to NCHW only where ONNX
semantics need it (shape ops, islands, graph outputs).

Buffers: every step owns its output (and scratch) buffers, allocated on the first run for the
shapes it sees and reused by later runs with the same shapes, so a steady-state ``run`` allocates
only its returned outputs. A plan runs one call at a time (a lock serialises concurrent calls).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .. import kernels as K
from ..ir.errors import UnsupportedOpError
from ..kernels import reference as R

logger = logging.getLogger(__name__)

#: element-wise float ops a lookup table may absorb (one variable input, or scalar constants)
LUT_OPS = frozenset({
    "Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish", "Gelu", "Relu", "Clip", "LeakyRelu", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
})
#: ops lowered as index operations on the integers (NCHW semantics)
SHAPE_OPS = frozenset({"Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Slice"})
_NCHW_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


class Buffers:
    """Arrays owned by one step, keyed by role; reallocated only when the shape or dtype changes."""

    __slots__ = ("_arrays",)

    def __init__(self):
        self._arrays: dict = {}

    def get(self, key: str, shape, dtype) -> np.ndarray:
        arr = self._arrays.get(key)
        if arr is not None and arr.shape == tuple(shape) and arr.dtype == dtype:  # the steady state
            return arr
        shape = tuple(int(d) for d in shape)
        if arr is None or arr.shape != shape or arr.dtype != np.dtype(dtype):
            arr = np.empty(shape, dtype)
            self._arrays[key] = arr
        return arr

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())


@dataclass
class QValue:
    """A quantized activation at run time: the integer array, its layout and its parameters."""

    data: np.ndarray
    layout: str  # "NHWC" for 4-D tensors kept channels-last, "plain" otherwise

    def nchw(self, bufs: Buffers | None = None, key: str = "nchw") -> np.ndarray:
        if self.layout != "NHWC":
            return self.data
        view = self.data.transpose(0, 3, 1, 2)
        if bufs is None:
            return np.ascontiguousarray(view)
        dst = bufs.get(key, view.shape, view.dtype)
        np.copyto(dst, view)
        return dst

    def nhwc(self, bufs: Buffers | None = None, key: str = "nhwc") -> np.ndarray:
        if self.layout == "NHWC":
            return self.data
        if self.data.ndim != 4:
            raise ValueError(f"expected a 4-D activation, got shape {self.data.shape}")
        view = self.data.transpose(0, 2, 3, 1)
        if bufs is None:
            return np.ascontiguousarray(view)
        dst = bufs.get(key, view.shape, view.dtype)
        np.copyto(dst, view)
        return dst

    def onnx_shape(self) -> tuple[int, ...]:
        s = self.data.shape
        return (s[0], s[3], s[1], s[2]) if self.layout == "NHWC" else tuple(s)


class Bound:
    """A step's kernel call bound to its buffers (``kernels.bind_*``), rebuilt only when one of its
    inputs is no longer the same object -- a new input shape, or a producer that reallocated.
    ``bound(make, *inputs)``: on a change, ``make(*inputs)`` validates, allocates and returns
    ``(result, call)``; every time, ``call()`` runs and ``result`` (the output QValue) is returned.
    Buffers are owned by the steps and reused from run to run, so a steady-state run makes no
    checks."""

    __slots__ = ("_ids", "_inputs", "_result", "_call")

    def __init__(self):
        self._ids: tuple = ()
        self._inputs: tuple = ()  # held, so that their ids cannot be reused while bound
        self._result = self._call = None

    def __call__(self, make, *inputs):
        ids = tuple(map(id, inputs))
        if ids != self._ids:
            (self._result, self._call), self._ids, self._inputs = make(*inputs), ids, inputs
        self._call()
        return self._result


@dataclass
class Step:
    name: str  # the ONNX node(s) this step implements
    fn: Callable[[dict], None]
    kind: str = "kernel"  # kernel | lut | island | shape | quantize | dequantize
    bufs: Buffers = field(default_factory=Buffers)


@dataclass
class Plan:
    steps: list[Step]
    outputs: list[str]
    quantized_inputs: frozenset = frozenset()  # graph inputs that arrive already quantized
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def islands(self) -> list[str]:
        """Names of the nodes that run as float islands on ONNX Runtime."""
        return [s.name for s in self.steps if s.kind == "island"]

    @property
    def buffer_bytes(self) -> int:
        return sum(s.bufs.nbytes for s in self.steps)

    def run(self, names, feeds) -> list[np.ndarray]:
        with self._lock:
            env: dict = {k: QValue(np.ascontiguousarray(v), "plain") if k in self.quantized_inputs else v
                         for k, v in feeds.items()}
            for step in self.steps:
                step.fn(env)
            # step buffers are reused by the next run: hand out copies
            return [np.array(env[n].nchw()) if isinstance(env[n], QValue) else env[n] for n in names]


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
    dq_src: dict = field(default_factory=dict)  # DQ output -> its integer input (activation DQs)
    weight_dq: dict = field(default_factory=dict)  # DQ output -> DQ node (DQs of constants)
    const_nodes: dict = field(default_factory=dict)  # Constant node output -> node

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
                        g.const_nodes[node.output[0]] = node
            for name in node.input:
                if name:
                    g.consumers.setdefault(name, []).append(node)
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
                if node.input[0] in g.consts:
                    g.weight_dq[node.output[0]] = node
                else:
                    g.dq_src[node.output[0]] = node.input[0]
        g.outputs = {o.name for o in model.graph.output}
        return g

    def opsets(self):
        return list(self.model.opset_import)


def _label(node) -> str:
    """A node's name, or (for unnamed nodes) its first output."""
    return node.name or node.output[0]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _qparams(g: _Graph, node) -> QParams:
    """Scale and zero point of a per-tensor Q/DQ node."""
    scale = np.asarray(g.consts.get(node.input[1]))
    if node.input[1] not in g.consts or scale.size != 1:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only constant per-tensor scales are lowered")
    zp = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.uint8(0)
    return QParams(np.float32(scale.reshape(())), np.asarray(zp).reshape(()))


class _Decline(Exception):
    """An integer pattern does not apply to this node; the node becomes a float island instead."""


def lower(model: onnx.ModelProto) -> Plan:
    """Lower ``model`` (a QDQ graph) into a plan; raises ``UnsupportedOpError`` naming the first
    node that has no lowering."""
    g = _Graph.build(model)
    steps: list[Step] = []
    qinfo: dict[str, QParams] = {}  # quantized activation name -> its parameters
    alias: dict[str, str] = {}  # float name (DQ output) -> quantized activation name
    weights: dict[str, tuple] = {}  # float name (DQ of a constant) -> (int array, scale, zp, axis)
    floats: dict[str, int] = {}  # run-time non-quantized values (island/Shape outputs) -> elem type
    done: set[int] = set()
    quantized_inputs: set[str] = set()
    graph_inputs = {i.name for i in model.graph.input} - set(g.consts)
    nodes = list(model.graph.node)

    def float_input(node, name):
        if name not in alias:
            raise _Decline(f"node '{node.name}' ({node.op_type}): input '{name}' is not a dequantized activation")
        q = alias[name]
        return q, qinfo[q]

    def single_q(node, name):
        users = g.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or name in g.outputs:
            raise _Decline(f"node '{node.name}' ({node.op_type}): output is not followed by QuantizeLinear")
        return users[0]

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
                try:
                    out_range_fn = _clamp_range_fn(g, user)
                except UnsupportedOpError:
                    break
                chain.append(user)
                cur = user.output[0]
                continue
            break
        raise _Decline(f"node '{node.name}' ({node.op_type}): output is not followed by QuantizeLinear")

    def lower_integer(node):
        """One integer step for ``node`` (and the nodes it absorbs); raises _Decline."""
        op = node.op_type
        if op in ("Conv", "MatMul", "Gemm"):
            xq, xp = float_input(node, node.input[0])
            if node.input[1] not in weights:
                raise _Decline(f"node '{node.name}' ({op}): weight '{node.input[1]}' is not a dequantized constant")
            out, yp, rng, chain = epilogue(node, node.output[0])
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            b = bias and _bias(g, node, weights, bias, xp)
            if op == "Conv":
                step = _conv_step(node, xq, xp, weights[node.input[1]], b, yp, rng, out)
            else:
                step = _gemm_step(node, xq, xp, weights[node.input[1]], b, yp, rng, out)
            return step, chain, out, yp
        if op in ("Add", "Mul") and all(i in alias for i in node.input):
            aq, ap = float_input(node, node.input[0])
            bq, bp = float_input(node, node.input[1])
            out, yp, rng, chain = epilogue(node, node.output[0])
            return _binary_step(node, aq, ap, bq, bp, yp, rng, out), chain, out, yp
        if op == "Concat":
            srcs = [float_input(node, i) for i in node.input]
            q = single_q(node, node.output[0])
            yp = _qparams(g, q)
            return _concat_step(node, srcs, yp, q.output[0]), [q], q.output[0], yp
        if op in ("Relu", "Clip", "MaxPool", "GlobalAveragePool", "AveragePool") or op in SHAPE_OPS:
            xq, xp = float_input(node, node.input[0])
            q = single_q(node, node.output[0])
            yp = _qparams(g, q)
            return _unary_step(g, node, xq, xp, yp, q.output[0], floats), [q], q.output[0], yp
        raise _Decline(f"node '{node.name}': op {op} has no integer lowering")

    def lower_lut(node):
        """``DQ(x) -> element-wise chain -> Q`` as one table lookup; raises _Decline."""
        region, src, q = _lut_region(g, node, weights)
        yp = _qparams(g, q)
        xp = qinfo.get(src)
        if xp is None:
            raise _Decline(f"node '{node.name}': input '{src}' is not a quantized activation")
        table = _lut_table(g, region, src, xp, q)
        return _lut_step(node, region, src, table, yp, q.output[0]), region[1:] + [q], q.output[0], yp

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
            if _qparams(g, node) != qinfo[src]:
                raise UnsupportedOpError(f"node '{node.name}' (DequantizeLinear): parameters differ from its QuantizeLinear's")
            alias[node.output[0]] = src
            if node.output[0] in g.outputs:
                steps.append(_dequantize_step(node, src, qinfo[src]))
            continue
        if op == "QuantizeLinear":
            src, qp = node.input[0], _qparams(g, node)
            if src in graph_inputs or src in floats:
                steps.append(_quantize_step(node, src, qp))
            elif src in alias:
                steps.append(_requantize_step(node, alias[src], qinfo[alias[src]], qp, None))
            else:
                raise UnsupportedOpError(f"node '{node.name}' (QuantizeLinear): input '{src}' comes from an op with no lowering")
            qinfo[node.output[0]] = qp
            continue
        if op == "Shape" and node.input[0] in alias:
            steps.append(_shape_step(node, alias[node.input[0]]))
            floats[node.output[0]] = onnx.TensorProto.INT64
            continue
        lowered = None
        try:
            lowered = lower_integer(node)
        except _Decline as reason:
            logger.debug("%s", reason)
        if lowered is None and op in LUT_OPS:
            try:
                lowered = lower_lut(node)
            except _Decline as reason:
                logger.debug("%s", reason)
        if lowered is None:
            step, outs = _island_step(g, node, alias, qinfo, weights, floats, graph_inputs)
            steps.append(step)
            floats.update(outs)
            logger.info("node '%s' (%s) runs as a float island on ONNX Runtime", node.name, op)
            continue
        step, chain, out, yp = lowered
        steps.append(step)
        for c in chain:
            done.add(id(c))
        qinfo[out] = yp
    for name in g.outputs:
        if name not in alias and name not in qinfo and name not in floats:
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
        raise _Decline(f"node '{node.name}' ({node.op_type}): bias '{name}' is not a dequantized constant")
    b, bs, bz, _ = weights[name]
    if b.dtype != np.int32 or (bz is not None and np.any(np.asarray(bz) != 0)):
        raise _Decline(f"node '{node.name}' ({node.op_type}): bias '{name}' is not int32 with zero point 0")
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
        raise _Decline(f"node '{node.name}' (Conv): auto_pad={a['auto_pad']!r} has no numba lowering")
    if wq.ndim != 4:
        raise _Decline(f"node '{node.name}' (Conv): only 2-D convolutions are lowered")
    wz = np.zeros((), wq.dtype) if wz is None else np.asarray(wz)
    try:
        params = K.prepare_qconv(xp.zp.dtype, xp.scale, xp.zp, wq, ws, wz, yp.scale, yp.zp, bias,
                                 strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                                 dilations=a.get("dilations", (1, 1)), group=a.get("group", 1), out_range=rng)
    except (TypeError, ValueError) as exc:
        raise _Decline(f"node '{node.name}' (Conv): {exc}") from exc
    bufs = Buffers()

    bound = Bound()

    def bind(x):
        y = bufs.get("y", params.output_shape_nhwc(x.shape), params.y_dtype)
        scratch = None
        if params.kind == "gemm" and params.fast is None and params.strides != (1, 1):
            scratch = bufs.get("strided", x[:, ::params.strides[0], ::params.strides[1], :].shape, x.dtype)
        return QValue(y, "NHWC"), K.bind_qconv(params, x, y, scratch=scratch)

    def fn(env):
        env[out] = bound(bind, env[xq].nhwc(bufs))

    return Step(node.name, fn, "kernel", bufs)


def _gemm_step(node, xq, xp, w, bias, yp, rng, out):
    wq, ws, wz, _axis = w
    a = _attrs(node)
    trans_b = bool(a.get("transB", 0))
    if node.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
        raise _Decline(f"node '{node.name}' (Gemm): only transA=0, alpha=beta=1 are lowered")
    if wq.ndim != 2:
        raise _Decline(f"node '{node.name}' ({node.op_type}): only a 2-D constant right operand is lowered")
    wz = np.zeros((), wq.dtype) if wz is None else np.asarray(wz)
    try:
        params = K.prepare_qgemm(xp.zp.dtype, xp.scale, xp.zp, wq, ws, wz, yp.scale, yp.zp, bias, trans_b=trans_b,
                                 out_range=rng)
    except (TypeError, ValueError) as exc:
        raise _Decline(f"node '{node.name}' ({node.op_type}): {exc}") from exc
    bufs = Buffers()

    bound = Bound()

    def bind(x):
        y = bufs.get("y", x.shape[:-1] + (params.n,), params.y_dtype)
        return QValue(y, "plain"), K.bind_qgemm(params, x, y)

    def fn(env):
        env[out] = bound(bind, env[xq].nchw(bufs))

    return Step(node.name, fn, "kernel", bufs)


def _binary_step(node, aq, ap, bq, bp, yp, rng, out):
    params = K.prepare_qbinary("add" if node.op_type == "Add" else "mul", ap.zp.dtype, ap.scale, ap.zp, bp.zp.dtype,
                               bp.scale, bp.zp, yp.scale, yp.zp, out_range=rng)
    bufs = Buffers()
    bound = Bound()

    def bind(a, b, layout):
        y = bufs.get("y", np.broadcast_shapes(a.shape, b.shape), yp.zp.dtype)
        return QValue(y, layout), K.bind_qbinary(params, a, b, y)

    def fn(env):
        va, vb = env[aq], env[bq]
        if va.layout == vb.layout and va.data.shape == vb.data.shape:
            env[out] = bound(bind, va.data, vb.data, va.layout)
        else:
            env[out] = bound(bind, va.nchw(bufs, "a"), vb.nchw(bufs, "b"), "plain")

    return Step(node.name, fn, "kernel", bufs)


def _concat_step(node, srcs, yp, out):
    axis = int(_attrs(node).get("axis", 0))
    bufs = Buffers()

    def fn(env):
        vals = [env[q] for q, _ in srcs]
        rank = vals[0].data.ndim
        ax = axis % rank
        if all(v.layout == "NHWC" for v in vals):
            arrays, layout, ax = [v.data for v in vals], "NHWC", _NCHW_TO_NHWC_AXIS[ax]
        else:
            arrays, layout = [v.nchw(bufs, f"in{i}") for i, v in enumerate(vals)], "plain"
        parts = []
        for i, (arr, (_, xp)) in enumerate(zip(arrays, srcs)):
            if not _same(xp, yp):
                arr = K.requantize(arr, xp.scale, xp.zp, yp.scale, yp.zp, out=bufs.get(f"rq{i}", arr.shape, yp.zp.dtype))
            parts.append(arr)
        shape = list(parts[0].shape)
        shape[ax] = sum(p.shape[ax] for p in parts)
        y = bufs.get("y", shape, yp.zp.dtype)
        np.concatenate(parts, axis=ax, out=y)
        env[out] = QValue(y, layout)

    return Step(node.name, fn, "kernel", bufs)


def _same(p: QParams, q: QParams) -> bool:
    return p.scale == q.scale and p.zp == q.zp and p.zp.dtype == q.zp.dtype


def _const_ints(g, node, idx, what):
    if len(node.input) <= idx or not node.input[idx]:
        return None
    if node.input[idx] not in g.consts:
        raise _Decline(f"node '{node.name}' ({node.op_type}): {what} '{node.input[idx]}' is not constant")
    return [int(v) for v in np.asarray(g.consts[node.input[idx]]).reshape(-1)]


def _index_fn(g, node, floats):
    """``f(x_nchw, env) -> view`` of a shape-only op in ONNX semantics."""
    op = node.op_type
    a = _attrs(node)
    if op == "Identity":
        return lambda x, env: x
    if op == "Flatten":
        def flatten(x, env):
            axis = int(a.get("axis", 1)) % max(x.ndim, 1) if x.ndim else 0
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        return flatten
    if op == "Reshape":
        if a.get("allowzero", 0):
            raise _Decline(f"node '{node.name}' (Reshape): allowzero=1 has no numba lowering")
        name = node.input[1]
        if name in g.consts:
            shape = [int(s) for s in np.asarray(g.consts[name]).reshape(-1)]
            return lambda x, env: x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])
        if name in floats:
            return lambda x, env: x.reshape([x.shape[i] if s == 0 else int(s) for i, s in enumerate(np.asarray(env[name]).reshape(-1))])
        raise _Decline(f"node '{node.name}' (Reshape): shape '{name}' is not constant")
    if op == "Transpose":
        perm = a.get("perm")
        return lambda x, env: x.transpose(perm) if perm is not None else x.transpose()
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes")
        if axes is None:
            axes = _const_ints(g, node, 1, "axes")
        if op == "Unsqueeze":
            if axes is None:
                raise _Decline(f"node '{node.name}' (Unsqueeze): no axes")
            return lambda x, env: np.expand_dims(x, tuple(int(v) for v in axes))
        return lambda x, env: np.squeeze(x, tuple(int(v) for v in axes)) if axes is not None else np.squeeze(x)
    if op == "Slice":
        if "starts" in a:  # Slice-1
            starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
        else:
            starts, ends = _const_ints(g, node, 1, "starts"), _const_ints(g, node, 2, "ends")
            axes, steps = _const_ints(g, node, 3, "axes"), _const_ints(g, node, 4, "steps")

        def slc(x, env):
            ax = list(axes) if axes is not None else list(range(len(starts)))
            st = list(steps) if steps is not None else [1] * len(starts)
            index = [slice(None)] * x.ndim
            for s, e, k, d in zip(starts, ends, ax, st):
                k %= x.ndim
                start, stop, step = slice(s, e, d).indices(x.shape[k]) if d > 0 else _neg_slice(s, e, d, x.shape[k])
                index[k] = slice(start, stop, step)
            return x[tuple(index)]
        return slc
    raise _Decline(f"node '{node.name}': op {op} is not a shape op")


def _neg_slice(s, e, d, n):
    """ONNX Slice bounds for a negative step (ends may be below -n meaning 'through index 0')."""
    s = s + n if s < 0 else s
    s = max(0, min(n - 1, s))
    e = e + n if e < 0 else e
    e = max(-1, min(n - 1, e))
    return s, (None if e < 0 else e), d


def _unary_step(g, node, xq, xp, yp, out, floats):
    op = node.op_type
    a = _attrs(node)
    bufs = Buffers()
    if op in ("Relu", "Clip"):
        try:
            rng = _clamp_range_fn(g, node)(yp)
        except UnsupportedOpError as exc:
            raise _Decline(str(exc)) from exc

        def fn(env):
            v = env[xq]
            y = bufs.get("y", v.data.shape, yp.zp.dtype)
            env[out] = QValue(K.requantize(v.data, xp.scale, xp.zp, yp.scale, yp.zp, out_range=rng, out=y), v.layout)

        return Step(node.name, fn, "kernel", bufs)
    if op in ("MaxPool", "AveragePool"):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(a.get("kernel_shape", ())) != 2:
            raise _Decline(f"node '{node.name}' ({op}): only 2-D pools with explicit pads are lowered")
        kw = dict(strides=a.get("strides", (1, 1)), pads=a.get("pads", (0, 0, 0, 0)),
                  dilations=a.get("dilations", (1, 1)), ceil_mode=bool(a.get("ceil_mode", 0)))
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise _Decline(f"node '{node.name}' (MaxPool): the Indices output has no numba lowering")

            def fn(env):
                x = env[xq].nhwc(bufs)
                y = K.max_pool(x, a["kernel_shape"], layout="NHWC", out=_pool_buf(bufs, "p", x, a["kernel_shape"], kw, xp.zp.dtype), **kw)
                if not _same(xp, yp):
                    y = K.requantize(y, xp.scale, xp.zp, yp.scale, yp.zp, out=bufs.get("y", y.shape, yp.zp.dtype))
                env[out] = QValue(y, "NHWC")
        else:
            include = bool(a.get("count_include_pad", 0))

            def fn(env):
                x = env[xq].nhwc(bufs)
                y = _pool_buf(bufs, "y", x, a["kernel_shape"], kw, yp.zp.dtype)
                env[out] = QValue(K.average_pool(x, xp.scale, xp.zp, yp.scale, yp.zp, a["kernel_shape"],
                                                 count_include_pad=include, layout="NHWC", out=y, **kw), "NHWC")

        return Step(node.name, fn, "kernel", bufs)
    if op == "GlobalAveragePool":
        bound = Bound()

        def bind(x):
            y = bufs.get("y", (x.shape[0], 1, 1, x.shape[3]), yp.zp.dtype)
            return QValue(y, "NHWC"), K.bind_global_average_pool(x, xp.scale, xp.zp, yp.scale, yp.zp, y)

        def fn(env):
            env[out] = bound(bind, env[xq].nhwc(bufs))

        return Step(node.name, fn, "kernel", bufs)
    index = _index_fn(g, node, floats)
    # the result depends on the input array alone (no run-time shape input): a view of the same
    # buffer is the same view, so consumers keep their bound calls
    static = not (op == "Reshape" and node.input[1] not in g.consts)
    view = [None, None]  # input array, the QValue of its contiguous same-scale view

    def fn(env):
        v = env[xq]
        x = v.nchw(bufs)
        if static and x is view[0]:
            env[out] = view[1]
            return
        y = index(x, env)
        if static and y.flags.c_contiguous and _same(xp, yp) and np.may_share_memory(x, y):
            view[:] = [x, QValue(y, "plain")]
            env[out] = view[1]
            return
        if not y.flags.c_contiguous:
            dst = bufs.get("c", y.shape, y.dtype)
            np.copyto(dst, y)
            y = dst
        if not _same(xp, yp):
            y = K.requantize(y, xp.scale, xp.zp, yp.scale, yp.zp, out=bufs.get("y", y.shape, yp.zp.dtype))
        env[out] = QValue(y, "plain")

    return Step(node.name, fn, "shape", bufs)


def _pool_buf(bufs, key, x, kernel_shape, kw, dtype):
    n, h, w, c = x.shape
    (kh, kwd), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel_shape, kw["strides"], kw["pads"], kw["dilations"]
    oh = R.output_size(h, kh, sh, pt, pb, dh, kw["ceil_mode"])
    ow = R.output_size(w, kwd, sw, pl, pr, dw, kw["ceil_mode"])
    return bufs.get(key, (n, oh, ow, c), dtype)


# ----------------------------------------------------------------------------- lookup tables


def _lut_region(g: _Graph, start, weights):
    """The element-wise region that starts at ``start`` and ends in one QuantizeLinear.

    Returns ``(nodes in topological order, the quantized source, the QuantizeLinear)``. Every node's
    variable inputs are dequantizations of one quantized activation or outputs of the region; its
    other inputs are scalar constants (or dequantized scalar constants)."""
    src = None

    def scalar_const(name):
        if name in g.consts:
            return np.asarray(g.consts[name]).size == 1
        if name in weights:
            return np.asarray(weights[name][0]).size == 1
        return False

    def fits(node, produced):
        nonlocal src
        if node.op_type not in LUT_OPS or node.domain not in ("", "ai.onnx"):
            return False
        variable = False
        for name in node.input:
            if not name:
                continue
            if name in produced:
                variable = True
            elif name in g.dq_src and (src is None or g.dq_src[name] == src):
                src = g.dq_src[name]
                variable = True
            elif not scalar_const(name):
                return False
        return variable

    if not fits(start, set()):
        raise _Decline(f"node '{start.name}' ({start.op_type}): not an element-wise function of one activation")
    region, produced = [start], set(start.output)
    members = {id(start)}
    while True:
        if produced & g.outputs:
            raise _Decline(f"node '{start.name}': the element-wise region feeds a graph output")
        pending = []
        for name in produced:
            for c in g.consumers.get(name, []):
                if id(c) not in members and all(id(p) != id(c) for p in pending):
                    pending.append(c)
        qs = [c for c in pending if c.op_type == "QuantizeLinear"]
        others = [c for c in pending if c.op_type != "QuantizeLinear"]
        if not others:
            if len(qs) != 1:
                raise _Decline(f"node '{start.name}': the element-wise region does not end in one QuantizeLinear")
            return region, src, qs[0]
        for c in others:
            if not fits(c, produced):
                raise _Decline(f"node '{start.name}': '{c.name}' ({c.op_type}) does not fit a lookup table")
            region.append(c)
            members.add(id(c))
            produced |= set(c.output)


def _mini_model(g: _Graph, nodes, inputs: dict, outputs, extra_nodes=(), extra_inits=()) -> onnx.ModelProto:
    """A model of ``nodes`` alone: ``inputs`` (name -> elem type) are its graph inputs, constants
    (initializers, Constant nodes, DequantizeLinear of constants) are copied in."""
    produced = {o for n in list(extra_nodes) + list(nodes) for o in n.output}
    inits, pre = [], []
    seen = set(inputs) | {t.name for t in extra_inits}

    def need(name):
        if not name or name in seen or name in produced:
            return
        seen.add(name)
        if name in g.weight_dq:
            dq = g.weight_dq[name]
            for i in dq.input:
                need(i)
            pre.append(dq)
        elif name in g.consts:
            inits.append(numpy_helper.from_array(np.asarray(g.consts[name]), name))
        else:
            raise _Decline(f"tensor '{name}' is neither an input nor a constant of the island")

    for n in list(extra_nodes) + list(nodes):
        for name in n.input:
            need(name)
    graph = onnx.helper.make_graph(
        pre + list(extra_nodes) + list(nodes), "island",
        [onnx.helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs], inits + list(extra_inits))
    model = onnx.helper.make_model(graph, opset_imports=g.opsets())
    model.ir_version = g.model.ir_version
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises its own InferenceError types
        raise _Decline(f"shape inference failed on the island: {exc}".splitlines()[0]) from exc


def _ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _Decline(f"ONNX Runtime cannot run the island: {first}") from exc


def _lut_table(g: _Graph, region, src, xp: QParams, q) -> np.ndarray:
    """``table[c] = Q(f(DQ(c)))`` for the 256 codes ``c``, evaluated by ONNX Runtime on the region."""
    dtype = xp.zp.dtype
    codes = np.arange(256, dtype=np.uint8).view(dtype) if dtype == np.int8 else np.arange(256, dtype=np.uint8)
    x_names = sorted({i for n in region for i in n.input if g.dq_src.get(i) == src})
    s_name, z_name = "__lut_scale", "__lut_zero_point"
    dqs = [onnx.helper.make_node("DequantizeLinear", ["__lut_codes", s_name, z_name], [x], name=f"__lut_dq{i}")
           for i, x in enumerate(x_names)]
    inits = [numpy_helper.from_array(np.asarray(xp.scale, np.float32).reshape(()), s_name),
             numpy_helper.from_array(np.asarray(xp.zp).reshape(()), z_name)]
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _mini_model(g, list(region) + [q], {"__lut_codes": elem}, [q.output[0]], dqs, inits)
    table = _ort_session(model).run(None, {"__lut_codes": codes})[0]
    return np.ascontiguousarray(table.reshape(256))


def _lut_step(node, region, src, table, yp, out):
    bufs = Buffers()

    def fn(env):
        v = env[src]
        y = bufs.get("y", v.data.shape, table.dtype)
        env[out] = QValue(K.lookup(v.data, table, out=y), v.layout)

    return Step("+".join(_label(n) for n in region), fn, "lut", bufs)


# ----------------------------------------------------------------------------- float islands


def _island_step(g: _Graph, node, alias, qinfo, weights, floats, graph_inputs):
    """One node run by ONNX Runtime between explicit DequantizeLinear / QuantizeLinear borders."""
    op = node.op_type
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        raise UnsupportedOpError(f"node '{node.name}': op {op} (with a subgraph) has no numba lowering")
    inputs: dict[str, int] = {}
    dq_inputs: list[tuple[str, str, QParams]] = []
    for name in node.input:
        if not name or name in inputs:
            continue
        if name in alias:
            inputs[name] = onnx.TensorProto.FLOAT
            dq_inputs.append((name, alias[name], qinfo[alias[name]]))
        elif name in floats:
            inputs[name] = floats[name]
        elif name in weights or name in g.consts:
            continue
        elif name in graph_inputs:
            raise UnsupportedOpError(f"node '{node.name}' ({op}): input '{name}' is not a dequantized activation")
        else:
            raise UnsupportedOpError(f"node '{node.name}' ({op}): input '{name}' comes from an op with no lowering")
    try:
        model = _mini_model(g, [node], inputs, [o for o in node.output if o])
        sess = _ort_session(model)
    except _Decline as exc:
        raise UnsupportedOpError(f"node '{node.name}': op {op} has no numba lowering ({exc})") from exc
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    if any(t == onnx.TensorProto.UNDEFINED for t in out_types.values()):
        raise UnsupportedOpError(f"node '{node.name}': op {op} has no numba lowering (output type unknown)")
    names = [o for o in node.output if o]
    bufs = Buffers()

    def fn(env):
        feeds = {}
        for i, (name, q, qp) in enumerate(dq_inputs):
            x = env[q].nchw(bufs, f"x{i}")
            feeds[name] = K.dequantize_linear(x, qp.scale, qp.zp, out=bufs.get(f"f{i}", x.shape, np.float32))
        for name, t in inputs.items():
            if name not in feeds:
                feeds[name] = env[name]
        for name, value in zip(names, sess.run(names, feeds)):
            env[name] = value

    return Step(_label(node), fn, "island", bufs), out_types


def _shape_step(node, src):
    a = _attrs(node)
    out = node.output[0]

    def fn(env):
        shape = np.array(env[src].onnx_shape(), np.int64)
        env[out] = shape[a.get("start", 0): a.get("end", None)] if ("start" in a or "end" in a) else shape

    return Step(node.name, fn, "shape")


# ----------------------------------------------------------------------------- borders


def _quantize_step(node, src, qp):
    out = node.output[0]
    bufs = Buffers()

    to_nhwc = K.prepare_quantize_to_nhwc(qp.scale, qp.zp)

    def fn(env):
        x = env[src]
        if x.ndim == 4:  # straight into the runtime's NHWC layout, one pass
            n, c, h, w = x.shape
            env[out] = QValue(to_nhwc(x, bufs.get("y", (n, h, w, c), qp.zp.dtype)), "NHWC")
        else:
            env[out] = QValue(K.quantize_linear(x, qp.scale, qp.zp, out=bufs.get("y", x.shape, qp.zp.dtype)), "plain")

    return Step(node.name, fn, "quantize", bufs)


def _requantize_step(node, src, xp, yp, rng):
    out = node.output[0]
    bufs = Buffers()

    def fn(env):
        v = env[src]
        y = bufs.get("y", v.data.shape, yp.zp.dtype)
        env[out] = QValue(K.requantize(v.data, xp.scale, xp.zp, yp.scale, yp.zp, out_range=rng, out=y), v.layout)

    return Step(node.name, fn, "kernel", bufs)


def _dequantize_step(node, src, qp):
    out = node.output[0]

    def fn(env):
        env[out] = K.dequantize_linear(env[src].nchw(), qp.scale, qp.zp)

    return Step(node.name, fn, "dequantize")

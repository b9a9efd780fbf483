"""InsertQDQPass: INT8 QuantizeLinear/DequantizeLinear insertion from calibrated ranges.

Quantization maps a real ``x`` to an integer ``q = clamp(round(x / s) + z, qmin, qmax)`` and back
``x' = (q - z) * s``. Where they go (target ``ort``, the CPU provider of ONNX Runtime, whose QDQ
transformer turns ``DQ -> op -> Q`` groups into integer kernels):

- **Weights** (constant inputs of Conv, ConvTranspose, Gemm, MatMul) are stored as int8,
  symmetric (``z = 0``), per output channel: ``s_c = max|W_c| / qmax_w``,
  ``q = clamp(round(W / s_c), -qmax_w, qmax_w)``, read through a ``DequantizeLinear`` with
  ``axis`` = 0 for Conv (``[C_out, C_in/g, k...]``), 1 for ConvTranspose (``[C_in, C_out/g, k...]``,
  the scale is per ``C_out/g`` column, shared by the groups), 0 for Gemm with ``transB=1``
  (``[N, K]``) and 1 with ``transB=0`` (``[K, N]``), 1 for a MatMul 2-D weight ``[K, N]``; other
  MatMul weights are per-tensor. ``--per-tensor`` makes all weights per-tensor.
- **Bias** (Conv/ConvTranspose input 2, Gemm ``C`` when ``beta == 1`` and ``C`` is ``[N]``) is
  int32 with ``z = 0`` at scale ``s_b[c] = s_x * s_w[c]`` (computed in float32, as the fused
  kernels assume), ``q = round(b / s_b)``: the integer kernels add it to the int32 accumulator.
- **Activations**: every float input of Conv/ConvTranspose/Gemm/MatMul/Add/Mul/Concat/
  AveragePool/GlobalAveragePool and every output of those ops gets ``Q -> DQ`` (all readers read
  the DQ). An output read only by a Relu, or by a Clip with constant bounds, is quantized after
  the activation instead, with the range cut to the activation's bounds; ONNX Runtime then drops
  the Relu/Clip into the Q (its ``ReluQuantFusion``/``ClipQuantFusion`` need ``z = qmin`` for Relu
  and the Q's representable range ``[s(qmin-z), s(qmax-z)]`` inside Clip's ``[min, max]``; the
  scale is nudged down by ulps until it is in float32). Gemm/MatMul outputs that are graph
  outputs, or that no quantized node reads (e.g. a transformer's MatMul followed by a float bias
  Add and LayerNorm when only MatMul is quantized), keep float: ORT runs QGemm /
  MatMulIntegerToFloat with float output, and a Q there would only add error. Pass-through ops
  (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity) take the parameters of
  their input, so ORT drops their Q/DQ and runs them on integers. Constant float inputs of
  Add/Mul/Concat are stored as integers of the activation type with their own min/max range.
- Activation parameters from a calibrated ``(lo, hi)`` widened to contain 0: asymmetric
  ``s = (hi - lo) / 255``, ``z = qmin - round(lo / s)``; symmetric ``s = max(|lo|, |hi|) / 127``,
  ``z = 0`` (s8) or 128 (u8).

**The non-VNNI trap.** x86 CPUs without AVX512-VNNI/AVX-VNNI multiply uint8 x int8 with
``vpmaddubsw``, which adds two products into a *saturating int16*: ``255*127*2 = 64770`` overflows
``32767``. Default here: uint8 activations with **7-bit weights** (``qmax_w = 63``, so
``255*64*2 = 32640`` fits), which makes the fused kernels exact on every x86 CPU (the digits test
proves it against ORT's own defaults). ``weight_bits=8`` is for VNNI CPUs and GPU back ends.
**Depthwise Convs** (``group == C_out``, ``W [C, 1, k...]``) get 8-bit weights by default
(``depthwise_weight_bits=8``): ORT's QLinearConv runs them in MLAS's depthwise kernels, never in
the GEMM. With symmetric int8 weights that is ``MlasConvSymDepthwiseKernelAvx2`` (channels a
multiple of 16), which zero-extends each uint8 input and sign-extends each int8 weight to 32 bits
(``vpmovzxbd``/``vpmovsxbd``) and multiplies with ``vpmaddwd``: each 32-bit lane is the int16 pair
``(x, 0) . (w, sign)`` = ``x*w`` exactly; otherwise ``MlasConvDepthwiseKernel[Avx2]``, which widens
both to int16, subtracts the zero points and forms the full 32-bit product
(``mullo``/``mulhi_epi16``). Neither has an int16 pair sum, so 8-bit depthwise weights cannot
saturate on any x86 CPU (checked against ORT's MLAS sources: ``qdwconv.cpp``,
``ConvSymKernelAvx2.asm``, ``convsym.cpp``, ``qlinearconv.cc``). Grouped convolutions with several
channels per group go through the GEMM and keep ``weight_bits``. Quantized weights chosen elsewhere
(GPTQ, :mod:`~onnx_compress.passes.weight_rounding`) are passed as ``InsertQDQPass(ranges, config,
weights={node name: (q, scale)})`` and checked against the same integer bound.

**Target ``trt``** (``QuantConfig.for_target("trt")``): TensorRT's explicit-quantization form, where
Q/DQ pairs say which tensors TensorRT may keep in int8 and it fuses the rest itself. Everything is
symmetric int8: activations s8 with ``z = 0``, ``s = max(|lo|, |hi|) / 127``; weights s8
per-channel with ``qmax_w = 127`` (GPU int8 has no saturating int16 pair sums), ``z = 0``, axis as
above. Placement:

- Q -> DQ on the float activation **inputs** of Conv, ConvTranspose, Gemm and MatMul (both inputs
  of an activation x activation MatMul); the weight is a DQ of int8 per-channel values; the bias
  stays float (TensorRT folds it into the fused kernel in float).
- **No output Q** on weighted ops: a Q reads a Conv/Gemm output only where that value is itself the
  input of another weighted op or of a residual Add.
- **Residual Add** (two non-constant inputs): Q -> DQ on both inputs, so TensorRT can fuse the Add
  into the preceding Conv's epilogue with an int8 skip input. Adds with a constant, Mul and
  pooling stay float (TensorRT fuses them as pointwise ops).
- **Concat**: Q -> DQ on every non-constant input and on the output, all with **one** scale (the
  inputs are aliases of the output, whose calibrated range is exactly the union of the inputs'),
  so TensorRT concatenates in int8 without requantizing. Constant Concat inputs stay float.
- Relu/Clip are not folded into the ranges (TensorRT fuses them by itself); pass-through ops
  share their input's scale when both sides are quantized, as for ``ort``.

Options (:class:`QuantConfig`): ``target`` ``ort``/``trt``, ``activations`` ``u8``/``s8``,
``symmetric``, ``per_channel``,
``weight_bits`` 7/8, ``op_types``, ``exclude`` (node names, regular expressions matched in full
against names, or op types), ``only`` (quantize just these node names). Excluded nodes stay
float and read the *float* value of their inputs even where a neighbour quantizes that tensor:
ONNX Runtime quantizes the float weight of a ``DQ -> Conv -> Q`` group by itself, so an excluded
node that read a DQ would silently become an integer kernel. Declined nodes (weight not constant,
non-float tensors, Gemm ``alpha != 1``, ...) stay float and are listed with the reason.

The pass needs a range for every tensor :func:`plan_quantization` lists (``InsertQDQPass(ranges)``
raises a one-line :class:`PassError` naming the first one missing); ``onnx_compress.quantize``
calibrates them. Per-axis DequantizeLinear needs opset 13 or newer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.errors import PassError
from ..ir.graph import NameScope, constant_value, is_graph_output, producer
from .base import Pass, PassResult

logger = logging.getLogger(__name__)

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ELEMENTWISE_OPS = frozenset({"Add", "Mul"})
POOL_OPS = frozenset({"AveragePool", "GlobalAveragePool"})
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
DEFAULT_OP_TYPES = frozenset(WEIGHTED_OPS | ELEMENTWISE_OPS | POOL_OPS | {"Concat", "MaxPool"})


def check_op_types(op_types) -> None:
    """Raise ValueError naming the op types in ``op_types`` that cannot be quantized."""
    unknown = sorted(set(op_types) - DEFAULT_OP_TYPES)
    if unknown:
        raise ValueError(f"cannot quantize op type(s) {', '.join(unknown)}; "
                         f"supported: {', '.join(sorted(DEFAULT_OP_TYPES))}")
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
FLOAT_DTYPES = (np.float32,)
TARGETS = ("ort", "trt")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize (see the module docstring)."""

    activations: str = "u8"
    symmetric: bool = False
    per_channel: bool = True
    weight_bits: int = 7
    #: bits of depthwise Conv weights (``group == C_out``, one input channel per group); see the
    #: module docstring for why 8 cannot saturate there
    depthwise_weight_bits: int = 8
    op_types: frozenset[str] = DEFAULT_OP_TYPES
    exclude: tuple[str, ...] = ()
    #: when set, only nodes with these names are quantized (per-layer sensitivity)
    only: frozenset[str] | None = None
    #: placement: ``ort`` (ONNX Runtime CPU integer kernels) or ``trt`` (TensorRT explicit
    #: quantization: symmetric s8, Q/DQ on weighted-op and residual-Add inputs only)
    target: str = "ort"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target == "trt" and (self.activations != "s8" or not self.symmetric or self.weight_bits != 8
                                     or self.depthwise_weight_bits != 8):
            raise ValueError("target 'trt' needs activations='s8', symmetric=True and 8-bit weights "
                             "(use QuantConfig.for_target('trt'))")
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"activations must be 'u8' or 's8', got {self.activations!r}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")
        if self.depthwise_weight_bits not in (7, 8):
            raise ValueError(f"depthwise_weight_bits must be 7 or 8, got {self.depthwise_weight_bits}")
        object.__setattr__(self, "op_types", frozenset(self.op_types))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.only is not None:
            object.__setattr__(self, "only", frozenset(self.only))

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_target(cls, target: str, **options) -> "QuantConfig":
        """The config of ``target``: ``trt`` fixes s8 symmetric activations and 8-bit weights."""
        if target == "trt":
            options.update(activations="s8", symmetric=True, weight_bits=8, depthwise_weight_bits=8)
        return cls(target=target, **options)

    @property
    def act_dtype(self) -> type:
        return np.uint8 if self.activations == "u8" else np.int8

    @property
    def act_qmin(self) -> int:
        return 0 if self.activations == "u8" else -128

    @property
    def act_qmax(self) -> int:
        return 255 if self.activations == "u8" else 127

    @property
    def weight_qmax(self) -> int:
        return 63 if self.weight_bits == 7 else 127

    def weight_qmax_of(self, node: object, w: np.ndarray) -> int:
        """The integer bound of ``node``'s weight ``w``: depthwise Convs use ``depthwise_weight_bits``."""
        if is_depthwise(node, w):
            return 63 if self.depthwise_weight_bits == 7 else 127
        return self.weight_qmax

    def selects(self, node: gs.Node) -> bool:
        """Whether ``node`` may be quantized (not excluded, and in ``only`` when that is set)."""
        if self.only is not None and (node.name or "") not in self.only:
            return False
        return not self.excludes(node)

    def excludes(self, node: gs.Node) -> bool:
        """Whether an ``exclude`` pattern names ``node`` (name, full-match regex or op type)."""
        name = node.name or ""
        for pattern in self.exclude:
            if pattern == node.op or pattern == name:
                return True
            try:
                if name and re.fullmatch(pattern, name):
                    return True
            except re.error:
                continue
        return False


def is_depthwise(node: object, w: np.ndarray) -> bool:
    """A Conv with one input and one output channel per group (``group == C_out``, ``W [C, 1, k...]``):
    ONNX Runtime's depthwise kernels, which widen both operands before multiplying."""
    op = getattr(node, "op", None) or getattr(node, "op_type", None)
    if op != "Conv" or w.ndim < 3 or w.shape[1] != 1:
        return False
    attrs = getattr(node, "attrs", None)
    if attrs is not None:
        group = int(attrs.get("group", 1))
    else:
        group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
    return group == w.shape[0] and group > 1


@dataclass(frozen=True)
class QuantParams:
    scale: np.float32
    zero_point: int
    dtype: type

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def representable(self) -> tuple[float, float]:
        """The float32 range ``[s (qmin - z), s (qmax - z)]`` as ORT computes it."""
        s = np.float32(self.scale)
        return float(s * np.float32(self.qmin - self.zero_point)), float(s * np.float32(self.qmax - self.zero_point))


def activation_params(
    lo: float, hi: float, config: QuantConfig, *, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> QuantParams:
    """Scale/zero point of an activation with calibrated range ``(lo, hi)`` inside ``bounds``."""
    lo, hi = max(float(lo), bounds[0]), min(float(hi), bounds[1])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax, dtype = config.act_qmin, config.act_qmax, config.act_dtype
    if config.symmetric:
        absmax = max(abs(lo), abs(hi))
        scale = np.float32(absmax / 127.0) if absmax > 0 else np.float32(1.0)
        zp = 128 if config.activations == "u8" else 0
    else:
        span = hi - lo
        scale = np.float32(span / (qmax - qmin)) if span > 0 else np.float32(1.0)
        zp = int(np.clip(qmin - round(lo / float(scale)), qmin, qmax))
    if not np.isfinite(scale) or scale <= 0:
        scale = np.float32(1.0)
    params = QuantParams(scale, zp, dtype)
    # keep the representable range inside the activation's bounds (exact Relu/Clip removal)
    for _ in range(64):
        low, high = params.representable()
        if low >= bounds[0] - 1e-12 and high <= bounds[1] + 1e-12:
            break
        params = QuantParams(np.nextafter(params.scale, np.float32(0)), params.zero_point, dtype)
    return params


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (``[-qmax, qmax]``), per channel along ``axis`` (None: per tensor)."""
    w64 = np.asarray(w, dtype=np.float64)
    if axis is None:
        absmax = np.abs(w64).max(initial=0.0)
        scale = np.float32(absmax / qmax) if absmax > 0 else np.float32(1.0)
        q = np.clip(np.round(w64 / float(scale)), -qmax, qmax).astype(np.int8)
        return q, np.asarray(scale, dtype=np.float32)
    moved = np.moveaxis(w64, axis, 0).reshape(w64.shape[axis], -1)
    absmax = np.abs(moved).max(axis=1, initial=0.0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    shape = [1] * w64.ndim
    shape[axis] = -1
    q = np.clip(np.round(w64 / scale.astype(np.float64).reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    return np.clip(np.round(np.asarray(b, np.float64) / scale.astype(np.float64)), info.min, info.max).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class WeightUse:
    node: gs.Node
    index: int
    axis: int | None
    #: the weight scales, set when the weight is quantized
    scale: np.ndarray | None = None


@dataclass
class QuantPlan:
    """What :class:`InsertQDQPass` will do; ``tensors`` need calibrated ranges."""

    nodes: list[gs.Node] = field(default_factory=list)
    #: activation tensors to Q/DQ, in graph order (roots and aliases)
    quantized: list[str] = field(default_factory=list)
    #: tensor -> root tensor whose parameters it shares (pass-through ops)
    alias: dict[str, str] = field(default_factory=dict)
    #: root tensor -> (lower, upper) bounds from a Relu/Clip it follows
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    weights: list[WeightUse] = field(default_factory=list)
    #: (node, input index of its bias)
    biases: list[tuple[gs.Node, int]] = field(default_factory=list)
    #: constant float inputs of Add/Mul/Concat quantized with their own range
    constants: list[tuple[gs.Node, int]] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        """Root tensors (the ones to calibrate)."""
        return [t for t in self.quantized if t not in self.alias]

    def root(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name


def _is_float(tensor: gs.Tensor) -> bool:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return True  # unknown (no shape inference): activations of the ops we quantize are float
    try:
        return np.dtype(dtype) in (np.dtype(np.float32),)
    except TypeError:
        return False


def _weight_axis(node: gs.Node, w: np.ndarray, config: QuantConfig) -> int | None:
    if not config.per_channel:
        return None
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and w.ndim == 2:
        return 1
    return None


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    if node.op == "Relu":
        return (0.0, math.inf)
    if node.op != "Clip":
        return None
    lo, hi = -math.inf, math.inf
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return (float(node.attrs.get("min", lo)), float(node.attrs.get("max", hi)))
    for i, default in ((1, lo), (2, hi)):
        if len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name:
            value = constant_value(node.inputs[i])
            if value is None or value.size != 1:
                return None
            if i == 1:
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    return (lo, hi)


def _check_node(node: gs.Node) -> str | None:
    """None when ``node`` can be quantized, else the reason."""
    ins = node.inputs
    if node.op in ("Conv", "ConvTranspose"):
        w = constant_value(ins[1]) if len(ins) > 1 else None
        if w is None:
            return "weight is not constant"
        if w.dtype != np.float32 or w.ndim < 3:
            return "weight is not a float32 kernel"
        if len(ins) > 2 and ins[2].name:
            b = constant_value(ins[2])
            if b is None or b.ndim != 1:
                return "bias is not a constant vector"
        if not _is_float(ins[0]):
            return "input is not float32"
        return None
    if node.op == "Gemm":
        if float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm alpha != 1"
        if int(node.attrs.get("transA", 0)):
            return "Gemm transA=1"
        w = constant_value(ins[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return "Gemm B is not a constant float32 matrix"
        if constant_value(ins[0]) is not None:
            return "Gemm A is constant"
        return None
    if node.op == "MatMul":
        values = [constant_value(t) for t in ins[:2]]
        if all(v is not None for v in values):
            return "both inputs are constant"
        if any(v is not None and v.dtype != np.float32 for v in values):
            return "constant input is not float32"
        if not all(_is_float(t) for t, v in zip(ins, values) if v is None):
            return "input is not float32"
        return None
    if node.op in ELEMENTWISE_OPS or node.op == "Concat":
        values = [constant_value(t) for t in ins]
        if all(v is not None for v in values):
            return "all inputs are constant"
        if any(v is not None and v.dtype != np.float32 for v in values):
            return "constant input is not float32"
        if not all(_is_float(t) for t, v in zip(ins, values) if v is None):
            return "input is not float32"
        return None
    if node.op in POOL_OPS or node.op == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            return "MaxPool indices are used"
        return None if _is_float(ins[0]) else "input is not float32"
    return f"op {node.op} is not quantized"


def _plan_trt_node(
    node: gs.Node, plan: QuantPlan, want, concat_groups: dict[str, list[str]], config: QuantConfig
) -> None:
    """TensorRT placement of one checked node (see the module docstring): inputs only."""
    ins = node.inputs
    label = node.name or node.op
    if node.op in WEIGHTED_OPS:
        values = [constant_value(t) for t in ins[:2]]
        if node.op == "MatMul" and values[0] is not None:
            plan.weights.append(WeightUse(node, 0, None))
            want(ins[1])
        elif node.op == "MatMul" and values[1] is None:
            want(ins[0])
            want(ins[1])
        else:
            plan.weights.append(WeightUse(node, 1, _weight_axis(node, values[1], config)))
            want(ins[0])
        plan.nodes.append(node)
        return
    if node.op == "Add":
        if any(constant_value(t) is not None for t in ins):
            plan.declined.append((label, "Add with a constant input stays float for TensorRT"))
            return
        for t in ins:
            want(t)
        plan.nodes.append(node)
        return
    if node.op == "Concat":
        members = [t for t in ins if constant_value(t) is None]
        for t in members:
            want(t)
        want(node.outputs[0])
        concat_groups[node.outputs[0].name] = [t.name for t in members]
        plan.nodes.append(node)
        return
    plan.declined.append((label, f"{node.op} stays float for TensorRT (fused as a pointwise op)"))


def plan_quantization(graph: gs.Graph, config: QuantConfig = QuantConfig()) -> QuantPlan:
    """Which nodes, tensors, weights and biases :class:`InsertQDQPass` quantizes."""
    plan = QuantPlan()
    wanted: dict[str, None] = {}
    bounds: dict[str, tuple[float, float]] = {}
    #: trt: Concat output -> its quantized inputs (one shared scale)
    concat_groups: dict[str, list[str]] = {}

    def want(tensor: gs.Tensor) -> None:
        if tensor.name and constant_value(tensor) is None and _is_float(tensor):
            wanted[tensor.name] = None

    def output_target(tensor: gs.Tensor) -> gs.Tensor:
        lo, hi = -math.inf, math.inf
        while not is_graph_output(graph, tensor) and len(tensor.outputs) == 1:
            nxt = tensor.outputs[0]
            b = _clip_bounds(nxt) if nxt.op in FUSABLE_ACTIVATIONS and not config.excludes(nxt) else None
            if b is None or nxt.inputs[0] is not tensor:
                break
            lo, hi = max(lo, b[0]), min(hi, b[1])
            tensor = nxt.outputs[0]
        if (lo, hi) != (-math.inf, math.inf):
            bounds[tensor.name] = (lo, hi)
        return tensor

    planned = {id(n) for n in graph.nodes if n.op in config.op_types and config.selects(n) and _check_node(n) is None}

    def reads_quantized(tensor: gs.Tensor) -> bool:
        """Whether a quantized node reads ``tensor`` (directly or through pass-through ops)."""
        return any(id(r) in planned or (r.op in PASS_THROUGH_OPS and r.outputs and r.inputs[0] is tensor
                                        and reads_quantized(r.outputs[0])) for r in tensor.outputs)

    for node in graph.nodes:
        if node.op not in config.op_types:
            continue
        label = node.name or node.op
        if not config.selects(node):
            plan.declined.append((label, "excluded"))
            continue
        reason = _check_node(node)
        if reason is not None:
            plan.declined.append((label, reason))
            continue
        if node.op == "MaxPool":
            continue  # pass-through: decided below
        ins = node.inputs
        if config.target == "trt":
            _plan_trt_node(node, plan, want, concat_groups, config)
            continue
        plan.nodes.append(node)
        if node.op in WEIGHTED_OPS and not (node.op == "MatMul" and constant_value(ins[1]) is None):
            w = constant_value(ins[1])
            plan.weights.append(WeightUse(node, 1, _weight_axis(node, w, config)))
            want(ins[0])
            if node.op in ("Conv", "ConvTranspose") and len(ins) > 2 and ins[2].name:
                plan.biases.append((node, 2))
            if node.op == "Gemm" and len(ins) > 2 and ins[2].name:
                c = constant_value(ins[2])
                n_out = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
                if c is not None and float(node.attrs.get("beta", 1.0)) == 1.0 and c.shape == (n_out,):
                    plan.biases.append((node, 2))
                else:
                    plan.declined.append((label, "Gemm C kept float (beta != 1, not constant or not [N])"))
        elif node.op == "MatMul" and constant_value(ins[0]) is not None:
            plan.weights.append(WeightUse(node, 0, None))
            want(ins[1])
        else:
            for i, t in enumerate(ins):
                if constant_value(t) is not None:
                    plan.constants.append((node, i))
                else:
                    want(t)
        out = node.outputs[0]
        if node.op in ("Gemm", "MatMul") and (is_graph_output(graph, out) or not reads_quantized(output_target(out))):
            continue  # float output: ORT's QGemm / MatMulIntegerToFloat; a Q no reader uses only adds error
        want(output_target(out))

    # pass-through ops share their input's parameters
    for node in graph.nodes:
        if node.op not in PASS_THROUGH_OPS or not node.inputs or not node.outputs:
            continue
        if node.op == "MaxPool" and ("MaxPool" not in config.op_types or not config.selects(node) or _check_node(node)):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        src_in, dst_in = src.name in wanted, dst.name in wanted
        if node.op == "MaxPool" and (src_in or dst_in) and config.target != "trt":
            want(src)
            want(dst)
        elif not (src_in and dst_in):
            continue
        if src.name in wanted and dst.name in wanted:
            plan.alias[dst.name] = src.name
            if node.op == "MaxPool":
                plan.nodes.append(node)

    # trt: every Concat input shares the output's parameters (its range is the union of theirs)
    for out, members in concat_groups.items():
        if out not in wanted:
            continue
        for member in members:
            root, target = plan.root(member), plan.root(out)
            if member in wanted and root != target:
                plan.alias[root] = target
    plan.quantized = list(wanted)
    for name, b in bounds.items():
        root = plan.root(name)
        old = plan.bounds.get(root, (-math.inf, math.inf))
        plan.bounds[root] = (max(old[0], b[0]), min(old[1], b[1]))
    return plan


# ---------------------------------------------------------------------------------------------
# the pass


class InsertQDQPass(Pass):
    """Insert Q/DQ from calibrated ``ranges`` (root tensor name -> ``(lo, hi)``)."""

    name = "insert-qdq"

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]],
        config: QuantConfig = QuantConfig(),
        weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.ranges = dict(ranges)
        self.config = config
        #: node name -> (int8 weight, per-channel scale) chosen elsewhere (GPTQ); others: nearest
        self.weights = dict(weights or {})
        self.params: dict[str, QuantParams] = {}
        self.plan: QuantPlan | None = None

    def call(self, graph: gs.Graph) -> PassResult:
        if int(graph.opset) < 13:
            raise PassError(f"QDQ insertion needs opset >= 13, the model has {graph.opset}; convert it first")
        config = self.config
        plan = plan_quantization(graph, config)
        self.plan = plan
        missing = [t for t in plan.tensors if t not in self.ranges]
        if missing:
            raise PassError(f"no calibrated range for tensor '{missing[0]}' ({len(missing)} missing)")
        if not plan.nodes:
            return PassResult(graph, False, 0, plan.declined)
        params: dict[str, QuantParams] = {}
        for name in plan.tensors:
            lo, hi = self.ranges[name]
            params[name] = activation_params(lo, hi, config, bounds=plan.bounds.get(name, (-math.inf, math.inf)))
        for name in plan.quantized:
            params[name] = params[plan.root(name)]
        self.params = params
        tensors = graph.tensors()
        names = NameScope(graph)
        original_inputs = {id(n): list(n.inputs) for n in plan.nodes}

        # weights and biases read the float tensors as they were before activation Q/DQ
        for use in plan.weights:
            self._quantize_weight(graph, names, use)
        for node, index in plan.biases:  # empty for target trt: TensorRT keeps the bias float
            x = original_inputs[id(node)][0]
            w_use = next(u for u in plan.weights if u.node is node)
            self._quantize_bias(graph, names, node, index, params[x.name], w_use)
        for node, index in plan.constants:
            self._quantize_constant(graph, names, node, index)
        keep_float = {id(n) for n in graph.nodes if not config.selects(n)}
        for name in plan.quantized:
            self._insert_activation_qdq(graph, names, tensors[name], params[name], keep_float)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        logger.info("quantized %d nodes, %d activation tensors", len(plan.nodes), len(plan.quantized))
        return PassResult(graph, True, len(plan.nodes), plan.declined)

    # -- helpers --------------------------------------------------------------------------

    def _dq(self, graph: gs.Graph, names: NameScope, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
        qc = gs.Constant(names.fresh(f"{base}_quantized"), np.ascontiguousarray(q))
        sc = gs.Constant(names.fresh(f"{base}_scale"), np.ascontiguousarray(scale, dtype=np.float32))
        zc = gs.Constant(names.fresh(f"{base}_zero_point"), np.ascontiguousarray(zp))
        out = gs.Variable(names.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
        attrs = {} if axis is None else {"axis": int(axis)}
        node = gs.Node("DequantizeLinear", name=names.fresh(f"{base}_DequantizeLinear"),
                       attrs=attrs, inputs=[qc, sc, zc], outputs=[out])
        graph.nodes.append(node)
        return out

    def _quantize_weight(self, graph: gs.Graph, names: NameScope, use: WeightUse) -> None:
        tensor = use.node.inputs[use.index]
        w = constant_value(tensor)
        qmax = self.config.weight_qmax_of(use.node, w)
        given = self.weights.get(use.node.name or "")
        if given is not None and use.axis is not None and given[0].shape == w.shape \
                and np.asarray(given[1]).shape == (w.shape[use.axis],):
            q, scale = np.asarray(given[0], np.int8), np.asarray(given[1], np.float32)
            if int(np.abs(q.astype(np.int16)).max(initial=0)) > qmax:
                raise PassError(f"weight of '{use.node.name}' exceeds the integer bound {qmax}")
        else:
            q, scale = quantize_weight(w, use.axis, qmax)
        use.scale = scale
        zp = np.zeros(scale.shape, dtype=np.int8)
        use.node.inputs[use.index] = self._dq(graph, names, tensor.name, q, scale, zp, use.axis)

    def _quantize_bias(self, graph: gs.Graph, names: NameScope, node: gs.Node, index: int, x_params: QuantParams, w_use: WeightUse) -> None:
        tensor = node.inputs[index]
        b = constant_value(tensor).astype(np.float64)
        s_w = np.asarray(w_use.scale, dtype=np.float32)
        if node.op == "ConvTranspose" and s_w.ndim == 1:
            s_w = np.tile(s_w, int(node.attrs.get("group", 1)))
        scale = (np.float32(x_params.scale) * s_w).astype(np.float32)
        scale = np.broadcast_to(scale, b.shape).astype(np.float32) if scale.ndim else np.full(b.shape, scale, np.float32)
        q = quantize_bias(b, scale)
        node.inputs[index] = self._dq(graph, names, tensor.name, q, scale, np.zeros(b.shape, np.int32), 0)

    def _quantize_constant(self, graph: gs.Graph, names: NameScope, node: gs.Node, index: int) -> None:
        tensor = node.inputs[index]
        value = constant_value(tensor).astype(np.float32)
        p = activation_params(float(value.min(initial=0.0)), float(value.max(initial=0.0)), self.config)
        q = np.clip(np.round(value.astype(np.float64) / float(p.scale)) + p.zero_point, p.qmin, p.qmax).astype(p.dtype)
        node.inputs[index] = self._dq(
            graph, names, tensor.name, q, np.asarray(p.scale, np.float32), np.asarray(p.zero_point, p.dtype), None
        )

    def _insert_activation_qdq(self, graph: gs.Graph, names: NameScope, tensor: gs.Tensor, p: QuantParams, keep_float: set[int]) -> None:
        base = tensor.name
        scale = gs.Constant(names.fresh(f"{base}_scale"), np.asarray(p.scale, dtype=np.float32))
        zp = gs.Constant(names.fresh(f"{base}_zero_point"), np.asarray(p.zero_point, dtype=p.dtype))
        quantized = gs.Variable(names.fresh(f"{base}_quantized"), dtype=p.dtype, shape=tensor.shape)
        if is_graph_output(graph, tensor) and producer(tensor) is not None:
            # keep the output name: the producer writes a new tensor, the DQ writes the output
            src = producer(tensor)
            pre = gs.Variable(names.fresh(f"{base}_float"), dtype=tensor.dtype, shape=tensor.shape)
            src.outputs[[i for i, t in enumerate(src.outputs) if t is tensor][0]] = pre
            for user in list(tensor.outputs):  # excluded readers keep reading the float value
                if id(user) in keep_float:
                    user.inputs[:] = [pre if inp is tensor else inp for inp in user.inputs]
            q_in, dq_out = pre, tensor
        else:
            dq_out = gs.Variable(names.fresh(f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
            for user in list(tensor.outputs):
                if id(user) in keep_float:
                    continue  # excluded (or, with ``only``, unselected) readers keep the float value
                for i, inp in enumerate(user.inputs):
                    if inp is tensor:
                        user.inputs[i] = dq_out
            q_in = tensor
        graph.nodes.append(gs.Node("QuantizeLinear", name=names.fresh(f"{base}_QuantizeLinear"),
                                   inputs=[q_in, scale, zp], outputs=[quantized]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=names.fresh(f"{base}_DequantizeLinear"),
                                   inputs=[quantized, scale, zp], outputs=[dq_out]))


def quantized_tensor_names(graph: gs.Graph, config: QuantConfig = QuantConfig()) -> list[str]:
    """The tensors whose ranges must be calibrated before :class:`InsertQDQPass` runs."""
    return plan_quantization(graph, config).tensors


__all__ = [
    "DEFAULT_OP_TYPES",
    "TARGETS",
    "InsertQDQPass",
    "QuantConfig",
    "QuantParams",
    "QuantPlan",
    "activation_params",
    "plan_quantization",
    "quantize_bias",
    "quantize_weight",
    "quantized_tensor_names",
]

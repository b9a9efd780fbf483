"""Per-op channel rules: how the channel axes of a node's inputs and outputs are coupled.

Vocabulary
----------
A *dim* is one axis of one tensor, ``(tensor, axis)``; its *elements* are the indices
``0 .. size-1`` along that axis. A rule *links* elements of two dims: ``link(a, ia, b, ib)`` says
that index ``ia[k]`` of dim ``a`` and index ``ib[k]`` of dim ``b`` are the same channel, so they
are kept or removed together. The builder (:mod:`.graph`) takes the transitive closure of all
links (union-find); each connected set of elements is one prunable *channel*.

Every rule is called as ``rule.couple(ctx, node, tensor, axis)`` whenever a dim appears on one of
the node's inputs or outputs. It links that dim to the other dims of the node it determines, or
raises :class:`Barrier` with a reason: the dim is then frozen (never pruned) and the report
quotes the reason. An op type absent from :data:`RULES` is a barrier for every dim that reaches it
(DESIGN.md convention 4: fail closed, never guess).

Index maps (``C`` = channels, ``g`` = the Conv ``group`` attribute)
-------------------------------------------------------------------
* Conv, ``W [C_out, C_in/g, k...]``, ``g == 1``: ``Y[:, o] <-> W[o] <-> B[o]`` and
  ``X[:, i] <-> W[:, i]``.
* Conv, ``g > 1`` (grouped, depthwise): a conv group is the pruning atom. With
  ``cpg = C_in/g`` and ``opg = C_out/g``, all of ``X[:, k*cpg : (k+1)*cpg]`` and
  ``Y[:, k*opg : (k+1)*opg]`` (and ``W[k*opg : (k+1)*opg]``, ``B[...]``) are one channel; removing
  it removes conv group ``k`` and rewrites ``group := g - removed``. ``W`` axis 1 is never cut.
  For depthwise conv (``cpg == 1``) this is ``X[:, k] <-> Y[:, k*opg .. k*opg+opg-1]``.
* ConvTranspose, ``W [C_in, C_out/g, k...]``: ``X[:, i] <-> W[i]``; ``g == 1``:
  ``Y[:, o] <-> W[:, o] <-> B[o]``; ``g > 1``: whole groups as for Conv.
* Gemm ``Y = A' B' + C``: contraction ``A'[:, k] <-> B'[k, :]`` (``A' = A^T`` if ``transA``,
  ``B' = B^T`` if ``transB``, i.e. ``B`` axis ``1`` resp. ``0``); ``Y[:, n] <-> B'[:, n] <-> C[n]``
  (``C`` broadcast on that axis is exempt).
* MatMul with constant 2-D ``B [K, N]``: ``A[..., k] <-> B[k]``, ``Y[..., n] <-> B[:, n]``; the
  leading axes of ``A`` map one to one onto those of ``Y``.
* Element-wise (unary activations, Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow/Where/PRelu, ...): numpy
  broadcasting aligned from the right; an operand of size 1 on an axis whose output size is
  larger is broadcast there and exempt; every other operand (activations and per-channel
  constants alike) is linked one to one. Two activations meeting in Add/Mul/... therefore union
  their channels (residuals, squeeze-excitation gates).
* BatchNormalization / InstanceNormalization: ``X[:, c] <-> Y[:, c] <-> scale[c], B[c]
  (, mean[c], var[c])``; other axes one to one.
* Pools (Max/Average/Lp, global ones): axes 0 and 1 one to one; MaxPool's ``Indices`` output
  encodes flat positions (channel included), so a MaxPool whose second output is used is a
  barrier.
* Concat on axis ``a`` with input sizes ``s_0, s_1, ...``: ``X_j[.., i] <-> Y[.., o_j + i]``,
  ``o_j = s_0 + ... + s_{j-1}``; other axes one to one across all inputs.
* Split on axis ``a`` (sizes ``s_j``): ``X[.., o_j + i] <-> Y_j[.., i]``; after pruning
  ``split := [kept in Y_0, kept in Y_1, ...]``.
* Slice with constant ``starts/ends/axes/steps`` (step 1 on a cut axis): ``Y[.., i] <->
  X[.., start + i]``; after pruning ``start := #kept(X[:start])``,
  ``end := start' + #kept(X[start:end])``.
* Flatten(axis=f) with static ``X [d_0, ..., d_{r-1}]``: ``Y[:, c * P + s] <-> X[:, c]`` for
  ``a == f``, ``P = d_{f+1} * ... * d_{r-1}``, all ``s < P`` (so ``Linear(C*H*W)`` after
  ``Flatten`` loses whole ``H*W`` blocks of columns); axis 0 one to one when ``f == 1``.
* Reshape (axis factorisation). For the incoming axis ``a`` of one side with static sizes
  ``[C, t_1, ...]`` from ``a`` on, ``T = t_1 * ...``, take the innermost axis ``b`` of the other
  side whose static tail product equals ``C * T``, with ``T' = `` the product after ``b``. Element
  counts are conserved, so the leading (flattened) index agrees on both sides and channel ``c``
  covers flat offsets ``[c T, (c+1) T)``. If ``T' = r T``: ``X[.., c] <-> Y[.., c // r]`` (``C ->
  heads x head_dim`` with ``r = head_dim``: a channel is a whole head); if ``T = r T'``:
  ``Y[.., j] <-> X[.., j // r]`` (``heads x head_dim -> C``, ``C x H x W -> C*H*W``). Trailing axes
  named by the same symbol on both sides (a run-time sequence length ``s`` in ``[b, G, r, s, D] ->
  [b, G*r, s, D]``, equal by shape inference) multiply both tails alike and cancel first. A tail
  that is otherwise not static, or channels that straddle the new axes (an inner factor such as
  ``head_dim``, or a channel shuffle's group axis), is a barrier. The target-shape entry of the pruned output axis
  must be ``-1`` (left alone) or a constant, directly or as a constant piece of a 1-D ``Concat``
  (torch's ``x.size()[:-1] + (H, D)``); after pruning it becomes the kept count. An entry computed
  at run time or ``0`` (copy the input size) is a barrier, except a target that is the whole
  ``Shape(t)`` of a tensor ``t`` of the output's rank (torch's ``view(x.shape)``, GroupNorm's way
  back from ``[N, G, -1]`` under a dynamic batch): then ``Y[.., j] <-> t[.., j]`` one to one, so
  ``Shape(t)`` yields the kept count at run time and nothing is rewritten.
* Shape: no link; allowed when every consumer reads other axes only (``Gather``/``Slice`` with
  constant indices, torch's batch and sequence lengths) or is the Reshape above (``t[.., j] <->
  Y[.., j]``), else a barrier.
* MatMul of two activations (attention ``Q K^T`` and ``P V``), ``A [..., M, K] B [..., K, N]``:
  batch axes (the heads) one to one with broadcasting as for element-wise ops, ``A`` axis ``-2``
  <-> ``Y`` axis ``-2``, ``B`` axis ``-1`` <-> ``Y`` axis ``-1``; the contraction axis is a barrier.
  With the Reshape and Transpose rules this makes ``Q``, ``K``, ``V`` and the output projection's
  input rows of one attention layer a single group whose channels are whole heads; removing a
  head from softmax attention equals zeroing its ``V`` columns and output-projection rows (the
  masked reference does both).
* LayerNormalization: axes before ``axis`` one to one; the normalised axes (and scale/bias) are
  a barrier, "LayerNormalization normalises over the pruned axis": removing a hidden channel
  changes the mean and variance every other channel is normalised with, so a residual stream
  through LayerNorm stays frozen (an encoder's FFN width and heads are what prune).
* Transpose: input axis ``perm[j]`` <-> output axis ``j``. Squeeze/Unsqueeze: the axes that stay.
* DepthToSpace (blocksize ``b``, ``X [N, b*b*C, H, W] -> Y [N, C, b*H, b*W]``): ``DCR``: ``X[:,
  (i*b + j)*C + c] <-> Y[:, c]`` (output channel ``c`` couples the ``b*b`` input channels ``k*C + c``);
  ``CRD``: ``X[:, c*b*b + i*b + j] <-> Y[:, c]`` (a contiguous block; torch's ``pixel_shuffle``).
  SpaceToDepth (``X [N, C, H, W] -> Y [N, b*b*C, H/b, W/b]``): ``Y[:, (i*b + j)*C + c] <-> X[:, c]``.
  Axis 0 one to one, spatial axes barriers. Kept input channels stay in layout order, so the node
  needs no rewrite: ``C' = #kept`` follows from the input.
* GroupNormalization (``num_groups = G``, ``cpg = C/G``): axis 0 one to one; on axis 1 a whole
  normalisation group ``X[:, g*cpg : (g+1)*cpg] <-> Y[...]`` is one channel (removing a group
  changes no other group's mean or variance; removing part of one would). ``scale``/``bias`` hold
  one value per group before opset 21 (``scale[g]``) and per channel from 21 (``scale[c]``); after
  pruning ``num_groups := #kept groups``. Spatial axes are normalised over: barriers. ONNX's shape
  inference does not type its output; without shapes it is a barrier.
* Gather(``axis = a``): data axes ``k != a`` <-> output axis ``k`` (``k < a``) or ``k + q - 1``
  (``q`` = rank of the indices). On axis ``a`` with constant 1-D ``idx`` (negative ones wrapped):
  ``X[.., idx[p], ..] <-> Y[.., p, ..]``; a channel gathered twice couples both positions (removed
  together); channels never gathered are not linked (nobody downstream reads them here). After
  pruning ``idx' = [#kept(X[:idx[p]]) for each kept p]``. A scalar index (the axis disappears),
  indices of rank > 1 or computed at run time on axis ``a`` are barriers; with run-time indices
  the output axes ``a ..`` follow the indices' axes one to one. GatherND (``batch_dims = 0``,
  indices ``[..., k]``): data axes ``>= k`` pass through; constant indices ``[P, 1]`` gather axis 0
  like Gather (torch's ``x[:, [i, j]]`` under the dynamo exporter, between two Transposes).
* Expand: axes aligned from the right; an axis of equal size on both sides is one to one, its
  constant target entry (unless ``1``) becomes the kept count; a broadcast or created axis is a
  barrier. Tile with ``r`` repeats on an axis of ``C``: ``Y[.., k*C + c] <-> X[.., c]`` (every
  copy of a channel goes with it; torch's ``repeat``), repeats unchanged.
* Grouped-query attention (``H = G*r`` query heads, ``G`` key/value groups): torch's
  ``repeat_interleave(r, dim=1)`` exports as ``Unsqueeze -> Tile/Expand [.., G, r, ..] -> Reshape
  [.., G*r, ..]``; with the rules above (Reshape: ``Y[:, h] <-> X[:, h // r]``) and the attention
  MatMul rule, query head ``h`` is linked to key/value group ``h // r``: a channel is one KV group
  with its ``r`` query heads (``r*D`` columns of ``Wq``, ``D`` of ``Wk`` and ``Wv``, ``r*D`` rows of
  ``Wo``), the granularity at which removal is provably exact. A run-time sequence length inside the
  repeat's Reshape is fine when both sides carry its symbol; an Expand whose output sizes are left
  unknown (``expand`` with shapes read at run time) is a barrier.
* Reduce* (keepdims or not), Softmax/LogSoftmax (opset >= 13), Resize (scale 1 or constant sizes
  on the axis), Pad (zero pads on the axis): one to one on axes they do not reduce / normalise /
  resample / pad, a barrier on the others. Resize with ``sizes`` rewrites the size after pruning.

Weights and per-channel parameters need not be constants: the coupling holds whatever produces
them (torch's legacy exporter reads BatchNormalization statistics through ``Identity``), and the
producer's own rule must then carry the cut (or freeze the group). Only MatMul requires a
constant 2-D right operand to be a Linear layer; a product of two activations is attention.

Everything else (LRN, GatherElements, Scatter*, dynamic shapes that cannot be proven, graph
inputs and outputs) is a barrier until a rule is written for it.

Each rule may also implement ``apply(actx, node)``, called after a plan is chosen and before
weights are sliced, to rewrite what depends on channel counts (``group``, ``split`` sizes, Slice
``starts``/``ends``, Resize ``sizes``, Reshape and Expand target shapes, ``num_groups``, Gather
indices). ``actx.kept(tensor, axis)`` gives the boolean keep mask of
a dim (None when nothing on it is removed).
"""

from __future__ import annotations

import abc
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant_value, static_shape

#: ``role`` of a constant member; tells importance which members are weights and the masked
#: reference (:func:`.apply.apply_mask`) what value makes a removed channel inert.
WEIGHT = "weight"
BIAS = "bias"
SCALE = "scale"
SHIFT = "shift"
MEAN = "mean"
VARIANCE = "variance"
SLOPE = "slope"
OPERAND = "operand"
DIVISOR = "divisor"
EXPONENT = "exponent"

#: value a removed channel's slice of a constant with this role gets in the masked reference
MASK_FILL = {VARIANCE: 1.0, DIVISOR: 1.0, EXPONENT: 1.0}

#: roles whose magnitude measures importance
IMPORTANCE_ROLES = (WEIGHT, SCALE)


class Barrier(Exception):
    """Raised by a rule that cannot prove how a dim maps through a node."""


class CouplingContext(Protocol):
    """What a rule sees while the dependency graph is built (implemented in :mod:`.graph`)."""

    opset: int

    def dim(self, tensor: gs.Tensor, axis: int, role: str = OPERAND) -> int: ...

    def size(self, dim: int) -> int: ...

    def link(self, a: int, ia: np.ndarray | None, b: int, ib: np.ndarray | None) -> None: ...

    def axis_size(self, tensor: gs.Tensor, axis: int) -> int | None: ...

    def is_used(self, tensor: gs.Tensor) -> bool: ...


class ApplyContext(Protocol):
    """What a rule sees while a plan is applied (implemented in :mod:`.apply`)."""

    opset: int

    def kept(self, tensor: gs.Tensor, axis: int) -> np.ndarray | None: ...

    def set_input_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Make input ``index`` of ``node`` a constant holding ``values`` (appended if absent)."""


# ---------------------------------------------------------------------------------------------
# helpers


def tensor_rank(tensor: gs.Tensor) -> int:
    if isinstance(tensor, gs.Constant):
        return tensor.values.ndim
    value = constant_value(tensor)
    if value is not None:
        return value.ndim
    if tensor.shape is None:
        raise Barrier(f"rank of '{tensor.name}' unknown")
    return len(tensor.shape)


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise Barrier(f"{what} {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _present(node: gs.Node, i: int) -> gs.Tensor | None:
    if i < len(node.inputs) and node.inputs[i] is not None and node.inputs[i].name != "":
        return node.inputs[i]
    return None


def const_input(node: gs.Node, i: int, what: str) -> np.ndarray | None:
    """Value of optional input ``i`` (None if absent); Barrier if present but not constant."""
    tensor = _present(node, i)
    if tensor is None:
        return None
    value = constant_value(tensor)
    if value is None:
        raise Barrier(f"{what} '{tensor.name}' is not a constant")
    return value


def input_index(node: gs.Node, tensor: gs.Tensor) -> int | None:
    for i, t in enumerate(node.inputs):
        if t is tensor:
            return i
    return None


def output_index(node: gs.Node, tensor: gs.Tensor) -> int | None:
    for i, t in enumerate(node.outputs):
        if t is tensor:
            return i
    return None


def _axes_value(node: gs.Node, opset: int, input_from: int, attr_before: int = 13) -> list[int] | None:
    """``axes`` of Squeeze/Unsqueeze/Reduce*: an attribute before ``attr_before``, else input 1."""
    if opset < attr_before or "axes" in node.attrs:
        axes = node.attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]
    value = const_input(node, input_from, "axes")
    return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# rule classes


class ChannelRule(abc.ABC):
    """Base class: ``couple`` links dims; ``apply`` rewrites attributes after a plan is chosen."""

    #: True when the rule anchors groups by itself (weights with out/in channels)
    seeds = False

    @abc.abstractmethod
    def couple(self, ctx: CouplingContext, node: gs.Node, tensor: gs.Tensor, axis: int) -> None:
        """Link ``(tensor, axis)`` to the dims of ``node`` it determines, or raise Barrier."""

    def seed(self, node: gs.Node) -> list[tuple[gs.Tensor, int]]:
        """Dims a source op starts groups from (output channels, input channels)."""
        return []

    def apply(self, actx: ApplyContext, node: gs.Node) -> None:
        """Rewrite attributes / shape constants for the new channel counts (default: nothing)."""
        return None


class ConstantRule(ChannelRule):
    """``Constant`` node: its value is a weight, sliced with the dims it belongs to."""

    def couple(self, ctx, node, tensor, axis):
        return None


class ElementwiseRule(ChannelRule):
    """Unary ops and broadcasting n-ary ops (see the module docstring)."""

    def __init__(self, roles: dict[int, str] | None = None, outputs: int | None = None):
        #: role of a constant operand by input position (default OPERAND)
        self.roles = roles or {}
        #: how many outputs take part (Dropout's mask too); None = all
        self.outputs = outputs

    def couple(self, ctx, node, tensor, axis):
        outs = [o for o in node.outputs[: self.outputs] if o is not None]
        if not outs:
            raise Barrier("node has no outputs")
        ref = outs[0]
        out_rank = tensor_rank(ref)
        k = tensor_rank(tensor) - axis  # position counted from the right
        out_axis = out_rank - k
        if out_axis < 0:
            raise Barrier("axis beyond the output rank")
        out_size = ctx.axis_size(ref, out_axis)
        if out_size is None:
            raise Barrier(f"size of '{ref.name}' axis {out_axis} unknown")
        here = ctx.dim(tensor, axis)
        if ctx.size(here) != out_size:
            raise Barrier(f"'{tensor.name}' is broadcast along axis {axis}")
        participants: list[tuple[gs.Tensor, str]] = []
        for i, inp in enumerate(node.inputs):
            if inp is None or inp.name == "":
                continue
            participants.append((inp, self.roles.get(i, OPERAND)))
        participants.extend((o, OPERAND) for o in outs)
        for other, role in participants:
            if other is tensor:
                continue
            a = tensor_rank(other) - k
            if a < 0:
                continue  # missing leading axis: broadcast
            size = ctx.axis_size(other, a)
            if size is None:
                raise Barrier(f"size of '{other.name}' axis {a} unknown")
            if size == 1 and out_size != 1:
                continue  # broadcast along this axis: exempt
            ctx.link(here, None, ctx.dim(other, a, role), None)


class NormalizationRule(ChannelRule):
    """BatchNormalization / InstanceNormalization: per-channel constants on axis 1."""

    def __init__(self, roles: tuple[str, ...]):
        self.roles = roles  # roles of inputs 1..n

    def couple(self, ctx, node, tensor, axis):
        if len([o for o in node.outputs if o is not None and o.name]) > 1:
            raise Barrier("training-mode outputs")
        x, y = node.inputs[0], node.outputs[0]
        i = input_index(node, tensor)
        if i is not None and i > 0:
            if axis != 0:
                raise Barrier("parameter axis is not 0")
            axis = 1
            tensor = x
        here = ctx.dim(tensor, axis)
        other = y if tensor is x else x
        ctx.link(here, None, ctx.dim(other, axis), None)
        if axis != 1:
            return
        for j, role in enumerate(self.roles, start=1):
            param = _present(node, j)
            if param is None:
                continue
            if tensor_rank(param) != 1:
                raise Barrier(f"parameter '{param.name}' is not 1-D")
            ctx.link(here, None, ctx.dim(param, 0, role), None)


def _group_blocks(n: int, groups: int) -> np.ndarray:
    """Index -> conv group for an axis of ``n`` split into ``groups`` equal blocks."""
    return np.repeat(np.arange(groups), n // groups)


class ConvRule(ChannelRule):
    """Conv and ConvTranspose (``transpose=True``); see the module docstring."""

    seeds = True

    def __init__(self, transpose: bool = False):
        self.transpose = transpose
        # weight axis carrying input channels / output channels
        self.w_in, self.w_out = (0, 1) if transpose else (1, 0)

    def seed(self, node):
        return [(node.outputs[0], 1), (node.inputs[0], 1)]

    def couple(self, ctx, node, tensor, axis):
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        b = _present(node, 2)
        g = int(node.attrs.get("group", 1))
        # bring the incoming dim to X axis 1 or Y axis 1
        if b is not None and tensor is b:
            if axis != 0:
                raise Barrier("bias axis is not 0")
            tensor, axis = y, 1
        elif tensor is w:
            inner = self.w_out if self.transpose else self.w_in  # the C/g axis of W
            if axis not in (0, 1):
                raise Barrier(f"weight axis {axis} is a kernel axis")
            if g > 1 and axis == inner:
                raise Barrier("weight axis inside a conv group (group > 1)")
            tensor, axis = (x if axis == self.w_in else y), 1
        if tensor is not x and tensor is not y:
            raise Barrier(f"'{tensor.name}' is not mapped")
        if axis != 1:
            raise Barrier(f"axis {axis} of '{tensor.name}' is not the channel axis")
        c_in, c_out = ctx.axis_size(x, 1), ctx.axis_size(y, 1)
        if c_in is None or c_out is None:
            raise Barrier("channel counts unknown")
        dx, dy = ctx.dim(x, 1), ctx.dim(y, 1)
        # input channels: W axis w_in (full C_in only for ConvTranspose or group 1)
        if self.transpose or g == 1:
            ctx.link(dx, None, ctx.dim(w, self.w_in, WEIGHT), None)
        # output channels: W axis w_out (full C_out only for Conv or group 1)
        if not self.transpose or g == 1:
            ctx.link(dy, None, ctx.dim(w, self.w_out, WEIGHT), None)
        if b is not None:
            ctx.link(dy, None, ctx.dim(b, 0, BIAS), None)
        if g > 1:
            if c_in % g or c_out % g:
                raise Barrier(f"channels {c_in}/{c_out} not divisible by group {g}")
            # a whole conv group is one channel: link every index of group k to its first input
            gx, gy = _group_blocks(c_in, g), _group_blocks(c_out, g)
            first_x = np.arange(g) * (c_in // g)
            ctx.link(dx, np.arange(c_in), dx, first_x[gx])
            ctx.link(dy, np.arange(c_out), dx, first_x[gy])

    def apply(self, actx, node):
        g = int(node.attrs.get("group", 1))
        if g == 1:
            return
        keep = actx.kept(node.outputs[0], 1)
        if keep is None:
            return
        per_group = keep.size // g
        node.attrs["group"] = int(keep.sum()) // per_group


class GemmRule(ChannelRule):
    seeds = True

    def seed(self, node):
        a_axis = 0 if node.attrs.get("transA", 0) else 1
        return [(node.outputs[0], 1), (node.inputs[0], a_axis)]

    def couple(self, ctx, node, tensor, axis):
        a, bt, y = node.inputs[0], node.inputs[1], node.outputs[0]
        c = _present(node, 2)
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        a_k = 0 if trans_a else 1
        b_k, b_n = (1, 0) if trans_b else (0, 1)
        if tensor is bt:
            tensor, axis = (a, a_k) if axis == b_k else (y, 1)
        elif c is not None and tensor is c:
            if axis != tensor_rank(c) - 1:
                raise Barrier("C axis is not the output-feature axis")
            tensor, axis = y, 1
        if tensor is a and axis == a_k:
            ctx.link(ctx.dim(a, a_k), None, ctx.dim(bt, b_k, WEIGHT), None)
            return
        if tensor is y and axis == 1:
            dy = ctx.dim(y, 1)
            ctx.link(dy, None, ctx.dim(bt, b_n, WEIGHT), None)
            if c is not None:
                cr = tensor_rank(c)
                if cr >= 1 and ctx.axis_size(c, cr - 1) == ctx.size(dy):
                    ctx.link(dy, None, ctx.dim(c, cr - 1, BIAS), None)
                elif cr >= 1 and ctx.axis_size(c, cr - 1) != 1:
                    raise Barrier("C does not broadcast over output features")
            return
        raise Barrier(f"axis {axis} of '{tensor.name}' is a batch axis")


class MatMulRule(ChannelRule):
    """MatMul with a constant 2-D right operand (a Linear layer)."""

    seeds = True

    def seed(self, node):
        b = node.inputs[1]
        value = constant_value(b)
        if value is None or value.ndim != 2 or constant_value(node.inputs[0]) is not None:
            return []
        if node.inputs[0].shape is None:
            return []
        return [(node.outputs[0], -1), (node.inputs[0], -1)]

    def couple(self, ctx, node, tensor, axis):
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        bv = constant_value(b)
        if bv is None and constant_value(a) is None:
            self._product(ctx, node, tensor, axis)
            return
        if bv is None or bv.ndim != 2:
            raise Barrier("right operand is not a constant matrix")
        if constant_value(a) is not None:
            raise Barrier("left operand is a constant")
        ra = tensor_rank(a)
        if ra < 2:
            raise Barrier("left operand is 1-D")
        if tensor is b:
            tensor, axis = (a, ra - 1) if axis == 0 else (y, ra - 1)
        if tensor is a and axis == ra - 1:
            ctx.link(ctx.dim(a, axis), None, ctx.dim(b, 0, WEIGHT), None)
        elif tensor is y and axis == ra - 1:
            ctx.link(ctx.dim(y, axis), None, ctx.dim(b, 1, WEIGHT), None)
        elif tensor is a or tensor is y:
            other = y if tensor is a else a
            ctx.link(ctx.dim(tensor, axis), None, ctx.dim(other, axis), None)
        else:
            raise Barrier(f"'{tensor.name}' is not mapped")


    @staticmethod
    def _product(ctx, node, tensor, axis):
        """Product of two activations (attention): batch axes (heads) one to one, rows of ``A``
        and columns of ``B`` with those of ``Y``; the contraction axis is a barrier."""
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ra, rb, ry = tensor_rank(a), tensor_rank(b), tensor_rank(y)
        if ra < 2 or rb < 2:
            raise Barrier("1-D operand in a product of two activations")
        # position of the incoming axis in Y's frame
        if tensor is y:
            ay = axis
        elif tensor is a:
            if axis == ra - 1:
                raise Barrier("contraction axis of a product of two activations")
            ay = axis + ry - ra
        elif tensor is b:
            if axis == rb - 2:
                raise Barrier("contraction axis of a product of two activations")
            ay = ry - 1 if axis == rb - 1 else axis + ry - rb
        else:
            raise Barrier(f"'{tensor.name}' is not mapped")
        out_size = ctx.axis_size(y, ay)
        if out_size is None:
            raise Barrier(f"size of '{y.name}' axis {ay} unknown")
        if ay == ry - 2:
            pairs = [(a, ra - 2), (y, ay)]
        elif ay == ry - 1:
            pairs = [(b, rb - 1), (y, ay)]
        else:  # a batch axis (attention heads): numpy broadcasting over the leading axes
            pairs = [(y, ay)]
            for t, r in ((a, ra), (b, rb)):
                at = ay - (ry - r)
                if 0 <= at < r - 2:
                    size = ctx.axis_size(t, at)
                    if size is None:
                        raise Barrier(f"size of '{t.name}' axis {at} unknown")
                    if size == 1 and out_size != 1:
                        continue  # broadcast along this axis: exempt
                    pairs.append((t, at))
        here = ctx.dim(tensor, axis)
        for t, at in pairs:
            if t is tensor and at == axis:
                continue
            ctx.link(here, None, ctx.dim(t, at), None)


class PoolRule(ChannelRule):
    """Max/Average/Lp pools and their global forms: axes 0 and 1 one to one."""

    def couple(self, ctx, node, tensor, axis):
        if len(node.outputs) > 1 and node.outputs[1] is not None and ctx.is_used(node.outputs[1]):
            raise Barrier("Indices output is used (it encodes channel positions)")
        if axis > 1:
            raise Barrier(f"spatial axis {axis}")
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier(f"'{tensor.name}' is not mapped")
        ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)


class ConcatRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        y = node.outputs[0]
        r = tensor_rank(y)
        cat = norm_axis(int(node.attrs["axis"]), r)
        inputs = [t for t in node.inputs]
        if axis != cat:
            here = ctx.dim(tensor, axis)
            for t in inputs + [y]:
                if t is not tensor:
                    ctx.link(here, None, ctx.dim(t, axis), None)
            return
        sizes = [ctx.axis_size(t, cat) for t in inputs]
        if any(s is None for s in sizes):
            raise Barrier("input sizes on the concat axis unknown")
        dy = ctx.dim(y, cat)
        offset = 0
        for t, s in zip(inputs, sizes):
            if s:
                ctx.link(ctx.dim(t, cat), None, dy, np.arange(offset, offset + s))
            offset += s


def _split_sizes(ctx, node, axis_size: int) -> list[int]:
    n_out = len(node.outputs)
    if ctx.opset >= 13:
        split = const_input(node, 1, "split")
    else:
        split = node.attrs.get("split")
    if split is not None:
        sizes = [int(s) for s in np.asarray(split).reshape(-1)]
    else:
        if n_out == 0:
            raise Barrier("Split without outputs")
        chunk = -(-axis_size // n_out)  # ceil, opset 18 semantics; equal when divisible
        sizes = [min(chunk, axis_size - i * chunk) for i in range(n_out)]
    if sum(sizes) != axis_size or len(sizes) != n_out:
        raise Barrier("split sizes do not match the input")
    return sizes


class SplitRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x = node.inputs[0]
        r = tensor_rank(x)
        split_axis = norm_axis(int(node.attrs.get("axis", 0)), r)
        if input_index(node, tensor) not in (None, 0):
            raise Barrier("split sizes input is not a channel tensor")
        if axis != split_axis:
            here = ctx.dim(tensor, axis)
            for t in [x] + list(node.outputs):
                if t is not tensor:
                    ctx.link(here, None, ctx.dim(t, axis), None)
            return
        size = ctx.axis_size(x, split_axis)
        if size is None:
            raise Barrier("size of the split axis unknown")
        sizes = _split_sizes(ctx, node, size)
        dx = ctx.dim(x, split_axis)
        offset = 0
        for out, s in zip(node.outputs, sizes):
            if s:
                ctx.link(dx, np.arange(offset, offset + s), ctx.dim(out, split_axis), None)
            offset += s

    def apply(self, actx, node):
        x = node.inputs[0]
        split_axis = norm_axis(int(node.attrs.get("axis", 0)), tensor_rank(x))
        keep = actx.kept(x, split_axis)
        if keep is None:
            return
        sizes = _split_sizes(actx, node, keep.size)
        new, offset = [], 0
        for s in sizes:
            new.append(int(keep[offset : offset + s].sum()))
            offset += s
        node.attrs.pop("num_outputs", None)
        if actx.opset >= 13:
            actx.set_input_constant(node, 1, np.asarray(new, dtype=np.int64))
        else:
            node.attrs["split"] = new


def _slice_params(ctx, node, rank: int):
    """(starts, ends, axes, steps) as lists; opset >= 10 inputs, else attributes."""
    if ctx.opset >= 10:
        starts = const_input(node, 1, "starts")
        ends = const_input(node, 2, "ends")
        axes = const_input(node, 3, "axes")
        steps = const_input(node, 4, "steps")
    else:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [norm_axis(int(v), rank) for v in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    return starts, ends, axes, steps


def _clamp(v: int, n: int) -> int:
    if v < 0:
        v += n
    return max(0, min(n, v))


class SliceRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("starts/ends/axes/steps are not channel tensors")
        starts, ends, axes, steps = _slice_params(ctx, node, tensor_rank(x))
        if axis not in axes:
            ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)
            return
        j = axes.index(axis)
        if steps[j] != 1:
            raise Barrier(f"step {steps[j]} on the channel axis")
        n = ctx.axis_size(x, axis)
        if n is None:
            raise Barrier("size of the sliced axis unknown")
        s, e = _clamp(starts[j], n), _clamp(ends[j], n)
        if e > s:
            ctx.link(ctx.dim(x, axis), np.arange(s, e), ctx.dim(y, axis), None)

    def apply(self, actx, node):
        x = node.inputs[0]
        starts, ends, axes, steps = _slice_params(actx, node, tensor_rank(x))
        changed = False
        for j, axis in enumerate(axes):
            keep = actx.kept(x, axis)
            if keep is None:
                continue
            n = keep.size
            s, e = _clamp(starts[j], n), _clamp(ends[j], n)
            new_s = int(keep[:s].sum())
            starts[j], ends[j] = new_s, new_s + int(keep[s:e].sum())
            changed = True
        if not changed:
            return
        if actx.opset >= 10:
            dtype = constant_value(node.inputs[1]).dtype
            actx.set_input_constant(node, 1, np.asarray(starts, dtype=dtype))
            actx.set_input_constant(node, 2, np.asarray(ends, dtype=dtype))
        else:
            node.attrs["starts"], node.attrs["ends"] = starts, ends


class FlattenRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        r = tensor_rank(x)
        f = norm_axis(int(node.attrs.get("axis", 1)), r + 1)
        if f == 0 or f == r:
            raise Barrier(f"Flatten axis {f} moves every axis into one")
        if tensor is x:
            if axis < f:
                if f != 1:
                    raise Barrier(f"axis {axis} is merged with others")
                ctx.link(ctx.dim(x, 0), None, ctx.dim(y, 0), None)
                return
            if axis != f:
                raise Barrier(f"axis {axis} is flattened inside axis {f}")
        elif axis == 0:
            if f != 1:
                raise Barrier("axis 0 merges several input axes")
            ctx.link(ctx.dim(x, 0), None, ctx.dim(y, 0), None)
            return
        shape = x.shape if not isinstance(x, gs.Constant) else x.values.shape
        tail = [ctx.axis_size(x, a) for a in range(f, r)]
        if shape is None or any(d is None for d in tail):
            raise Barrier(f"shape of '{x.name}' from axis {f} on is not static")
        inner = int(np.prod(tail[1:], dtype=np.int64))
        c = tail[0]
        features = c * inner
        ctx.link(ctx.dim(y, 1), np.arange(features), ctx.dim(x, f), np.arange(features) // inner)


class TransposeRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        r = tensor_rank(x)
        perm = [int(p) for p in node.attrs.get("perm", list(range(r - 1, -1, -1)))]
        if tensor is x:
            ctx.link(ctx.dim(x, axis), None, ctx.dim(y, perm.index(axis)), None)
        else:
            ctx.link(ctx.dim(y, axis), None, ctx.dim(x, perm[axis]), None)


class SqueezeRule(ChannelRule):
    """Squeeze (``unsqueeze=False``) and Unsqueeze: axes that are neither removed nor inserted."""

    def __init__(self, unsqueeze: bool):
        self.unsqueeze = unsqueeze

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("axes input is not a channel tensor")
        rx, ry = tensor_rank(x), tensor_rank(y)
        axes = _axes_value(node, ctx.opset, 1)
        if self.unsqueeze:
            if axes is None:
                raise Barrier("Unsqueeze without axes")
            special = {norm_axis(a, ry) for a in axes}
            kept = [a for a in range(ry) if a not in special]  # output axes, in input order
            pairs = dict(zip(range(rx), kept))
        else:
            if axes is None:
                shape = static_shape(x)
                if shape is None:
                    raise Barrier("Squeeze without axes on a dynamic shape")
                special = {a for a, d in enumerate(shape) if d == 1}
            else:
                special = {norm_axis(a, rx) for a in axes}
            kept = [a for a in range(rx) if a not in special]  # input axes, in output order
            pairs = dict(zip(kept, range(ry)))
        if tensor is x:
            if axis not in pairs:
                raise Barrier(f"axis {axis} is squeezed")
            ctx.link(ctx.dim(x, axis), None, ctx.dim(y, pairs[axis]), None)
        else:
            inverse = {v: k for k, v in pairs.items()}
            if axis not in inverse:
                raise Barrier(f"axis {axis} is inserted")
            ctx.link(ctx.dim(y, axis), None, ctx.dim(x, inverse[axis]), None)


class ReduceRule(ChannelRule):
    """Reduce*: one to one on axes that are not reduced (``axes`` attribute before opset 18)."""

    def __init__(self, axes_input_opset: int = 18):
        self.axes_input_opset = axes_input_opset

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("axes input is not a channel tensor")
        rx = tensor_rank(x)
        axes = _axes_value(node, ctx.opset, 1, self.axes_input_opset)
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)
                return
            raise Barrier("reduces every axis")
        reduced = {norm_axis(a, rx) for a in axes}
        keepdims = int(node.attrs.get("keepdims", 1))
        rest = [a for a in range(rx) if a not in reduced]
        pairs = {a: (a if keepdims else i) for i, a in enumerate(rest)}
        if tensor is x:
            if axis in reduced:
                raise Barrier(f"axis {axis} is reduced")
            ctx.link(ctx.dim(x, axis), None, ctx.dim(y, pairs[axis]), None)
        else:
            inverse = {v: k for k, v in pairs.items()}
            if axis not in inverse:
                raise Barrier(f"axis {axis} is reduced")
            ctx.link(ctx.dim(y, axis), None, ctx.dim(x, inverse[axis]), None)


class SoftmaxRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        r = tensor_rank(x)
        sm = norm_axis(int(node.attrs.get("axis", -1 if ctx.opset >= 13 else 1)), r)
        if ctx.opset >= 13 and axis == sm:
            raise Barrier(f"normalised axis {axis}")
        if ctx.opset < 13 and axis >= sm:
            raise Barrier(f"axis {axis} is normalised (opset < 13 coerces to 2-D)")
        ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)


class ResizeRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("roi/scales/sizes are not channel tensors")
        if ctx.opset < 11:
            raise Barrier("Resize before opset 11")
        if node.attrs.get("axes") is not None:
            raise Barrier("Resize with axes attribute")
        scales = const_input(node, 2, "scales")
        sizes = const_input(node, 3, "sizes")
        if scales is not None and scales.size:
            if float(scales.reshape(-1)[axis]) != 1.0:
                raise Barrier(f"axis {axis} is resampled")
        elif sizes is not None and sizes.size:
            n = ctx.axis_size(x, axis)
            if n is None or int(sizes.reshape(-1)[axis]) != n:
                raise Barrier(f"axis {axis} is resampled")
        else:
            raise Barrier("neither scales nor sizes is given")
        ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)

    def apply(self, actx, node):
        sizes = _present(node, 3)
        value = constant_value(sizes) if sizes is not None else None
        if value is None or not value.size:
            return
        new = np.array(value, copy=True).reshape(-1)
        changed = False
        for a in range(new.size):
            keep = actx.kept(node.inputs[0], a)
            if keep is not None:
                new[a] = int(keep.sum())
                changed = True
        if changed:
            actx.set_input_constant(node, 3, new.astype(value.dtype))


class PadRule(ChannelRule):
    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("pads/value are not channel tensors")
        r = tensor_rank(x)
        if ctx.opset >= 11:
            pads = const_input(node, 1, "pads")
            axes = const_input(node, 3, "axes")
        else:
            pads, axes = np.asarray(node.attrs.get("pads", [])), None
        pads = np.asarray(pads).reshape(-1)
        axes = list(range(r)) if axes is None else [norm_axis(int(a), r) for a in axes.reshape(-1)]
        if axis in axes:
            j, n = axes.index(axis), len(axes)
            if int(pads[j]) != 0 or int(pads[j + n]) != 0:
                raise Barrier(f"axis {axis} is padded")
        ctx.link(ctx.dim(x, axis), None, ctx.dim(y, axis), None)


def _reshape_entry(node: gs.Node, j: int) -> tuple[gs.Node, int, np.ndarray, int]:
    """Where entry ``j`` of a Reshape's target shape lives: ``(node, input slot, value, index)``.

    The shape is a constant, or a 1-D Concat (used only by this Reshape) whose piece holding
    entry ``j`` is a constant; anything else is computed at run time and is a barrier.
    """
    shape = node.inputs[1]
    value = constant_value(shape)
    if value is not None:
        return node, 1, np.asarray(value).reshape(-1), j
    src = shape.inputs[0] if shape.inputs else None
    if src is None or src.op != "Concat" or len(shape.outputs) != 1:
        raise Barrier(f"target size of axis {j} is computed at run time")
    offset = 0
    for k, piece in enumerate(src.inputs):
        pv = constant_value(piece)
        n = pv.size if pv is not None else (piece.shape[0] if piece.shape and isinstance(piece.shape[0], int) else None)
        if n is None:
            raise Barrier("length of a target-shape piece is unknown")
        if offset <= j < offset + n:
            if pv is None:
                raise Barrier(f"target size of axis {j} is computed at run time")
            return src, k, np.asarray(pv).reshape(-1), j - offset
        offset += n
    raise Barrier(f"target shape has no entry {j}")


def _dim_token(ctx, tensor: gs.Tensor, axis: int) -> int | str | None:
    """Static size of an axis, else its symbolic name (``dim_param``), else None."""
    size = ctx.axis_size(tensor, axis)
    if size is not None:
        return size
    shape = None if isinstance(tensor, gs.Constant) else tensor.shape
    d = shape[axis] if shape is not None and axis < len(shape) else None
    return d if isinstance(d, str) and d else None


def _shape_source(node: gs.Node) -> gs.Tensor | None:
    """``t`` when a Reshape's target is the whole ``Shape(t)`` of a tensor of the output's rank
    (torch's ``x.view(orig.shape)``, GroupNorm's way back from ``[N, G, -1]``), else None."""
    shape = node.inputs[1]
    src = shape.inputs[0] if shape.inputs else None
    if src is None or src.op != "Shape" or not src.inputs:
        return None
    t = src.inputs[0]
    try:
        r = tensor_rank(t)
        if tensor_rank(node.outputs[0]) != r:
            return None
    except Barrier:
        return None
    start, end = int(src.attrs.get("start", 0)), int(src.attrs.get("end", r))
    return t if (_clamp(start, r), _clamp(end, r)) == (0, r) else None


class ReshapeRule(ChannelRule):
    """Reshape as axis factorisation (see the module docstring): ``C -> heads x head_dim``,
    ``heads x head_dim -> C``, ``C x H x W -> C*H*W``."""

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("the target shape is not a channel tensor")
        other = y if tensor is x else x
        rt, ro = tensor_rank(tensor), tensor_rank(other)
        tail = [_dim_token(ctx, tensor, a) for a in range(axis, rt)]
        o_dims = [_dim_token(ctx, other, b) for b in range(ro)]
        # trailing axes of the same symbolic size on both sides (shape inference's proof that they
        # are equal, e.g. a run-time sequence length) scale both tails alike: they cancel
        while (len(tail) > 1 and o_dims and tail[-1] is not None and tail[-1] == o_dims[-1]
               and any(isinstance(d, str) for d in tail[1:])):
            tail.pop()
            o_dims.pop()
        if any(not isinstance(d, int) for d in tail):
            raise Barrier(f"shape of '{tensor.name}' from axis {axis} on is not static")
        inner = int(np.prod(tail[1:], dtype=np.int64))
        block = tail[0] * inner
        match, prod = None, 1
        for b in range(len(o_dims) - 1, -1, -1):
            s = o_dims[b]
            if not isinstance(s, int):
                raise Barrier(f"size of '{other.name}' axis {b} is unknown (computed at run time)")
            prod *= s
            if prod == block:
                match = b
                break
            if prod > block:
                break
        if match is None:
            raise Barrier(f"axis {axis} of '{tensor.name}' is merged with or split across other axes")
        o_inner = prod // o_dims[match]
        ya = match if other is y else axis  # the axis of Y whose target size may change
        source = _shape_source(node)
        if source is not None:  # the target size of axis ya is Shape(source)[ya] at run time
            if ctx.axis_size(source, ya) != ctx.axis_size(y, ya):
                raise Barrier(f"target size of axis {ya} is read from '{source.name}' of another size")
            ctx.link(ctx.dim(y, ya), None, ctx.dim(source, ya), None)
        else:
            _, _, value, idx = _reshape_entry(node, ya)
            v = int(value[idx])
            if v == 0 and not int(node.attrs.get("allowzero", 0)):
                raise Barrier(f"target size of axis {ya} copies the input size (0)")
            if v not in (-1, ctx.axis_size(y, ya)):
                raise Barrier(f"target size {v} of axis {ya} does not match the inferred shape")
        here, there = ctx.dim(tensor, axis), ctx.dim(other, match)
        if o_inner >= inner:
            if o_inner % inner:
                raise Barrier(f"axis {axis} of '{tensor.name}' straddles the new axes")
            idx_t = np.arange(ctx.size(here))
            ctx.link(here, idx_t, there, idx_t // (o_inner // inner))
        else:
            if inner % o_inner:
                raise Barrier(f"axis {axis} of '{tensor.name}' straddles the new axes")
            idx_o = np.arange(ctx.size(there))
            ctx.link(there, idx_o, here, idx_o // (inner // o_inner))

    def apply(self, actx, node):
        y = node.outputs[0]
        if _shape_source(node) is not None:
            return  # the target follows Shape(source), pruned consistently (linked one to one)
        for j in range(tensor_rank(y)):
            keep = actx.kept(y, j)
            if keep is None:
                continue
            entry_node, slot, value, idx = _reshape_entry(node, j)
            if int(value[idx]) == -1:
                continue
            new = np.array(value, copy=True)
            new[idx] = int(keep.sum())
            actx.set_input_constant(entry_node, slot, new)


class ShapeRule(ChannelRule):
    """Shape: allowed when no consumer reads the size of the channel axis (torch reads batch and
    sequence lengths through ``Shape -> Gather`` / ``Shape -> Slice``)."""

    def couple(self, ctx, node, tensor, axis):
        r = tensor_rank(tensor)
        start, end = int(node.attrs.get("start", 0)), int(node.attrs.get("end", r))
        start, end = _clamp(start, r), _clamp(end, r)
        if not start <= axis < end:
            return
        if not node.outputs[0].outputs and ctx.is_used(node.outputs[0]):
            raise Barrier(f"the size of axis {axis} is a graph output")
        pos = axis - start  # the entry of the Shape output that holds the pruned size
        n = end - start
        for user in node.outputs[0].outputs:
            if user.op == "Reshape" and user.inputs[1] is node.outputs[0] and _shape_source(user) is tensor:
                # Reshape(z, Shape(t)): its output takes t's (pruned) size on this axis
                ctx.link(ctx.dim(tensor, axis), None, ctx.dim(user.outputs[0], axis), None)
                continue
            if user.op == "Gather" and int(user.attrs.get("axis", 0)) == 0:
                idx = constant_value(user.inputs[1])
                if idx is not None and pos not in {int(i) % n for i in np.asarray(idx).reshape(-1)}:
                    continue
            elif user.op == "Slice" and len(user.inputs) >= 3:
                try:
                    starts, ends, _, steps = _slice_params(ctx, user, 1)
                except Barrier:
                    starts = None
                if (starts is not None and len(starts) == 1 and steps[0] == 1
                        and not _clamp(starts[0], n) <= pos < _clamp(ends[0], n)):
                    continue
            raise Barrier(f"the size of axis {axis} is read at run time ({user.op} node '{user.name}')")


class LayerNormalizationRule(ChannelRule):
    """LayerNormalization: axes before ``axis`` one to one; the normalised axes are barriers
    (removing a channel changes the mean and variance of every other one)."""

    def couple(self, ctx, node, tensor, axis):
        if any(o is not None and o.name and ctx.is_used(o) for o in node.outputs[1:]):
            raise Barrier("Mean/InvStdDev outputs are used")
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("LayerNormalization normalises over the pruned axis")
        r = tensor_rank(x)
        if axis >= norm_axis(int(node.attrs.get("axis", -1)), r):
            raise Barrier("LayerNormalization normalises over the pruned axis")
        other = y if tensor is x else x
        ctx.link(ctx.dim(tensor, axis), None, ctx.dim(other, axis), None)


class DepthToSpaceRule(ChannelRule):
    """DepthToSpace (``DCR``/``CRD``) and SpaceToDepth (``space_to_depth=True``): the deep side's
    channel axis factorises as ``b*b`` block positions x the shallow side's channels."""

    def __init__(self, space_to_depth: bool = False):
        self.space_to_depth = space_to_depth

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier(f"'{tensor.name}' is not mapped")
        if tensor_rank(x) != 4:
            raise Barrier("input is not 4-D")
        if axis == 0:
            ctx.link(ctx.dim(x, 0), None, ctx.dim(y, 0), None)
            return
        if axis != 1:
            raise Barrier(f"spatial axis {axis} is rearranged with the channels")
        b = int(node.attrs.get("blocksize", 0))
        deep, shallow = (y, x) if self.space_to_depth else (x, y)
        c_deep, c_shallow = ctx.axis_size(deep, 1), ctx.axis_size(shallow, 1)
        if b < 1 or c_deep is None or c_shallow is None or c_deep != b * b * c_shallow:
            raise Barrier("channel counts do not match blocksize")
        mode = node.attrs.get("mode", "DCR")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        deep_idx = np.arange(c_deep)
        if self.space_to_depth or mode == "DCR":
            shallow_idx = deep_idx % c_shallow  # deep channel (i*b + j)*C + c
        elif mode == "CRD":
            shallow_idx = deep_idx // (b * b)  # deep channel c*b*b + i*b + j
        else:
            raise Barrier(f"unknown mode '{mode}'")
        ctx.link(ctx.dim(deep, 1), deep_idx, ctx.dim(shallow, 1), shallow_idx)


class GroupNormalizationRule(ChannelRule):
    """GroupNormalization: a normalisation group is the atom; ``scale``/``bias`` per group
    (opset 18-20) or per channel (opset >= 21); ``num_groups`` rewritten after pruning."""

    def couple(self, ctx, node, tensor, axis):
        if any(o is not None and o.name and ctx.is_used(o) for o in node.outputs[1:]):
            raise Barrier("extra outputs are used")
        x, y = node.inputs[0], node.outputs[0]
        i = input_index(node, tensor)
        if i is not None and i > 0:
            if axis != 0:
                raise Barrier("parameter axis is not 0")
            tensor, axis = x, 1
        if tensor is not x and tensor is not y:
            raise Barrier(f"'{tensor.name}' is not mapped")
        if axis == 0:
            ctx.link(ctx.dim(x, 0), None, ctx.dim(y, 0), None)
            return
        if axis != 1:
            raise Barrier(f"GroupNormalization normalises over axis {axis}")
        if y.shape is None:
            raise Barrier("output shape unknown (ONNX shape inference does not type GroupNormalization)")
        g = int(node.attrs.get("num_groups", 0))
        c = ctx.axis_size(x, 1)
        if c is None or g < 1 or c % g:
            raise Barrier(f"{c} channels not divisible into {g} groups")
        cpg = c // g
        dx, dy = ctx.dim(x, 1), ctx.dim(y, 1)
        ctx.link(dx, None, dy, None)
        first = np.arange(g) * cpg
        ctx.link(dx, np.arange(c), dx, first[_group_blocks(c, g)])  # a whole group is one channel
        per_channel = ctx.opset >= 21
        expected = c if per_channel else g
        for j, role in ((1, SCALE), (2, SHIFT)):
            param = _present(node, j)
            if param is None:
                continue
            if tensor_rank(param) != 1 or ctx.axis_size(param, 0) != expected:
                raise Barrier(f"'{param.name}' does not hold one value per {'channel' if per_channel else 'group'}")
            dp = ctx.dim(param, 0, role)
            if per_channel:
                ctx.link(dx, None, dp, None)
            else:
                ctx.link(dp, np.arange(g), dx, first)

    def apply(self, actx, node):
        keep = actx.kept(node.inputs[0], 1)
        if keep is None:
            return
        cpg = keep.size // int(node.attrs["num_groups"])
        node.attrs["num_groups"] = int(keep.sum()) // cpg


def _gathered_positions(ctx, data: gs.Tensor, axis: int, idx: np.ndarray) -> np.ndarray:
    """Constant indices into ``data`` axis ``axis``, made non-negative (Barrier if out of range)."""
    n = ctx.axis_size(data, axis)
    if n is None:
        raise Barrier(f"size of the gathered axis {axis} unknown")
    pos = np.asarray(idx, dtype=np.int64).reshape(-1)
    if pos.size and (pos.min() < -n or pos.max() >= n):
        raise Barrier("index out of range")
    return np.where(pos < 0, pos + n, pos)


def _remap_positions(actx, data: gs.Tensor, axis: int, out: gs.Tensor, out_axis: int, pos: np.ndarray):
    """New indices after pruning: kept output positions, renumbered among the kept data indices
    (None when nothing changes)."""
    keep_d, keep_o = actx.kept(data, axis), actx.kept(out, out_axis)
    if keep_d is None and keep_o is None:
        return None
    sel = pos if keep_o is None else pos[keep_o]
    if keep_d is None:
        return sel
    if not keep_d[sel].all():
        raise ValueError(f"a gathered channel of '{data.name}' would be removed while its output stays")
    return (np.cumsum(keep_d) - 1)[sel]


class GatherRule(ChannelRule):
    """Gather: axes other than ``axis`` pass through one to one. On the gathered axis, constant
    1-D indices ``idx`` give ``Y[.., p] <-> X[.., idx[p]]`` (a channel gathered twice couples
    both output positions); the indices are rewritten after pruning. A scalar index drops the
    axis and multi-axis or run-time indices give no per-channel map: barriers."""

    def couple(self, ctx, node, tensor, axis):
        data, ind, y = node.inputs[0], node.inputs[1], node.outputs[0]
        r = tensor_rank(data)
        a = norm_axis(int(node.attrs.get("axis", 0)), r)
        q = tensor_rank(ind)
        idx = constant_value(ind)
        if tensor is ind:
            if idx is not None:
                raise Barrier("constant indices are not a channel tensor")
            kind, k = "ind", axis
        elif tensor is y:
            kind, k = ("data", axis) if axis < a else (("ind", axis - a) if axis < a + q else ("data", axis - q + 1))
        elif tensor is data:
            kind, k = "data", axis
        else:
            raise Barrier(f"'{tensor.name}' is not mapped")
        if kind == "data" and k != a:
            ctx.link(ctx.dim(data, k), None, ctx.dim(y, k if k < a else k + q - 1), None)
            return
        if idx is None:
            if kind == "ind":  # run-time indices: output axes a.. follow the indices' axes
                ctx.link(ctx.dim(ind, k), None, ctx.dim(y, a + k), None)
                return
            raise Barrier(f"indices on axis {a} are computed at run time")
        if q == 0:
            raise Barrier(f"scalar index picks one channel of axis {a} and drops the axis")
        if q > 1:
            raise Barrier(f"{q}-D indices on axis {a}")
        pos = _gathered_positions(ctx, data, a, idx)
        if pos.size:
            ctx.link(ctx.dim(data, a), pos, ctx.dim(y, a), np.arange(pos.size))

    def apply(self, actx, node):
        data, ind, y = node.inputs[0], node.inputs[1], node.outputs[0]
        idx = constant_value(ind)
        if idx is None or idx.ndim != 1:
            return
        a = norm_axis(int(node.attrs.get("axis", 0)), tensor_rank(data))
        if actx.kept(data, a) is None and actx.kept(y, a) is None:
            return
        n = data.values.shape[a] if isinstance(data, gs.Constant) else int(data.shape[a])
        new = _remap_positions(actx, data, a, y, a, np.where(idx < 0, idx + n, idx).astype(np.int64))
        if new is not None:
            actx.set_input_constant(node, 1, new.astype(idx.dtype))


class GatherNDRule(ChannelRule):
    """GatherND (``batch_dims = 0``), indices ``[..., k]``: data axes from ``k`` on pass through
    one to one; constant indices ``[P, 1]`` gather axis 0 like Gather (``Y[p] <-> X[idx[p, 0]]``,
    rewritten after pruning, torch's ``x[:, [i, j]]`` under the dynamo exporter)."""

    def couple(self, ctx, node, tensor, axis):
        data, ind, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if int(node.attrs.get("batch_dims", 0)):
            raise Barrier("batch_dims > 0")
        if tensor is ind:
            raise Barrier("indices are not a channel tensor")
        k = ctx.axis_size(ind, tensor_rank(ind) - 1)
        q = tensor_rank(ind) - 1  # leading output axes come from the indices
        if k is None:
            raise Barrier("index depth unknown")
        if tensor is y:
            if axis >= q:
                tensor, axis = data, axis - q + k
            elif q == 1 and k == 1:
                tensor, axis = data, 0
            else:
                raise Barrier(f"output axis {axis} comes from the indices")
        elif tensor is not data:
            raise Barrier(f"'{tensor.name}' is not mapped")
        if axis >= k:
            ctx.link(ctx.dim(data, axis), None, ctx.dim(y, axis - k + q), None)
            return
        idx = constant_value(ind)
        if idx is None:
            raise Barrier("indices are computed at run time")
        if not (q == 1 and k == 1):
            raise Barrier(f"axis {axis} is indexed jointly with others")
        pos = _gathered_positions(ctx, data, 0, idx)
        if pos.size:
            ctx.link(ctx.dim(data, 0), pos, ctx.dim(y, 0), np.arange(pos.size))

    def apply(self, actx, node):
        data, ind, y = node.inputs[0], node.inputs[1], node.outputs[0]
        idx = constant_value(ind)
        if idx is None or idx.ndim != 2 or idx.shape[1] != 1 or int(node.attrs.get("batch_dims", 0)):
            return
        if actx.kept(data, 0) is None and actx.kept(y, 0) is None:
            return
        n = data.values.shape[0] if isinstance(data, gs.Constant) else int(data.shape[0])
        flat = idx.reshape(-1).astype(np.int64)
        new = _remap_positions(actx, data, 0, y, 0, np.where(flat < 0, flat + n, flat))
        if new is not None:
            actx.set_input_constant(node, 1, new.reshape(-1, 1).astype(idx.dtype))


class ExpandRule(ChannelRule):
    """Expand: axes aligned from the right; an axis of the same size on both sides is one to one
    (its constant target entry, unless 1, becomes the kept count); a broadcast or new axis is a
    barrier. torch's ``expand`` / ``repeat_interleave`` of key/value heads (GQA) goes through here."""

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("the target shape is not a channel tensor")
        rx, ry = tensor_rank(x), tensor_rank(y)
        k = tensor_rank(tensor) - axis
        ax, ay = rx - k, ry - k
        if tensor is y and (ax < 0 or ctx.axis_size(x, ax) == 1) and self._constant_entry(node, k, ctx.axis_size(y, ay)):
            return None  # every slice of y along ay is the same copy of x: apply shrinks the target entry
        if ax < 0:
            raise Barrier(f"axis {ay} is created by Expand")
        sx, sy = ctx.axis_size(x, ax), ctx.axis_size(y, ay)
        if sx is None or sy is None:
            raise Barrier("sizes unknown")
        if sx != sy:
            raise Barrier(f"axis {ay} is broadcast by Expand")
        j = self._length(node) - k
        if j >= 0:  # the entry is a constant, directly or as a piece of a 1-D Concat
            _, _, value, idx = _reshape_entry(node, j)
            if int(value[idx]) not in (1, sy):
                raise Barrier(f"target size {int(value[idx])} of axis {ay} does not match the inferred shape")
        ctx.link(ctx.dim(x, ax), None, ctx.dim(y, ay), None)

    @classmethod
    def _constant_entry(cls, node: gs.Node, k: int, size: int | None) -> bool:
        """Whether the target entry ``k`` from the right is a constant equal to ``size`` (> 1)."""
        try:
            j = cls._length(node) - k
            if j < 0:
                return False
            _, _, value, idx = _reshape_entry(node, j)
        except Barrier:
            return False
        return size is not None and size > 1 and int(value[idx]) == size

    @staticmethod
    def _length(node: gs.Node) -> int:
        shape = node.inputs[1]
        value = constant_value(shape)
        if value is not None:
            return int(value.size)
        if shape.shape and len(shape.shape) == 1 and isinstance(shape.shape[0], (int, np.integer)):
            return int(shape.shape[0])
        raise Barrier("length of the target shape is unknown")

    def apply(self, actx, node):
        y = node.outputs[0]
        ry = tensor_rank(y)
        for ay in range(ry):
            keep = actx.kept(y, ay)
            j = self._length(node) - (ry - ay)
            if keep is None or j < 0:
                continue
            entry_node, slot, value, idx = _reshape_entry(node, j)
            if int(value[idx]) != 1:
                new = np.array(value, copy=True)
                new[idx] = int(keep.sum())
                actx.set_input_constant(entry_node, slot, new)


class TileRule(ChannelRule):
    """Tile: ``Y[.., k*C + c] <-> X[.., c]`` for each of the ``r`` copies (one to one when
    ``r == 1``); the repeats stay, ``r*C'`` follows from the pruned input."""

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            raise Barrier("repeats are not a channel tensor")
        repeats = const_input(node, 1, "repeats")
        if repeats is None:
            raise Barrier("repeats missing")
        rep = int(np.asarray(repeats).reshape(-1)[axis])
        c, cy = ctx.axis_size(x, axis), ctx.axis_size(y, axis)
        if c is None or cy != rep * c:
            raise Barrier(f"sizes of axis {axis} do not match {rep} repeats")
        iy = np.arange(cy)
        ctx.link(ctx.dim(y, axis), iy, ctx.dim(x, axis), iy % c)


class CastLikeRule(ChannelRule):
    """``CastLike(x, like)``: element-wise on ``x`` (``y`` has ``x``'s shape); ``like`` supplies
    only the element type, so none of its dims are coupled (the dynamo exporter's raw graph reads
    a zero bias as ``CastLike(0, activation)``)."""

    def couple(self, ctx, node, tensor, axis):
        x, y = node.inputs[0], node.outputs[0]
        if tensor is not x and tensor is not y:
            return None  # the `like` operand: its type is read, never its values or shape
        other = y if tensor is x else x
        ctx.link(ctx.dim(tensor, axis), None, ctx.dim(other, axis), None)


# ---------------------------------------------------------------------------------------------
# the registry

_UNARY = (
    "Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish", "Erf", "Neg", "Abs",
    "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity", "Cast",
    "Sin", "Cos", "Not", "IsNaN", "IsInf",
)


def _build_rules() -> dict[str, ChannelRule]:
    rules: dict[str, ChannelRule] = {}
    unary = ElementwiseRule()
    for op in _UNARY:
        rules[op] = unary
    rules["Dropout"] = ElementwiseRule(outputs=None)
    rules["CastLike"] = CastLikeRule()
    for op in ("Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal", "Less",
               "Greater", "LessOrEqual", "GreaterOrEqual"):
        rules[op] = ElementwiseRule()
    rules["Sub"] = ElementwiseRule()
    rules["Div"] = ElementwiseRule(roles={1: DIVISOR})
    rules["Pow"] = ElementwiseRule(roles={1: EXPONENT})
    rules["Where"] = ElementwiseRule()
    rules["PRelu"] = ElementwiseRule(roles={1: SLOPE})
    rules["BatchNormalization"] = NormalizationRule((SCALE, SHIFT, MEAN, VARIANCE))
    rules["InstanceNormalization"] = NormalizationRule((SCALE, SHIFT))
    rules["Conv"] = ConvRule()
    rules["ConvTranspose"] = ConvRule(transpose=True)
    rules["Gemm"] = GemmRule()
    rules["MatMul"] = MatMulRule()
    pool = PoolRule()
    for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        rules[op] = pool
    rules["Concat"] = ConcatRule()
    rules["Split"] = SplitRule()
    rules["Slice"] = SliceRule()
    rules["Flatten"] = FlattenRule()
    rules["Transpose"] = TransposeRule()
    rules["Squeeze"] = SqueezeRule(unsqueeze=False)
    rules["Unsqueeze"] = SqueezeRule(unsqueeze=True)
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"):
        rules[op] = ReduceRule(axes_input_opset=13 if op == "ReduceSum" else 18)
    rules["Softmax"] = SoftmaxRule()
    rules["LogSoftmax"] = SoftmaxRule()
    rules["Resize"] = ResizeRule()
    rules["Pad"] = PadRule()
    rules["Constant"] = ConstantRule()
    rules["Reshape"] = ReshapeRule()
    rules["Shape"] = ShapeRule()
    rules["LayerNormalization"] = LayerNormalizationRule()
    rules["GroupNormalization"] = GroupNormalizationRule()
    rules["DepthToSpace"] = DepthToSpaceRule()
    rules["SpaceToDepth"] = DepthToSpaceRule(space_to_depth=True)
    rules["Gather"] = GatherRule()
    rules["GatherND"] = GatherNDRule()
    rules["Expand"] = ExpandRule()
    rules["Tile"] = TileRule()
    return rules


#: op type -> rule (standard ONNX domain only). Built once; not mutated by the library.
RULES: dict[str, ChannelRule] = _build_rules()

"""Model statistics: node count, op histogram, parameter count and multiply-accumulates.

Parameters are the elements of every floating-point or integer weight tensor (initializers and
``Constant``-node values) with more than one element; shape constants and scalars are not
parameters. MACs are counted for one forward pass from shapes found by onnx shape inference:

* Conv: ``N * C_out * prod(out_spatial) * (C_in / group) * prod(kernel)``
* ConvTranspose: ``N * C_in * prod(in_spatial) * (C_out / group) * prod(kernel)``
* Gemm: ``M * N * K``; MatMul: ``prod(batch) * M * N * K``

A symbolic dimension (batch, dynamic H/W) counts as 1, and the result says so
(``macs_symbolic``). Ops inside local functions (our fused Conv+activation nodes) are counted
through the function body's Conv.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import shape_inference

from .io import iter_tensors
from .validate import default_opset, stripped_initializers, weightless_copy


@dataclass
class ModelStats:
    nodes: int
    parameters: int
    macs: int
    macs_symbolic: bool
    op_histogram: dict[str, int] = field(default_factory=dict)
    opset: int = 0
    inputs: list[tuple[str, str, list]] = field(default_factory=list)
    outputs: list[tuple[str, str, list]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "parameters": self.parameters,
            "macs": self.macs,
            "macs_symbolic_dims_as_1": self.macs_symbolic,
            "op_histogram": dict(self.op_histogram),
            "opset": self.opset,
            "inputs": [{"name": n, "dtype": t, "shape": s} for n, t, s in self.inputs],
            "outputs": [{"name": n, "dtype": t, "shape": s} for n, t, s in self.outputs],
        }


def _dims(value_info: onnx.ValueInfoProto) -> list | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _describe(vi: onnx.ValueInfoProto) -> tuple[str, str, list]:
    elem = vi.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "unknown"
    return vi.name, dtype, _dims(vi) or []


def count_parameters(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in iter_tensors(model.graph):
        n = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        if n > 1 and tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.BOOL):
            total += n
    return total


def _conv_weight_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _static(dims: list | None) -> tuple[list[int] | None, bool]:
    if dims is None:
        return None, True
    symbolic = any(not isinstance(d, int) for d in dims)
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims], symbolic


def count_macs(model: onnx.ModelProto) -> tuple[int, bool]:
    """(MACs of one forward pass, whether any symbolic dimension was counted as 1)."""
    try:
        inferred = shape_inference.infer_shapes(weightless_copy(model), data_prop=True)  # dims suffice
    except Exception:  # counting must never fail a run; unknown shapes count as symbolic
        inferred = model
    shapes: dict[str, list | None] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[vi.name] = _dims(vi)
    weights = _conv_weight_shapes(inferred)
    for name, dims in weights.items():
        shapes.setdefault(name, dims)
    functions = {(f.domain, f.name): f for f in inferred.functions}

    macs = 0
    symbolic_any = False

    def shape_of(name: str):
        return _static(shapes.get(name))

    for node in inferred.graph.node:
        op = node.op_type
        inputs = list(node.input)
        out = node.output[0] if node.output else ""
        func = functions.get((node.domain, op))
        if func is not None:
            inner = [n.op_type for n in func.node]
            if "Conv" in inner:
                op = "Conv"
            elif "ConvTranspose" in inner:
                op = "ConvTranspose"
            else:
                continue
        if op in ("Conv", "ConvTranspose"):
            w, _ = shape_of(inputs[1])
            x, sx = shape_of(inputs[0])
            y, sy = shape_of(out)
            if w is None or x is None or y is None:
                symbolic_any = True
                continue
            kernel = int(np.prod(w[2:])) if len(w) > 2 else 1
            if op == "Conv":
                macs += y[0] * y[1] * int(np.prod(y[2:])) * w[1] * kernel
            else:
                macs += x[0] * x[1] * int(np.prod(x[2:])) * w[1] * kernel
            symbolic_any |= sx or sy
        elif op == "Gemm":
            a, sa = shape_of(inputs[0])
            y, sy = shape_of(out)
            if a is None or y is None:
                symbolic_any = True
                continue
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            macs += y[0] * y[1] * k
            symbolic_any |= sa or sy
        elif op == "MatMul":
            a, sa = shape_of(inputs[0])
            y, sy = shape_of(out)
            if a is None or y is None:
                symbolic_any = True
                continue
            k = a[-1]
            macs += int(np.prod(y)) * k
            symbolic_any |= sa or sy
    return int(macs), symbolic_any


def model_stats(model: onnx.ModelProto) -> ModelStats:
    histogram = collections.Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}") for n in model.graph.node
    )
    macs, symbolic = count_macs(model)
    init_names = {i.name for i in model.graph.initializer}
    return ModelStats(
        nodes=len(model.graph.node),
        parameters=count_parameters(model),
        macs=macs,
        macs_symbolic=symbolic,
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        opset=default_opset(model),
        inputs=[_describe(vi) for vi in model.graph.input if vi.name not in init_names],
        outputs=[_describe(vi) for vi in model.graph.output],
    )


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _serialized_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, exactly, without encoding the weights (protobuf's ByteSize encodes
    the whole message: 0.5 s for a 100 MB model). Sizes come from :func:`weightless_copy`, plus,
    per stripped tensor, its ``raw_data`` field (1-byte tag, varint length, payload) and the change
    in the varint length prefixes of the tensor inside the graph and of the graph in the model."""
    stripped = stripped_initializers(model)
    if not stripped:
        return model.ByteSize()
    light = weightless_copy(model)
    graph_light = light.graph.ByteSize()
    graph_full = graph_light
    for i in stripped:
        payload = len(model.graph.initializer[i].raw_data)
        stub = light.graph.initializer[i].ByteSize()
        full = stub + 1 + _varint_len(payload) + payload
        graph_full += (full + _varint_len(full)) - (stub + _varint_len(stub))
    return light.ByteSize() - graph_light - _varint_len(graph_light) + graph_full + _varint_len(graph_full)


def file_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes serialized (payload of external data included)."""
    try:
        return _serialized_size(model)
    except Exception:
        return sum(len(t.raw_data) for t in iter_tensors(model.graph))



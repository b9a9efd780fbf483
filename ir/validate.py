"""Validation and opset normalisation.

``validate_model`` runs what decides whether onnx-compress can work on a model at all: the onnx
checker, strict shape inference, the opset range we support (11 up to the newest one the
installed onnx knows) and the operator domains (standard ONNX, ai.onnx.ml, ONNX Runtime's
com.microsoft contrib ops, and domains defined by the model's own local functions). Every failure
becomes an :class:`InvalidModelError` or :class:`UnsupportedOpError` whose one-line message names
the problem; the underlying exception is chained.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from .errors import InvalidModelError, UnsupportedOpError

MIN_OPSET = 11
#: domains whose operators ONNX Runtime (and so our verification) can execute.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


def newest_opset() -> int:
    return onnx.defs.onnx_opset_version()


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports (0 if it imports none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_domains(model: onnx.ModelProto) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    local_domains = {f.domain for f in model.functions}
    imported = {entry.domain for entry in model.opset_import}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if (node.domain, node.op_type) in local:
                pass
            elif node.domain not in KNOWN_DOMAINS and node.domain not in local_domains:
                raise UnsupportedOpError(
                    f"node '{node.name or node.op_type}' uses operator '{node.op_type}' from unknown "
                    f"domain '{node.domain}'"
                    + ("" if node.domain in imported else " (the domain is not even imported)")
                )
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)


def validate_model(
    model: onnx.ModelProto, *, origin: str = "model", shape_inference: bool = True, serialized: bytes | None = None
) -> None:
    """Raise if the model is not something onnx-compress can process; return None if it is.

    ``serialized``: the bytes ``model`` was parsed from, if at hand (the checker then need not
    serialize the model again)."""
    opset = default_opset(model)
    if opset == 0:
        raise InvalidModelError(f"{origin} imports no default ONNX opset")
    if opset > newest_opset():
        raise UnsupportedOpError(
            f"{origin} uses opset {opset}; the installed onnx supports up to {newest_opset()}"
        )
    _check_domains(model)
    try:
        onnx.checker.check_model(model if serialized is None else serialized, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{origin} fails the ONNX checker: {_first_line(exc)}") from exc
    except ValueError as exc:  # e.g. a model over 2 GiB passed as a proto
        raise InvalidModelError(f"{origin} cannot be checked: {_first_line(exc)}") from exc
    if shape_inference:
        light = weightless_copy(model)
        if light.ByteSize() < 2**31 - 1:
            try:
                onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
            except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
                # confirm on the full model, so that a stripped weight can never cause a refusal
                # (a model over 2 GiB cannot go to onnx's shape inference whole: not checked, as before)
                if model.ByteSize() >= 2**31 - 1:
                    return
                try:
                    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
                except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
                    raise InvalidModelError(f"{origin} fails shape inference: {_first_line(exc)}") from exc


#: floating-point initializers with more raw bytes than this are left out of ``weightless_copy``
WEIGHTLESS_MIN_BYTES = 1024
_FLOAT_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.DOUBLE: 8
}


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field but ``skip`` (never read: ListFields would copy a raw_data payload)."""
    for fd in source.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        if fd.is_repeated:
            value = getattr(source, fd.name)
            if len(value):
                getattr(target, fd.name).extend(value)
        elif fd.has_presence and not source.HasField(fd.name):
            continue
        elif fd.message_type is not None:
            getattr(target, fd.name).CopyFrom(getattr(source, fd.name))
        else:
            setattr(target, fd.name, getattr(source, fd.name))


def stripped_initializers(model: onnx.ModelProto) -> list[int]:
    """Indices of the top-level initializers that :func:`weightless_copy` leaves without data."""
    indices = []
    for i, t in enumerate(model.graph.initializer):  # sizes from dims: reading raw_data copies it
        itemsize = _FLOAT_BYTES.get(t.data_type)
        if itemsize and t.HasField("raw_data"):
            count = 1
            for d in t.dims:
                count *= d
            if count * itemsize > WEIGHTLESS_MIN_BYTES:
                indices.append(i)
    return indices


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large floating-point initializers have every field but ``raw_data``.

    Shape inference needs only the type and dims of a weight; values are read only from small
    integer tensors (Reshape shapes, Slice starts, ...), which are kept. onnx serializes the whole
    model on every ``infer_shapes``/``check_model`` call, which for a 100 MB ResNet-50 costs more
    than the inference itself; on this copy it costs nothing. The copy fails the checker (a tensor
    without a value): it is only for shape inference and sizes.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    stripped = set(stripped_initializers(model))
    for i, tensor in enumerate(model.graph.initializer):
        if i in stripped:
            _copy_fields(tensor, light.graph.initializer.add(), skip="raw_data")
        else:
            light.graph.initializer.add().CopyFrom(tensor)
    return light


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` run on :func:`weightless_copy`, weights put back.

    Returns a new model (the input is not modified) with the inferred ``value_info``; keyword
    arguments go to onnx's ``infer_shapes``.
    """
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), **kwargs)
    del inferred.graph.initializer[:]
    for tensor in model.graph.initializer:  # add().CopyFrom: half the time of extend() here
        inferred.graph.initializer.add().CopyFrom(tensor)
    return inferred


def _interface(model: onnx.ModelProto) -> list[tuple]:
    """(name, element type, dims) of every graph input that is not a weight, and every output."""
    weights = {t.name for t in model.graph.initializer}

    def describe(vi: onnx.ValueInfoProto) -> tuple:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        return (vi.name, t.elem_type, dims if t.HasField("shape") else None)

    return [describe(vi) for vi in model.graph.input if vi.name not in weights] + [
        describe(vi) for vi in model.graph.output
    ]


def normalize_opset(model: onnx.ModelProto, *, target: int = MIN_OPSET) -> onnx.ModelProto:
    """Return the model unchanged if its opset is at least ``target``, else converted to it.

    Our passes are written for opset 11 and later (Clip with min/max inputs, Pad with a pads
    input, ...); older models are lifted with onnx's version converter.
    """
    opset = default_opset(model)
    if opset >= target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError/IndexError alike
        raise UnsupportedOpError(
            f"model uses opset {opset}; converting it to opset {target} failed: {_first_line(exc)}"
        ) from exc
    if _interface(converted) != _interface(model):
        # e.g. Scan 8 -> 9 drops the batch axis of the graph inputs: not the same model any more
        raise UnsupportedOpError(
            f"model uses opset {opset}; converting it to opset {target} changes its inputs/outputs "
            f"({_interface(model)} -> {_interface(converted)})"
        )
    # The converter leaves the IR version as it was; the new opset needs at least its own.
    needed = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    if converted.ir_version < 4 <= needed:
        # Below IR 4 every initializer had to be listed as an input (they are weights, not
        # inputs anyone feeds); from IR 4 on that would make them overridable inputs.
        weights = {t.name for t in converted.graph.initializer}
        real_inputs = [vi for vi in converted.graph.input if vi.name not in weights]
        del converted.graph.input[:]
        converted.graph.input.extend(real_inputs)
    converted.ir_version = max(converted.ir_version, needed)
    return converted

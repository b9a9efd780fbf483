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


def validate_model(model: onnx.ModelProto, *, origin: str = "model", shape_inference: bool = True) -> None:
    """Raise if the model is not something onnx-compress can process; return None if it is."""
    opset = default_opset(model)
    if opset == 0:
        raise InvalidModelError(f"{origin} imports no default ONNX opset")
    if opset > newest_opset():
        raise UnsupportedOpError(
            f"{origin} uses opset {opset}; the installed onnx supports up to {newest_opset()}"
        )
    _check_domains(model)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{origin} fails the ONNX checker: {_first_line(exc)}") from exc
    except ValueError as exc:  # e.g. a model over 2 GiB passed as a proto
        raise InvalidModelError(f"{origin} cannot be checked: {_first_line(exc)}") from exc
    if shape_inference and model.ByteSize() < 2**31 - 1:
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise InvalidModelError(f"{origin} fails shape inference: {_first_line(exc)}") from exc


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
    return converted

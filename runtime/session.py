"""``Session``: run an ONNX model on the Numba INT8 kernels or on ONNX Runtime, with ORT's API.

``Session(model, backend="numba" | "onnxruntime", threads=None)`` offers ``run(output_names,
feeds)``, ``get_inputs()`` and ``get_outputs()`` like ``onnxruntime.InferenceSession``.

The numba back end lowers a QDQ graph once, at load, into a plan of kernel calls (see
``lowering``): constant weights are dequantize-free integer tensors packed for the kernels,
activations stay quantized (NHWC for 4-D tensors) between steps, and each
``DequantizeLinear -> op -> [Relu|Clip] -> QuantizeLinear`` pattern becomes one kernel call whose
requantization (defined in ``onnx_compress.kernels.reference``) replaces the float op and the Q/DQ
pair; element-wise activations become 256-entry lookup tables and ops without an integer lowering
run as float islands on ONNX Runtime between explicit Q/DQ borders (``lowering`` lists them).
Graph inputs are quantized by a QuantizeLinear step; float graph outputs come from a
DequantizeLinear step. An op without a lowering raises ``UnsupportedOpError`` naming it; with
``fallback=True`` the whole model runs on the ONNX Runtime back end instead, and the session says
so: ``active_backend == "onnxruntime"``, ``fallback_reason`` holds the error's message, and a
warning is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..ir.errors import UnsupportedModelError, UnsupportedOpError
from ..ir.io import load_model

logger = logging.getLogger(__name__)

BACKENDS = ("numba", "onnxruntime")


@dataclass(frozen=True)
class NodeArg:
    """What ``get_inputs()``/``get_outputs()`` return (the fields of ORT's ``NodeArg``)."""

    name: str
    type: str
    shape: list


def _node_args(values) -> list[NodeArg]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
        type_str = f"tensor({_ORT_TYPE.get(np.dtype(dtype).name, np.dtype(dtype).name) if dtype is not None else 'undefined'})"
        shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim] if t.HasField("shape") else []
        out.append(NodeArg(v.name, type_str, shape))
    return out


_ORT_TYPE = {"float32": "float", "float64": "double"}


class Session:
    """An inference session on the ``numba`` or the ``onnxruntime`` back end."""

    def __init__(self, model, backend: str = "numba", threads: int | None = None, *, fallback: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.model = load_model(model) if not isinstance(model, onnx.ModelProto) else model
        self.backend = backend
        self.active_backend = backend
        self.fallback_reason: str | None = None
        self.threads = threads
        graph = self.model.graph
        inits = {i.name for i in graph.initializer}
        self._inputs = _node_args([i for i in graph.input if i.name not in inits])
        self._outputs = _node_args(list(graph.output))
        self._plan = None
        if backend == "numba":
            from .lowering import lower

            try:
                self._plan = lower(self.model)
            except UnsupportedOpError as exc:
                if not fallback:
                    raise
                self.active_backend = "onnxruntime"
                self.fallback_reason = str(exc)
                logger.warning("numba back end cannot run the model (%s); running the whole model on onnxruntime", exc)
            else:
                self._ort = None
                logger.info("lowered %d nodes into %d kernel steps (%d float islands)", len(graph.node),
                            len(self._plan.steps), len(self._plan.islands))
        if self.active_backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            try:
                self._ort = ort.InferenceSession(self.model.SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own exception types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {first}") from exc

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise TypeError(f"feeds must be a mapping of input name to array, got {type(feeds).__name__}")
        known = {i.name: i for i in self._inputs}
        for name in feeds:
            if name not in known:
                raise ValueError(f"unknown input '{name}' (inputs: {', '.join(known)})")
        checked = {}
        for name, arg in known.items():
            if name not in feeds:
                raise ValueError(f"missing input '{name}'")
            value = feeds[name]
            if not isinstance(value, np.ndarray):
                raise TypeError(f"input '{name}' must be a numpy.ndarray, got {type(value).__name__}")
            if arg.type != f"tensor({_ORT_TYPE.get(value.dtype.name, value.dtype.name)})":
                raise TypeError(f"input '{name}' must be {arg.type}, got {value.dtype}")
            if len(arg.shape) != value.ndim or any(isinstance(d, int) and d != s for d, s in zip(arg.shape, value.shape)):
                raise ValueError(f"input '{name}' must have shape {arg.shape}, got {list(value.shape)}")
            checked[name] = value
        return checked

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model; ``output_names=None`` returns every graph output, in graph order."""
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        valid = {o.name for o in self._outputs}
        for n in names:
            if n not in valid:
                raise ValueError(f"unknown output '{n}' (outputs: {', '.join(sorted(valid))})")
        feeds = self._check_feeds(feeds)
        if self._ort is not None:
            return self._ort.run(names, feeds)
        if self.threads is None:
            return self._plan.run(names, feeds)
        import numba

        previous = numba.get_num_threads()
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        try:
            return self._plan.run(names, feeds)
        finally:
            numba.set_num_threads(previous)

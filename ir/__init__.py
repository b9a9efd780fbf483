"""ir: load/save, validation, opset normalisation, the graph type and helpers, errors.

The graph type is onnx-graphsurgeon's ``gs.Graph``; ``to_graph``/``to_model`` convert without
losing model metadata. Nothing here imports onnxruntime.
"""

from .errors import (
    InvalidModelError,
    OnnxCompressError,
    OutputPathError,
    PassError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)
from .graph import (
    NODE_EXTRAS,
    constant_value,
    consumers,
    copy_extras,
    is_constant,
    is_graph_input,
    is_graph_output,
    make_constant,
    producer,
    to_graph,
    to_model,
    unique_name,
    bypass_node,
    rank,
    replace_all_uses,
    static_shape,
)
from .io import check_output_path, iter_tensors, load_model, save_model, tensor_bytes
from .stats import ModelStats, count_macs, count_parameters, file_size, model_stats
from .validate import MIN_OPSET, default_opset, newest_opset, normalize_opset, validate_model

__all__ = [name for name in dir() if not name.startswith("_")]

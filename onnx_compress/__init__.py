"""onnx-compress: a graph-level compiler on ONNX IR.

Public API::

    import onnx_compress
    model = onnx_compress.compress("model.onnx")            # ModelProto, verified
    model, report = onnx_compress.compress_with_report(model_proto, skip=["fold-constants"])

Every pass is usable alone: ``onnx_compress.passes.FoldBatchNormPass()(model_proto)``.
"""

__version__ = "0.1.0"

from .api import CompressReport, compress, compress_file, compress_with_report  # noqa: E402
from .ir.errors import (  # noqa: E402
    InvalidModelError,
    OnnxCompressError,
    OutputPathError,
    PassError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)
from .options import CompressOptions  # noqa: E402

__all__ = [
    "CompressOptions",
    "CompressReport",
    "InvalidModelError",
    "OnnxCompressError",
    "OutputPathError",
    "PassError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "VerificationError",
    "compress",
    "compress_file",
    "compress_with_report",
]

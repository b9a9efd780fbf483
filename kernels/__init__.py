"""kernels: Numba INT8 kernels, exact against NumPy references of ONNX integer semantics.

Each op has a public wrapper that validates (``TypeError``/``ValueError`` naming the argument), a
private ``@njit`` kernel (options in ``config``) and a NumPy twin in ``reference`` (which also
defines, once, the float32 requantization every integer kernel uses). Internal layout is NHWC.
Imports only numpy and numba.
"""

from . import reference
from .config import COLD_START_NOTE
from .conv import QConvParams, bind_qconv, prepare_qconv, qlinear_conv, run_qconv
from .eltwise import (
    QBinaryParams,
    bind_qbinary,
    clamp,
    prepare_qbinary,
    qlinear_add,
    qlinear_mul,
    run_qbinary,
)
from .gemm import QGemmParams, bind_qgemm, prepare_qgemm, qgemm, qlinear_matmul, run_qgemm
from .lut import lookup
from .pool import average_pool, bind_global_average_pool, global_average_pool, max_pool
from .quantize import (
    dequantize_linear,
    prepare_quantize_to_nhwc,
    quantize_linear,
    quantize_linear_to_nhwc,
    requantize,
)

__all__ = [
    "COLD_START_NOTE", "QConvParams", "QGemmParams", "average_pool", "bind_global_average_pool", "bind_qbinary",
    "bind_qconv", "bind_qgemm", "clamp", "dequantize_linear",
    "global_average_pool", "lookup", "max_pool", "prepare_qconv", "prepare_qgemm", "qgemm", "qlinear_add",
    "qlinear_conv", "qlinear_matmul", "qlinear_mul", "quantize_linear", "quantize_linear_to_nhwc", "prepare_quantize_to_nhwc", "reference", "requantize",
    "run_qconv", "run_qgemm", "QBinaryParams", "prepare_qbinary", "run_qbinary",
]

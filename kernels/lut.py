"""Element-wise int8/uint8 activations by a 256-entry lookup table.

Math: an element-wise float function ``f`` sandwiched between a DequantizeLinear and a
QuantizeLinear maps each of the 256 input codes to exactly one output code,
``y = Q(f(DQ(q)))``, so the whole ``DQ -> f -> Q`` chain is ``y = table[q]`` with
``table[c] = Q(f(DQ(code(c))))``. The table is indexed by the input's two's-complement byte
(``c = q & 0xFF``: uint8 codes 0..255 as themselves, int8 codes -128..-1 at 128..255).
Who fills the table decides the semantics: the runtime evaluates the float chain once with ONNX
Runtime on all 256 codes, so the lookup equals ORT's float evaluation of the QDQ graph element
for element (see ``runtime.lowering``). ``reference.lookup`` is the NumPy twin.

Any layout (element-wise); parallel over elements.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import QTYPES, check_array, check_out
from .config import jit_parallel


@jit_parallel
def _lut_kernel(q, table, out):
    for i in prange(q.shape[0]):
        out[i] = table[q[i]]


def check_table(table) -> np.ndarray:
    """A table must be a 1-D uint8 or int8 array of 256 entries."""
    check_array("table", table, dtypes=QTYPES, ndim=1)
    if table.shape[0] != 256:
        raise ValueError(f"table must have 256 entries, got {table.shape[0]}")
    return table


def lookup(q, table, *, out=None) -> np.ndarray:
    """``table[q & 0xFF]`` with the table's dtype; bit-exact with ``reference.lookup``."""
    check_array("q", q)
    check_table(table)
    y = check_out("out", out, q.shape, table.dtype)
    _lut_kernel(np.ascontiguousarray(q).view(np.uint8).reshape(-1), np.ascontiguousarray(table).view(np.uint8),
                y.view(np.uint8).reshape(-1))
    return y

"""Validation helpers shared by the public kernel wrappers, and the scalar njit helpers every
kernel uses for the one requantization (see ``reference``: ``clamp(rne(float32(acc) * m),
lo - z, hi - z) + z``, all float32)."""

from __future__ import annotations

import numpy as np

from .config import jit_serial
from .reference import qrange

QTYPES = (np.dtype(np.uint8), np.dtype(np.int8))
INT32_MAX = 2**31 - 1


def check_array(name: str, value, dtypes=QTYPES, ndim: int | None = None) -> np.ndarray:
    """``value`` must be an ndarray of one of ``dtypes`` (TypeError) with ``ndim`` axes (ValueError)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    return value


def check_scale(name: str, value, size: int | None = None) -> np.ndarray:
    """A positive finite float32 scale: scalar (``size=None``) or of ``size`` entries (or one entry,
    broadcast). Returns a 1-D float32 array."""
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a float scale, got dtype {arr.dtype}")
    arr = arr.astype(np.float32).reshape(-1)
    if size is None and arr.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if size is not None and arr.size not in (1, size):
        raise ValueError(f"{name} must have 1 or {size} entries, got {arr.size}")
    if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(f"{name} must be positive and finite")
    return np.ascontiguousarray(np.broadcast_to(arr, (size or 1,)))


def check_zero_point(name: str, value, dtypes=QTYPES, size: int | None = None) -> np.ndarray:
    """A zero point of an integer dtype (numpy scalar or array): scalar or ``size`` entries.
    Returns it as a 1-D int32 array; the dtype is read with ``zero_point_dtype``."""
    arr = np.asarray(value)
    if arr.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {arr.dtype}")
    flat = arr.reshape(-1)
    if size is None and flat.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if size is not None and flat.size not in (1, size):
        raise ValueError(f"{name} must have 1 or {size} entries, got {flat.size}")
    return np.ascontiguousarray(np.broadcast_to(flat.astype(np.int32), (size or 1,)))


def check_out_range(out_range, dtype) -> tuple[int, int]:
    """``(lo, hi)`` of the clamp epilogue, inside ``dtype``'s range and non-empty."""
    lo, hi = qrange(dtype)
    if out_range is None:
        return lo, hi
    try:
        a, b = (int(v) for v in out_range)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"out_range must be a pair of integers, got {out_range!r}") from exc
    if not (lo <= a <= b <= hi):
        raise ValueError(f"out_range {out_range!r} must satisfy {lo} <= lo <= hi <= {hi}")
    return a, b


def check_ints(name: str, value, count: int, minimum: int) -> tuple[int, ...]:
    """A tuple of ``count`` integers, each at least ``minimum``."""
    try:
        vals = tuple(int(v) for v in value)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of {count} integers, got {value!r}") from exc
    if len(vals) != count:
        raise ValueError(f"{name} must have {count} entries, got {len(vals)}")
    if any(v < minimum for v in vals):
        raise ValueError(f"{name} entries must be >= {minimum}, got {vals}")
    return vals


def check_layout(layout: str) -> str:
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def to_nhwc(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if layout == "NCHW" else x)


def from_nhwc(y: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if layout == "NCHW" else y


def check_out(name: str, out, shape, dtype) -> np.ndarray:
    """A caller-supplied output buffer must be C-contiguous with the exact shape and dtype."""
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if out.shape != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous with shape {tuple(shape)}, got {out.shape}")
    return out


@jit_serial
def rne_clamped(v, lo_f, hi_f):
    """``rne(clamp(v, lo_f, hi_f))`` for a float32 ``v`` (integer-valued float32 bounds) -> int32.

    NaN maps to 0. Branch-free (selects, ``min``/``max`` and ``rint``, which rounds half to even
    in the default IEEE mode), so loops that call it vectorise; clamping before rounding equals
    rounding before clamping because the bounds are integers."""
    v = np.float32(0.0) if v != v else v
    v = min(max(v, lo_f), hi_f)
    return np.int32(np.rint(v))


@jit_serial
def requant(acc, m, zp, lo, hi):
    """The one requantization of an int32 accumulator with float32 multiplier ``m``."""
    v = np.float32(acc) * m
    return rne_clamped(v, np.float32(lo - zp), np.float32(hi - zp)) + zp

"""Every Numba compilation option of the kernels, in one place (DESIGN.md convention 8).

Kernels never call ``numba.njit`` with options of their own; they use ``jit_serial`` (one thread,
for kernels whose callers already parallelise or whose work is tiny) or ``jit_parallel``
(``parallel=True``: ``prange`` loops spread over Numba's thread pool).

Options and why:

* ``cache=True`` -- compiled machine code is written to disk and reused by later processes.
* ``nogil=True`` -- a running kernel releases the GIL, so a host may run sessions in threads.
* ``fastmath=False`` -- integer paths must be exact, and the float32 requantisation must round
  exactly like ONNX Runtime's (no reassociation, no FMA contraction, no flush-to-zero). Fastmath
  would not change integer adds, but it is off everywhere so that no kernel silently differs.
* ``error_model="numpy"`` -- no ZeroDivisionError checks in the hot loops (divisors are
  validated by the public wrappers).
* ``boundscheck=False`` -- wrappers validate shapes; kernels index without checks.

Caching and cold start
----------------------
Numba compiles lazily, once per argument-type signature (e.g. a uint8 and an int8 activation are
two compilations). With ``cache=True`` the result is stored in an ``.nbi``/``.nbc`` pair under
the package's ``__pycache__`` (or under ``$NUMBA_CACHE_DIR`` when set, which is the way to put
the cache elsewhere, e.g. on a read-only install). The cache is *keyed* by Numba on the function's
qualified name, its source file's path and modification time, the argument types, the Numba
version and the host CPU name and features: editing a kernel file, upgrading Numba or moving to a
different CPU recompiles, never reuses stale code. A kernel that calls ``numba.get_thread_id()``
cannot be cached; none here does.

To keep the number of compilations small, integer kernels write their result through a
``uint8`` view of the output buffer (two's-complement bytes, ``value & 0xFF``), so each kernel
compiles once per *input* dtype rather than once per (input, output) dtype pair.

The VNNI/AVX2 micro-kernels (``microkernel``, ``numba.extending.intrinsic``) cache like any other
code: the intrinsics are expanded into the caller's LLVM IR at compile time, and the disk cache is
keyed on the CPU name and features, so an AVX2-only machine never loads VNNI code. Measured
(``benchmarks/bench_runtime.py``, load average ~9, 1 thread): ResNet-18 / MobileNetV2 QDQ load
+ first batch-1 run 36.2 / 33.3 s with an empty ``NUMBA_CACHE_DIR``, 1.6 / 1.4 s from the disk
cache (plus ~1.4 s import), against 0.5 / 0.3 s for ONNX Runtime.

Latest, with every kernel of the two models (``python benchmarks/bench_runtime.py --batches 1
--repeats 5 --rounds 1``, 2026-11-28, idle 2-core AVX512-VNNI machine, import + load + first
batch-1 run in a fresh process): ResNet-18 / MobileNetV2 14.4 / 13.6 s with an empty
``NUMBA_CACHE_DIR``, 1.2 / 1.2 s with the disk cache, against 0.7 / 0.7 s for ONNX Runtime.

Older measurements on the loaded development machine: see ``COLD_START_NOTE`` below -- about a
minute to compile everything, under a second to load it back from the cache.
End to end (``benchmarks/bench_runtime.py``, import + load + first batch-1 run in a fresh process,
ResNet-18 and MobileNetV2 QDQ, load average 15-45): 19-33 s with an empty ``NUMBA_CACHE_DIR``,
2.7-4.6 s with the disk cache (about 1 s of it the first inference), against 1.1-3.0 s for ONNX
Runtime.
"""

from __future__ import annotations

import numba

#: options shared by every kernel
BASE_OPTIONS: dict = {
    "cache": True,
    "nogil": True,
    "fastmath": False,
    "error_model": "numpy",
    "boundscheck": False,
}

SERIAL_OPTIONS: dict = dict(BASE_OPTIONS, parallel=False)
PARALLEL_OPTIONS: dict = dict(BASE_OPTIONS, parallel=True)

COLD_START_NOTE = (
    "measured (2 shared cores at load average ~26, Numba 0.68, one uint8 signature of each of the 10 "
    "kernels): cold, empty cache: 68 s of first calls (1.5-14 s per parallel kernel); warm disk cache: "
    "0.9 s for all first calls (0.75 s of it starting Numba's thread pool), plus ~1-2 s to import"
)


def jit_serial(fn):
    """``numba.njit`` with the serial kernel options."""
    return numba.njit(**SERIAL_OPTIONS)(fn)


def jit_inline(fn):
    """``numba.njit`` with the serial options, inlined into its callers at Numba-IR level
    (``inline="always"``): for small helpers taking many array arguments, whose call overhead
    (every array is passed as a 7-field struct) would otherwise cost as much as their work."""
    return numba.njit(inline="always", **SERIAL_OPTIONS)(fn)


def jit_parallel(fn):
    """``numba.njit`` with ``parallel=True`` and the shared kernel options."""
    return numba.njit(**PARALLEL_OPTIONS)(fn)

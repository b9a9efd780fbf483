"""Kernel-level timings of the Numba INT8 back end (issue 5): where the figures quoted in
``kernels/conv.py`` and ``benchmarks/README.md`` come from.

* ``depthwise``: MobileNetV2's depthwise shapes (3x3, uint8 activations, int8 weights of zero point
  0) through each depthwise kernel that can run them -- ``pixel`` (per pixel, float32),
  ``rows`` (row-buffered float32) and ``vnni`` (``vpdpbusd``, AVX512-VNNI CPUs only) -- every one
  checked equal to the others before it is timed; min of ``--repeats`` runs, kernels alternated.
* ``conv``: non-depthwise shapes of ResNet-18 (its 7x7 stem and 3x3 layers) through the GEMM
  driver, as the runtime binds them; min of ``--repeats`` runs.
* ``plan``: the fixed cost of a whole MobileNetV2 plan -- ORT ``quantize_static``'s QDQ model of
  ``bench_runtime.py``, run on a 32x32 input so that the kernels have almost no work; min and
  median of ``--repeats * 4`` runs.

    python benchmarks/bench_kernels.py [--threads 1 2] [--repeats 30] [--parts depthwise conv plan]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: (batch, input size, channels, stride) of MobileNetV2's 3x3 depthwise layers (a selection)
DEPTHWISE = ((1, 112, 32, 1), (1, 112, 96, 2), (1, 56, 144, 1), (1, 14, 576, 1), (1, 7, 960, 1),
             (8, 112, 32, 1), (8, 112, 96, 2), (8, 56, 144, 1), (8, 14, 576, 1), (8, 7, 960, 1))
#: (batch, input size, in channels, out channels, kernel, stride) of ResNet-18 convolutions
CONVS = ((1, 224, 3, 64, 7, 2), (1, 56, 64, 64, 3, 1), (1, 28, 128, 128, 3, 1), (1, 14, 256, 256, 3, 1),
         (1, 7, 512, 512, 3, 1), (8, 14, 256, 256, 3, 1))


def _min_times(calls: dict, repeats: int) -> dict:
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def bench_depthwise(repeats: int) -> None:
    from onnx_compress.kernels import conv as C

    rng = np.random.default_rng(0)
    print("depthwise 3x3 (ms, min of alternated runs; '-' = kernel not available here)")
    for n, size, c, s in DEPTHWISE:
        w = rng.integers(-127, 128, (c, 1, 3, 3)).astype(np.int8)
        x = rng.integers(0, 256, (n, size, size, c)).astype(np.uint8)
        p = C.prepare_qconv(np.uint8, np.float32(0.02), np.uint8(128), w, np.full(c, 0.01, np.float32),
                            np.zeros(c, np.int8), np.float32(0.05), np.uint8(3),
                            rng.integers(-1000, 1000, c).astype(np.int32), strides=(s, s), pads=(1, 1, 1, 1), group=c)
        shape = p.output_shape_nhwc(x.shape)
        dims = np.array([n, size, size, c, shape[1], shape[2]], np.int64)
        geo = np.array([3, 3, s, s, 1, 1, 1, 1], np.int64)
        outs = {k: np.empty(shape, np.uint8) for k in ("pixel", "rows", "vnni")}
        extras = {"pixel": ("dw_f32", (dims, geo)), "rows": ("dw_rows", (dims, geo, C._rows_per_task(p, x.shape, shape, 4)))}
        if p.dw_vnni is not None:
            extras["vnni"] = ("dw_vnni", (dims, geo, C._rows_per_task(p, x.shape, shape, 1)))
        calls = {}
        for key, (path, extra) in extras.items():
            kernel, call = C.DEPTHWISE_KERNELS[path], C._depthwise_args(p, path, extra, x, outs[key])
            calls[key] = lambda kernel=kernel, call=call: kernel(*call)
        for call in calls.values():
            call()
        for key in calls:
            if not np.array_equal(outs[key], outs["pixel"]):
                raise AssertionError(f"depthwise kernel '{key}' differs from the per-pixel one at {(n, size, c, s)}")
        best = _min_times(calls, repeats)
        print(f"  {n}x{size}x{size}x{c} stride {s}: " + "  ".join(
            f"{k} {best[k] * 1e3:.3f}" if k in best else f"{k} -" for k in ("pixel", "rows", "vnni")))


def bench_conv(repeats: int) -> None:
    from onnx_compress.kernels import conv as C

    rng = np.random.default_rng(0)
    print("convolution through the GEMM driver (ms, min; GMAC/s)")
    for n, size, ci, co, k, s in CONVS:
        w = rng.integers(-60, 61, (co, ci, k, k)).astype(np.int8)
        x = rng.integers(0, 256, (n, size, size, ci)).astype(np.uint8)
        p = C.prepare_qconv(np.uint8, np.float32(0.02), np.uint8(128), w, np.full(co, 0.001, np.float32),
                            np.zeros(co, np.int8), np.float32(0.05), np.uint8(0), np.zeros(co, np.int32),
                            strides=(s, s), pads=(k // 2,) * 4)
        y = np.empty(p.output_shape_nhwc(x.shape), np.uint8)
        best = _min_times({"conv": C.bind_qconv(p, x, y)}, repeats)["conv"]
        print(f"  {n}x{size}x{size}x{ci} -> {co}, {k}x{k} stride {s}: {best * 1e3:.3f} ms "
              f"({y.size * ci * k * k / best / 1e9:.0f} GMAC/s, {p.isa})")


def bench_plan(repeats: int) -> None:
    from benchmarks.bench_runtime import qdq_model
    from benchmarks.models import DEFAULT_CACHE_DIR
    from onnx_compress.runtime import Session

    plan = Session(str(qdq_model("mobilenet_v2", Path(DEFAULT_CACHE_DIR))), backend="numba")._plan
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    plan.run(plan.outputs, feeds)
    times = []
    for _ in range(repeats * 4):
        t0 = time.perf_counter()
        plan.run(plan.outputs, feeds)
        times.append(time.perf_counter() - t0)
    print(f"MobileNetV2 plan on a 32x32 input ({len(plan.steps)} steps): min {min(times) * 1e3:.3f} ms, "
          f"median {np.median(times) * 1e3:.3f} ms")


def main(argv=None) -> int:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--parts", nargs="+", choices=["depthwise", "conv", "plan"], default=["depthwise", "conv", "plan"])
    args = parser.parse_args(argv)
    parts = {"depthwise": bench_depthwise, "conv": bench_conv, "plan": bench_plan}
    for threads in args.threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        print(f"--- {threads} thread(s)")
        for part in args.parts:
            parts[part](args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

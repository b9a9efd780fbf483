"""The ``run`` and ``bench`` subcommands of the CLI, as plain functions.

``run_command(model, input_npz, output_npz, backend)``
    ``onnx-compress run MODEL --input feeds.npz --output out.npz [--backend numba|onnxruntime]``:
    loads the feeds (one array per graph input, keyed by input name), runs every graph output on
    the chosen back end (:class:`onnx_compress.runtime.Session`) and writes them, keyed by output
    name, to ``output_npz`` atomically (temp file + rename).

``bench_command(model, backend="both", batch=1, threads=None, repeats=20, warmup=3)``
    ``onnx-compress bench MODEL [--backend numba|onnxruntime|both] [--batch N] [--threads T]``:
    seeded random feeds (standard normal for float inputs, uniform codes for integer inputs;
    dynamic first dimension = ``batch``, other dynamic dimensions are refused), ``warmup`` runs
    then ``repeats`` timed runs per back end; prints median and p90 latency per back end and, for
    ``both``, the ratio numba / onnxruntime of the medians. Returns the figures as a dict.

These functions print (they are the CLI's); errors are one-line ``OnnxCompressError``/
``ValueError``/``FileNotFoundError`` messages naming the file or tensor.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from .runtime import BACKENDS, Session

BENCH_BACKENDS = BACKENDS + ("both",)


def _load_feeds(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"input file '{path}' is not a readable .npz archive: {exc}") from exc


def _save_npz_atomic(path, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def run_command(model, input_npz, output_npz, backend: str = "numba", *, threads: int | None = None,
                fallback: bool = False) -> dict[str, np.ndarray]:
    """Run ``model`` on the feeds in ``input_npz``; write every graph output to ``output_npz``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if Path(output_npz).resolve() == Path(input_npz).resolve():
        raise ValueError(f"output '{output_npz}' would overwrite the input")
    feeds = _load_feeds(input_npz)
    sess = Session(model, backend=backend, threads=threads, fallback=fallback)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds)))
    _save_npz_atomic(output_npz, outputs)
    return outputs


def random_feeds(sess: Session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every input of ``sess`` (dynamic first dimension = ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        shape = []
        for i, d in enumerate(arg.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                raise ValueError(f"input '{arg.name}' has a dynamic dimension {i} ({d!r}); only the first may be dynamic")
        dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(uint8)": np.uint8,
                 "tensor(int8)": np.int8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(arg.type)
        if dtype is None:
            raise ValueError(f"input '{arg.name}' has type {arg.type}, which bench cannot generate")
        if np.dtype(dtype).kind == "f":
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            feeds[arg.name] = rng.integers(max(info.min, -128), min(info.max, 255) + 1, shape).astype(dtype)
    return feeds


def time_session(sess: Session, feeds, repeats: int, warmup: int) -> dict[str, float]:
    """Median and p90 latency (ms) of ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "runs": repeats}


def bench_command(model, backend: str = "both", batch: int = 1, threads: int | None = None, repeats: int = 20,
                  warmup: int = 3, *, out: TextIO | None = None) -> dict:
    """Time ``model`` on one or both back ends; print median/p90 and the ratio; return the figures."""
    if backend not in BENCH_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BENCH_BACKENDS)}, got {backend!r}")
    for name, value, minimum in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    out = out or sys.stdout
    backends = BACKENDS if backend == "both" else (backend,)
    result: dict = {"model": str(model) if not hasattr(model, "SerializeToString") else "<ModelProto>",
                    "batch": batch, "threads": threads, "backends": {}}
    feeds = None
    for name in backends:
        t0 = time.perf_counter()
        sess = Session(model, backend=name, threads=threads)
        load_s = time.perf_counter() - t0
        feeds = feeds if feeds is not None else random_feeds(sess, batch)
        figures = time_session(sess, feeds, repeats, warmup)
        figures["load_s"] = load_s
        result["backends"][name] = figures
        print(f"{name:12s} median {figures['median_ms']:9.3f} ms   p90 {figures['p90_ms']:9.3f} ms   "
              f"(batch {batch}, threads {threads or 'default'}, {repeats} runs after {warmup} warm-up)", file=out)
    if len(backends) == 2:
        ratio = result["backends"]["numba"]["median_ms"] / result["backends"]["onnxruntime"]["median_ms"]
        result["ratio_numba_over_onnxruntime"] = ratio
        print(f"ratio numba / onnxruntime (median): {ratio:.2f}x", file=out)
    return result

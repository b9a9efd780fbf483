"""ResNet-50 calibration cost: onnx-compress entropy/percentile vs ORT ``quantize_static`` MinMax.

Issue 4's acceptance: with 64 calibration samples, entropy and percentile calibration peak RSS at
most 1.5 GB and flat from 16 to 256 samples; wall time at most 1.5x ORT MinMax on the same model
and samples; 53/53 Conv and 16/16 Add run as integer kernels by ONNX Runtime.

Every configuration (tool x method x sample count) runs in a **fresh subprocess**, so the peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read right after the quantization
call and before anything else) is that configuration's alone; ``rss_baseline`` is the peak after
imports and loading the model, before calibration starts.

Samples are **random normal** ``[1, 3, 224, 224]`` tensors generated lazily from a seed (never held
as a list): memory and time depend on tensor shapes and on how statistics are kept, not on what
the pixels show, so no real images are needed for these figures (the ranges they give are
meaningless; accuracy is measured by ``bench_quantize.py`` on real photos).

The same work for both tools: calibration of every activation tensor, Q/DQ insertion, save.
onnx-compress runs ``quantize(export, feeds, method=M, weight_rounding="nearest",
bias_correction=False, report_kernels=False)`` on the raw export (its time includes folding the 53
BatchNormalizations); ORT runs ``quantize_static(folded, out, reader, quant_format=QDQ,
calibrate_method=MinMax)`` with its other defaults on the BN-folded float model (ORT does not fold
BN itself, so the raw export would leave every Conv float and make ORT look worse than it is).
GPTQ and bias correction, which ORT has no equivalent of, are off. Integer/float kernel counts
are read from ORT's ``ORT_ENABLE_ALL`` graph afterwards (not timed).

Peak memory is set by the calibration **batch** (``--batch-size``, default 4 as ``quantize``'s
``batch_size``: every quantized activation of a whole batch is an ORT output at once), not by the
sample count: measured flat over 16/64/256 samples at 2.4-2.5 GB with batch 16 and 1.25-1.38 GB
with batch 4.

Each row reports wall seconds **and CPU seconds** (``getrusage`` user + system, this process's
threads and children, over the timed call) and the 1-minute load average when it ended: on a
loaded machine wall time measures the neighbours as much as the tool, so the verdict line gives
the CPU-seconds ratio next to the wall ratio (the target is on wall time on an idle machine).

    python benchmarks/bench_calibration.py [--samples 16 64 256] [--methods entropy percentile]
        [--batch-size 4] [--cache DIR] [--json OUT] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RSS_LIMIT = 1.5e9
TIME_RATIO_LIMIT = 1.5
INPUT = "input"


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports kB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) and its waited-for children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _feeds(count: int, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {INPUT: rng.standard_normal((1, 3, size, size)).astype(np.float32)}


def _kernel_counts(model) -> dict:
    from onnx_compress.passes.quant_report import ort_kernel_report

    report = ort_kernel_report(model)
    return {
        "int_conv": report.integer_ops.get("QLinearConv", 0),
        "float_conv": sum(v for k, v in report.float_ops.items() if k in ("Conv", "FusedConv")),
        "int_add": report.integer_ops.get("QLinearAdd", 0),
        "float_add": report.float_ops.get("Add", 0),
        "integer_total": report.integer_total,
        "float_total": report.float_total,
        "summary": report.summary(),
    }


def worker(tool: str, method: str, samples: int, model_path: str, size: int, seed: int, out: str,
           batch_size: int = 4) -> None:
    """One configuration in this (fresh) process; writes its JSON to ``out``."""
    import logging

    import onnx

    logging.getLogger().setLevel(logging.ERROR)
    if tool == "ours":
        from onnx_compress.quantize import quantize

        rss_baseline = _peak_rss()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        quantized, report = quantize(
            model_path, _feeds(samples, size, seed), method=method, weight_rounding="nearest",
            bias_correction=False, report_kernels=False, progress=False, batch_size=batch_size,
        )
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(quantized, str(Path(tmp) / "q.onnx"))
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        stages = report.seconds
    else:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = _feeds(samples, size, seed)

            def get_next(self):
                return next(self._it, None)

        rss_baseline = _peak_rss()
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "ort_int8.onnx"
            c0, t0 = _cpu_seconds(), time.perf_counter()
            quantize_static(model_path, str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            calibrate_method=CalibrationMethod.MinMax)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            quantized = onnx.load(str(dst))
        stages = {}
    rss = _peak_rss()
    row = {"tool": tool, "method": method, "samples": samples, "seconds": seconds, "cpu_seconds": cpu,
           "load_average": os.getloadavg()[0], "stages": stages,
           "rss_peak": rss, "rss_baseline": rss_baseline, "kernels": _kernel_counts(quantized)}
    Path(out).write_text(json.dumps(row))


def run_config(tool: str, method: str, samples: int, model_path: Path, size: int, seed: int,
               batch_size: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, method, str(samples),
               str(model_path), "--input-size", str(size), "--seed", str(seed), "--worker-out", str(out),
               "--batch-size", str(batch_size)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"tool": tool, "method": method, "samples": samples, "error": tail[0]}
        return json.loads(out.read_text())


def folded_model(src: Path, cache: Path) -> Path:
    """The BN-folded float model ORT is given (our lossless pipeline, verified off)."""
    import onnx

    from onnx_compress.quantize import prepare_float_model

    dst = cache / (src.stem + "_folded.onnx")
    if not dst.is_file():
        onnx.save(prepare_float_model(str(src)), str(dst))
    return dst


def main(argv=None) -> int:
    from benchmarks.models import (  # torch is imported only when exporting
        DEFAULT_CACHE_DIR,
        resnet_onnx,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--methods", nargs="+", default=["entropy", "percentile"])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4,
                        help="our calibration batch (quantize's batch_size): peak memory scales with it, not with samples")
    parser.add_argument("--cache", default=os.environ.get("ONNX_COMPRESS_BENCH_CACHE", str(DEFAULT_CACHE_DIR)))
    parser.add_argument("--json", default=None)
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--no-ort", action="store_true", help="skip ORT quantize_static")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "METHOD", "SAMPLES", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        tool, method, samples, model_path = args.worker
        worker(tool, method, int(samples), model_path, args.input_size, args.seed, args.worker_out, args.batch_size)
        return 0

    if args.prepare_out:  # in a subprocess of its own (see below)
        cache = Path(args.cache)
        src = resnet_onnx(args.model, input_size=args.input_size, cache_dir=cache)
        Path(args.prepare_out).write_text(json.dumps([str(src), str(folded_model(src, cache))]))
        return 0
    # Export and folding run in a child: Linux carries a process's RSS high-water mark into the
    # children it forks (their ru_maxrss starts at the parent's RSS), so this parent stays small.
    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp) / "paths.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--input-size",
                        str(args.input_size), "--cache", args.cache, "--prepare-out", str(paths)],
                       check=True, cwd=str(ROOT))
        src, folded = (Path(p) for p in json.loads(paths.read_text()))
    rows = []
    for n in args.samples:  # interleaved: ours (each method), ORT, for each sample count
        for method in args.methods:
            rows.append(run_config("ours", method, n, src, args.input_size, args.seed, args.batch_size))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if not args.no_ort:
            rows.append(run_config("ort", "minmax", n, folded, args.input_size, args.seed))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"{args.model} {args.input_size}px, random-normal calibration samples, one fresh process per row, "
          f"our calibration batch {args.batch_size}")
    print(f"{'tool':26s} {'samples':>7s} {'time s':>7s} {'CPU s':>7s} {'calib s':>7s} {'peak RSS GB':>11s} "
          f"{'base GB':>7s} {'int Conv':>9s} {'int Add':>8s} {'load':>5s}")
    for r in rows:
        name = f"{'onnx-compress' if r['tool'] == 'ours' else 'ORT quantize_static'} {r['method']}"
        if "error" in r:
            print(f"{name:26s} {r['samples']:7d} ERROR {r['error']}")
            continue
        k = r["kernels"]
        convs, adds = k["int_conv"] + k["float_conv"], k["int_add"] + k["float_add"]
        calib = r["stages"].get("calibrate", float("nan"))
        print(f"{name:26s} {r['samples']:7d} {r['seconds']:7.1f} {r['cpu_seconds']:7.1f} {calib:7.1f} "
              f"{r['rss_peak'] / 1e9:11.2f} {r['rss_baseline'] / 1e9:7.2f} {k['int_conv']:4d}/{convs:<4d} "
              f"{k['int_add']:3d}/{adds:<4d} {r['load_average']:5.1f}")

    failures, checks = [], []
    ours = [r for r in rows if r["tool"] == "ours" and "error" not in r]
    ort = {r["samples"]: r for r in rows if r["tool"] == "ort" and "error" not in r}
    for r in ours:
        tag = f"{r['method']}@{r['samples']}"
        checks.append((f"{tag} RSS {r['rss_peak'] / 1e9:.2f} GB <= 1.5", r["rss_peak"] <= RSS_LIMIT))
        k = r["kernels"]
        label = (f"{tag} Conv {k['int_conv']}/{k['int_conv'] + k['float_conv']} and Add "
                 f"{k['int_add']}/{k['int_add'] + k['float_add']} integer")
        checks.append((label,
                       k["float_conv"] == 0 and k["float_add"] == 0 and k["int_conv"] > 0))
        if r["samples"] in ort:
            ratio = r["seconds"] / ort[r["samples"]]["seconds"]
            cpu_ratio = r["cpu_seconds"] / ort[r["samples"]]["cpu_seconds"]
            checks.append((f"{tag} time {ratio:.2f}x ORT MinMax <= {TIME_RATIO_LIMIT} (CPU seconds {cpu_ratio:.2f}x)",
                           ratio <= TIME_RATIO_LIMIT))
    for method in args.methods:
        peaks = [r["rss_peak"] for r in ours if r["method"] == method]
        if len(peaks) > 1:
            growth = max(peaks) / min(peaks)
            checks.append((f"{method} RSS flat over samples (max/min {growth:.2f} <= 1.15)", growth <= 1.15))
    failures = [c for c, ok in checks if not ok]
    if any("error" in r for r in rows):
        failures.append("some configurations failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": [{"check": c, "ok": ok} for c, ok in checks]},
                                              indent=2))
    print(("FAIL: " + "; ".join(failures)) if failures else "PASS: " + "; ".join(c for c, _ in checks))
    return 1 if (failures and args.strict) else 0


if __name__ == "__main__":
    raise SystemExit(main())

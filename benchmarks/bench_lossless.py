"""Benchmark: the default lossless pipeline against onnxslim and ONNX Runtime's BASIC level.

What is measured, side by side in one run on the same file (interleaved: ours, onnxslim, ours,
onnxslim, ... so that machine drift hits both alike), as the median of ``--repeats`` runs after
``--warmup`` untimed runs of each:

* ``ours``: the job ``onnx-compress IN OUT --no-verify`` does, in process: load and validate,
  passes, statistics for the report table, atomic save. Verification (which runs ONNX Runtime
  twice, original and result) is timed on its own as ``verify``; ``ours + verify`` is the sum of
  the two medians, i.e. what the plain ``onnx-compress IN OUT`` costs.
* ``onnxslim``: ``onnxslim.slim(IN, OUT)`` with its defaults (load, shape inference, constant
  folding, fusions, save; its model check is off by default, like our ``--no-verify``). Its
  summary table goes to a buffer, not the terminal.
* ``ratio`` = ours / onnxslim, computed from the two medians.

Node counts after each tool, with op histograms (BatchNormalization left is printed on its own):
ours, onnxslim, and ONNX Runtime at ``ORT_ENABLE_BASIC`` (``SessionOptions.optimized_model_filepath``
saves the graph ORT would run; BASIC is ORT's set of semantics-preserving, provider-independent
rewrites: constant folding, redundant node elimination, Conv+BN/Mul/Add fusions).

``CPU s`` is the median CPU time of the process (all threads) over the same runs: on a machine
busy with other work it is steadier than wall time.

Targets (issue 2): ``ours <= 5 s`` wall and ``ours <= 2 x onnxslim``. The last line printed is a
verdict; ``--strict`` makes the exit status 1 when a target is missed.

Threads: nothing here pins threads; every tool uses its defaults. To compare on fewer cores run
the whole script under ``taskset -c 0`` (the JSON records the CPUs the process may use).

    python benchmarks/bench_lossless.py                       # ResNet-50, 5 repeats
    python benchmarks/bench_lossless.py --repeats 9 --json out.json
    python benchmarks/bench_lossless.py --onnx some_model.onnx
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks.models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_SECONDS = 5.0
TARGET_RATIO = 2.0


def _histogram(model) -> dict[str, int]:
    counts = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _summary(model) -> dict[str, Any]:
    hist = _histogram(model)
    return {
        "nodes": len(model.graph.node),
        "batchnorm_left": hist.get("BatchNormalization", 0),
        "op_histogram": hist,
    }


def _load_average() -> float | None:
    """1-minute load average (timings on a machine busy with other work are not comparable)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def run_ours(src: Path, dst: Path):
    """The work of ``onnx-compress SRC DST --no-verify``: load, passes, stats, atomic save."""
    from onnx_compress.api import compress_with_report
    from onnx_compress.ir import io as ir_io

    ir_io.check_output_path(dst, src)
    compressed, report = compress_with_report(str(src), verify=False)
    ir_io.save_model(compressed, dst, protect=(src,))
    return compressed, report


def run_verify(original, compressed):
    """Verification as ``onnx-compress`` runs it by default (options from CompressOptions)."""
    from onnx_compress.options import CompressOptions
    from onnx_compress.verify import verify_models

    opts = CompressOptions()
    return verify_models(
        original, compressed, tolerance=opts.tolerance, samples=opts.verify_samples, seed=opts.seed,
        input_shapes=dict(opts.input_shapes),
    )


def run_onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        onnxslim.slim(str(src), str(dst))


def run_ort_basic(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="resnet50", help="architecture from benchmarks/models.py (default resnet50)")
    src.add_argument("--onnx", metavar="PATH", help="benchmark this .onnx file instead of a built model")
    p.add_argument("--input-size", type=int, default=224, help="export input size (default 224)")
    p.add_argument("--width", type=int, default=64, help="stem width of the built ResNet (default 64, torchvision's)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs of the built ResNet (default 1000)")
    p.add_argument("--cache", metavar="DIR", help="where exported models are cached (default ~/.cache/onnx-compress-bench)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each tool; medians are reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import onnxslim

    import onnx_compress
    from onnx_compress.ir import io as ir_io

    if args.repeats < 1:
        raise SystemExit("bench_lossless: --repeats must be at least 1")
    if args.onnx:
        src = Path(args.onnx)
        model_name = src.name
    else:
        from benchmarks.models import resnet_onnx

        src = resnet_onnx(
            args.model, input_size=args.input_size, width=args.width, num_classes=args.num_classes,
            cache_dir=args.cache,
        )
        model_name = f"{args.model} (width {args.width}, {args.input_size}px, torch legacy export, opset 17)"

    load_before = _load_average()
    original = ir_io.load_model(src)
    with tempfile.TemporaryDirectory(prefix="bench_lossless_") as tmp:
        tmp = Path(tmp)
        ours_out, slim_out, ort_out = tmp / "ours.onnx", tmp / "onnxslim.onnx", tmp / "ort_basic.onnx"
        for _ in range(args.warmup):
            run_ours(src, ours_out)
            run_onnxslim(src, slim_out)
        ours_times, slim_times, ours_cpu, slim_cpu = [], [], [], []
        compressed = report = None
        for _ in range(args.repeats):  # interleaved, so drift hits both tools alike
            t0, c0 = time.perf_counter(), time.process_time()
            compressed, report = run_ours(src, ours_out)
            ours_times.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            run_onnxslim(src, slim_out)
            slim_times.append(time.perf_counter() - t0)
            slim_cpu.append(time.process_time() - c0)
        verify_median, verify_times, verification = _median_time(
            lambda: run_verify(original, compressed), args.repeats
        )
        ort_median, ort_times, _ = _median_time(lambda: run_ort_basic(src, ort_out), args.repeats)

        ours_model = onnx.load(str(ours_out))
        slim_model = onnx.load(str(slim_out))
        ort_model = onnx.load(str(ort_out))

    ours_median = statistics.median(ours_times)
    slim_median = statistics.median(slim_times)
    ratio = ours_median / slim_median
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    result = {
        "model": model_name,
        "model_path": str(src),
        "model_bytes": src.stat().st_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": {
            "cpus_usable": cpus,
            "load_average_before_after": [load_before, _load_average()],
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {
            "onnx_compress": onnx_compress.__version__,
            "onnxslim": onnxslim.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
        },
        "pipeline": report.pipeline,
        "seconds": {
            "ours": ours_median,
            "verify": verify_median,
            "ours_plus_verify": ours_median + verify_median,
            "onnxslim": slim_median,
            "ort_basic_session": ort_median,
            "cpu": {"ours": statistics.median(ours_cpu), "onnxslim": statistics.median(slim_cpu)},
            "ours_stages_last_run": {
                **report.seconds,
                "stats_and_save": ours_times[-1] - sum(report.seconds.values()),
            },
            "runs": {"ours": ours_times, "onnxslim": slim_times, "verify": verify_times, "ort_basic_session": ort_times},
        },
        "ratio_ours_over_onnxslim": ratio,
        "verification": {"passed": verification.passed, "summary": verification.summary()},
        "counts": {
            "original": _summary(original),
            "ours": _summary(ours_model),
            "onnxslim": _summary(slim_model),
            "ort_basic": _summary(ort_model),
        },
        "targets": {"seconds": TARGET_SECONDS, "ratio": TARGET_RATIO},
    }
    result["verdict"] = {
        "seconds_ok": ours_median <= TARGET_SECONDS,
        "ratio_ok": ratio <= TARGET_RATIO,
    }
    result["verdict"]["passed"] = all(result["verdict"].values())
    return result


def format_table(result: dict[str, Any]) -> str:
    s, c = result["seconds"], result["counts"]
    lines = [
        f"model: {result['model']}  ({result['model_bytes'] / 2**20:.1f} MiB, {c['original']['nodes']} nodes, "
        f"{c['original']['batchnorm_left']} BatchNormalization)",
        f"medians of {result['repeats']} runs after {result['warmup']} warm-up; {result['machine']['cpus_usable']} CPUs usable; "
        f"load average before/after {result['machine']['load_average_before_after']}",
        f"pipeline: {', '.join(result['pipeline'])}",
        "",
        f"{'':30} {'seconds':>9} {'nodes':>7} {'BN left':>8} {'CPU s':>7}",
        f"{'original':30} {'':>9} {c['original']['nodes']:>7} {c['original']['batchnorm_left']:>8}",
        f"{'onnx-compress (--no-verify)':30} {s['ours']:>9.3f} {c['ours']['nodes']:>7} {c['ours']['batchnorm_left']:>8} {s['cpu']['ours']:>7.3f}",
        f"{'  + verification (2 ORT runs)':30} {s['verify']:>9.3f}",
        f"{'  = onnx-compress IN OUT':30} {s['ours_plus_verify']:>9.3f}",
        f"{'onnxslim ' + result['versions']['onnxslim']:30} {s['onnxslim']:>9.3f} {c['onnxslim']['nodes']:>7} {c['onnxslim']['batchnorm_left']:>8} {s['cpu']['onnxslim']:>7.3f}",
        f"{'ORT ENABLE_BASIC (session)':30} {s['ort_basic_session']:>9.3f} {c['ort_basic']['nodes']:>7} {c['ort_basic']['batchnorm_left']:>8}",
        "",
        "op histograms after:",
    ]
    for key in ("original", "ours", "onnxslim", "ort_basic"):
        hist = ", ".join(f"{op} {n}" for op, n in c[key]["op_histogram"].items())
        lines.append(f"  {key:10} {hist}")
    lines.append(f"ours stages (last run): " + ", ".join(f"{k} {v:.3f}s" for k, v in s["ours_stages_last_run"].items()))
    lines.append(f"verification: {result['verification']['summary']}")
    v = result["verdict"]
    lines.append(
        f"{'PASS' if v['passed'] else 'FAIL'}: ours {s['ours']:.2f} s <= {result['targets']['seconds']:g} s: "
        f"{'yes' if v['seconds_ok'] else 'NO'}; ours/onnxslim {result['ratio_ours_over_onnxslim']:.2f}x "
        f"<= {result['targets']['ratio']:g}x: {'yes' if v['ratio_ok'] else 'NO'}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = benchmark(args)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.strict and not result["verdict"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""INT8 runtime benchmark (issue 5): the Numba back end against ONNX Runtime, side by side.

Models
    * ResNet-18 (``benchmarks.models``: torchvision's structure, seeded random weights) and
      MobileNetV2 with its real ImageNet weights (``tests.real_models``), both exported with BN
      unfused.
    * Each is quantized once with ORT's ``quant_pre_process`` (BatchNorm folded) then
      ``quantize_static`` (QDQ, per-channel s8 weights, ``reduce_range``, u8 activations),
      calibrated on 8 real photos. The QDQ file is cached beside the float export.

Contestants (``--threads``, default 2), each **in a process of its own** (``benchmarks/isolated.py``:
two engines in one process slow each other down, because ORT's worker threads spin after a run
and so do Numba's OpenMP threads; measured there), ``--rounds`` rounds alternating the three:
    * ``numba``      : ``onnx_compress.runtime.Session(qdq, backend="numba", threads=T)``
    * ``ort_int8``   : ORT on the same QDQ model, ``ORT_ENABLE_ALL`` (fully fused QLinearConv, u8
      activations), ``intra_op_num_threads=T``
    * ``ort_fp32``   : ORT on the float export, ``ORT_ENABLE_ALL``, ``intra_op_num_threads=T``

Figures: for batch 1 and 8, each contestant's best per-process median over ``--rounds`` processes
of ``--repeats`` timed runs (each process first makes ``--warmup`` untimed runs; why the best one:
``isolated.py``); the ratios numba / ort_int8 (target <= 1.3) and numba / ort_fp32 (target <= 0.7),
and in brackets the same ratios from the medians of all runs pooled. Next to the wall times, the median process CPU time of one run
(``time.process_time``: all threads of that process), which a loaded machine distorts far less.
``--isolation interleaved`` is the older method (the three in this process, runs interleaved).

Cold start: ``load + first batch-1 run`` of the numba back end in a fresh subprocess, once with an
empty ``NUMBA_CACHE_DIR`` (everything JIT-compiled) and once more with that now-filled cache
(compiled code loaded from disk); ORT's load + first run of the QDQ model for comparison.

Threads: Numba's ``parallel=True`` kernels run on its OpenMP layer (GNU libgomp here), whose
threads by default *spin* for a while between parallel regions, as ORT's do. Each engine keeps its
default here (``--omp-wait-policy inherit``). On a shared, oversubscribed machine (load average 10
on 2 cores) spinning threads take the cores from the ones with work: measured there, MobileNetV2
batch 1 at 2 threads took 580-720 ms (285 ms of CPU) with the default policy and 38-42 ms with
``OMP_WAIT_POLICY=PASSIVE`` (sleep at once); ``--omp-wait-policy passive`` sets that for the Numba
processes. ORT does not use OpenMP, so the setting does not touch the ORT contestants.

Usage: ``python benchmarks/bench_runtime.py [--models resnet18 mobilenet_v2] [--batches 1 8]
[--repeats 20] [--rounds 3] [--warmup 3] [--threads 2] [--omp-wait-policy inherit|passive|active]
[--json out.json]``. Prints a table; the machine's load average is recorded before and after,
because on a shared machine absolute milliseconds mean little -- quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import DEFAULT_CACHE_DIR, resnet_onnx  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")


def float_model(name: str, cache: Path) -> Path:
    if name == "resnet18":
        return resnet_onnx("resnet18", cache_dir=cache)
    from tests import real_models as RM

    return RM.mobilenet_v2_onnx(cache)


def qdq_model(name: str, cache: Path) -> Path:
    """ORT quantize_static QDQ model of ``name`` (cached)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from tests import real_models as RM

    dst = cache / f"{name}_qdq_u8s8_rr_pc.onnx"
    if dst.is_file():
        return dst
    src = float_model(name, cache)
    calib = np.asarray(RM.imagenet_batch(flips=False))[:8]
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

            def get_next(self):
                return next(self.it, None)

        out = Path(tmp) / "q.onnx"
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(out, dst)
    return dst


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ratios(med: dict, med_cpu: dict) -> dict:
    return {
        "numba_over_ort_int8_cpu": med_cpu["numba"] / med_cpu["ort_int8"],
        "numba_over_ort_int8": med["numba"] / med["ort_int8"],
        "numba_over_ort_fp32": med["numba"] / med["ort_fp32"],
        "ort_int8_over_ort_fp32": med["ort_int8"] / med["ort_fp32"],
    }


def bench_model_isolated(name: str, cache: Path, batches, repeats: int, warmup: int, threads: int,
                         rounds: int) -> dict:
    """The three contestants, each in processes of its own, alternated ``rounds`` times."""
    from benchmarks.isolated import side_by_side

    qdq, fp32 = qdq_model(name, cache), float_model(name, cache)
    contestants = {"numba": {"path": qdq, "backend": "numba", "threads": threads},
                   "ort_int8": {"path": qdq, "backend": "onnxruntime", "threads": threads},
                   "ort_fp32": {"path": fp32, "backend": "onnxruntime", "threads": threads}}
    result = {}
    for batch in batches:
        got = side_by_side(contestants, batch=batch, warmup=warmup, repeats=repeats, rounds=rounds)
        med = {k: v["best_median_s"] * 1e3 for k, v in got.items()}
        pooled = {k: v["median_s"] * 1e3 for k, v in got.items()}
        med_cpu = {k: v["median_cpu_s"] * 1e3 for k, v in got.items()}
        result[f"batch{batch}"] = {"median_ms": med, "pooled_median_ms": pooled,
                                   "process_medians_ms": {k: [m * 1e3 for m in v["process_medians_s"]]
                                                          for k, v in got.items()},
                                   "p90_ms": {k: v["p90_s"] * 1e3 for k, v in got.items()},
                                   "median_cpu_ms": med_cpu, **_ratios(med, med_cpu),
                                   "pooled_numba_over_ort_int8": pooled["numba"] / pooled["ort_int8"],
                                   "pooled_numba_over_ort_fp32": pooled["numba"] / pooled["ort_fp32"]}
    return result


def bench_model(name: str, cache: Path, batches, repeats: int, warmup: int, threads: int) -> dict:
    """The older method: the three contestants in this process, runs interleaved."""
    from onnx_compress.runtime import Session

    qdq, fp32 = qdq_model(name, cache), float_model(name, cache)
    contestants = {
        "numba": Session(str(qdq), backend="numba", threads=threads),
        "ort_int8": ort_session(qdq, threads),
        "ort_fp32": ort_session(fp32, threads),
    }
    result = {}
    rng = np.random.default_rng(0)
    for batch in batches:
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for sess in contestants.values():
            for _ in range(warmup):
                sess.run(None, {"input": x})
        times = {k: [] for k in contestants}
        cpu = {k: [] for k in contestants}
        for _ in range(repeats):  # interleaved
            for key, sess in contestants.items():
                c0, t0 = time.process_time(), time.perf_counter()
                sess.run(None, {"input": x})
                times[key].append((time.perf_counter() - t0) * 1e3)
                cpu[key].append((time.process_time() - c0) * 1e3)
        med = {k: float(np.median(v)) for k, v in times.items()}
        med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
        result[f"batch{batch}"] = {
            "median_ms": med,
            "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
            "median_cpu_ms": med_cpu,
            **_ratios(med, med_cpu),
        }
    return result


_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from onnx_compress.runtime import Session
t1 = time.perf_counter()
sess = Session(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]))
t2 = time.perf_counter()
sess.run(None, {"input": np.zeros((1, 3, 224, 224), np.float32)})
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_run_s": t3 - t2, "total_s": t3 - t0}))
"""


def cold_start(qdq: Path, threads: int) -> dict:
    """Subprocess timings: numba with an empty then a filled disk cache, and ORT."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(max(threads, 1)))
        for label, backend in (("numba_empty_cache", "numba"), ("numba_disk_cache", "numba"), ("onnxruntime", "onnxruntime")):
            proc = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, str(qdq), backend, str(threads)], cwd=root,
                                  env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                out[label] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternated processes per contestant")
    parser.add_argument("--isolation", choices=["process", "interleaved"], default="process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start subprocesses")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="inherit",
                        help="OMP_WAIT_POLICY for Numba's OpenMP threads (set before they start; 'inherit' leaves "
                             "the environment alone). See the module docstring.")
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    args.cache.mkdir(parents=True, exist_ok=True)
    wait = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    report = {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "omp_wait_policy": wait,
              "isolation": args.isolation, "rounds": args.rounds,
              "load_average_before": os.getloadavg()[0], "models": {}}
    print(f"threads={args.threads} repeats={args.repeats} warmup={args.warmup} OMP_WAIT_POLICY={wait} "
          f"isolation={args.isolation} rounds={args.rounds} "
          f"load_avg={os.getloadavg()[0]:.1f}")
    print(f"{'model':14s}{'batch':>6s}{'numba ms':>11s}{'ort_int8 ms':>13s}{'ort_fp32 ms':>13s}"
          f"{'nb/int8':>9s}{'nb/fp32':>9s}{'int8/fp32':>10s}   cpu ms numba/int8/fp32 (nb/int8)")
    for name in args.models:
        if args.isolation == "process":
            res = bench_model_isolated(name, args.cache, args.batches, args.repeats, args.warmup, args.threads,
                                       args.rounds)
        else:
            res = bench_model(name, args.cache, args.batches, args.repeats, args.warmup, args.threads)
        for key, r in res.items():
            m, c = r["median_ms"], r["median_cpu_ms"]
            pooled = (f" (pooled {r['pooled_numba_over_ort_int8']:.2f} / {r['pooled_numba_over_ort_fp32']:.2f})"
                      if "pooled_numba_over_ort_int8" in r else "")
            print(f"{name:14s}{key[5:]:>6s}{m['numba']:11.1f}{m['ort_int8']:13.1f}{m['ort_fp32']:13.1f}"
                  f"{r['numba_over_ort_int8']:9.2f}{r['numba_over_ort_fp32']:9.2f}{r['ort_int8_over_ort_fp32']:10.2f}"
                  f"   {c['numba']:.1f}/{c['ort_int8']:.1f}/{c['ort_fp32']:.1f} ({r['numba_over_ort_int8_cpu']:.2f})"
                  f"{pooled}", flush=True)
        if not args.no_cold:
            res["cold_start"] = cold_start(qdq_model(name, args.cache), args.threads)
            for label, c in res["cold_start"].items():
                text = c.get("error") or (f"import {c['import_s']:.2f} s + load {c['load_s']:.2f} s + "
                                          f"first run {c['first_run_s']:.2f} s = {c['total_s']:.2f} s")
                print(f"  cold start {name} {label:18s}: {text}", flush=True)
        report["models"][name] = res
    report["load_average_after"] = os.getloadavg()[0]
    print(f"targets: numba/ort_int8 <= 1.3, numba/ort_fp32 <= 0.7; load_avg after={report['load_average_after']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

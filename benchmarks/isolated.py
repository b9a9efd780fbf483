"""Latency of a model measured in a process of its own, contestants alternated round by round.

Why a process each. Two inference engines (or two ONNX Runtime sessions) in one process disturb
each other: ONNX Runtime's intra-op worker threads *spin* after a run while they wait for the next
one (``session.intra_op.allow_spinning``, on by default), and Numba's OpenMP threads do the same
unless ``OMP_WAIT_POLICY=PASSIVE``. Run A then B in one process and B shares the two cores with A's
spinning worker. Measured on this 2-core machine (2 threads; the same script run with
``--isolation interleaved`` and then with the default ``--isolation process``, 2026-11-28 01:25):

===============================================  ==================  ======================
contestant                                       interleaved, one    one process each
                                                 process (median)    (best process median)
===============================================  ==================  ======================
ResNet-50 pruned to half the MACs, b1            49.5 ms             32.2 ms
ResNet-50 unpruned, b1                           76.6 ms             47.0 ms
MobileNetV2 INT8 QDQ in ORT, b1                  14.1 ms             4.1 ms
MobileNetV2 INT8 QDQ, Numba back end, b1         17.8 ms             4.9 ms
===============================================  ==================  ======================

(``python benchmarks/bench_prune.py --models resnet50 --ratios 0.3 --batches 1 --repeats 10
--rounds 3 --isolation interleaved|process`` and ``python benchmarks/bench_runtime.py --models
mobilenet_v2 --batches 1 --repeats 20 --rounds 3 --no-cold --isolation interleaved|process``.)

So every contestant here runs the way it is deployed: alone in its process, with its engine's own
default thread policy. Load drift on a shared machine is handled by alternation instead of
interleaving: ``side_by_side`` runs ``rounds`` rounds, and in each round every contestant gets a
fresh process (``warmup`` untimed runs, then ``repeats`` timed ones). Per contestant it returns the
median (and p90) over all its timed runs, the median process CPU time of one run (all threads of
that process), and ``best_median_s``: the smallest of its per-process medians.

Why the last one. On this VM a whole process runs fast or slow: the per-process medians of one
contestant in one run differ by up to 1.9x (``process_medians_s`` in the result; e.g. ORT FP32
ResNet-18 batch 1, 17.1 to 32.7 ms in the bench_runtime run quoted in benchmarks/README.md).
Interference only ever adds time, so the best per-process median is
the steadiest estimate of a contestant's own speed; the benchmarks' verdicts use its ratios and
print the pooled medians beside them.

A contestant is a dict: ``{"path": model file, "backend": "onnxruntime" | "numba", "threads": T}``
plus, optionally, ``"optimization": "all" | "disable"`` (ORT graph optimisations, default all).
Inputs: seeded standard-normal float32 of the model's input shapes, the batch axis set to
``batch`` and other symbolic dimensions to 224.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import numpy as np
if spec["backend"] == "numba":
    from onnx_compress.runtime import Session
    sess = Session(spec["path"], backend="numba", threads=spec["threads"])
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if spec.get("optimization") == "disable"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.intra_op_num_threads = spec["threads"]
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(spec["path"], opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {}
for inp in sess.get_inputs():
    shape = [spec["batch"] if i == 0 else (d if isinstance(d, int) else 224) for i, d in enumerate(inp.shape)]
    feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
for _ in range(spec["warmup"]):
    sess.run(None, feeds)
wall, cpu = [], []
for _ in range(spec["repeats"]):
    c0, t0 = time.process_time(), time.perf_counter()
    sess.run(None, feeds)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps({"wall": wall, "cpu": cpu}))
"""


def measure(contestant: dict, *, batch: int, warmup: int, repeats: int, env: dict | None = None) -> dict:
    """Time one contestant in a fresh Python process: ``{"wall": [s, ...], "cpu": [s, ...]}``."""
    spec = {"optimization": "all", **contestant, "path": str(contestant["path"]), "batch": batch, "warmup": warmup,
            "repeats": repeats}
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), child_env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=child_env)
    if done.returncode != 0:
        raise RuntimeError(f"timing {contestant['path']} ({contestant['backend']}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(contestants: dict[str, dict], *, batch: int, warmup: int = 3, repeats: int = 20, rounds: int = 3,
                 env: dict | None = None) -> dict[str, dict]:
    """Alternate ``rounds`` rounds of one fresh process per contestant; per contestant the median
    and p90 wall seconds and the median CPU seconds over all its timed runs."""
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be >= 1, got {rounds}, {repeats}")
    runs = {key: {"wall": [], "cpu": [], "process_medians": []} for key in contestants}
    for _ in range(rounds):
        for key, contestant in contestants.items():
            got = measure(contestant, batch=batch, warmup=warmup, repeats=repeats, env=env)
            runs[key]["wall"] += got["wall"]
            runs[key]["cpu"] += got["cpu"]
            runs[key]["process_medians"].append(float(np.median(got["wall"])))
    return {key: {"median_s": float(np.median(r["wall"])), "p90_s": float(np.percentile(r["wall"], 90)),
                  "median_cpu_s": float(np.median(r["cpu"])), "runs": len(r["wall"]),
                  "best_median_s": min(r["process_medians"]), "process_medians_s": r["process_medians"]}
            for key, r in runs.items()}

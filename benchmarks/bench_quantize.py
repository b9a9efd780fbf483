"""INT8 post-training quantization of MobileNetV2 (real ImageNet weights): onnx-compress vs ORT.

Calibration: 4 views (centre crop, mirrored centre crop, two corner crops) of 8 real photos (the
even-numbered ones of ``tests.real_models.photo_paths()``), 32 samples. Evaluation: 6 views of
each of the 12 other photos (72 samples), top-1 agreement with FP32, every model run by ONNX
Runtime's CPU provider with ``ORT_ENABLE_ALL`` (the fused integer kernels users get). Printed side
by side: agreement, the integer/float kernel counts of ORT's optimised graph, and wall time of the
quantization call. ORT's ``quantize_static`` runs with its defaults (QDQ, per-tensor) and with
``per_channel=True``, on the same 32 samples.

    python benchmarks/bench_quantize.py [--cache DIR] [--json OUT] [--min-agreement 0.99]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALIB_PHOTOS = tuple(range(0, 16, 2))
CALIB_VIEWS = 4
EVAL_VIEWS = 6


def data():
    from tests import real_models as rm

    eval_photos = tuple(i for i in range(len(rm.photo_paths())) if i not in CALIB_PHOTOS)
    return rm.imagenet_views(CALIB_PHOTOS, CALIB_VIEWS), rm.imagenet_views(eval_photos, EVAL_VIEWS)


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from onnx_compress.passes.quant_report import optimized_session

    session = optimized_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)])


def ort_quantize_static(src: Path, calib: np.ndarray, *, per_channel: bool) -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self._it, None)

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "ort_int8.onnx"
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel)
        return onnx.load(str(dst))


def main(argv=None) -> int:
    from onnx_compress.passes.quant_report import ort_kernel_report
    from onnx_compress.quantize import quantize
    from tests import real_models as rm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "onnx_compress_bench_quantize"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--min-agreement", type=float, default=None)
    args = parser.parse_args(argv)

    src = rm.mobilenet_v2_onnx(args.cache)
    model = onnx.load(str(src))
    calib, evaluation = data()
    reference = outputs(model, evaluation).argmax(1)
    rows = []

    def record(name, build):
        t0 = time.perf_counter()
        quantized = build()
        seconds = time.perf_counter() - t0
        kernels = ort_kernel_report(quantized)
        agree = float((outputs(quantized, evaluation).argmax(1) == reference).mean())
        rows.append({"name": name, "agreement": agree, "integer_ops": kernels.integer_total,
                     "float_ops": kernels.float_total, "seconds": seconds, "kernels": kernels.summary()})

    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    record("onnx-compress", lambda: quantize(model, feeds, progress=False, report_kernels=False,
                                             min_agreement=args.min_agreement)[0])
    record("ORT quantize_static (defaults)", lambda: ort_quantize_static(src, calib, per_channel=False))
    record("ORT quantize_static (per_channel)", lambda: ort_quantize_static(src, calib, per_channel=True))

    print(f"MobileNetV2, {len(calib)} calibration samples, {len(evaluation)} evaluation samples (other photos)")
    print(f"{'quantizer':36s} {'top-1 agree':>11s} {'int ops':>8s} {'float ops':>9s} {'time s':>7s}")
    for r in rows:
        print(f"{r['name']:36s} {100 * r['agreement']:10.1f}% {r['integer_ops']:8d} {r['float_ops']:9d} {r['seconds']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

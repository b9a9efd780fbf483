"""Benchmark: accuracy of structured pruning without fine-tuning (issue 3), side by side.

Two measurements, each against the unpruned model in the same run:

* **MobileNetV2** (torchvision's ImageNet weights, ``tests/real_models.py``) with 20 % of the
  channels of every prunable group removed (``prune(model, 0.2)``, uniform, ``round_to=8``), for
  three ways of choosing/compensating:

  - ``l1``: group-summed weight magnitude;
  - ``activation``: mean ``|x|`` of what the next layer reads, measured on the calibration views;
  - ``l1+reconstruct``: l1 choice, then the consumers of removed channels refitted by ridge least
    squares on the calibration views (``reconstruct=True``), shrunk toward the plain pruned weights;
  - ``l1+reconstruct1``: the same with round 1 only (``reconstruct_rounds=1``): each layer fitted
    on the original model's activations, without the joint second round on the pruned model's.

  The real photos (:func:`tests.real_models.photo_paths`, 20 bundled with scikit-image and
  scikit-learn) are split by a seeded permutation into *evaluation* photos and *calibration*
  photos, disjoint by construction; each photo gives ``--views`` views
  (:data:`tests.real_models.IMAGENET_VIEWS`: centre, mirrored, corner and rescaled crops). No
  ImageNet labels exist offline, so the metric is **top-1 agreement** with the unpruned model
  (percent of evaluation views whose argmax is unchanged), plus top-5 agreement (the unpruned
  top-1 is among the pruned top-5) and the mean cosine between pruned and unpruned logits (a
  continuous measure that still separates the methods when both agreements are near zero:
  MobileNetV2 is fragile, measured here at 20 % without fine-tuning every method loses almost
  all top-1 agreement).

* **Digits CNN** trained here on scikit-learn's digits (real labels; the same network and seed as
  ``tests/test_pruning_reconstruct.py``), 30 % of channels removed: test accuracy of the
  original, of plain ``l1`` pruning and of ``l1`` + reconstruction (256 training images as
  calibration data). Target (issue 3): reconstruct within 1 point of the original and above l1.

MACs are counted by :func:`onnx_compress.ir.stats.count_macs` (after / before). Pruning time is
given as CPU time of this process next to wall time (the machine is shared). The last line is a
verdict; ``--strict`` makes a missed target exit with status 1.

    python benchmarks/bench_prune_accuracy.py                    # both parts, default sizes
    python benchmarks/bench_prune_accuracy.py --models digits --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = (("l1", {"importance": "l1"}), ("activation", {"importance": "activation"}),
           ("l1+reconstruct", {"importance": "l1", "reconstruct": True}),
           ("l1+reconstruct1", {"importance": "l1", "reconstruct": True, "reconstruct_rounds": 1}))


def _session(model: onnx.ModelProto, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _logits(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> np.ndarray:
    session = _session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between two logit vectors (1.0 = same direction)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))


def _timed_prune(model, ratio, **kw):
    from onnx_compress.prune import prune

    cpu, wall = time.process_time(), time.perf_counter()
    pruned, report = prune(model, ratio, **kw)
    return pruned, report, time.process_time() - cpu, time.perf_counter() - wall


# --------------------------------------------------------------------------- MobileNetV2


def split_photos(eval_photos: int, calib_photos: int, seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(evaluation, calibration) photo indices: a seeded permutation cut in two (disjoint)."""
    from tests.real_models import photo_paths

    n = len(photo_paths())
    if eval_photos + calib_photos > n:
        raise ValueError(f"only {n} photos: cannot take {eval_photos} for evaluation and {calib_photos} to calibrate")
    order = np.random.default_rng(seed).permutation(n)
    return tuple(sorted(int(i) for i in order[:eval_photos])), tuple(sorted(int(i) for i in order[eval_photos:eval_photos + calib_photos]))


def bench_mobilenet(args) -> dict:
    from tests.real_models import imagenet_views, mobilenet_v2_onnx, photo_paths

    model = onnx.load(mobilenet_v2_onnx(args.cache))
    eval_idx, calib_idx = split_photos(args.eval_photos, args.calib_photos, args.seed)
    assert not set(eval_idx) & set(calib_idx)
    x_eval = np.array(imagenet_views(eval_idx, args.views))
    x_calib = np.array(imagenet_views(calib_idx, args.views))
    reference = _logits(model, x_eval)
    top1 = reference.argmax(1)
    rows = []
    for label, kw in METHODS:
        calib = {"input": x_calib} if (kw.get("importance") == "activation" or kw.get("reconstruct")) else None
        pruned, report, cpu, wall = _timed_prune(model, args.mobilenet_ratio, calib=calib, **kw)
        out = _logits(pruned, x_eval)
        top5 = np.argsort(-out, axis=1)[:, :5]
        rows.append({
            "method": label,
            "top1_agreement": float((out.argmax(1) == top1).mean() * 100),
            "top5_agreement": float((top5 == top1[:, None]).any(1).mean() * 100),
            "logit_cosine": _mean_cosine(reference, out),
            "evaluated": int(len(x_eval)),
            "macs_ratio": report.macs_after / report.macs_before,
            "params_ratio": report.params_after / report.params_before,
            "reconstructed_layers": len(report.reconstructed),
            "prune_cpu_s": cpu,
            "prune_wall_s": wall,
        })
    names = [p.name for p in photo_paths()]
    return {
        "ratio": args.mobilenet_ratio,
        "views_per_photo": args.views,
        "eval_photos": [names[i] for i in eval_idx],
        "calib_photos": [names[i] for i in calib_idx],
        "calib_samples": int(len(x_calib)),
        "rows": rows,
    }


# --------------------------------------------------------------------------- digits


def bench_digits(args) -> dict:
    from tests.digits import digits_split, pruning_digits_net, train_and_export

    x_train, y_train, x_test, y_test = digits_split(1300)
    model = train_and_export(pruning_digits_net, x_train, y_train, epochs=args.digits_epochs, lr=1e-2, output_name="y",
                             seeded_shuffle=True)

    def accuracy(m):
        return float((_logits(m, x_test, batch=512).argmax(1) == y_test).mean() * 100)

    plain, report, cpu_l1, wall_l1 = _timed_prune(model, args.digits_ratio)
    fitted, report_fit, cpu_fit, wall_fit = _timed_prune(model, args.digits_ratio, reconstruct=True,
                                                         calib={"x": x_train[:256]})
    return {
        "ratio": args.digits_ratio,
        "epochs": args.digits_epochs,
        "test_samples": int(len(x_test)),
        "calib_samples": report_fit.calib_samples,
        "accuracy": {"original": accuracy(model), "l1": accuracy(plain), "reconstruct": accuracy(fitted)},
        "macs_ratio": report.macs_after / report.macs_before,
        "reconstructed_layers": list(report_fit.reconstructed),
        "prune_cpu_s": {"l1": cpu_l1, "reconstruct": cpu_fit},
        "prune_wall_s": {"l1": wall_l1, "reconstruct": wall_fit},
    }


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2", "digits"], choices=["mobilenetv2", "digits"])
    parser.add_argument("--mobilenet-ratio", type=float, default=0.2)
    parser.add_argument("--digits-ratio", type=float, default=0.3)
    parser.add_argument("--eval-photos", type=int, default=12)
    parser.add_argument("--calib-photos", type=int, default=8)
    parser.add_argument("--views", type=int, default=6, help="views per photo (1..6)")
    parser.add_argument("--digits-epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="photo split")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("ONNX_COMPRESS_BENCH_CACHE", Path.home() / ".cache" / "onnx-compress-bench")))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)

    result: dict = {"command": "python benchmarks/bench_prune_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    failures: list[str] = []
    summary: list[str] = []
    print(f"load average before: {os.getloadavg()[0]:.2f} (CPUs usable: {len(os.sched_getaffinity(0))})")
    if "mobilenetv2" in args.models:
        args.cache.mkdir(parents=True, exist_ok=True)
        mb = result["mobilenetv2"] = bench_mobilenet(args)
        print(f"\nMobileNetV2, {mb['ratio']:.0%} of channels removed; agreement with the unpruned model on "
              f"{mb['rows'][0]['evaluated']} views of {len(mb['eval_photos'])} photos; calibration: "
              f"{mb['calib_samples']} views of {len(mb['calib_photos'])} other photos")
        print(f"{'method':<15} {'top-1 agr %':>11} {'top-5 agr %':>11} {'cosine':>6} {'MACs':>6} {'params':>6} {'CPU s':>6} {'wall s':>6}")
        for r in mb["rows"]:
            print(f"{r['method']:<15} {r['top1_agreement']:11.1f} {r['top5_agreement']:11.1f} {r['logit_cosine']:6.3f} {r['macs_ratio']:6.3f} "
                  f"{r['params_ratio']:6.3f} {r['prune_cpu_s']:6.1f} {r['prune_wall_s']:6.1f}")
        summary.append("MobileNetV2 20 % top-1 agreement " + ", ".join(
            f"{r['method']} {r['top1_agreement']:.1f} % (cosine {r['logit_cosine']:.3f})" for r in mb["rows"]))
    if "digits" in args.models:
        dg = result["digits"] = bench_digits(args)
        acc = dg["accuracy"]
        print(f"\ndigits CNN ({dg['epochs']} epochs), {dg['ratio']:.0%} of channels removed (MACs {dg['macs_ratio']:.3f}); "
              f"test accuracy on {dg['test_samples']} held-out digits, {dg['calib_samples']} calibration images")
        print(f"{'model':<15} {'accuracy %':>10}")
        for key in ("original", "l1", "reconstruct"):
            print(f"{key:<15} {acc[key]:10.2f}")
        if acc["reconstruct"] < acc["original"] - 1.0:
            failures.append(f"digits: reconstruct {acc['reconstruct']:.2f} % is more than 1 point below the original "
                            f"{acc['original']:.2f} %")
        if acc["reconstruct"] <= acc["l1"]:
            failures.append(f"digits: reconstruct {acc['reconstruct']:.2f} % does not beat l1 {acc['l1']:.2f} %")
        summary.append(f"digits 30 %: original {acc['original']:.2f} %, l1 {acc['l1']:.2f} %, "
                       f"reconstruct {acc['reconstruct']:.2f} %")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    result["verdict"] = {"passed": not failures, "failures": failures, "summary": summary}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    print(("PASS: " if not failures else "FAIL: " + "; ".join(failures) + " | ") + "; ".join(summary))
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())

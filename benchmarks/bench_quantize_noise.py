"""How much of MobileNetV2's INT8 top-1 agreement is measurement noise, and how far is 95 %?

Issue 4 asks for 95 % top-1 agreement with FP32 on 72 evaluation views (``bench_quantize.py``'s
split). This script measures three things (a fourth on request) on that split, every model run by ONNX Runtime with
``ORT_ENABLE_ALL`` (the fused integer kernels):

1. **FP32 near-ties**: the gap between the FP32 model's top-1 and top-2 logits per view. A view
   whose gap is smaller than the INT8 model's logit error flips on the rounding of a few values.
2. **The rounding lottery**: the default ``quantize`` pipeline's QDQ model, with the input
   QuantizeLinear's scale multiplied by ``1 + k * 1e-6`` for ``k = 0 .. --draws - 1``. That moves
   no range in any meaningful way, only which input values round up or down; the spread of the
   agreement over these draws is the resolution of the 72-view metric for this model.
3. **The error needed**: the INT8 logits' error scaled by a factor ``f`` (same direction,
   ``ref + f * (int8 - ref)``): the agreement and logits SQNR at each ``f`` show what logit
   accuracy 95 % takes.

4. With ``--per-tensor``, **where the activation noise comes from**: each activation
   QuantizeLinear -> DequantizeLinear pair of the QDQ model kept alone (every other activation
   pair bypassed, weights still quantized), run with ``ORT_DISABLE_ALL`` (float emulation of the
   same arithmetic); its logits minus those of the model with every activation pair bypassed is
   that tensor's noise. Printed: the weights-only and all-activations SQNR, the SQNR of the sum
   of the per-tensor noise powers (close to the joint figure when the noises are independent),
   and the tensors with the largest share. About four minutes on 2 cores.

``--no-equalize`` runs the default pipeline without activation range equalization (the rows
before it in the quantize.py table).

    python benchmarks/bench_quantize_noise.py [--draws 16] [--per-tensor] [--no-equalize] [--cache DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_quantize import data, outputs  # noqa: E402

ERROR_FACTORS = (1.0, 0.85, 0.7, 0.6, 0.5, 0.4)


def sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((out - ref).astype(np.float64) ** 2).sum()))


def input_scale_name(model: onnx.ModelProto, input_name: str) -> str:
    """The scale initializer of the QuantizeLinear that reads the graph input."""
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == input_name:
            return node.input[1]
    raise ValueError(f"no QuantizeLinear reads '{input_name}'")


def with_scaled_initializer(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            value = numpy_helper.to_array(init).astype(np.float32) * np.float32(factor)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return out
    raise ValueError(f"no initializer '{name}'")


def activation_pairs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The QuantizeLinear nodes of activations (their input is not an initializer)."""
    constants = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


def keep_activation_pairs(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """A copy in which every activation Q -> DQ pair whose Q is not named in ``keep`` is bypassed:
    the DQ's readers read the Q's float input instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    source = {n.output[0]: n.input[0] for n in activation_pairs(out) if n.name not in keep}
    bypass = {n.output[0]: source[n.input[0]] for n in out.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in source}
    if any(o.name in bypass for o in out.graph.output):
        raise ValueError("a graph output is the DequantizeLinear of an activation; cannot bypass it")
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
    return out


def emulated_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 24]})[0] for i in range(0, len(x), 24)])


def per_tensor_noise(float_model: onnx.ModelProto, quantized: onnx.ModelProto, x: np.ndarray, top: int = 12) -> dict:
    """Section 4 of the module docstring."""
    pairs = activation_pairs(quantized)
    ref = emulated_outputs(float_model, x)
    weights_only = emulated_outputs(keep_activation_pairs(quantized, set()), x)
    full = emulated_outputs(keep_activation_pairs(quantized, {n.name for n in pairs}), x)
    power = float((weights_only.astype(np.float64) ** 2).sum())
    noise = []
    for node in pairs:
        out = emulated_outputs(keep_activation_pairs(quantized, {node.name}), x)
        noise.append((float(((out - weights_only).astype(np.float64) ** 2).sum()), node.input[0]))
    noise.sort(reverse=True)
    total = sum(n for n, _ in noise)
    result = {"tensors": len(pairs), "weights_only_sqnr_db": sqnr_db(weights_only, ref),
              "activations_sqnr_db": sqnr_db(full, weights_only), "all_sqnr_db": sqnr_db(full, ref),
              "sum_of_tensors_sqnr_db": float(10 * np.log10(power / total)),
              "largest": [{"tensor": name, "sqnr_db": float(10 * np.log10(power / n)), "share": n / total}
                          for n, name in noise[:top]]}
    print(f"\nper-tensor activation noise (emulated in float, {len(pairs)} activation tensors): weights only "
          f"{result['weights_only_sqnr_db']:.2f} dB vs FP32; all activations {result['activations_sqnr_db']:.2f} dB vs "
          f"weights only (sum of single-tensor noises {result['sum_of_tensors_sqnr_db']:.2f} dB); both "
          f"{result['all_sqnr_db']:.2f} dB vs FP32")
    for row in result["largest"]:
        print(f"  {row['sqnr_db']:6.2f} dB  {100 * row['share']:5.1f} %  {row['tensor']}")
    return result


def main(argv=None) -> int:
    from onnx_compress.quantize import quantize
    from tests import real_models as rm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "onnx_compress_bench_quantize"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--per-tensor", action="store_true", help="also attribute the activation noise to tensors")
    parser.add_argument("--no-equalize", action="store_true", help="default pipeline without activation equalization")
    args = parser.parse_args(argv)

    model = onnx.load(str(rm.mobilenet_v2_onnx(args.cache)))
    calib, evaluation = data()
    ref = outputs(model, evaluation)
    top1 = ref.argmax(1)
    ordered = np.sort(ref, axis=1)
    gap = ordered[:, -1] - ordered[:, -2]
    result = {"views": int(len(ref)), "gap_quantiles": dict(zip(("min", "p10", "p25", "median"),
                                                                  np.percentile(gap, [0, 10, 25, 50]).round(3).tolist())),
              "views_with_gap_below": {str(t): int((gap < t).sum()) for t in (0.1, 0.25, 0.5, 1.0)}}
    print(f"MobileNetV2, {len(ref)} evaluation views; FP32 top-1 minus top-2 logit gap: "
          + ", ".join(f"{(gap < t).sum()} views < {t}" for t in (0.1, 0.25, 0.5, 1.0))
          + f" (median {np.median(gap):.2f})")

    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    quantized, _ = quantize(model, feeds, progress=False, report_kernels=False, equalize=not args.no_equalize)
    int8 = outputs(quantized, evaluation)
    wrong = int8.argmax(1) != top1
    result["default"] = {"agreeing_views": int((~wrong).sum()), "sqnr_db": sqnr_db(int8, ref),
                         "gaps_of_disagreeing_views": gap[wrong].round(3).tolist()}
    print(f"default pipeline: {(~wrong).sum()}/{len(ref)} views agree, logits SQNR {sqnr_db(int8, ref):.2f} dB; "
          f"FP32 gaps of the disagreeing views: {', '.join(f'{g:.2f}' for g in sorted(gap[wrong]))}")

    scale = input_scale_name(quantized, model.graph.input[0].name)
    draws = []
    for k in range(args.draws):
        out = outputs(with_scaled_initializer(quantized, scale, 1 + k * 1e-6), evaluation)
        draws.append((int((out.argmax(1) == top1).sum()), sqnr_db(out, ref)))
    agree = np.array([d[0] for d in draws])
    sq = np.array([d[1] for d in draws])
    result["lottery"] = {"agreeing_views": agree.tolist(), "sqnr_db": sq.round(3).tolist()}
    print(f"rounding lottery, input scale x (1 + k*1e-6), k < {args.draws}: agreeing views mean {agree.mean():.2f}, "
          f"sd {agree.std():.2f}, min {agree.min()}, max {agree.max()}; logits SQNR {sq.mean():.2f} +- {sq.std():.2f} dB")

    curve = []
    for f in ERROR_FACTORS:
        out = ref + np.float32(f) * (int8 - ref)
        curve.append({"factor": f, "agreeing_views": int((out.argmax(1) == top1).sum()), "sqnr_db": sqnr_db(out, ref)})
    result["error_scaling"] = curve
    print("INT8 logit error scaled by f: " + "; ".join(
        f"f={c['factor']:.2f}: {c['agreeing_views']}/{len(ref)} at {c['sqnr_db']:.1f} dB" for c in curve))
    if args.per_tensor:
        result["per_tensor"] = per_tensor_noise(model, quantized, evaluation)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

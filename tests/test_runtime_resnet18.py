"""End to end on ResNet-18: its QDQ models, run on the Numba back end, against the same QDQ graph
evaluated by ONNX Runtime with ``ORT_DISABLE_ALL`` (the reference), on the real photos.

The network is ``benchmarks/models.py``'s ResNet-18 (torchvision's structure: 7x7/2 stem, 3x3/2
MaxPool, [2, 2, 2, 2] BasicBlocks with residual Add + ReLU, global average pool, Linear) at 224 px
with **seeded random weights** and non-trivial BatchNorm statistics: no real ResNet-18 weights are
available offline, so nothing here is about accuracy; only agreement with the reference is.

Two quantizers make the QDQ graph:

(a) ORT's ``quant_pre_process`` + ``quantize_static`` (QDQ, u8 activations, s8 per-channel
    weights, ``reduce_range``), calibrated on 8 real photos (``tests.real_models.imagenet_batch``);
(b) ``onnx_compress.quantize.quantize`` (its defaults but nearest weight rounding), calibrated on
    the same photos. It leaves the classifier Gemm's output (the logits) float, so that Gemm is
    the plan's one float island (ORT itself, on the dequantized integer input); the one-step
    bound is then checked on that last quantized tensor, and top-1 on the logits.

The issue's bound, checked on all 40 photo views (20 photos and their mirror images):

* ``|numba - ref| <= s_out`` (one quantization step of the output's DequantizeLinear) on at least
  99.9 % of the logits, and
* ``argmax numba == argmax ref`` on 100 % of the views,

paired with structural assertions: every step of the plan is an integer step (no float island;
for (b), none but the float classifier), and every Conv of the model is a quantized Conv kernel
step.

Why one step is the right bound: each requantization is ``q = clamp(rne(acc * m) + z)``, where
numba accumulates in int32 exactly and rounds once in float32, and ORT accumulates the dequantized
products in float; they differ only when ``acc * m`` sits within float rounding of a ``.5`` tie,
i.e. by one step, on few elements. The per-step (teacher-forced) tests measure that directly:
each step fed ORT's own quantized inputs must give >= 99.9 % of its elements within one step.
End to end, such flips can compound through 20 convs (as on MobileNetV2, see
``tests/test_runtime_models.py``). ResNet-18 keeps the bound end to end (measured on the 40 views:
100 % of the logits within one step, at most 1 step off, top-1 100 %, for (a) and for (b)'s
classifier input; ORT's fused INT8 session of (a) matches the reference just as closely).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_compress.runtime import Session

from onnx_compress.verify import reference_session
from tests import real_models as RM
from tests.test_runtime_models import (
    end_to_end,
    quantize_with_ort,
    teacher_forced_steps,
)

#: step kinds that compute on integers (``island`` = a float op run through ONNX Runtime)
INTEGER_KINDS = {"kernel", "lut", "shape", "quantize", "dequantize"}
N_CALIB = 8


def _resnet18(folder, **kw):
    from benchmarks.models import (
        resnet_onnx,  # tests/conftest.py puts the repo root on sys.path
    )

    return resnet_onnx("resnet18", cache_dir=folder, **kw)


def _assert_all_integer(model: onnx.ModelProto, float_convs: int, islands: tuple[str, ...] = ()) -> Session:
    """Every step of the plan is an integer step except exactly ``islands``, and every Conv of the
    model is one quantized Conv kernel step."""
    sess = Session(model)
    steps = sess._plan.steps
    assert tuple(sess._plan.islands) == islands, sess._plan.islands
    assert {s.kind for s in steps if s.kind != "island"} <= INTEGER_KINDS, {s.kind for s in steps}
    conv_steps = [s for s in steps if s.kind == "kernel" and "Conv" in s.name]
    assert len(conv_steps) == float_convs, [s.name for s in conv_steps]
    assert sum(n.op_type == "Conv" for n in model.graph.node) == float_convs
    return sess


def _classifier_island(model: onnx.ModelProto) -> tuple[str, ...]:
    """The float island the quantizer may leave: the last Gemm, when its output (the logits) is
    not re-quantized."""
    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    return () if last.op_type == "DequantizeLinear" else (last.name,)


def last_quantized_end_to_end(model: onnx.ModelProto, x: np.ndarray) -> dict:
    """The issue's bound on the last quantized tensor: the logits when they are quantized, else
    the integer input of the float classifier island (the island is ORT itself, so any logit
    difference comes from that input); plus top-1 agreement of the logits."""
    if not _classifier_island(model):
        return end_to_end(model, x)
    gemm = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    dq = next(n for n in model.graph.node if n.output[0] == gemm.input[0])
    assert dq.op_type == "DequantizeLinear", dq.op_type
    q_name = dq.input[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=q_name))
    ref_logits, ref_q = reference_session(probe).run(None, {"input": x})
    got_logits, got_q = Session(model)._plan.run([model.graph.output[0].name, q_name], {"input": x})
    diff = np.abs(got_q.astype(np.int32) - ref_q.astype(np.int32))
    return {"within_one_step": float(np.mean(diff <= 1)), "max_steps": int(diff.max()),
            "top1_numba": float(np.mean(got_logits.argmax(1) == ref_logits.argmax(1)))}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resnet18_float(tmp_path_factory):
    return _resnet18(tmp_path_factory.mktemp("r18"))


@pytest.fixture(scope="module")
def resnet18_ort_qdq(resnet18_float, tmp_path_factory):
    calib = np.asarray(RM.imagenet_batch(flips=False))[:N_CALIB]
    return quantize_with_ort(resnet18_float, tmp_path_factory.mktemp("r18_ort"), "r18", calib)


@pytest.fixture(scope="module")
def resnet18_ours_qdq(resnet18_float):
    from onnx_compress.quantize import quantize

    calib = np.asarray(RM.imagenet_batch(flips=False))[:N_CALIB]
    try:
        # nearest rounding: the same graph as the default GPTQ rounding (which only moves weight
        # values) at a tenth of the time (measured here: 32 s vs 314 s wall, 12 s vs 182 s CPU)
        model, _ = quantize(str(resnet18_float), {"input": calib}, report_kernels=False, weight_rounding="nearest")
    except Exception as exc:  # noqa: BLE001 -- the quantizer is developed elsewhere; its failure is not this test's
        pytest.skip(f"onnx_compress.quantize failed: {type(exc).__name__}: {exc}")
    return model


# ----------------------------------------------------------------------------- fast smoke


def test_resnet18_small_smoke(tmp_path):
    """Fast smoke: a width-8, 10-class ResNet-18 (same 20 Conv / 20 BN structure) at 64 px,
    quantized by ORT on 4 downscaled photos: all 20 convs lowered to integer kernels, no island,
    every step within one quantization step of the reference on >= 99.9 % of its elements
    (teacher forced) and the same top-1 on all 20 photos.

    The end-to-end logits are not held to the one-step bound here: with 8 channels a flip
    early on weighs far more than at width 64 (measured: 96-98.5 % of the 10 logits within one
    step, up to 3 steps off); the full-width tests below hold that bound."""
    import torch

    path = _resnet18(tmp_path, input_size=64, width=8, num_classes=10)
    photos = torch.from_numpy(np.array(RM.imagenet_batch(flips=False)))
    x = torch.nn.functional.interpolate(photos, size=(64, 64), mode="bilinear", antialias=True).numpy()
    model = quantize_with_ort(path, tmp_path, "r18s", x[:4])
    sess = _assert_all_integer(model, 20)
    steps = teacher_forced_steps(model, {"input": x[4:8]})
    worst = min(steps, key=steps.get)
    assert len(steps) >= 30 and steps[worst] >= 0.999, (worst, steps[worst])
    got = sess.run(None, {"input": x})[0]
    ref = reference_session(model).run(None, {"input": x})[0]
    assert got.shape == ref.shape == (20, 10)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


# ----------------------------------------------------------------------------- ORT quantize_static


@pytest.mark.slow
@pytest.mark.realmodel
def test_resnet18_ort_qdq_plan_is_integer(resnet18_ort_qdq):
    _assert_all_integer(resnet18_ort_qdq, 20)


@pytest.mark.slow
@pytest.mark.realmodel
def test_resnet18_ort_qdq_end_to_end(resnet18_ort_qdq):
    e2e = end_to_end(resnet18_ort_qdq, np.asarray(RM.imagenet_batch(flips=True)))
    assert e2e["within_one_step"] is not None, "the logits should be quantized (Gemm lowered)"
    assert e2e["within_one_step"] >= 0.999 and e2e["top1_numba"] == 1.0, e2e


# ----------------------------------------------------------------------------- onnx_compress.quantize


@pytest.mark.slow
@pytest.mark.realmodel
def test_resnet18_ours_qdq_plan_is_integer(resnet18_ours_qdq):
    """All integer but, at most, the classifier Gemm when the quantizer leaves the logits float."""
    _assert_all_integer(resnet18_ours_qdq, 20, _classifier_island(resnet18_ours_qdq))


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("qdq_fixture", ["resnet18_ort_qdq", "resnet18_ours_qdq"])
def test_resnet18_qdq_per_step_within_one_quantization_step(qdq_fixture, request):
    """Both quantizers' graphs: each step fed the reference's own quantized inputs."""
    model = request.getfixturevalue(qdq_fixture)
    x = np.asarray(RM.imagenet_batch(flips=False))[N_CALIB : N_CALIB + 4]
    steps = teacher_forced_steps(model, {"input": x})
    worst = min(steps, key=steps.get)
    assert len(steps) >= 30 and steps[worst] >= 0.999, (worst, steps[worst])


@pytest.mark.slow
@pytest.mark.realmodel
def test_resnet18_ours_qdq_end_to_end(resnet18_ours_qdq):
    e2e = last_quantized_end_to_end(resnet18_ours_qdq, np.asarray(RM.imagenet_batch(flips=True)))
    assert e2e["within_one_step"] >= 0.999 and e2e["top1_numba"] == 1.0, e2e

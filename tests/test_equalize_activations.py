"""Activation range equalization: exact for Relu, exact on calibration data for ReLU6, channel
ranges lifted, non-matching chains left alone, and the quantizer's default uses it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_compress.passes.calibration import with_outputs
from onnx_compress.passes.equalize_activations import (
    channel_scales,
    equalize_activations,
)

from tests.numerics import assert_parity, constant_arrays, random_feeds, run


def _model(act="Clip", *, c=8, multiplier=1, dense=False, shared_output=False, lower=0.0, seed=0):
    """x -> Conv(3->c, 3x3) -> act -> Conv(depthwise, or dense 1x1 with ``dense``) -> y.

    Conv1's output channels have ranges spread over three orders of magnitude.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(c, 3, 3, 3)).astype(np.float32) * np.logspace(-2, 0.5, c).astype(np.float32)[:, None, None, None]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array((rng.normal(size=c) * 0.01).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array(lower, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    if dense:
        inits += [numpy_helper.from_array(rng.normal(size=(5, c, 1, 1)).astype(np.float32), "w2")]
        second = helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2")
        out_c = 5
    else:
        out_c = c * multiplier
        inits += [numpy_helper.from_array(rng.normal(size=(out_c, 1, 3, 3)).astype(np.float32), "w2"),
                  numpy_helper.from_array(rng.normal(size=out_c).astype(np.float32), "b2")]
        second = helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1])
    act_node = (helper.make_node("Clip", ["y1", "lo", "hi"], ["a1"], name="act") if act == "Clip"
                else helper.make_node("Relu", ["y1"], ["a1"], name="act"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]), act_node, second]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_c, 10, 10])]
    if shared_output:
        nodes.append(helper.make_node("Neg", ["y1"], ["z"], name="other_reader"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 10, 10]))
    graph = helper.make_graph(nodes, "aeq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _feeds(model, count=6, seed=1):
    return random_feeds(model, count=count, seed=seed)


def _channel_max(model, feeds, name="a1"):
    probe = with_outputs(model, [name])
    return np.max([run(probe, f)[-1].max(axis=(0, 2, 3)) for f in feeds], axis=0)


def test_channel_scales_formula():
    m = np.array([3.0, 1.0, 0.1, 0.0, 1e-4, 5.0])
    s = channel_scales(m, 6.0, margin=2.0, max_scale=16.0)
    np.testing.assert_allclose(s, [1.0, 3.0, 16.0, 1.0, 16.0, 1.0])  # t = 6 / 2 = 3; m = 0 stays 1
    np.testing.assert_allclose(channel_scales(m, None, margin=2.0, max_scale=100.0), [5 / 3, 5.0, 50.0, 1.0, 100.0, 1.0])
    assert np.all(channel_scales(np.zeros(4), 6.0) == 1.0)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_relu_chain_is_exact_and_lifts_small_channels(multiplier):
    model = _model("Relu", multiplier=multiplier)
    calib = _feeds(model)
    out, pairs = equalize_activations(model, calib, margin=1.0, max_scale=1e3)
    assert [(p.producer, p.consumer, p.tensor) for p in pairs] == [("conv1", "dw", "a1")]
    assert_parity(model, out, feeds=_feeds(model, seed=7), rel_tol=1e-5)  # Relu: exact everywhere
    before, after = _channel_max(model, calib), _channel_max(out, calib)
    np.testing.assert_allclose(after, before * pairs[0].scales, rtol=1e-5)
    positive = before > 0
    # every channel with a positive value now reaches the tensor's maximum
    np.testing.assert_allclose(after[positive], before.max(), rtol=1e-5)
    assert before[positive].min() < 0.1 * before.max()  # the test model does spread the channels


def test_relu6_chain_is_exact_on_calibration_data():
    model = _model("Clip")
    calib = _feeds(model)
    out, pairs = equalize_activations(model, calib, margin=2.0, max_scale=16.0)
    assert len(pairs) == 1 and pairs[0].scales.max() > 1.0
    s = pairs[0].scales
    # no calibration value is clipped by the scaled Clip: identical outputs on the calibration data
    assert_parity(model, out, feeds=calib, samples=0, rel_tol=1e-5)
    # and the scaled channels stay below hi = 6 with the margin's headroom: s * m <= 6 / margin
    m = _channel_max(model, calib)
    scaled = s > 1.0
    assert scaled.any() and np.all(s[scaled] * m[scaled] <= 3.0 * (1 + 1e-6))


def test_relu6_chain_clips_only_beyond_the_margin():
    """With margin 1, an input three times a calibration input drives scaled channels past their
    calibration maximum, where the rewritten model clips and the original does not: the bet the
    margin describes is real (and is why the default margin is 2)."""
    model = _model("Clip")
    calib = _feeds(model)
    out, pairs = equalize_activations(model, calib, margin=1.0, max_scale=16.0)
    assert pairs and pairs[0].scales.max() > 1.0
    big = {"x": calib[0]["x"] * 3.0}
    a, b = run(model, big)[0], run(out, big)[0]
    assert not np.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, reason", [
    ({"dense": True}, "dense consumer"),
    ({"shared_output": True}, "Conv1 output read twice"),
    ({"lower": -1.0}, "Clip lower bound not 0"),
])
def test_declined_chains_are_untouched(kwargs, reason):
    model = _model("Clip", **kwargs)
    out, pairs = equalize_activations(model, _feeds(model))
    assert pairs == [], reason
    assert out is model


def test_select_excludes_chains():
    model = _model("Relu")
    out, pairs = equalize_activations(model, _feeds(model), select=lambda n: n.name != "dw")
    assert pairs == [] and out is model


def test_bad_arguments():
    model = _model("Relu")
    with pytest.raises(ValueError, match="margin"):
        equalize_activations(model, _feeds(model), margin=0.5)
    with pytest.raises(ValueError, match="max_scale"):
        equalize_activations(model, _feeds(model), max_scale=0.5)


def test_quantize_reports_equalization_and_can_skip_it():
    from onnx_compress.quantize import quantize

    model = _model("Clip")
    calib = _feeds(model, count=8)
    q_on, report_on = quantize(model, calib, progress=False, report_kernels=False, weight_rounding="nearest")
    q_off, report_off = quantize(model, calib, progress=False, report_kernels=False, weight_rounding="nearest",
                                 equalize=False)
    assert report_off.equalized is None
    assert list(report_on.equalized) == ["a1"] and report_on.equalized["a1"] > 1.0
    assert report_on.as_dict()["equalized"] == report_on.equalized
    # the rescaled weights went into the quantized model: its first conv's weights differ
    w_on, w_off = constant_arrays(q_on), constant_arrays(q_off)
    assert any("_aeq" in k for k in w_on) and not any("_aeq" in k for k in w_off)


@pytest.mark.slow
@pytest.mark.realmodel
def test_mobilenet_v2_real_photos(tmp_path):
    """MobileNetV2 (ImageNet weights), calibrated on the 32 real views of ``bench_quantize.py``:
    all 17 Conv -> ReLU6 -> depthwise chains rewritten; exact (float rounding) on the calibration
    views, and on the 72 views of the other photos the top-1 class never changes."""
    pytest.importorskip("torch")
    from benchmarks import bench_quantize as bench
    from onnx_compress.quantize import prepare_float_model
    from tests import real_models as rm

    model = prepare_float_model(onnx.load(str(rm.mobilenet_v2_onnx(tmp_path))))
    calib, evaluation = bench.data()
    feeds = [{"input": calib[i : i + 1]} for i in range(len(calib))]
    out, pairs = equalize_activations(model, feeds)
    assert len(pairs) == 17 and all(p.scales.max() > 1.0 for p in pairs)
    assert_parity(model, out, feeds=feeds, samples=0, rel_tol=1e-5)
    before, after = bench.outputs(model, evaluation), bench.outputs(out, evaluation)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))

"""Verification: output comparison (relative to range, NaN positions, exact non-float outputs),
seeded random feeds, real feeds from .npz, and the report verify_models gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir.errors import InvalidModelError
from onnx_compress.verify import compare_outputs, load_feeds, random_feeds, verify_models


def _affine(scale: float = 2.0) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("ArgMax", ["y"], ["k"], axis=-1, keepdims=0)],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["N"])],
        initializer=[numpy_helper.from_array(np.full(8, scale, np.float32), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_difference_is_relative_to_the_output_range():
    ref = np.array([0.0, 10.0, 5.0], np.float32)
    (ok,) = compare_outputs([ref], [ref + np.float32(0.0005)], ["y"], 1e-4)
    assert ok.passed and ok.rel_diff == pytest.approx(5e-5, rel=1e-2)
    (bad,) = compare_outputs([ref], [ref + np.float32(0.002)], ["y"], 1e-4)
    assert not bad.passed and bad.rel_diff == pytest.approx(2e-4, rel=1e-2)


def test_nan_positions_must_match():
    ref = np.array([1.0, np.nan, 3.0], np.float32)
    (same,) = compare_outputs([ref], [ref.copy()], ["y"], 1e-6)
    assert same.passed
    (moved,) = compare_outputs([ref], [np.array([np.nan, 2.0, 3.0], np.float32)], ["y"], 1e-6)
    assert not moved.passed
    (inf,) = compare_outputs([np.array([np.inf, 1.0])], [np.array([-np.inf, 1.0])], ["y"], 1e-6)
    assert not inf.passed


def test_non_float_outputs_must_be_identical_and_shapes_equal():
    (ints,) = compare_outputs([np.array([1, 2, 3])], [np.array([1, 2, 4])], ["k"], 0.5)
    assert not ints.passed and ints.exact_required
    (shape,) = compare_outputs([np.zeros((2, 3))], [np.zeros((3, 2))], ["y"], 0.5)
    assert not shape.passed


def test_top1_agreement():
    ref = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    cand = np.array([[0.1, 0.9], [0.2, 0.8]], np.float32)
    (c,) = compare_outputs([ref], [cand], ["p"], 1.0 - 1e-9)
    assert c.top1_agreement == 0.5


def test_random_feeds_are_seeded_and_shaped():
    model = _affine()
    a = random_feeds(model, count=2, seed=7)
    b = random_feeds(model, count=2, seed=7)
    c = random_feeds(model, count=1, seed=8)
    assert len(a) == 2 and a[0]["x"].shape == (1, 8) and a[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(a[1]["x"], b[1]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert random_feeds(model, count=1, input_shapes={"x": (5, 8)})[0]["x"].shape == (5, 8)


def test_load_feeds_from_npz_and_folder(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.ones((2, 8), np.float32))
    assert load_feeds(tmp_path / "one.npz")[0]["x"].shape == (2, 8)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in (2, 1):
        np.savez(folder / f"{i}.npz", x=np.full((1, 8), i, np.float32))
    feeds = load_feeds(folder)
    assert [float(f["x"][0, 0]) for f in feeds] == [1.0, 2.0]  # name order
    with pytest.raises(InvalidModelError, match="no such input"):
        load_feeds(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelError, match="no .npz"):
        load_feeds(tmp_path / "empty")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidModelError, match="broken.npz"):
        load_feeds(tmp_path / "broken.npz")


def test_verify_models_passes_and_fails():
    same = verify_models(_affine(), _affine(), samples=2, seed=0)
    assert same.passed and same.feeds == 2 and same.max_abs_diff == 0.0
    assert [o.name for o in same.outputs] == ["y", "k"]
    assert "passed" in same.summary()
    off = verify_models(_affine(2.0), _affine(2.01), samples=2, seed=0, tolerance=1e-4)
    assert not off.passed and "FAILED" in off.summary()
    assert off.as_dict()["passed"] is False
    real = verify_models(_affine(), _affine(), samples=0, real_feeds=[{"x": np.ones((3, 8), np.float32)}])
    assert real.passed and real.feeds == 1 and real.real_feeds == 1


def test_verify_models_skips_with_a_reason_when_inputs_cannot_be_made():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])], "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    report = verify_models(model, model)
    assert not report.passed and report.skipped_reason and "--inputs" in report.skipped_reason
    assert report.summary().startswith("not verified")

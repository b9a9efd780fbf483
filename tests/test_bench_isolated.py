"""benchmarks/isolated.py: contestants timed in processes of their own, alternated by rounds.

Timings themselves are not asserted (they belong to the benchmark); what is checked is that every
round's runs are counted, each contestant really runs its own model in its own process (a model the
child cannot load fails loudly, naming it), and the figures are consistent (median <= p90)."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.isolated import measure, side_by_side


def _relu_model(path, width):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_side_by_side_counts_every_round(tmp_path):
    small, big = _relu_model(tmp_path / "small.onnx", 8), _relu_model(tmp_path / "big.onnx", 4096)
    got = side_by_side({"small": {"path": small, "backend": "onnxruntime", "threads": 1},
                        "big": {"path": big, "backend": "onnxruntime", "threads": 1}},
                       batch=2, warmup=1, repeats=3, rounds=2)
    assert set(got) == {"small", "big"}
    for figures in got.values():
        assert figures["runs"] == 6 and len(figures["process_medians_s"]) == 2
        assert 0 < figures["median_s"] <= figures["p90_s"]
        assert figures["best_median_s"] == min(figures["process_medians_s"]) > 0
        assert figures["median_cpu_s"] >= 0


def test_measure_names_the_model_a_child_cannot_load(tmp_path):
    bad = tmp_path / "not_a_model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RuntimeError, match="not_a_model.onnx"):
        measure({"path": bad, "backend": "onnxruntime", "threads": 1}, batch=1, warmup=0, repeats=1)


def test_side_by_side_rejects_empty_schedules(tmp_path):
    with pytest.raises(ValueError, match="rounds"):
        side_by_side({}, batch=1, rounds=0)

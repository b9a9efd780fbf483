"""Smoke test of benchmarks/bench_lossless.py, so the benchmark script cannot rot.

Runs its ``main`` end to end on a narrow ResNet-18 (stem width 8, 32x32 input, 10 classes: the
same 20 Conv + 20 BatchNormalization structure as the real one, 0.7 MB) with one repeat and no
warm-up, and checks the JSON it writes: every key the README documents, positive timings, and
node counts that make sense (nothing grows; BatchNormalization gone when BN folding is in the
default pipeline; the result verified). Timings themselves are not asserted: they belong to the
benchmark, not to a unit test on a shared machine.

It also pins the fast paths the benchmark drove into ``ir/``: shape inference on a weightless copy
gives exactly onnx's own result, and ``file_size`` computed without encoding the weights equals
``ModelProto.ByteSize()`` byte for byte.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxslim")

from benchmarks import bench_lossless  # noqa: E402  (tests/conftest.py puts the repo root on sys.path)


SMALL = ["--model", "resnet18", "--width", "8", "--input-size", "32", "--num-classes", "10"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_cache")


def test_bench_lossless_main_writes_sane_json(tmp_path, cache_dir, capsys):
    out = tmp_path / "bench.json"
    code = bench_lossless.main([
        *SMALL, "--repeats", "1", "--warmup", "0", "--cache", str(cache_dir), "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "onnxslim" in printed and "ORT ENABLE_BASIC" in printed
    assert printed.strip().splitlines()[-1].startswith(("PASS:", "FAIL:"))

    result = json.loads(out.read_text())
    for key in ("model", "model_path", "repeats", "machine", "versions", "pipeline", "seconds",
                "ratio_ours_over_onnxslim", "verification", "counts", "targets", "verdict"):
        assert key in result, key
    assert result["repeats"] == 1

    seconds = result["seconds"]
    for key in ("ours", "verify", "ours_plus_verify", "onnxslim", "ort_basic_session"):
        assert seconds[key] > 0, key
    assert len(seconds["runs"]["ours"]) == len(seconds["runs"]["onnxslim"]) == 1
    assert seconds["cpu"]["ours"] > 0 and seconds["cpu"]["onnxslim"] > 0
    assert math.isclose(result["ratio_ours_over_onnxslim"], seconds["ours"] / seconds["onnxslim"])
    assert set(result["verdict"]) == {"seconds_ok", "ratio_ok", "passed"}

    counts = result["counts"]
    original = counts["original"]
    assert original["nodes"] == 69 and original["batchnorm_left"] == 20  # 20 Conv + 20 BN + ...
    assert original["op_histogram"]["Conv"] == 20
    for tool in ("ours", "onnxslim", "ort_basic"):
        assert counts[tool]["nodes"] <= original["nodes"], tool
        assert counts[tool]["batchnorm_left"] <= original["batchnorm_left"], tool
        assert sum(counts[tool]["op_histogram"].values()) == counts[tool]["nodes"], tool
    assert counts["ours"]["op_histogram"].get("Conv") == 20  # folding never removes a Conv
    if "fold-batchnorm" in result["pipeline"]:
        assert counts["ours"]["batchnorm_left"] == 0
        assert counts["ours"]["nodes"] == original["nodes"] - 20
    assert result["verification"]["passed"] is True


def test_weightless_fast_paths_are_exact(cache_dir):
    import onnx

    from benchmarks.models import resnet_onnx
    from onnx_compress.ir.stats import file_size
    from onnx_compress.ir.validate import infer_shapes, stripped_initializers, weightless_copy

    model = onnx.load(str(resnet_onnx("resnet18", input_size=32, width=8, num_classes=10, cache_dir=cache_dir)))
    stripped = stripped_initializers(model)
    assert len(stripped) >= 20  # the conv weights at least: the fast path is really taken
    light = weightless_copy(model)
    assert light.ByteSize() < model.ByteSize() / 10
    assert all(not light.graph.initializer[i].raw_data for i in stripped)
    assert [t.dims for t in light.graph.initializer] == [t.dims for t in model.graph.initializer]

    assert file_size(model) == model.ByteSize()
    assert infer_shapes(model, data_prop=True) == onnx.shape_inference.infer_shapes(model, data_prop=True)


def test_bench_prune_main_on_the_bundled_example(tmp_path, capsys):
    """``benchmarks/bench_prune.py`` end to end on ``examples/tiny_cnn.onnx`` (32x32, one
    process per model and round): one row per setting and batch, MAC fractions below 1, the
    verdict line last."""
    from benchmarks import bench_prune

    out = tmp_path / "prune.json"
    code = bench_prune.main(["--onnx", "examples/tiny_cnn.onnx", "--ratios", "0.3", "--batches", "1",
                             "--repeats", "1", "--rounds", "1", "--warmup", "0", "--round-to", "8",
                             "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round_to 8" in printed
    assert printed.strip().splitlines()[-1].startswith(("PASS:", "FAIL:"))
    result = json.loads(out.read_text())
    assert result["round_to"] == 8
    assert [r["setting"] for r in result["rows"]] == ["ratio 0.3", "MACs 0.5", "MACs 0.5 unif"]  # no r8 row at 8
    for row in result["rows"]:
        assert 0 < row["macs_ratio"] < 1 and row["orig_s"] > 0 and row["pruned_s"] > 0
        assert math.isclose(row["speedup"], row["orig_s"] / row["pruned_s"])


def test_bench_prune_groups_timing_on_the_bundled_example(capsys):
    from benchmarks import bench_prune

    assert bench_prune.main(["--groups-timing", "--onnx", "examples/tiny_cnn.onnx", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "tiny_cnn.onnx" in lines[-2] and "prunable" in lines[-2]
    assert lines[-1].startswith(("PASS: groups in", "FAIL: groups in"))  # timings belong to the benchmark

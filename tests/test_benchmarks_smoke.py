"""Smoke test of benchmarks/bench_lossless.py, so the benchmark script cannot rot.

Runs its ``main`` end to end on a narrow ResNet-18 (stem width 8, 32x32 input, 10 classes: the
same 20 Conv + 20 BatchNormalization structure as the real one, 0.7 MB) with one repeat and no
warm-up, and checks the JSON it writes: every key the README documents, positive timings, and
node counts that make sense (nothing grows; BatchNormalization gone when BN folding is in the
default pipeline; the result verified). Timings themselves are not asserted: they belong to the
benchmark, not to a unit test on a shared machine.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxslim")

from benchmarks import bench_lossless  # noqa: E402  (tests/conftest.py puts the repo root on sys.path)


def test_bench_lossless_main_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_lossless.main([
        "--model", "resnet18", "--width", "8", "--input-size", "32", "--num-classes", "10",
        "--repeats", "1", "--warmup", "0", "--cache", str(tmp_path / "cache"), "--json", str(out),
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

"""The ``onnx-compress`` command line: table, JSON report, pass selection, inspect, verification inputs
and the verification exit code. Runs ``onnx_compress.cli.main`` in-process (one subprocess test
checks the installed console script end to end)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress import cli
from onnx_compress.ir import io as ir_io
from onnx_compress.passes.base import Pass, PassResult
from onnx_compress.passes.registry import DEFAULT_PIPELINE, PASS_FACTORIES
from tests.numerics import assert_parity, op_count


def call(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``onnx-compress argv``; argparse's SystemExit included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def inspect_json(path, capsys) -> dict:
    code, out, _ = call(["inspect", path, "--json"], capsys)
    assert code == 0
    return json.loads(out)


def _single_conv(batch="N") -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(8 filters, 3x3, pad 1) -> y; MACs per image = 8*8*8 * 3*9 = 13824."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="unit")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------------------------
# compress: table and report


def test_table_and_report_agree_with_inspect(tiny_cnn_path, tmp_path, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, stderr = call([tiny_cnn_path, out, "--report", report_path], capsys)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split() == ["before", "after", "change"]
    labels = [line.split("  ")[0].strip() for line in lines[1:5]]
    assert labels[:3] == ["nodes", "parameters", "file size"] and labels[3].startswith("MACs")
    assert any(line.startswith("verification: passed") for line in lines)

    report = json.loads(report_path.read_text())
    assert set(report) >= {"before", "after", "pipeline", "pass_changes", "declined", "verification", "seconds"}
    assert report["pipeline"] == DEFAULT_PIPELINE
    before, after = inspect_json(tiny_cnn_path, capsys), inspect_json(out, capsys)
    for key in ("nodes", "parameters", "macs", "op_histogram", "opset"):
        assert report["before"][key] == before[key], key
        assert report["after"][key] == after[key], key
    assert report["after"]["bytes"] == out.stat().st_size
    assert report["before"]["bytes"] == tiny_cnn_path.stat().st_size
    assert lines[1].split()[1:3] == [str(before["nodes"]), str(after["nodes"])]
    assert after["nodes"] < before["nodes"]
    assert report["pass_changes"]["eliminate-noop"] >= 2  # Identity and Dropout
    verification = report["verification"]
    assert verification["passed"] is True and verification["input_sets"] == 2
    assert verification["max_rel_diff"] <= verification["tolerance"] == 1e-4
    assert [o["name"] for o in verification["outputs"]] == ["logits"]
    model = onnx.load_model(str(out))
    assert op_count(model, "Identity") == op_count(model, "Dropout") == 0
    assert_parity(onnx.load_model(str(tiny_cnn_path)), model, rel_tol=1e-4)


def test_passes_and_skip_select_the_pipeline(tiny_cnn_path, tmp_path, capsys):
    only, skipped = tmp_path / "only.onnx", tmp_path / "skipped.onnx"
    code, _, err = call([tiny_cnn_path, only, "--passes", "eliminate-noop", "--report", tmp_path / "a.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a.json").read_text())["pipeline"] == ["eliminate-noop"]
    original = onnx.load_model(str(tiny_cnn_path))
    model = onnx.load_model(str(only))
    assert op_count(model, "Identity") == 0
    assert op_count(model, "BatchNormalization") == op_count(original, "BatchNormalization")

    code, _, err = call([tiny_cnn_path, skipped, "--skip", "eliminate-noop", "--report", tmp_path / "b.json"], capsys)
    assert code == 0, err
    pipeline = json.loads((tmp_path / "b.json").read_text())["pipeline"]
    assert pipeline == [p for p in DEFAULT_PIPELINE if p != "eliminate-noop"]
    assert op_count(onnx.load_model(str(skipped)), "Identity") == 1


@pytest.mark.parametrize("flag", ["--passes", "--skip"])
def test_unknown_pass_is_a_usage_error(tiny_cnn_path, tmp_path, capsys, flag):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = call([tiny_cnn_path, out, flag, "no-such-pass"], capsys)
    assert code == 2
    assert "no-such-pass" in stderr and "unknown pass" in stderr
    assert not out.exists()


def test_quiet_prints_nothing_on_success(tiny_cnn_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = call([tiny_cnn_path, out, "-q"], capsys)
    assert code == 0 and out.is_file()
    assert stdout == "" and stderr == ""


def test_no_verify_skips_verification(tiny_cnn_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, _ = call([tiny_cnn_path, out, "--no-verify", "--report", tmp_path / "r.json"], capsys)
    assert code == 0
    assert "verification: skipped" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["verification"] is None
    assert_parity(onnx.load_model(str(tiny_cnn_path)), onnx.load_model(str(out)), rel_tol=1e-4)


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_text_and_json(tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    onnx.save_model(_single_conv(), str(path))
    code, out, _ = call(["inspect", path], capsys)
    assert code == 0
    assert "opset 13" in out and "producer 'unit'" in out
    assert "parameters 216" in out and "MACs 13.82K" in out and "symbolic dims = 1" in out
    assert "input  x: float32[Nx3x8x8]" in out
    assert "output y: float32[Nx8x8x8]" in out
    assert any(line.split() == ["Conv", "1"] for line in out.splitlines())
    data = inspect_json(path, capsys)
    assert data["parameters"] == 8 * 3 * 3 * 3
    assert data["macs"] == 8 * 8 * 8 * 3 * 9 and data["macs_symbolic_dims_as_1"] is True
    assert data["op_histogram"] == {"Conv": 1} and data["opset"] == 13 and data["nodes"] == 1
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}]
    assert data["bytes"] == path.stat().st_size


def test_inspect_histogram_matches_the_model(tiny_cnn_path, capsys):
    data = inspect_json(tiny_cnn_path, capsys)
    model = onnx.load_model(str(tiny_cnn_path))
    assert data["op_histogram"] == dict(collections.Counter(n.op_type for n in model.graph.node))
    assert data["nodes"] == len(model.graph.node)


# ---------------------------------------------------------------------------------------------
# verification inputs


def _reshape_model() -> onnx.ModelProto:
    """x[1, K] -> Reshape to [1, 2, 8] -> Relu: only K = 16 runs, so the default 64 cannot."""
    shape = numpy_helper.from_array(np.array([1, 2, 8], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["xi"]),
         helper.make_node("Reshape", ["xi", "shape"], ["r"]),
         helper.make_node("Relu", ["r"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_input_shape_makes_verification_possible(tmp_path, capsys):
    path, out = tmp_path / "reshape.onnx", tmp_path / "out.onnx"
    onnx.save_model(_reshape_model(), str(path))
    code, stdout, stderr = call([path, out, "--report", tmp_path / "a.json"], capsys)
    assert code == 0
    assert "not verified" in stdout and "--input-shape" in stderr
    assert json.loads((tmp_path / "a.json").read_text())["verification"]["skipped_reason"]

    code, stdout, stderr = call([path, out, "--input-shape", "x:1x16", "--report", tmp_path / "b.json"], capsys)
    assert code == 0, stderr
    verification = json.loads((tmp_path / "b.json").read_text())["verification"]
    assert verification["passed"] is True and verification["skipped_reason"] is None
    assert verification["input_sets"] == 2
    assert op_count(onnx.load_model(str(out)), "Identity") == 0


@pytest.mark.parametrize("bad", ["x", "x:1xA", "x:0x3", ":1x3"])
def test_bad_input_shape_is_a_usage_error(tiny_cnn_path, tmp_path, capsys, bad):
    code, _, stderr = call([tiny_cnn_path, tmp_path / "out.onnx", "--input-shape", bad], capsys)
    assert code == 2 and "input-shape" in stderr


def test_real_inputs_from_one_npz_and_from_a_folder(tiny_cnn_path, tmp_path, capsys):
    rng = np.random.default_rng(3)
    single = tmp_path / "feed.npz"
    np.savez(single, image=rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", image=rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    for source, count in ((single, 1), (folder, 3)):
        report = tmp_path / f"{source.stem}.json"
        code, _, stderr = call([tiny_cnn_path, tmp_path / "out.onnx", "--inputs", source, "--samples", "1",
                                "--report", report], capsys)
        assert code == 0, stderr
        verification = json.loads(report.read_text())["verification"]
        assert verification["real_input_sets"] == count
        assert verification["input_sets"] == count + 1
        assert verification["passed"] is True


def test_real_inputs_the_model_rejects_are_invalid(tiny_cnn_path, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((1, 5, 32, 32), np.float32))  # 5 channels, the model takes 3
    out = tmp_path / "out.onnx"
    code, _, stderr = call([tiny_cnn_path, out, "--inputs", bad], capsys)
    assert code == 3 and "real input" in stderr
    assert not out.exists()


class _PerturbWeightPass(Pass):
    """Scales the first float weight by 1.01: a 'lossless' pass with a bug."""

    name = "perturb"

    def call(self, graph):
        for tensor in graph.tensors().values():
            if hasattr(tensor, "values") and tensor.values.dtype == np.float32 and tensor.values.size > 1:
                tensor.values = tensor.values * np.float32(1.01)
                return PassResult(graph, True, 1)
        return PassResult(graph, False, 0)


def test_pipeline_that_changes_outputs_exits_4_and_writes_nothing(tiny_cnn_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(PASS_FACTORIES, "eliminate-noop", lambda opts: _PerturbWeightPass())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = tiny_cnn_path.read_bytes()
    code, stdout, stderr = call([tiny_cnn_path, out, "-q", "--report", report], capsys)
    assert code == 4
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "verification failed" in stderr and "nothing written" in stderr
    assert not out.exists()
    assert json.loads(report.read_text())["verification"]["passed"] is False
    assert tiny_cnn_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([tiny_cnn_path.name, "r.json"])
    # the same run without verification writes (proof the check, not the pass, stopped it)
    code, _, _ = call([tiny_cnn_path, out, "-q", "--no-verify"], capsys)
    assert code == 0 and out.exists()


def test_console_script_end_to_end(tiny_cnn_path, tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_compress.cli", str(tiny_cnn_path), str(out), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert ir_io.load_model(out).graph.output[0].name == "logits"

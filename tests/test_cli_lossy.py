"""CLI and API for the lossy steps: --prune, --quantize, composed; inspect --groups; run; bench."""

import json

import numpy as np
import onnx
import pytest

import onnx_compress
from onnx_compress.cli import EXIT_OK, EXIT_USAGE, main
from tests.numerics import op_count


@pytest.fixture
def calib_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, image=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    return path


def test_prune_cli_shrinks_weights_and_reports(tiny_cnn_path, tmp_path, capsys):
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main([str(tiny_cnn_path), str(out), "--prune", "0.5", "--round-to", "1", "--report", str(report)]) == EXIT_OK
    data = json.loads(report.read_text())
    assert data["prune"]["macs"]["after"] < data["prune"]["macs"]["before"]
    assert data["after"]["parameters"] < data["before"]["parameters"]
    frozen = [g for g in data["prune"]["groups"] if g["frozen"]]
    assert frozen and all(g["reasons"] for g in frozen), "frozen groups must say why"
    assert data["verification"]["passed"] is True  # the lossless passes after pruning
    assert data["fidelity"] is not None and data["fidelity"]["input_sets"] == 2
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert op_count(pruned, "BatchNormalization") == 0
    assert "pruning:" in capsys.readouterr().out


def test_round_to_auto_is_this_cpus_block(tiny_cnn_path, tmp_path, capsys):
    from onnx_compress.dependency_graph.strategy import host_channel_block

    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main([str(tiny_cnn_path), str(out), "--prune", "0.5", "--round-to", "auto", "--report", str(report)]) == EXIT_OK
    assert json.loads(report.read_text())["prune"]["round_to"] == host_channel_block() in (8, 16)
    for bad in ("0", "-8", "eight"):
        assert main([str(tiny_cnn_path), str(tmp_path / "bad.onnx"), "--prune", "0.5", "--round-to", bad]) == EXIT_USAGE
        assert "positive integer or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


def test_prune_ratio_zero_keeps_weights(tiny_cnn):
    same = onnx_compress.compress(tiny_cnn, prune=0.0)
    plain = onnx_compress.compress(tiny_cnn)
    assert [np.asarray(onnx.numpy_helper.to_array(t)).tobytes() for t in same.graph.initializer] == [
        np.asarray(onnx.numpy_helper.to_array(t)).tobytes() for t in plain.graph.initializer
    ]


def test_quantize_then_prune_in_one_call(tiny_cnn_path, tmp_path, calib_npz):
    out, report = tmp_path / "pq.onnx", tmp_path / "r.json"
    rc = main([str(tiny_cnn_path), str(out), "--prune", "0.5", "--round-to", "1", "--quantize", "int8",
               "--calib", str(calib_npz), "--report", str(report), "-q"])
    assert rc == EXIT_OK
    data = json.loads(report.read_text())
    assert data["prune"] is not None and data["quantization"] is not None
    model = onnx.load(str(out))
    assert op_count(model, "QuantizeLinear") > 0 and op_count(model, "DequantizeLinear") > 0
    assert data["fidelity"]["min_cosine"] > 0.5


def test_quantize_ops_limits_what_is_quantized(tiny_cnn_path, tmp_path, calib_npz):
    out = tmp_path / "q.onnx"
    rc = main([str(tiny_cnn_path), str(out), "--quantize", "int8", "--calib", str(calib_npz),
               "--quantize-ops", "Conv", "--smooth", "0.5", "-q"])
    assert rc == EXIT_OK
    model = onnx.load(str(out))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert {n.op_type for n in weighted} >= {"Conv"} and len({n.op_type for n in weighted}) > 1
    for n in weighted:  # Conv weights are dequantized integers, the head's stay float initializers
        assert (producers.get(n.input[1]) == "DequantizeLinear") == (n.op_type == "Conv"), n.name


def test_target_numba_uses_full_8_bit_weights(tiny_cnn, calib_npz):
    def weight_codes(model):
        producers = {o: n for n in model.graph.node for o in n.output}
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv"  # depthwise ones are 8-bit for both
                 and not any(a.name == "group" and a.i > 1 for a in n.attribute)]
        return np.concatenate([inits[producers[c.input[1]].input[0]].ravel().astype(np.int16) for c in convs])

    ort_codes = weight_codes(onnx_compress.compress(tiny_cnn, quantize="int8", calib=str(calib_npz)))
    numba_codes = weight_codes(onnx_compress.compress(tiny_cnn, quantize="int8", calib=str(calib_npz), target="numba"))
    assert np.abs(ort_codes).max() <= 64  # 7-bit: safe from the AVX2 u8s8 int16 saturation
    assert np.abs(numba_codes).max() == 127  # symmetric per-channel 8-bit: the largest weight maps to 127


def test_image_folder_calibration_with_preprocessing_flags(tiny_cnn_path, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = main([str(tiny_cnn_path), str(out), "--quantize", "int8", "--calib", str(folder), "--image-size", "32",
               "--mean", "0.5,0.5,0.5", "--std", "0.25", "--report", str(report), "-q"])
    assert rc == EXIT_OK
    assert json.loads(report.read_text())["quantization"] is not None
    assert op_count(onnx.load(str(out)), "QuantizeLinear") > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--quantize", "int8"],  # no calibration data
        ["--reconstruct", "--prune", "0.3"],
        ["--prune", "1.5"],
        ["--importance", "nope", "--prune", "0.3"],
        ["--fuse", "--quantize", "int8", "--calib", "calib.npz"],
        ["--quantize", "int8", "--calib", "calib.npz", "--quantize-ops", "Conv,Softmax"],
        ["--quantize", "int8", "--calib", "calib.npz", "--smooth", "1.5"],
        ["--quantize", "int8", "--calib", "calib.npz", "--mean", "0.5,x"],
        ["--quantize", "int8", "--calib", "calib.npz", "--image-size", "0"],
    ],
)
def test_lossy_usage_errors_exit_2_and_write_nothing(tiny_cnn_path, tmp_path, args, capsys):
    out = tmp_path / "x.onnx"
    assert main([str(tiny_cnn_path), str(out), *args]) == EXIT_USAGE
    assert not out.exists()
    assert "error" in capsys.readouterr().err


def test_inspect_groups_lists_frozen_reasons(tiny_cnn_path, capsys):
    assert main(["inspect", "--groups", str(tiny_cnn_path)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "channel groups" in text and "FROZEN: graph input 'image'" in text
    assert main(["inspect", "--groups", "--json", str(tiny_cnn_path)]) == EXIT_OK
    groups = json.loads(capsys.readouterr().out)
    assert any(not g["frozen"] for g in groups)


def test_run_and_bench_subcommands(tiny_cnn_path, tmp_path, capsys):
    feeds, out = tmp_path / "feeds.npz", tmp_path / "out.npz"
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(feeds, image=x)
    assert main(["run", str(tiny_cnn_path), "--input", str(feeds), "--output", str(out), "--backend", "onnxruntime"]) == EXIT_OK
    with np.load(out) as data:
        assert data["logits"].shape == (2, 10)
    assert main(["bench", str(tiny_cnn_path), "--backend", "onnxruntime", "--repeats", "3", "--warmup", "1"]) == EXIT_OK
    assert "median" in capsys.readouterr().out

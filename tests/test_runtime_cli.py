"""``onnx_compress.runtime_cli``: the ``run`` and ``bench`` subcommands as Python functions, on a
small QDQ CNN quantized by ORT's ``quantize_static``."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from onnx_compress.runtime_cli import bench_command, run_command
from onnx_compress.verify import reference_session
from tests.test_runtime import _output_steps, _quantize


@pytest.fixture(scope="module")
def qdq_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "cnn_qdq.onnx"
    onnx.save_model(_quantize(folder, "u8"), str(path))
    return path


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_run_command_writes_every_output(qdq_path, tmp_path, backend):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", image=x)
    outputs = run_command(str(qdq_path), tmp_path / "feeds.npz", tmp_path / "out.npz", backend)
    with np.load(tmp_path / "out.npz") as saved:
        assert sorted(saved.files) == ["c3.r", "logits"]
        for name in saved.files:
            np.testing.assert_array_equal(saved[name], outputs[name])
    model = onnx.load_model(str(qdq_path))
    ref = reference_session(model).run(["logits"], {"image": x})[0]
    step = _output_steps(model)["logits"]  # numba and ORT's fused kernels: within two steps of the QDQ reference
    assert outputs["logits"].shape == (2, 10) and np.max(np.abs(outputs["logits"] - ref)) <= 2 * step + 1e-6
    assert not list(tmp_path.glob("*.npz.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == ["feeds.npz", "out.npz"]


def test_run_command_errors_name_the_file_or_tensor(qdq_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="input file '.*missing.npz' does not exist"):
        run_command(str(qdq_path), tmp_path / "missing.npz", tmp_path / "out.npz", "numba")
    np.savez(tmp_path / "bad.npz", img=np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown input 'img'"):
        run_command(str(qdq_path), tmp_path / "bad.npz", tmp_path / "out.npz", "numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        run_command(str(qdq_path), tmp_path / "bad.npz", tmp_path / "out.npz", "tvm")
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_command(str(qdq_path), tmp_path / "bad.npz", tmp_path / "bad.npz", "numba")
    assert not (tmp_path / "out.npz").exists()


def test_bench_command_prints_median_p90_and_ratio(qdq_path):
    buf = io.StringIO()
    result = bench_command(str(qdq_path), backend="both", batch=2, threads=1, repeats=3, warmup=1, out=buf)
    text = buf.getvalue()
    assert set(result["backends"]) == {"numba", "onnxruntime"}
    for name, fig in result["backends"].items():
        assert 0 < fig["median_ms"] <= fig["p90_ms"] and fig["runs"] == 3
        assert f"{name}" in text
    assert "median" in text and "p90" in text and "ratio numba / onnxruntime" in text
    ratio = result["backends"]["numba"]["median_ms"] / result["backends"]["onnxruntime"]["median_ms"]
    assert result["ratio_numba_over_onnxruntime"] == pytest.approx(ratio)
    single = bench_command(str(qdq_path), backend="onnxruntime", repeats=2, warmup=0, out=io.StringIO())
    assert list(single["backends"]) == ["onnxruntime"] and "ratio_numba_over_onnxruntime" not in single
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        bench_command(str(qdq_path), batch=0, out=io.StringIO())

"""Bad input on the command line. Every case asserts the documented exit code (see
``onnx_compress.cli``: 2 usage / output path, 3 invalid or unsupported model), a one-line error on
stderr that names the problem, nothing on stdout, the input byte-identical afterwards, and no output
(nor temporary) file left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress import cli
from onnx_compress.ir import io as ir_io


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"], name="act")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def run_cli(argv, capsys, folder: Path, expected_code: int, *must_mention: str) -> str:
    """Run the CLI and check everything every bad-input case must satisfy; return stderr."""
    before = _snapshot(folder)
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == expected_code, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-compress: ")
    for text in must_mention:
        assert text in lines[0], (text, lines[0])
    assert _snapshot(folder) == before  # input untouched, nothing written, no temp files
    return lines[0]


def _external(folder: Path, location: str) -> Path:
    model = _model()
    w = model.graph.initializer[0]
    payload = w.raw_data
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="length", value=str(len(payload)))
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    "name, content, mention",
    [
        ("empty.onnx", b"", "empty"),
        ("text.onnx", b"this is a text file, not a model\n", "not an ONNX model"),
        ("tensor.onnx", numpy_helper.from_array(np.arange(6, dtype=np.float32), "t").SerializeToString(),
         "not an ONNX model"),
        ("graph.onnx", _model().graph.SerializeToString(), "not an ONNX model"),
    ],
    ids=["empty", "text", "tensorproto", "graphproto"],
)
def test_not_a_model(work, capsys, name, content, mention):
    path = work / name
    path.write_bytes(content)
    run_cli([path, work / "out.onnx"], capsys, work, 3, name, mention)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_model(work, capsys, fraction):
    data = _model().SerializeToString()
    path = work / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    run_cli([path, work / "out.onnx"], capsys, work, 3, "truncated.onnx")


def test_unknown_op_domain(work, capsys):
    model = _model()
    model.graph.node[1].domain = "com.example.private"
    model.opset_import.append(helper.make_opsetid("com.example.private", 1))
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    run_cli([path, work / "out.onnx"], capsys, work, 3, "com.example.private", "act")


def test_opset_newer_than_onnx_supports(work, capsys):
    model = _model()
    newest = onnx.defs.onnx_opset_version()
    model.opset_import[0].version = newest + 3
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    run_cli([path, work / "out.onnx"], capsys, work, 3, f"opset {newest + 3}", str(newest))


def test_missing_external_data(work, capsys):
    path = _external(work, "weights.bin")
    run_cli([path, work / "out.onnx"], capsys, work, 3, "missing external data", "weights.bin")


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname"])
def test_external_data_escaping_the_folder(work, capsys, location):
    (work.parent / "outside.bin").write_bytes(b"\0" * 128)
    path = _external(work, location)
    run_cli([path, work / "out.onnx"], capsys, work, 3, location)


def test_external_data_symlink_escaping_the_folder(work, capsys):
    (work.parent / "outside.bin").write_bytes(b"\0" * 128)
    (work / "weights.bin").symlink_to(work.parent / "outside.bin")
    path = _external(work, "weights.bin")
    run_cli([path, work / "out.onnx"], capsys, work, 3, "escapes", "weights.bin")


def test_input_does_not_exist(work, capsys):
    run_cli([work / "absent.onnx", work / "out.onnx"], capsys, work, 3, "absent.onnx", "no such file")


def test_input_is_a_folder(work, capsys):
    (work / "dir.onnx").mkdir()
    run_cli([work / "dir.onnx", work / "out.onnx"], capsys, work, 3, "not a regular file")


# ---------------------------------------------------------------------------------------------
# output paths


@pytest.fixture
def model_path(work):
    path = work / "m.onnx"
    onnx.save_model(_model(), str(path))
    return path


def test_output_equal_to_input(work, capsys, model_path):
    run_cli([model_path, model_path], capsys, work, 2, "is the input")


def test_output_equal_to_input_by_another_spelling(work, capsys, model_path, monkeypatch):
    run_cli([model_path, work / "." / "sub" / ".." / "m.onnx"], capsys, work, 2, "is the input")
    monkeypatch.chdir(work)
    run_cli(["m.onnx", str(model_path)], capsys, work, 2, "is the input")


def test_output_equal_to_input_through_a_symlink(work, capsys, model_path):
    link = work / "link.onnx"
    link.symlink_to(model_path)
    run_cli([model_path, link], capsys, work, 2, "is the input")
    run_cli([link, model_path], capsys, work, 2, "is the input")


def test_output_equal_to_input_through_a_hard_link(work, capsys, model_path):
    os.link(model_path, work / "hard.onnx")
    run_cli([model_path, work / "hard.onnx"], capsys, work, 2, "is the input")


def test_output_over_the_inputs_external_data(work, capsys):
    """Writing the result over the input's weight file would destroy the input."""
    path = _external(work, "weights.bin")
    (work / "weights.bin").write_bytes(_model().graph.initializer[0].raw_data)
    run_cli([path, work / "weights.bin"], capsys, work, 2, "weights.bin")


def test_output_data_file_over_the_inputs_external_data(work, capsys):
    """``--external-data`` writes OUT.data: it must not land on the input's data file either."""
    path = _external(work, "out.onnx.data")
    (work / "out.onnx.data").write_bytes(_model().graph.initializer[0].raw_data)
    run_cli([path, work / "out.onnx", "--external-data"], capsys, work, 2, "out.onnx.data")


def test_report_path_equal_to_input(work, capsys, model_path):
    run_cli([model_path, work / "out.onnx", "--report", model_path], capsys, work, 2, "is the input")


def test_output_folder_missing(work, capsys, model_path):
    run_cli([model_path, work / "missing" / "out.onnx"], capsys, work, 2, "does not exist")


def test_output_is_a_folder(work, capsys, model_path):
    (work / "dir").mkdir()
    run_cli([model_path, work / "dir"], capsys, work, 2, "is a folder")


def test_output_folder_through_a_regular_file(work, capsys, model_path):
    """A path whose 'folder' is a regular file cannot be written, not even by root."""
    run_cli([model_path, model_path / "out.onnx"], capsys, work, 2, "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 folder anyway; "
                    "test_output_folder_unwritable_by_access covers the check")
def test_output_folder_unwritable(work, capsys, model_path):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        run_cli([model_path, locked / "out.onnx"], capsys, work, 2, "not writable")
    finally:
        locked.chmod(0o700)


def test_output_folder_unwritable_by_access(work, capsys, model_path, monkeypatch):
    locked = work / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(ir_io.os, "access",
                        lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    run_cli([model_path, locked / "out.onnx"], capsys, work, 2, "not writable", str(locked))


def test_output_folder_failing_mid_write(work, capsys, model_path, monkeypatch):
    """The folder looks writable, but creating the temporary file fails (read-only mount, quota)."""
    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(ir_io.tempfile, "mkdtemp", refuse)
    run_cli([model_path, work / "out.onnx"], capsys, work, 2, "Read-only file system")


def test_error_is_one_line_from_the_real_console_script(work, model_path):
    """End to end in a fresh process: the exit code and a single stderr line, nothing on stdout."""
    empty = work / "empty.onnx"
    empty.write_bytes(b"")
    for argv, code in (([empty, work / "o.onnx"], 3), ([model_path, model_path], 2)):
        proc = subprocess.run([sys.executable, "-m", "onnx_compress.cli", *map(str, argv)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (work / "o.onnx").exists()

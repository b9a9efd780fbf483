"""ir.io and ir.validate: loading (path, bytes, ModelProto, external data), refusing what cannot be
trusted, the supported opset range, opset normalisation and atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.ir import io as ir_io
from onnx_compress.ir.errors import InvalidModelError, OutputPathError, UnsupportedOpError
from onnx_compress.ir.validate import MIN_OPSET, default_opset, newest_opset, normalize_opset, validate_model
from tests.numerics import run


def _mlp(opset: int = 13, hidden: int = 64) -> onnx.ModelProto:
    """x[N,16] -> Gemm(W1, b1) -> Relu -> Gemm(W2) -> y[N,4]; weights large enough for external data."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    model.ir_version = 7
    return model


def _feed(batch: int = 3):
    return {"x": np.random.default_rng(1).standard_normal((batch, 16)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# loading


def test_load_from_path_bytes_and_proto_gives_the_same_model(tmp_path):
    model = _mlp()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    before = model.SerializeToString()
    from_path = ir_io.load_model(path)
    from_str_path = ir_io.load_model(str(path))
    from_bytes = ir_io.load_model(before)
    from_proto = ir_io.load_model(model)
    assert from_path.SerializeToString() == from_str_path.SerializeToString() == before
    assert from_bytes.SerializeToString() == before
    assert from_proto.SerializeToString() == before
    assert from_proto is not model
    assert model.SerializeToString() == before  # the given proto is not mutated
    from_proto.graph.node[0].name = "changed"
    assert model.graph.node[0].name == "fc1"  # a copy, not a view


def test_load_refuses_wrong_types_and_garbage(tmp_path):
    with pytest.raises(TypeError):
        ir_io.load_model(42)
    with pytest.raises(InvalidModelError, match="empty"):
        ir_io.load_model(b"")
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        ir_io.load_model(b"hello, this is text\n")
    with pytest.raises(InvalidModelError, match="no such file"):
        ir_io.load_model(tmp_path / "absent.onnx")
    with pytest.raises(InvalidModelError, match="not a regular file"):
        ir_io.load_model(tmp_path)
    data = _mlp().SerializeToString()
    with pytest.raises(InvalidModelError):
        ir_io.load_model(data[: len(data) // 2])


def test_load_onnx_external_data_from_folder(tmp_path):
    model = _mlp()
    path = tmp_path / "ext.onnx"
    to_save = onnx.ModelProto()
    to_save.CopyFrom(model)  # onnx.save_model moves the payload out of the proto it is given
    onnx.save_model(to_save, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    stored = onnx.load_model(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    loaded = ir_io.load_model(path)
    for t in loaded.graph.initializer:
        assert t.data_location == TensorProto.DEFAULT
    want = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # bytes of an external-data model need a base_dir
    with pytest.raises(InvalidModelError, match="external data"):
        ir_io.load_model(path.read_bytes())
    via_bytes = ir_io.load_model(path.read_bytes(), base_dir=tmp_path)
    assert via_bytes.SerializeToString() == loaded.SerializeToString()


def test_save_external_data_writes_data_file_and_reloads_identically(tmp_path):
    model = _mlp()
    out = tmp_path / "out.onnx"
    ir_io.save_model(model, out, external_data=True)
    data_file = tmp_path / "out.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size >= 16 * 64 * 4
    assert out.stat().st_size < data_file.stat().st_size
    stored = onnx.load_model(str(out), load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    reloaded = ir_io.load_model(out)
    assert reloaded.SerializeToString() == model.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def _external_model(tmp_path: Path, location: str) -> Path:
    """A model whose W1 points to ``location``; the other tensors stay inline."""
    model = _mlp()
    w1 = model.graph.initializer[0]
    payload = w1.raw_data or numpy_helper.to_array(w1).tobytes()
    w1.ClearField("raw_data")
    w1.ClearField("float_data")
    w1.data_location = TensorProto.EXTERNAL
    w1.external_data.add(key="location", value=location)
    w1.external_data.add(key="length", value=str(len(payload)))
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16 * 64 * 4)
    path = _external_model(tmp_path, location)
    with pytest.raises(InvalidModelError, match="escapes") as info:
        ir_io.load_model(path)
    assert location in str(info.value) and "W1" in str(info.value)


def test_external_data_absolute_location_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16 * 64 * 4)
    path = _external_model(tmp_path, str(secret))
    with pytest.raises(InvalidModelError, match="absolute") as info:
        ir_io.load_model(path)
    assert str(secret) in str(info.value)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16 * 64 * 4)
    path = _external_model(tmp_path, "weights.bin")
    (path.parent / "weights.bin").symlink_to(secret)
    with pytest.raises(InvalidModelError, match="escapes") as info:
        ir_io.load_model(path)
    assert "weights.bin" in str(info.value)


def test_missing_external_data_is_named(tmp_path):
    path = _external_model(tmp_path, "weights.bin")
    with pytest.raises(InvalidModelError, match="missing external data") as info:
        ir_io.load_model(path)
    assert "weights.bin" in str(info.value) and "W1" in str(info.value)


def test_short_external_data_file_is_invalid_not_a_crash(tmp_path):
    path = _external_model(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(InvalidModelError):
        ir_io.load_model(path)


# ---------------------------------------------------------------------------------------------
# validation


def test_validation_names_an_undefined_tensor():
    model = _mlp()
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(InvalidModelError, match="nowhere"):
        ir_io.load_model(model)


def test_validation_names_an_unknown_op():
    model = _mlp()
    model.graph.node[1].op_type = "Relux"
    with pytest.raises(InvalidModelError, match="Relux"):
        ir_io.load_model(model)


def test_validation_names_an_unknown_domain():
    model = _mlp()
    model.graph.node[1].domain = "com.example.secret"
    model.opset_import.append(helper.make_opsetid("com.example.secret", 1))
    with pytest.raises(UnsupportedOpError, match="com.example.secret") as info:
        ir_io.load_model(model)
    assert "act" in str(info.value)


def test_validation_names_a_shape_mismatch():
    model = _mlp()
    model.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.zeros((63, 4), np.float32), "W2")
    )
    with pytest.raises(InvalidModelError, match="shape inference"):
        ir_io.load_model(model)


def test_model_without_default_opset_is_invalid():
    model = _mlp()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    with pytest.raises(InvalidModelError, match="opset"):
        validate_model(model)


@pytest.mark.parametrize("opset", range(MIN_OPSET, onnx.defs.onnx_opset_version() + 1))
def test_supported_opsets_are_accepted(opset):
    model = _mlp(opset)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    loaded = ir_io.load_model(model)
    assert default_opset(loaded) == opset
    assert normalize_opset(loaded) is loaded  # nothing to convert


def test_opset_newer_than_onnx_is_unsupported():
    model = _mlp()
    model.opset_import[0].version = newest_opset() + 1
    with pytest.raises(UnsupportedOpError, match=f"opset {newest_opset() + 1}"):
        ir_io.load_model(model)


def test_old_opset_is_converted_with_same_outputs():
    """opset 9 Clip (min/max attributes) becomes opset 11 Clip (min/max inputs)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Clip", ["r"], ["y"], min=0.0, max=0.5)],
        "old", [x], [y],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    original = ir_io.load_model(model)
    converted = normalize_opset(original)
    assert default_opset(converted) == MIN_OPSET
    assert converted.ir_version >= onnx.helper.find_min_ir_version_for(list(converted.opset_import))
    clip = next(n for n in converted.graph.node if n.op_type == "Clip")
    assert len(clip.input) == 3 and not clip.attribute
    validate_model(converted)
    feed = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)}
    np.testing.assert_array_equal(run(converted, feed)[0], run(original, feed)[0])


def test_ir3_weights_listed_as_inputs_stay_weights_after_conversion():
    model = _mlp(8)
    model.ir_version = 3
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    onnx.checker.check_model(model)
    converted = normalize_opset(ir_io.load_model(model))
    assert converted.ir_version >= 6
    assert [i.name for i in converted.graph.input] == ["x"]
    onnx.checker.check_model(converted)
    np.testing.assert_allclose(run(converted, _feed())[0], run(model, _feed())[0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# saving


def test_save_refuses_to_overwrite_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_mlp().SerializeToString())
    before = path.read_bytes()
    with pytest.raises(OutputPathError, match="input"):
        ir_io.save_model(_mlp(hidden=8), path, protect=(path,))
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    with pytest.raises(OutputPathError, match="input"):
        ir_io.save_model(_mlp(hidden=8), link, protect=(path,))
    with pytest.raises(OutputPathError, match="input"):
        ir_io.save_model(_mlp(hidden=8), tmp_path / "." / "m.onnx", protect=(path,))
    assert path.read_bytes() == before


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failing_save_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir_io.os, "replace", boom)
    with pytest.raises(OutputPathError, match="No space left"):
        ir_io.save_model(_mlp(), tmp_path / "out.onnx")
    with pytest.raises(OutputPathError, match="No space left"):
        ir_io.save_model(_mlp(), tmp_path / "ext.onnx", external_data=True)
    assert _leftovers(tmp_path) == []


def test_existing_output_is_replaced_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    real_replace = os.replace

    def fail_on_model(src, dst):
        if Path(dst) == out:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ir_io.os, "replace", fail_on_model)
    with pytest.raises(OutputPathError):
        ir_io.save_model(_mlp(), out, external_data=True)
    assert out.read_bytes() == b"previous result"
    assert (tmp_path / "out.onnx.data").read_bytes() == b"previous data"
    assert _leftovers(tmp_path) == ["out.onnx", "out.onnx.data"]
    monkeypatch.setattr(ir_io.os, "replace", real_replace)
    ir_io.save_model(_mlp(), out)
    assert ir_io.load_model(out).SerializeToString() == _mlp().SerializeToString()
    assert _leftovers(tmp_path) == ["out.onnx", "out.onnx.data"]


def test_save_to_missing_folder_or_folder_path(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        ir_io.save_model(_mlp(), tmp_path / "missing" / "out.onnx")
    with pytest.raises(OutputPathError, match="folder"):
        ir_io.save_model(_mlp(), tmp_path)
    assert _leftovers(tmp_path) == []

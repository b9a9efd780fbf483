"""Loading and saving ONNX models without loss.

``load_model`` accepts a path, the serialized bytes or a ``ModelProto``. External data
(``model.onnx.data`` and friends) is loaded from the model's folder; a location that is absolute
or escapes that folder (``../secret``, a symlink pointing outside) is refused before anything is
read. ``save_model`` writes atomically: everything goes to a temporary folder beside the target
and is moved into place with ``os.replace`` only once complete, so a failure leaves no partial
output and an existing file is never half-overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import InvalidModelError, OutputPathError
from .validate import validate_model

logger = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

#: protobuf cannot serialize a message of 2 GiB or more; above this we write external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
#: tensors at least this large go to the external data file when saving as external data.
EXTERNAL_DATA_MIN_BYTES = 1024


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers and Constant/attribute tensors, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def _check_external_locations(model: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    for tensor in iter_tensors(model.graph):
        location = _external_location(tensor)
        if location is None:
            continue
        if not location:
            raise InvalidModelError(f"tensor '{tensor.name}' is stored externally but has no location")
        if os.path.isabs(location):
            raise InvalidModelError(
                f"external data of tensor '{tensor.name}' has an absolute location '{location}'; "
                "only files inside the model's folder are read"
            )
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise InvalidModelError(
                f"external data location '{location}' of tensor '{tensor.name}' escapes the "
                f"model's folder {base}"
            )
        if not target.is_file():
            raise InvalidModelError(
                f"missing external data: tensor '{tensor.name}' needs '{location}', "
                f"not found in {base}"
            )


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{origin} is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(f"{origin} is not an ONNX model (protobuf parse failed: {exc})") from exc
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InvalidModelError(
            f"{origin} is not an ONNX model (no graph or no ir_version in the protobuf)"
        )
    return model


def load_model(
    source: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    validate: bool = True,
) -> onnx.ModelProto:
    """Load a model from a path, bytes or a ModelProto; external data is resolved and checked.

    ``base_dir`` is where external data is looked up for bytes / ModelProto sources (for a path
    it is the file's folder). A ModelProto source is copied, never mutated. With ``validate``
    the model goes through :func:`validate_model` (checker, shape inference, opset range).
    """
    serialized = None  # the bytes parsed, reused by the checker (serializing 100 MB takes 0.5 s)
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        origin = "model"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        serialized = bytes(source)
        model = _parse(serialized, "the given bytes")
        origin = "model bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InvalidModelError(f"{path}: no such file")
        if not path.is_file():
            raise InvalidModelError(f"{path}: not a regular file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidModelError(f"{path}: cannot read ({exc.strerror})") from exc
        model = _parse(data, str(path))
        serialized = data
        base_dir = path.parent
        origin = str(path)
    else:
        raise TypeError(f"load_model expects a path, bytes or ModelProto, got {type(source).__name__}")

    has_external = any(_external_location(t) is not None for t in iter_tensors(model.graph))
    if has_external:
        serialized = None
        if base_dir is None:
            raise InvalidModelError(
                f"{origin} stores tensors as external data; pass a path (or base_dir) so they can be found"
            )
        _check_external_locations(model, Path(base_dir))
        try:
            external_data_helper.load_external_data_for_model(model, str(base_dir))
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{origin}: cannot load external data ({exc})") from exc
        for tensor in iter_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.DEFAULT:
                tensor.ClearField("data_location")  # loaded inline: same bytes as never-external
    if validate:
        validate_model(model, origin=origin, serialized=serialized)
    return model


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor payload in the model (what decides whether it fits in one protobuf)."""
    total = 0
    for tensor in iter_tensors(model.graph):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += tensor.ByteSize()
    return total


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _input_files(path: Path) -> list[Path]:
    """The model file and the external data files it names: none may be written over."""
    files = [path]
    if not path.is_file():
        return files
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: loading will say so; protect the file itself
        return files
    for tensor in iter_tensors(model.graph):
        location = _external_location(tensor)
        if location:
            files.append(path.parent / location)
    return files


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse output paths that would overwrite an input or cannot be written; return it resolved.

    An input is the model file and its external data files; the output's own data file
    (``OUT.data``, written with external data) must not be one of them either.
    """
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    out_data = folder / (out.name + ".data")
    for inp in inputs:
        if inp is None:
            continue
        for index, protected in enumerate(_input_files(Path(inp))):
            what = "the input file" if index == 0 else f"external data {protected} of the input"
            if _same_file(out, protected):
                raise OutputPathError(f"output path {out} is {what}; refusing to overwrite the input")
            if _same_file(out_data, protected):
                raise OutputPathError(
                    f"output data file {out_data} is {what}; refusing to overwrite the input"
                )
    if out.exists() and out.is_dir():
        raise OutputPathError(f"output path {out} is a folder")
    if not folder.is_dir():
        raise OutputPathError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable")
    return out


def _move_into_place(tmp_dir: Path, tmp_model: Path, out: Path, data_name: str | None) -> None:
    """Rename the finished files over the targets; on failure restore what was there before.

    The model goes last. A data file is moved first (the model refers to it); an existing data
    file of that name is parked in ``tmp_dir`` and put back if the model cannot be moved, so a
    failure never leaves a new data file beside an old model.
    """
    folder = out.parent
    new_data = tmp_dir / data_name if data_name else None
    if new_data is None or not new_data.exists():
        os.replace(tmp_model, out)
        return
    target = folder / data_name
    parked = tmp_dir / (data_name + ".previous")
    had_previous = target.exists()
    if had_previous:
        os.replace(target, parked)
    try:
        os.replace(new_data, target)
        os.replace(tmp_model, out)
    except OSError:
        try:
            if had_previous:
                os.replace(parked, target)
            elif target.exists():
                target.unlink()
        except OSError:
            logger.warning("could not restore %s after a failed save", target)
        raise


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``external_data``: ``True`` always writes tensors to ``<name>.data`` beside the model,
    ``False`` never (fails for models over 2 GiB), ``None`` (default) only when needed.
    ``protect``: paths (the inputs) that must never be overwritten.
    """
    out = check_output_path(path, *protect)
    if external_data is None:
        external_data = tensor_bytes(model) >= PROTOBUF_LIMIT_BYTES - 64 * 1024 * 1024
    folder = out.parent if str(out.parent) else Path(".")
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputPathError(f"cannot write in {folder}: {exc.strerror}") from exc
    try:
        tmp_model = tmp_dir / out.name
        data_name = out.name + ".data"
        if external_data:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            external_data_helper.convert_model_to_external_data(
                to_write,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_DATA_MIN_BYTES,
                convert_attribute=True,
            )
            onnx.save_model(to_write, str(tmp_model))
        else:
            try:
                data = model.SerializeToString()
            except ValueError as exc:
                raise OutputPathError(
                    f"model is too large for a single protobuf ({exc}); save with external_data=True"
                ) from exc
            tmp_model.write_bytes(data)
        _move_into_place(tmp_dir, tmp_model, out, data_name if external_data else None)
    except OSError as exc:
        raise OutputPathError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.debug("saved %s (external data: %s)", out, external_data)
    return out

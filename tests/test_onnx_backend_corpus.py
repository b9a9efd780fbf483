"""Corpus test: every model of onnx's own backend tests goes load -> default pipeline -> save -> reload.

Sources: the model files shipped with onnx (``onnx/backend/test/data/{node,simple,
pytorch-converted,pytorch-operator}/*/model.onnx`` with their ``test_data_set_*/input_*.pb``) and,
when the wheel ships no ``node/`` folder (onnx 1.23 does not), the node test cases generated in
memory by ``onnx.backend.test.case.node.collect_testcases()`` (the same models and data the
``node/`` folder is written from).

For each model:

* our validation may refuse it, but only with ``InvalidModelError``/``UnsupportedModelError``;
  anything else (a ``PassError`` from the pipeline included) is a crash and fails the test;
* the compressed model is saved atomically, reloaded through our loader and must be byte-identical
  to what was saved;
* where ONNX Runtime (``ORT_DISABLE_ALL``) runs the original on the test's own inputs, the
  compressed model must give the same outputs: same dtype and shape, non-float outputs identical,
  float outputs within ``PARITY_TOL`` (1e-5; float16: 4 * 2**-11) of each output's range
  (``max|a-b| <= tol * ptp(a)``) with NaN/Inf at the same positions;
* where the original's outputs match the test's expected outputs (the case's own rtol/atol), the
  compressed model's must match them too.

The fast suite runs all model files and every 8th generated node case (deterministic, by sorted
name); ``-m slow`` runs every generated case. Categories are counted per shard and printed with
``-s``/``-rA``.
"""

from __future__ import annotations

import collections
import functools
import glob
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_compress
from onnx_compress.ir import io as ir_io
from onnx_compress.ir.errors import InvalidModelError, UnsupportedModelError
from onnx_compress.verify import compare_outputs, reference_session

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDERS = ("node", "simple", "pytorch-converted", "pytorch-operator")
#: fp32 rounding of folded weights (BatchNorm into Conv) stays far below this
PARITY_TOL = 1e-5
#: float16 keeps 11 significant bits: a folded subexpression rounded once instead of per op moves
#: an output by a few units of 2**-11 of its magnitude; 4 such units of the output range
PARITY_TOL_BY_DTYPE = {np.dtype(np.float16): 4 * 2.0**-11}
FAST_STRIDE = 8
SHARDS = 8


def _disk_models() -> list[Path]:
    found = []
    for folder in FOLDERS:
        found.extend(sorted(Path(p) for p in glob.glob(str(DATA / folder / "*" / "model.onnx"))))
    return found


DISK_MODELS = _disk_models()
HAS_NODE_FOLDER = any(p.parent.parent.name == "node" for p in DISK_MODELS)


@functools.lru_cache(maxsize=1)
def _generated_cases() -> tuple:
    """(name, model, [(inputs, outputs)], rtol, atol) for onnx's node test cases, sorted by name."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    out = []
    for case in cases:
        if case.model is None:
            continue
        data_sets = [([_as_value(v) for v in inputs], [_as_value(v) for v in outputs])
                     for inputs, outputs in case.data_sets or []]
        out.append((case.name, case.model, data_sets, case.rtol, case.atol))
    return tuple(sorted(out, key=lambda c: c[0]))


def _as_value(value):
    """Generated cases hold TensorProtos where numpy has no dtype for the data: convert them."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_as_value(v) for v in value]
    return value


def _read_data(path: Path):
    data = path.read_bytes()
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    if tensor.name or tensor.dims or tensor.raw_data or tensor.data_type:
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - fall through to the other container types
            pass
    seq = onnx.SequenceProto()
    seq.ParseFromString(data)
    if seq.elem_type:
        return numpy_helper.to_list(seq)
    opt = onnx.OptionalProto()
    opt.ParseFromString(data)
    return numpy_helper.to_optional(opt)


def _disk_data_sets(model_path: Path):
    sets = []
    for folder in sorted(model_path.parent.glob("test_data_set_*")):
        inputs = [_read_data(p) for p in sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        outputs = [_read_data(p) for p in sorted(folder.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        sets.append((inputs, outputs))
    return sets


def _flatten(values) -> list:
    """Outputs as a flat list of arrays (sequence outputs are expanded, None kept as None)."""
    flat = []
    for v in values:
        if isinstance(v, list):
            flat.append(("seq", len(v)))
            flat.extend(np.asarray(x) for x in v)
        else:
            flat.append(v if v is None else np.asarray(v))
    return flat


def _assert_same(ref, cand, label: str) -> None:
    ref, cand = _flatten(ref), _flatten(cand)
    assert len(ref) == len(cand), f"{label}: {len(ref)} outputs (with sequence items) vs {len(cand)}"
    for i, (r, c) in enumerate(zip(ref, cand)):
        if isinstance(r, tuple) or r is None:
            assert not isinstance(c, np.ndarray) and r == c, f"{label}: output {i} structure differs"
            continue
        assert r.dtype == c.dtype and r.shape == c.shape, (
            f"{label}: output {i} is {c.dtype}{c.shape}, original {r.dtype}{r.shape}"
        )
        if r.dtype.kind in "OUS":  # strings
            assert np.array_equal(r, c), f"{label}: string output {i} differs"
            continue
        tolerance = PARITY_TOL_BY_DTYPE.get(r.dtype, PARITY_TOL)
        (comparison,) = compare_outputs([r], [c], [f"output {i}"], tolerance)
        assert comparison.passed, (
            f"{label}: output {i} differs: max |diff| {comparison.max_abs_diff:.3g} "
            f"({comparison.rel_diff:.3g} of range) or NaN/Inf positions differ"
        )


def _matches_expected(actual, expected, rtol: float, atol: float) -> bool:
    actual, expected = _flatten(actual), _flatten(expected)
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected):
        if isinstance(e, tuple) or e is None:
            if isinstance(a, np.ndarray) or a != e:
                return False
            continue
        if a.shape != e.shape:
            return False
        if e.dtype.kind in "OUS":
            if not np.array_equal(a.astype(object), e.astype(object)):
                return False
            continue
        try:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
        except (AssertionError, TypeError, ValueError):
            return False
    return True


def check_model(name: str, model_or_path, data_sets, rtol: float, atol: float, tmp_path: Path) -> str:
    """Run one corpus model through the pipeline; return its category (raises on a real failure)."""
    try:
        original = ir_io.load_model(model_or_path)
        compressed = onnx_compress.compress(original, verify=False)
    except (InvalidModelError, UnsupportedModelError) as exc:
        return f"refused: {type(exc).__name__}"
    # anything else propagates: a crash is a failure

    out = tmp_path / f"{name}.onnx"
    ir_io.save_model(compressed, out)
    reloaded = ir_io.load_model(out)
    assert reloaded.SerializeToString() == compressed.SerializeToString(), f"{name}: reload differs from saved"
    assert [o.name for o in reloaded.graph.output] == [o.name for o in original.graph.output], name
    out.unlink()

    if not data_sets:
        return "no test data"
    try:
        ref_sess = reference_session(original)
    except UnsupportedModelError:
        return "ORT cannot load original"
    cand_sess = reference_session(reloaded)
    feed_names = [i.name for i in ref_sess.get_inputs()]
    assert [i.name for i in cand_sess.get_inputs()][: len(feed_names)] == feed_names, f"{name}: inputs changed"
    result = "parity"
    for index, (inputs, expected) in enumerate(data_sets):
        feed = {n: v for n, v in zip(feed_names, inputs)}
        try:
            ref = ref_sess.run(None, feed)
        except Exception:  # noqa: BLE001 - ORT refusing the original is not our concern
            return "ORT cannot run original"
        cand = cand_sess.run(None, feed)
        _assert_same(ref, cand, f"{name} data set {index}")
        if expected and _matches_expected(ref, expected, rtol, atol):
            assert _matches_expected(cand, expected, rtol, atol), (
                f"{name} data set {index}: original matched the expected outputs, compressed does not"
            )
        elif expected:
            result = "parity (ORT itself differs from expected)"
    return result


def _report(counts: collections.Counter, label: str) -> None:
    print(f"\n{label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@pytest.mark.parametrize("path", DISK_MODELS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_disk_model_round_trips_with_parity(path, tmp_path):
    category = check_model(path.parent.name, path, _disk_data_sets(path), 1e-3, 1e-7, tmp_path)
    # every model file on disk ships test data; ORT runs all of them at this onnx/ORT pairing
    assert category.startswith("parity") or category.startswith("refused") or category.startswith("ORT cannot"), category


def test_disk_corpus_is_present_and_mostly_accepted(tmp_path):
    """The corpus exists, and our validation accepts the bulk of it (a refusal of everything would
    make the parity tests above vacuous)."""
    assert len(DISK_MODELS) >= 100
    counts = collections.Counter()
    for path in DISK_MODELS:
        try:
            ir_io.load_model(path)
            counts["accepted"] += 1
        except (InvalidModelError, UnsupportedModelError) as exc:
            counts[f"refused: {type(exc).__name__}"] += 1
    _report(counts, "disk corpus")
    assert counts["accepted"] >= 0.9 * len(DISK_MODELS), counts


def _run_shard(shard: int, stride: int, tmp_path: Path) -> collections.Counter:
    cases = _generated_cases()
    selected = [c for i, c in enumerate(cases) if i % stride == 0][shard::SHARDS]
    counts: collections.Counter = collections.Counter()
    failures = []
    for name, model, data_sets, rtol, atol in selected:
        try:
            counts[check_model(name, model, data_sets, rtol, atol, tmp_path)] += 1
        except Exception as exc:  # noqa: BLE001 - collected and reported together below
            first = (str(exc).strip().splitlines() or [""])[0]
            failures.append(f"{name}: {type(exc).__name__}: {first}")
    _report(counts, f"node cases shard {shard}")
    assert not failures, f"{len(failures)} of {len(selected)} cases failed:\n" + "\n".join(failures)
    assert counts["parity"] > 0 or len(selected) < 10, counts
    return counts


@pytest.mark.skipif(HAS_NODE_FOLDER, reason="node/ models ship on disk and are covered above")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_generated_node_cases_subset(shard, tmp_path):
    _run_shard(shard, FAST_STRIDE, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(HAS_NODE_FOLDER, reason="node/ models ship on disk and are covered above")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_generated_node_cases_full(shard, tmp_path):
    _run_shard(shard, 1, tmp_path)

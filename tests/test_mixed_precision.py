"""Mixed precision: the most sensitive layers stay float until held-back agreement is met."""

from __future__ import annotations

import math

from onnx_compress.quantize import quantize
from tests.numerics import op_count
from tests.test_bias_correction import _feeds, _model


def test_min_agreement_keeps_most_sensitive_layers_float_and_reports():
    model = _model(4)
    feeds = _feeds(5, 16)
    plain, base = quantize(model, feeds, holdout=4, bias_correction=False, report_kernels=False, progress=False)
    assert base.holdout is not None and base.holdout.samples == 4 * 2  # batch rows of the held-back feeds
    assert base.float_layers == [] and base.samples == 24
    quantized, report = quantize(model, feeds, min_agreement=1.0, holdout=4, bias_correction=False,
                                 report_kernels=False, progress=False)
    # reported: per-layer SQNR (ascending: most sensitive first), held-back top-1 and cosine
    sqnr = [s.sqnr_db for s in report.sensitivity]
    assert sqnr == sorted(sqnr) and all(not math.isnan(v) for v in sqnr)
    assert report.holdout.top1 == 1.0 and report.holdout.cosine >= base.holdout.cosine
    assert report.as_dict()["holdout_agreement"]["top1"] == 1.0
    # the float layers are a prefix of the sensitivity order, and they really are float
    order = [s.node for s in report.sensitivity]
    assert report.float_layers == order[: len(report.float_layers)]
    assert base.holdout.top1 == 1.0 or report.float_layers
    float_convs = sum(1 for n in report.float_layers if n in ("dw", "pw"))
    weight_dqs = op_count(quantized, "DequantizeLinear") - op_count(plain, "DequantizeLinear")
    assert weight_dqs <= 0 if float_convs else weight_dqs == 0

"""The one strict numerics helper for tests (DESIGN.md convention 6).

``assert_parity(original, candidate)`` runs both models on ONNX Runtime's CPU provider with
``ORT_DISABLE_ALL`` on seeded random inputs (and on ``feeds`` when given), checks the candidate
with ``onnx.checker.check_model(full_check=True)``, and asserts every output agrees within
``rel_tol`` of that output's range (fp32 default 1e-5). There is no default that passes anything.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx

from onnx_compress.verify import compare_outputs, random_feeds, reference_session


def run(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return reference_session(model).run(None, dict(feed))


def assert_parity(
    original: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    rel_tol: float = 1e-5,
    samples: int = 2,
    seed: int = 0,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    full_check: bool = True,
) -> list:
    assert 0 < rel_tol < 0.01, "a parity tolerance this loose proves nothing"
    if full_check:
        onnx.checker.check_model(candidate, full_check=True)
    all_feeds = list(feeds or [])
    if samples:
        all_feeds = random_feeds(original, count=samples, seed=seed, input_shapes=input_shapes) + all_feeds
    assert all_feeds, "no inputs to compare on"
    ref_sess, cand_sess = reference_session(original), reference_session(candidate)
    names = [o.name for o in ref_sess.get_outputs()]
    assert names == [o.name for o in cand_sess.get_outputs()], "output names differ"
    comparisons = []
    for feed in all_feeds:
        ref = ref_sess.run(None, dict(feed))
        cand = cand_sess.run(None, dict(feed))
        for c in compare_outputs(ref, cand, names, rel_tol):
            assert c.passed, (
                f"output '{c.name}' differs: max |diff| {c.max_abs_diff:.3g} = {c.rel_diff:.3g} of its range "
                f"(allowed {rel_tol:g})"
            )
            comparisons.append(c)
    return comparisons


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def constant_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of ``model`` by name: initializers and ``Constant`` nodes' ``value``."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out

"""Reconstruction without training (``prune(..., reconstruct=True, calib=...)``).

* Accuracy on real labels: a small CNN trained here on scikit-learn's digits (seeded, a few
  seconds of CPU training, torch legacy export with BatchNormalization kept). At 30 % of the
  channels removed, refitting the consumers by ridge least squares keeps test accuracy within
  1 point of the original and beats plain l1 pruning; both figures are printed.
* The least-squares math on a single Conv -> Conv pair: with the removed channels' activation
  constant (ReLU of a negative bias is 0, HardSigmoid of 0 is 0.5), the refit folds the
  constant into the consumer bias and reproduces the original output exactly (to fp32), which
  plain pruning does not.
* im2col agrees with a direct convolution (strides, padding, dilation).
* Streaming: the statistics are the same whether the calibration data comes as one batch or
  sample by sample, and their size does not depend on the number of samples; the full-Gram
  form of the statistics and fitting only the kept outputs give the same solution.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.dependency_graph.reconstruct import im2col
from onnx_compress.prune import prune


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits_model():
    from tests.digits import digits_split, pruning_digits_net, train_and_export

    x_train, y_train, x_test, y_test = digits_split(1300)
    model = train_and_export(pruning_digits_net, x_train, y_train, epochs=6, lr=1e-2, output_name="y",
                             seeded_shuffle=True)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    return model, x_train, x_test, y_test


def _accuracy(model, x, y) -> float:
    return float((_session(model).run(None, {"x": x})[0].argmax(1) == y).mean() * 100)


def test_reconstruct_keeps_digits_accuracy_and_beats_l1(digits_model, tmp_path):
    model, x_train, x_test, y_test = digits_model
    base = _accuracy(model, x_test, y_test)
    assert base > 90.0  # the net really learned the task
    plain, plain_report = prune(model, 0.3)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x_train[:256])  # the .npz form the CLI takes
    fitted, report = prune(model, 0.3, reconstruct=True, calib=str(calib))
    acc_plain, acc_fit = _accuracy(plain, x_test, y_test), _accuracy(fitted, x_test, y_test)
    print(f"\ndigits accuracy: original {base:.2f} %, l1 30 % {acc_plain:.2f} %, "
          f"l1 + reconstruct 30 % {acc_fit:.2f} %; MACs {report.macs_after / report.macs_before:.3f}")
    # structure: same plan, same shapes, the consumers of every pruned group were refitted
    assert report.plan == plain_report.plan
    assert report.macs_after == plain_report.macs_after < report.macs_before
    # every consumer of a pruned group was refitted (Flatten -> fc1 included)
    assert set(report.reconstructed) == {"/c2/Conv", "/c3/Conv", "/fc1/Gemm", "/fc2/Gemm"}
    assert report.calib_samples == 256
    assert acc_fit >= base - 1.0
    assert acc_fit > acc_plain


def _conv_pair(act: str, bias1: np.ndarray):
    """x -> Conv(w1, bias1) -> act -> Conv(w2, b2) -> y, 1x1 then 3x3 (padding 0)."""
    rng = np.random.default_rng(0)
    c = bias1.size
    w1 = rng.standard_normal((c, 3, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(bias1.astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((5, c, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        helper.make_node(act, ["h"], ["a"], name="act"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w1


@pytest.mark.parametrize("act", ["Relu", "HardSigmoid"])
def test_constant_channels_fold_into_the_consumer_bias(act):
    c = 16
    bias = np.full(c, 0.2)
    model, w1 = _conv_pair(act, bias)
    # make 4 channels dead: zero weights, so the activation is act(bias) = constant;
    # those have the lowest l1 and are the ones removed at ratio 0.25
    dead = np.array([1, 5, 9, 14])
    w1[dead] = 0
    if act == "Relu":
        bias[dead] = -1.0  # Relu(-1) = 0 but Relu(0.2) would be 0.2: both cases are constants
        bias[dead[:2]] = 0.7
    for init in model.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(numpy_helper.from_array(w1, "w1"))
        if init.name == "b1":
            init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "b1"))
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(8)]
    plain, report = prune(model, 0.25, round_to=1)
    fitted, report_fit = prune(model, 0.25, round_to=1, reconstruct=True, calib=calib, ridge=1e-9)
    assert sorted(set(range(c)) - set(report.plan[next(iter(report.plan))])) == dead.tolist()
    assert report_fit.reconstructed == ["conv2"]
    assert numpy_helper.to_array(next(t for t in fitted.graph.initializer if t.name == "w2")).shape == (5, 12, 3, 3)
    x = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)
    ref = _session(model).run(None, {"x": x})[0]
    out_fit = _session(fitted).run(None, {"x": x})[0]
    out_plain = _session(plain).run(None, {"x": x})[0]
    scale = float(np.abs(ref).max())
    assert np.abs(out_fit - ref).max() <= 1e-4 * scale  # the constants went into the bias
    assert np.abs(out_plain - ref).max() > 1e-2 * scale  # plain pruning loses them


@pytest.mark.parametrize("stride,pad,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_im2col_matches_a_direct_convolution(stride, pad, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad, dilation=dilation).numpy()
    geometry = ([3, 2], [stride, stride], [dilation, dilation], [pad, pad, pad, pad])
    cols = im2col(x, *geometry)
    n, c_out, oh, ow = ref.shape
    got = (cols @ w.reshape(4, -1).T).reshape(n, oh, ow, c_out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # gathering selected rows equals slicing the full matrix
    rows = np.array([0, 3, oh * ow - 1, oh * ow + 2, 2 * oh * ow - 1])
    np.testing.assert_array_equal(im2col(x, *geometry, rows=rows), cols[rows])


def test_statistics_are_streamed_and_batching_free():
    from onnx_compress.dependency_graph.reconstruct import LayerFit

    rng = np.random.default_rng(0)
    model, _ = _conv_pair("Relu", np.zeros(8))
    node = type("N", (), {"name": "n", "op": "Conv", "attrs": {}})()
    w2d = rng.standard_normal((5, 8 * 9))
    keep = np.repeat(np.arange(8) % 3 != 0, 9)
    data = rng.standard_normal((12, 8, 6, 6)).astype(np.float32)
    geometry = ([3, 3], [1, 1], [1, 1], [0, 0, 0, 0])
    one = LayerFit(node, "conv", "x", w2d, np.zeros(5), keep, np.ones(5, bool), True, geometry, np.float64)
    many = LayerFit(node, "conv", "x", w2d, np.zeros(5), keep, np.ones(5, bool), True, geometry, np.float64)
    fast = LayerFit(node, "conv", "x", w2d, np.zeros(5), keep, np.ones(5, bool), True, geometry)  # float32
    one.update(data)
    fast.update(data[:5])
    fast.update(data[5:])
    sizes = []
    for i in range(12):
        many.update(data[i : i + 1])
        sizes.append(many.xx.nbytes + many.xy.nbytes + many.sum_x.nbytes + many.sum_y.nbytes)
    assert len(set(sizes)) == 1  # flat in the number of samples
    assert one.n == many.n == 12 * 16
    # each accumulates around its own first batch's shift; the solution does not depend on it
    # (up to the float32 targets W x, computed per batch: 1e-6 of the weights' scale)
    w1, b1 = one.solve(1e-6)
    w2, b2 = many.solve(1e-6)
    np.testing.assert_allclose(w1, w2, atol=1e-6 * np.abs(w1).max())
    np.testing.assert_allclose(b1, b2, atol=1e-6 * np.abs(b1).max())
    assert w1.shape == (5, int(keep.sum()))
    # and it is the exact least-squares solution computed in one go
    rows = im2col(data, *geometry).astype(np.float64)
    xk = np.hstack([rows[:, keep], np.ones((rows.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(xk, rows @ w2d.T, rcond=None)
    np.testing.assert_allclose(w1, coef[:-1].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b1, coef[-1], rtol=1e-4, atol=1e-4)
    # float32 products on shifted data: float32-level agreement (well-conditioned here)
    w3, b3 = fast.solve(1e-6)
    scale = np.abs(w1).max()
    np.testing.assert_allclose(w3, w1, atol=1e-4 * scale)
    np.testing.assert_allclose(b3, b1, atol=1e-4 * np.abs(b1).max())


def test_full_gram_form_and_kept_outputs_give_the_same_fit():
    """The Gram of all D features (targets' moments derived at solve time) is the same fit as
    accumulating the kept features against ``W x``; fitting only the kept outputs gives their rows."""
    from onnx_compress.dependency_graph.reconstruct import LayerFit

    rng = np.random.default_rng(2)
    node = type("N", (), {"name": "n", "op": "Conv", "attrs": {}})()
    w2d = rng.standard_normal((6, 4 * 9))
    bias = rng.standard_normal(6)
    keep = np.repeat(np.array([True, False, True, True]), 9)
    outs = np.array([True, False, True, True, False, True])
    data = rng.standard_normal((10, 4, 5, 5)).astype(np.float32) + 0.5
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1])
    fits = {
        (full, part, icpt): LayerFit(node, "conv", "x", w2d, bias, keep, outs if part else np.ones(6, bool), icpt,
                                     geometry, np.float64, full_gram=full)
        for full in (False, True) for part in (False, True) for icpt in (True, False)
    }
    for f in fits.values():
        f.update(data[:4])
        f.update(data[4:])
    assert fits[(True, False, True)].xx.shape == (36, 36) and fits[(True, False, True)].xy is None
    assert fits[(False, False, True)].xx.shape == (27, 27) and fits[(False, False, True)].xy.shape == (27, 6)
    for icpt in (True, False):
        w_ref, b_ref = fits[(False, False, icpt)].solve(1e-4)
        assert w_ref.shape == (6, 27)
        for full in (False, True):
            for part in (False, True):
                w, b = fits[(full, part, icpt)].solve(1e-4)
                sel = outs if part else np.ones(6, bool)
                # (the per-row form computes its targets W x in float32: 1e-6 of the scale)
                np.testing.assert_allclose(w, w_ref[sel], rtol=0, atol=1e-6 * np.abs(w_ref).max())
                np.testing.assert_allclose(b, b_ref[sel], rtol=0, atol=1e-6 * np.abs(b_ref).max())
    # auto: a 3x3 conv with few outputs accumulates the kept features; a 1x1 that expands, all of them
    narrow = rng.standard_normal((16, 64 * 9))  # D = 576, |K| = 405: D^2 > |K|^2 + 2 |K| C + 2 D C
    assert not LayerFit(node, "conv", "x", narrow, np.zeros(16), np.repeat(np.arange(64) < 45, 9), np.ones(16, bool),
                        True, geometry).full_gram
    wide = rng.standard_normal((64, 8))
    assert LayerFit(node, "conv", "x", wide, np.zeros(64), np.arange(8) < 6, np.ones(64, bool), True,
                    ([1, 1], [1, 1], [1, 1], [0, 0, 0, 0])).full_gram


def test_fit_shrinks_toward_the_pruned_weights_not_zero():
    """The penalty is ``lam ||A - W_K||^2``: no rows (or ``lam -> inf``) return ``W_K`` exactly,
    a well-determined system returns ordinary least squares, and the directions an
    underdetermined system (fewer rows than kept inputs) cannot see keep ``W_K`` instead of 0."""
    from onnx_compress.dependency_graph.reconstruct import LayerFit

    rng = np.random.default_rng(3)
    node = type("N", (), {"name": "fc", "op": "Gemm", "attrs": {}})()
    d, c_out = 40, 7
    w2d = rng.standard_normal((c_out, d))
    bias = rng.standard_normal(c_out)
    keep = np.arange(d) % 4 != 0  # 30 kept inputs
    outs = np.arange(c_out) != 2
    prior = w2d[np.ix_(outs, keep)]

    def fit(**kw):
        return LayerFit(node, "gemm", "x", w2d, bias, keep, outs, True, None, np.float64, **kw)

    # no rows: plain pruning, bit for bit
    empty = fit()
    w0, b0 = empty.solve(1e-3)
    np.testing.assert_array_equal(w0, prior)
    np.testing.assert_array_equal(b0, bias[outs])
    # lam -> inf: the data no longer matters
    x = (rng.standard_normal((500, d)) + 0.3).astype(np.float32).astype(np.float64)  # what the fit reads
    strong = fit()
    strong.update(x)
    w_inf, _ = strong.solve(1e12)
    np.testing.assert_allclose(w_inf, prior, rtol=0, atol=1e-9 * np.abs(prior).max())
    # well-determined (500 rows, 30 unknowns + intercept): ordinary least squares
    for full in (False, True):
        f = fit(full_gram=full)
        f.update(x[:200])
        f.update(x[200:])
        w, b = f.solve(1e-12)
        design = np.hstack([x[:, keep], np.ones((len(x), 1))])
        coef, *_ = np.linalg.lstsq(design, x @ w2d[outs].T + bias[outs], rcond=None)
        # (the targets W x are formed in float32, per batch: 1e-6 of the scale)
        np.testing.assert_allclose(w, coef[:-1].T, rtol=0, atol=1e-6 * np.abs(coef).max())
        np.testing.assert_allclose(b, coef[-1], rtol=0, atol=1e-6 * np.abs(coef).max())
        assert np.abs(w - prior).max() > 0.1  # and that is not the prior: the data moved it
    # underdetermined (10 rows, 30 unknowns): the component of A outside the rows' span is W_K's
    few = fit()
    xs = x[:10]
    few.update(xs)
    w_few, _ = few.solve(1e-3)
    centred = xs[:, keep] - xs[:, keep].mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=True)
    null = vt[(sv > 1e-9 * sv[0]).sum():]  # directions no calibration row sees
    assert null.shape[0] >= 20
    np.testing.assert_allclose(w_few @ null.T, prior @ null.T, rtol=0, atol=1e-9 * np.abs(prior).max())
    assert np.abs(prior @ null.T).max() > 0.5  # a ridge toward zero would have zeroed these
    # and the fit still matches the original outputs on the rows it saw (nearly: ridge 1e-3)
    ref = xs @ w2d[outs].T + bias[outs]
    _, b_few = few.solve(1e-3)
    err_fit = np.abs(xs[:, keep] @ w_few.T + b_few - ref).max()
    err_plain = np.abs(xs[:, keep] @ prior.T + bias[outs] - ref).max()
    assert err_fit < 0.05 * err_plain

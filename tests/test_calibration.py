"""Calibration data sources and streaming statistics (passes/calibration.py)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_compress.passes.calibration import (
    CALIB_METHODS,
    CalibrationSet,
    ImagePreprocessing,
    HIST_CHUNK,
    TensorStats,
    bin_counts,
    collect_statistics,
    compute_range,
    iterable_source,
    kl_divergences,
    load_calibration,
)


def _chunks(seed: int = 0, n: int = 40):
    """Samples whose scale grows, so the histogram range must double several times."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(300) * (0.01 * 1.3**i)).astype(np.float32) for i in range(n)]


def _feed_all(chunks, **kw) -> TensorStats:
    s = TensorStats(**kw)
    s.update(np.concatenate(chunks))
    return s


def _feed_one_by_one(chunks, **kw) -> TensorStats:
    s = TensorStats(**kw)
    for c in chunks:
        s.update(c)
    return s


def test_histogram_is_independent_of_batching():
    chunks = _chunks()
    whole, single = _feed_all(chunks), _feed_one_by_one(chunks)
    assert single.range > 16 * _feed_one_by_one(chunks[:1]).range  # the range really grew
    assert (whole.min, whole.max, whole.count) == (single.min, single.max, single.count)
    assert whole.range == single.range
    np.testing.assert_array_equal(whole.hist, single.hist)  # exact: power-of-two merges
    reversed_order = _feed_one_by_one(chunks[::-1])
    np.testing.assert_array_equal(whole.hist, reversed_order.hist)


@pytest.mark.parametrize("method", CALIB_METHODS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_ranges_identical_for_one_batch_or_one_sample_at_a_time(method, symmetric):
    chunks = _chunks(seed=1)
    whole, single = _feed_all(chunks), _feed_one_by_one(chunks)
    a = compute_range(whole, method, symmetric=symmetric)
    b = compute_range(single, method, symmetric=symmetric)
    if method == "minmax":
        assert a == b == (whole.min, whole.max)
    else:
        assert abs(a[0] - b[0]) <= whole.bin_width and abs(a[1] - b[1]) <= whole.bin_width
    assert whole.min <= a[0] <= a[1] <= whole.max


def test_doubling_is_an_exact_union_of_bins():
    s = TensorStats(bins=16)
    s.update(np.array([0.3, -0.2, 0.01], np.float32))
    assert s.range == 0.5
    s.update(np.array([3.5], np.float32))  # 0.5 -> 1 -> 2 -> 4
    assert s.range == 4.0
    direct = np.zeros(16, np.int64)
    for v in (0.3, -0.2, 0.01, 3.5):
        direct[int(np.floor(v * 16 / 8)) + 8] += 1
    np.testing.assert_array_equal(s.hist, direct)


def test_nonfinite_values_are_counted_and_skipped():
    s = TensorStats()
    s.update(np.array([1.0, np.nan, -np.inf, 2.0], np.float32))
    assert s.nonfinite == 2 and s.count == 2 and s.max == 2.0


def test_nonfinite_values_in_every_position():
    s = TensorStats(bins=16)
    s.update(np.array([np.inf, 0.5, -0.25], np.float32))  # +inf only: max is inf, min finite
    s.update(np.array([np.nan, np.nan], np.float32))  # nothing finite
    s.update(np.array([-0.5, np.nan, 0.125], np.float64))
    assert (s.nonfinite, s.count, s.min, s.max, s.range) == (4, 4, -0.5, 0.5, 1.0)
    np.testing.assert_array_equal(s.hist, np.histogram([0.5, -0.25, -0.5, 0.125], bins=16, range=(-1, 1))[0])


def _edge_heavy(rng, size: int, radius: float, dtype) -> np.ndarray:
    """Values below ``radius`` in magnitude, a third of them exactly on bin edges, with -0.0."""
    x = rng.uniform(-0.99 * radius, 0.99 * radius, size)
    width = 2 * radius / 4096
    x[: size // 3] = rng.integers(-2048, 2048, size // 3) * width  # exact edges, -radius included
    x[size // 3 : size // 3 + 4] = [-0.0, 0.0, -width / 1024, width / 1024]
    x = x.astype(dtype)
    x[-1] = np.nextafter(dtype(radius), dtype(0))  # the largest value below the range
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("radius", [2.0**-6, 1.0, 2.0**14])
def test_bin_counts_equals_numpy_histogram(dtype, radius):
    rng = np.random.default_rng(3)
    x = _edge_heavy(rng, 3 * HIST_CHUNK + 123, radius, dtype)  # several chunks and a partial one
    assert -radius == x.min() and x.max() < radius  # the bins cover [-R, R)
    got = bin_counts(x, 2048 / radius, 4096)
    # numpy's histogram compares with the (exact, power-of-two spaced) edges: half-open bins
    want, _ = np.histogram(x.astype(np.float64), bins=4096, range=(-radius, radius))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and got.sum() == x.size
    with pytest.raises(ValueError, match="bins"):
        bin_counts(x.astype(np.float32), 1.0, 2**24)


def test_update_equals_one_histogram_of_everything_at_the_final_range():
    rng = np.random.default_rng(4)
    chunks = [_edge_heavy(rng, 5000, 0.01 * 4.0**i, np.float32) for i in range(6)]
    s = TensorStats()
    for c in chunks:
        s.update(c.reshape(50, 100))  # any shape
    everything = np.concatenate(chunks).astype(np.float64)
    assert s.range == 2.0 ** math.ceil(math.log2(np.abs(everything).max() * (1 + 2**-30)))
    want, _ = np.histogram(everything, bins=4096, range=(-s.range, s.range))
    np.testing.assert_array_equal(s.hist, want)


def _naive_kl(hist: np.ndarray, nq: int, eps: float = 1e-10) -> np.ndarray:
    """The per-candidate loop (the implementation before the prefix-sum form), as the reference."""
    out = []
    for i in range(nq, hist.size + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        group = (np.arange(i) * nq) // i
        src = hist[:i]
        sums = np.bincount(group, weights=src, minlength=nq)
        nonzero = np.bincount(group, weights=(src != 0).astype(np.float64), minlength=nq)
        per_bin = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
        q = np.where(src != 0, per_bin[group], 0.0)
        if p.sum() == 0 or q.sum() == 0:
            out.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        out.append(float(np.sum(p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], eps)))))
    return np.array(out)


def _test_histograms():
    rng = np.random.default_rng(5)
    bins = np.arange(700)
    sparse = np.zeros(700)
    sparse[rng.integers(0, 700, 40)] = rng.integers(1, 100, 40)
    return {
        "exponential": rng.poisson(2000 * np.exp(-bins / 150.0)),
        "relu-like": np.concatenate(([5e5], rng.poisson(800 * np.exp(-bins[1:] / 60.0)))),
        "sparse": sparse,
        "gaps": rng.poisson(50, 700) * (rng.uniform(size=700) < 0.3),
        "heavy tail": rng.poisson(1e6 * (1 + bins) ** -2.5),
        "empty head": np.concatenate((np.zeros(200), rng.poisson(30, 500))),
    }


@pytest.mark.parametrize("name", list(_test_histograms()))
@pytest.mark.parametrize("nq", [128, 256])
def test_kl_divergences_match_the_per_candidate_loop(name, nq):
    hist = _test_histograms()[name].astype(np.float64)
    hist[-1] = max(hist[-1], 1.0)
    fast, naive = kl_divergences(hist, nq), _naive_kl(hist, nq)
    assert fast.shape == naive.shape == (hist.size - nq + 1,)
    finite = np.isfinite(naive)
    np.testing.assert_array_equal(np.isfinite(fast), finite)
    np.testing.assert_allclose(fast[finite], naive[finite], rtol=1e-9, atol=1e-12)
    assert np.argmin(np.where(finite, fast, np.inf)) == np.argmin(naive)  # same threshold chosen


def test_entropy_threshold_equals_the_naive_search_on_real_shapes():
    rng = np.random.default_rng(6)
    for data in (np.maximum(rng.standard_normal(100_000), 0) ** 1.5, rng.standard_t(3, 100_000)):
        s = TensorStats()
        s.update(data.astype(np.float32))
        counts, width = s.abs_histogram()
        counts = counts.reshape(-1, 1).sum(axis=1).astype(np.float64)  # 2048 bins: the entropy view
        top = int(np.nonzero(counts)[0][-1]) + 1
        hist = counts[:top].copy()
        hist[0] = hist[1]
        best = 128 + int(np.argmin(_naive_kl(hist, 128)))
        want = min((best + 0.5) * width, max(abs(s.min), abs(s.max)))
        assert compute_range(s, "entropy")[1] == pytest.approx(want, rel=1e-12)


def test_percentile_and_mse_on_known_distributions():
    rng = np.random.default_rng(0)
    uniform = TensorStats()
    uniform.update(rng.uniform(0, 1, 200_000).astype(np.float32))
    lo, hi = compute_range(uniform, "percentile", percentile=99.0)
    assert abs(lo - 0.01) <= 2 * uniform.bin_width and abs(hi - 0.99) <= 2 * uniform.bin_width
    # uniform data: clipping never pays, the MSE range is (almost) the full range
    assert compute_range(uniform, "mse")[1] >= 0.98 * uniform.max
    gauss = TensorStats()
    gauss.update(rng.standard_normal(200_000).astype(np.float32))
    lo, hi = compute_range(gauss, "mse", symmetric=True)
    assert 2.0 < hi < gauss.max and lo == -hi  # Gaussian tails are clipped
    lo, hi = compute_range(gauss, "percentile", symmetric=True, percentile=99.0)
    assert abs(hi - 2.5758) < 0.05


def test_entropy_clips_outliers_but_keeps_the_body():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:5] = 40.0  # a few far outliers
    s = TensorStats()
    s.update(x)
    lo, hi = compute_range(s, "entropy")
    assert 2.5 < hi < 20.0 and lo == -hi
    relu = TensorStats()
    relu.update(np.maximum(x[5:], 0))  # half the values exactly zero
    assert compute_range(relu, "entropy", num_quantized_bins=256)[1] > 2.5  # the zero spike does not win


def test_statistics_memory_is_flat_in_the_number_of_samples():
    def peak(n: int) -> int:
        rng = np.random.default_rng(0)
        s = TensorStats()
        tracemalloc.start()
        for i in range(n):
            s.update(rng.standard_normal(4096).astype(np.float32) * (1 + i % 7))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(20), peak(200)
    assert large <= small + 64 * 1024, (small, large)


# ---------------------------------------------------------------------------------------------
# collection with ONNX Runtime


def _tiny_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.array([[1.5, -0.5], [0.25, 2.0]], np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Mul", ["r", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 2)).astype(np.float32) * (1 + i % 5)} for i in range(n)]


def test_collect_statistics_batching_gives_identical_statistics():
    model, feeds = _tiny_model(), _feeds(37)
    one = collect_statistics(model, feeds, ["h", "r", "y"], batch_size=1, progress=False)
    many = collect_statistics(model, feeds, ["h", "r", "y"], batch_size=8, progress=False)
    assert one.samples == many.samples == 37
    x = np.concatenate([f["x"] for f in feeds])
    h = x @ np.array([[1.5, -0.5], [0.25, 2.0]], np.float32)
    assert one.stats["h"].min == pytest.approx(float(h.min()), rel=1e-6)
    for name in ("h", "r", "y"):
        a, b = one.stats[name], many.stats[name]
        assert (a.min, a.max, a.count) == (b.min, b.max, b.count)
        np.testing.assert_array_equal(a.hist, b.hist)
    assert one.stats["r"].min == 0.0


def test_collect_statistics_threads_and_optimisation_levels():
    model, feeds = _tiny_model(), _feeds(23)
    names = ["h", "r", "y"]
    serial = collect_statistics(model, feeds, names, batch_size=4, threads=1, progress=False)
    for threads, level in ((2, "basic"), (3, "all"), (2, "disable")):
        other = collect_statistics(model, feeds, names, batch_size=4, threads=threads, ort_optimization=level,
                                   progress=False)
        for name in names:
            a, b = serial.stats[name], other.stats[name]
            assert (a.min, a.max, a.count, a.range) == (b.min, b.max, b.count, b.range)
            np.testing.assert_array_equal(a.hist, b.hist)  # a tiny MatMul/Relu/Mul: no rounding differences
    with pytest.raises(ValueError, match="ort_optimization"):
        collect_statistics(model, feeds, names, ort_optimization="max", progress=False)


def test_collect_statistics_memory_is_flat():
    model = _tiny_model()

    def peak(n: int) -> int:
        data = CalibrationSet(lambda: iter(_feeds(n)), size=n)
        tracemalloc.start()
        collect_statistics(model, data, ["h", "r", "y"], batch_size=4, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(16), peak(256)
    assert large <= small + 256 * 1024, (small, large)


def test_collect_statistics_rejects_missing_inputs_and_empty_data():
    with pytest.raises(ValueError, match="lacks input"):
        collect_statistics(_tiny_model(), [{"z": np.zeros((1, 2), np.float32)}], ["h"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_statistics(_tiny_model(), [], ["h"], progress=False)


# ---------------------------------------------------------------------------------------------
# data sources


def test_npz_file_is_sliced_on_the_batch_axis(tmp_path):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.savez(tmp_path / "calib.npz", x=x, m=np.ones((10, 1), np.float32))
    data = load_calibration(tmp_path / "calib.npz", batch_size=4)
    feeds = list(data)
    assert len(data) == 3 and [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)
    assert len(list(data)) == 3  # re-iterable
    np.savez(tmp_path / "bad.npz", x=x, m=np.ones((9, 1), np.float32))
    with pytest.raises(ValueError, match="batch axis"):
        load_calibration(tmp_path / "bad.npz")


def test_npz_folder_feeds_may_differ_in_shape(tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, size in enumerate((4, 7)):
        np.savez(folder / f"{i}.npz", x=np.full((1, size), i, np.float32))
    feeds = list(load_calibration(folder))
    assert [f["x"].shape for f in feeds] == [(1, 4), (1, 7)]


def test_image_folder_preprocessing(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 128)).save(folder / "a.png")
    Image.new("RGB", (30, 50), (0, 255, 0)).save(folder / "b.jpg", quality=100)
    (folder / "notes.txt").write_text("not an image")
    prep = ImagePreprocessing(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    feeds = list(load_calibration(folder, input_names=["image"], preprocessing=prep))
    assert len(feeds) == 2
    first = feeds[0]["image"]
    assert first.shape == (1, 3, 16, 16) and first.dtype == np.float32
    np.testing.assert_allclose(first[0, :, 8, 8], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25], atol=1e-5)
    nhwc = ImagePreprocessing(image_size=16, layout="NHWC")
    assert list(load_calibration(folder, input_names=["image"], preprocessing=nhwc))[1]["image"].shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="layout"):
        ImagePreprocessing(layout="CHW")


def test_iterables_lists_generators_and_splits():
    feeds = _feeds(10)
    data = load_calibration(feeds)
    assert len(data) == 10 and len(list(data)) == 10
    calib, held = data.split(3)
    assert len(calib) == 7 and len(held) == 3
    np.testing.assert_array_equal(list(held)[0]["x"], feeds[7]["x"])
    once = iterable_source(f for f in feeds)
    assert len(list(once)) == 10
    with pytest.raises(RuntimeError, match="already consumed"):
        list(once)
    with pytest.raises(TypeError, match="expected a dict"):
        list(load_calibration([np.zeros(3)]))
    with pytest.raises(FileNotFoundError):
        load_calibration("/nonexistent/calib.npz")
    assert len(list(load_calibration(feeds, limit=4))) == 4

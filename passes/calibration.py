"""Calibration: data sources and streaming activation statistics for INT8 quantization.

Data sources (:func:`load_calibration`) all become a :class:`CalibrationSet`, a re-iterable
sequence of feed dicts ``{input name: array}``:

- an ``.npz`` file of arrays keyed by input name, stacked on the batch axis (axis 0); it is
  read lazily and yields slices of ``batch_size`` samples;
- a folder of ``.npz`` files, each one feed dict (shapes may differ between files);
- a folder of images (``.png``, ``.jpg``, ...) with stated preprocessing: resize the short side to
  ``resize`` (default ``round(image_size / 0.875)``, i.e. 256 for 224), centre-crop
  ``image_size`` x ``image_size``, scale to [0, 1], ``(x - mean) / std`` per channel, layout
  ``NCHW`` (or ``NHWC``), float32, batch of one;
- any Python iterable of feed dicts (a list is re-iterable; a generator can be read once).

Statistics are streamed: per tensor, :class:`TensorStats` keeps the running ``min``/``max``, the
sample count and (for histogram methods) one fixed-size histogram. Memory is flat in the number
of samples; nothing of a sample is kept after its update.

Histogram. Signed, ``B`` bins (``B`` divisible by 4, default 4096) over the symmetric range
``[-R, R)`` where ``R`` is always a power of two, the smallest one *strictly* above every
``|x|`` seen so far (floor ``2**-24``). A value goes to bin ``floor(x * B / (2R)) + B/2``; since
``B/(2R)`` is a power of two the product is exact, so the bin of a value never depends on rounding.
When a new value reaches ``|x| >= R``, the range doubles (as often as needed): the new bin
``j`` covers old bins ``2(j - B/4)`` and ``2(j - B/4) + 1`` (old range = middle half of the new),
an exact union of bins. Hence the histogram after any sequence of updates equals the histogram of
all the data binned at once at the final ``R``: statistics do not depend on batching.
The ``|x|`` histogram used by the symmetric methods folds bin ``B/2 + k`` with bin ``B/2 - 1 - k``:
``B/2`` bins of width ``w = 2R/B`` over ``[0, R)``.

Ranges (:func:`compute_range`), returned as ``(lo, hi)`` inside ``[min, max]`` (with 0 included
by the quantizer later):

- ``minmax``: ``(min, max)``.
- ``percentile`` p (default 99.999): symmetric: ``T`` = the upper edge of the first ``|x|`` bin
  whose cumulative count reaches ``p %`` of the total; range ``(-T, T)`` clipped to
  ``[min, max]``. Asymmetric: lower/upper edges at ``(100 - p) %`` and ``p %`` of the signed
  histogram.
- ``entropy`` (TensorRT's KL calibration): ``|x|`` histogram cut to its first ``N`` bins where
  ``N`` = ``2048`` (the top of the non-empty part, at least ``num_quantized_bins``); for every
  candidate ``i`` in ``[num_quantized_bins, N]``: reference ``P = h[:i]`` with the outliers
  ``sum(h[i:])`` added to ``P[i-1]``; ``Q`` = ``h[:i]`` merged into ``num_quantized_bins`` groups
  (bin ``j`` in group ``floor(j * num_quantized_bins / i)``: equal widths, where TensorRT's
  reference gives the last group the whole remainder) and spread back uniformly over the non-empty bins of each group; threshold
  ``T = (i + 0.5) * w'`` for the ``i`` minimising ``KL(P || Q) = sum P log(P/Q)`` (both
  normalised; ``Q = 0`` where ``P > 0`` is smoothed by ``eps``). The first bin (the spike of
  exact zeros after ReLU) is set to the count of the second before the search, as
  pytorch-quantization does; otherwise KL favours clipping ReLU outputs hard. ``w'`` is the width of the
  2048-bin view (adjacent bins of the stored histogram merged exactly when it has more). All
  candidates are evaluated at once from prefix sums (:func:`kl_divergences`: O(N * groups), no
  loop over candidates; the per-candidate loop cost ~0.1 s per ResNet-50 tensor).
- ``mse``: the clip range minimising the expected squared quantization error of the histogram,
  ``E(T) = sum_{|c| <= T} n_c * step^2 / 12 + sum_{|c| > T} n_c (|c| - T)^2`` with bin centres
  ``c`` and ``step = T / levels``; candidates are ``T = alpha * max|x|`` for 200 values of
  ``alpha`` in ``(0, 1]`` (asymmetric: ``(alpha*lo, alpha*hi)`` with ``step = alpha*(hi-lo)/levels``).

Collection (:func:`collect_statistics`) runs the model in ONNX Runtime with the tensors to
calibrate added as graph outputs, feeds grouped into batches of ``batch_size`` samples where shapes
and the model's batch axis allow, and updates the statistics of each batch before the next runs.
One update per tensor and batch: ``min``/``max`` of the whole array (NaN and inf show there, so
the finite filter runs only when needed), then :func:`bin_counts` in cache-sized chunks; the
tensors of a batch are updated by a thread pool (NumPy releases the GIL in its loops), each
tensor by one task, so statistics do not depend on the thread count.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_HIST_RANGE = 2.0**-24
#: values binned per step by :func:`bin_counts` (temporaries of 256 KB for float32 stay in cache)
HIST_CHUNK = 1 << 16


def progress_bar(iterable: Iterable, *, total: int | None = None, desc: str = "", enabled: bool | None = None):
    """tqdm over ``iterable``; shown only when ``enabled`` is True, or (None) when stderr is a tty."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------
# data sources


class CalibrationSet:
    """A re-iterable sequence of feed dicts (``len`` is known when :attr:`size` is not None)."""

    def __init__(self, factory: Callable[[], Iterator[Feed]], *, size: int | None = None, description: str = ""):
        self._factory = factory
        self.size = size
        self.description = description

    def __iter__(self) -> Iterator[Feed]:
        return iter(self._factory())

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError(f"the size of calibration set {self.description!r} is not known")
        return self.size

    def take(self, count: int) -> "CalibrationSet":
        """The first ``count`` feeds."""
        if count < 0:
            raise ValueError("count must be non-negative")

        def factory() -> Iterator[Feed]:
            for i, feed in enumerate(self):
                if i >= count:
                    return
                yield feed

        size = count if self.size is None else min(count, self.size)
        return CalibrationSet(factory, size=size, description=f"{self.description}[:{count}]")

    def skip(self, count: int) -> "CalibrationSet":
        """Everything after the first ``count`` feeds."""

        def factory() -> Iterator[Feed]:
            for i, feed in enumerate(self):
                if i >= count:
                    yield feed

        size = None if self.size is None else max(0, self.size - count)
        return CalibrationSet(factory, size=size, description=f"{self.description}[{count}:]")

    def split(self, holdout: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(calibration part, the last ``holdout`` feeds held back); needs a known size."""
        n = len(self)
        if not 0 <= holdout < n:
            raise ValueError(f"holdout must be in [0, {n}), got {holdout}")
        return self.take(n - holdout), self.skip(n - holdout)


def _as_feed(item: Any, where: str) -> Feed:
    if not isinstance(item, Mapping):
        raise TypeError(f"calibration item {where} is a {type(item).__name__}, expected a dict of input name -> array")
    return {str(k): np.asarray(v) for k, v in item.items()}


def npz_source(path: str | os.PathLike, *, batch_size: int = 1) -> CalibrationSet:
    """An ``.npz`` of arrays stacked on axis 0, yielded ``batch_size`` samples at a time."""
    path = Path(path)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with np.load(path, allow_pickle=False) as data:
        names = list(data.files)
        if not names:
            raise ValueError(f"{path} holds no arrays")
        counts = {name: (data[name].shape[0] if data[name].ndim else 0) for name in names}
    n = min(counts.values())
    if len(set(counts.values())) != 1 or n == 0:
        raise ValueError(f"arrays in {path} must share a non-empty batch axis 0, got {counts}")

    def factory() -> Iterator[Feed]:
        with np.load(path, allow_pickle=False, mmap_mode="r") as data:
            arrays = {name: data[name] for name in names}
            for start in range(0, n, batch_size):
                yield {name: np.ascontiguousarray(a[start : start + batch_size]) for name, a in arrays.items()}

    return CalibrationSet(factory, size=math.ceil(n / batch_size), description=str(path))


def npz_folder_source(path: str | os.PathLike) -> CalibrationSet:
    """A folder of ``.npz`` files, each one feed dict (sorted by file name)."""
    files = sorted(Path(path).glob("*.npz"))
    if not files:
        raise ValueError(f"no .npz files in {path}")

    def factory() -> Iterator[Feed]:
        for file in files:
            with np.load(file, allow_pickle=False) as data:
                yield {name: np.asarray(data[name]) for name in data.files}

    return CalibrationSet(factory, size=len(files), description=str(path))


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image file becomes a model input (see the module docstring)."""

    image_size: int = 224
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layout: str = "NCHW"
    grayscale: bool = False

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.image_size < 1:
            raise ValueError("image_size must be positive")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")

    def __call__(self, image: Any) -> np.ndarray:
        from PIL import Image

        image = image.convert("L" if self.grayscale else "RGB")
        short = self.resize or round(self.image_size / 0.875)
        w, h = image.size
        ratio = short / min(w, h)
        image = image.resize((max(short, round(w * ratio)), max(short, round(h * ratio))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        x = np.asarray(image, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[:, :, None]
        channels = x.shape[2]
        mean = np.broadcast_to(np.asarray(self.mean, np.float32), (channels,)) if len(self.mean) in (1, channels) else None
        std = np.broadcast_to(np.asarray(self.std, np.float32), (channels,)) if len(self.std) in (1, channels) else None
        if mean is None or std is None:
            raise ValueError(f"mean/std need 1 or {channels} values")
        x = (x - mean) / std
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=np.float32)


def image_folder_source(
    path: str | os.PathLike, *, input_name: str, preprocessing: ImagePreprocessing | None = None
) -> CalibrationSet:
    """A folder of images, each preprocessed into ``{input_name: [1, C, H, W]}``."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    prep = preprocessing or ImagePreprocessing()

    def factory() -> Iterator[Feed]:
        from PIL import Image

        for file in files:
            with Image.open(file) as image:
                yield {input_name: prep(image)}

    return CalibrationSet(factory, size=len(files), description=str(path))


def iterable_source(items: Iterable[Mapping[str, Any]]) -> CalibrationSet:
    """Any iterable of feed dicts. Sequences are re-iterable; an iterator can be read once."""
    if isinstance(items, CalibrationSet):
        return items
    if isinstance(items, Sequence):
        seq = items

        def factory() -> Iterator[Feed]:
            for i, item in enumerate(seq):
                yield _as_feed(item, f"#{i}")

        return CalibrationSet(factory, size=len(seq), description="sequence")
    state = {"used": False}

    def once() -> Iterator[Feed]:
        if state["used"]:
            raise RuntimeError("this calibration iterator was already consumed; pass a list or a CalibrationSet")
        state["used"] = True
        for i, item in enumerate(items):
            yield _as_feed(item, f"#{i}")

    return CalibrationSet(once, size=None, description="iterator")


def load_calibration(
    source: Any,
    *,
    input_names: Sequence[str] | None = None,
    batch_size: int = 1,
    preprocessing: ImagePreprocessing | None = None,
    limit: int | None = None,
) -> CalibrationSet:
    """Any supported source as a :class:`CalibrationSet` (see the module docstring).

    ``input_names`` is needed for an image folder (the model must have one input, or the first
    name is used). ``limit`` keeps the first ``limit`` feeds.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            if path.suffix != ".npz":
                raise ValueError(f"calibration file must be an .npz, got {path}")
            result = npz_source(path, batch_size=batch_size)
        elif path.is_dir():
            if any(path.glob("*.npz")):
                result = npz_folder_source(path)
            else:
                if not input_names:
                    raise ValueError("an image folder needs the model's input name")
                result = image_folder_source(path, input_name=input_names[0], preprocessing=preprocessing)
        else:
            raise FileNotFoundError(f"calibration data not found: {path}")
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        n = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        if len(n) != 1 or 0 in n:
            raise ValueError("a dict of calibration arrays must share a non-empty batch axis 0")
        count = n.pop()

        def factory() -> Iterator[Feed]:
            for start in range(0, count, batch_size):
                yield {k: a[start : start + batch_size] for k, a in arrays.items()}

        result = CalibrationSet(factory, size=math.ceil(count / batch_size), description="arrays")
    else:
        result = iterable_source(source)
    return result if limit is None else result.take(limit)


# ---------------------------------------------------------------------------------------------
# streaming statistics


def _pow2_above(value: float) -> float:
    """The smallest power of two strictly greater than ``value`` (at least MIN_HIST_RANGE)."""
    if not value > 0:
        return MIN_HIST_RANGE
    _, exp = math.frexp(value)  # value = m * 2**exp, 0.5 <= m < 1  ->  2**exp > value
    return max(math.ldexp(1.0, exp), MIN_HIST_RANGE)


def bin_counts(values: np.ndarray, scale: float, bins: int) -> np.ndarray:
    """Counts of ``floor(x * scale) + bins/2`` over ``bins`` bins: the histogram update.

    The caller guarantees that ``scale`` is a power of two and that ``-bins/2 <= x * scale <
    bins/2`` for every value (all finite), so ``x * scale`` is exact in the input's own float type
    (float32 stays float32; other dtypes are widened to float64; only a subnormal ``x`` scaled
    down can round) and its floor is an integer ``k`` in ``[-bins/2, bins/2)``. The integer is read from the float's bits instead of a float->int cast:
    ``k + bins/2 + 2**m`` (``m`` = 23 for float32, 52 for float64) is an integer in
    ``[2**m, 2**m + bins)``, exact in that type, whose mantissa field *is* ``k + bins/2``.
    Equal, bin for bin, to ``np.bincount((np.floor(x * scale) + bins/2).astype(int))``; computed
    in chunks of :data:`HIST_CHUNK` values so the temporaries stay in cache (about 3x faster than
    whole-array passes on 25M values; ``np.bincount`` releases the GIL for its counting loop).
    """
    x = values.reshape(-1)
    if x.dtype == np.float32:
        itype, mantissa_bits = np.int32, 23
    else:
        x = x.astype(np.float64, copy=False)
        itype, mantissa_bits = np.int64, 52
    dtype = x.dtype
    half = bins // 2
    if bins > 2**mantissa_bits // 2:
        raise ValueError(f"at most {2**mantissa_bits // 2} bins for {dtype} data")
    s = dtype.type(scale)
    magic = dtype.type(2.0**mantissa_bits + half)
    field = itype(2**mantissa_bits - 1)
    chunk = min(x.size, HIST_CHUNK)
    buf = np.empty(chunk, dtype)
    ints = buf.view(itype)
    counts = np.zeros(bins, np.int64)
    for start in range(0, x.size, chunk):
        part = x[start : start + chunk]
        b, k = buf[: part.size], ints[: part.size]
        np.multiply(part, s, out=b)
        np.floor(b, out=b)
        np.add(b, magic, out=b)
        np.bitwise_and(k, field, out=k)
        counts += np.bincount(k, minlength=bins)
    return counts


class TensorStats:
    """Running min/max/count and (optionally) a range-growing histogram of one tensor."""

    def __init__(self, *, bins: int = 4096, histogram: bool = True):
        if bins < 8 or bins % 4:
            raise ValueError("bins must be a multiple of 4, at least 8")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self.hist: np.ndarray | None = np.zeros(bins, dtype=np.int64) if histogram else None
        self.range = 0.0  # R; 0 until the first finite value

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        if x.size == 0:
            return
        x = x.reshape(-1)
        lo, hi = x.min(), x.max()  # NaN propagates into both, +-inf shows in one: the finite check is free
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if x.size == 0:
                return
            lo, hi = x.min(), x.max()
        lo, hi = float(lo), float(hi)
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        if self.hist is None:
            return
        needed = _pow2_above(max(abs(lo), abs(hi)))
        if self.range == 0.0:
            self.range = needed
        while self.range < needed:
            self._double_range()
        self.hist += bin_counts(x, self.bins // 2 / self.range, self.bins)

    def _double_range(self) -> None:
        old = self.hist
        pairs = old.reshape(-1, 2).sum(axis=1)  # B/2 merged bins = old range at the new width
        new = np.zeros_like(old)
        quarter = self.bins // 4
        new[quarter : quarter + self.bins // 2] = pairs
        self.hist = new
        self.range *= 2.0

    # views ---------------------------------------------------------------------------------

    @property
    def bin_width(self) -> float:
        return 2.0 * self.range / self.bins

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """(counts of |x| in B/2 bins over [0, R), bin width)."""
        if self.hist is None:
            raise ValueError("histogram statistics were not collected for this tensor")
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1], self.bin_width

    def signed_edges(self) -> np.ndarray:
        return np.linspace(-self.range, self.range, self.bins + 1)


class StatisticsCollector:
    """Statistics of many tensors; ``update({name: array})`` per batch."""

    def __init__(self, names: Iterable[str], *, histogram: bool = True, bins: int = 4096):
        self.stats = {name: TensorStats(bins=bins, histogram=histogram) for name in names}
        self.samples = 0

    def update(self, values: Mapping[str, np.ndarray], *, samples: int = 1, executor: Executor | None = None) -> None:
        """Update each tensor's statistics; with ``executor``, tensors in parallel (largest first).

        Each tensor's statistics are touched by one task only, and its update does not depend on
        the others, so the result is the same with or without threads.
        """
        items = [(self.stats[name], value) for name, value in values.items() if name in self.stats]
        if executor is None or len(items) < 2:
            for stats, value in items:
                stats.update(value)
        else:
            items.sort(key=lambda item: -np.size(item[1]))
            for future in [executor.submit(stats.update, value) for stats, value in items]:
                future.result()
        self.samples += samples


# ---------------------------------------------------------------------------------------------
# ranges from statistics


def _empty_range(stats: TensorStats) -> tuple[float, float] | None:
    if stats.count == 0:
        return (0.0, 0.0)
    if stats.min == stats.max:
        return (stats.min, stats.max)
    return None


def compute_range(
    stats: TensorStats,
    method: str = "minmax",
    *,
    symmetric: bool = False,
    percentile: float = 99.999,
    num_bins: int = 2048,
    num_quantized_bins: int = 128,
    levels: int = 255,
) -> tuple[float, float]:
    """The calibrated range ``(lo, hi)`` of one tensor (see the module docstring)."""
    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(CALIB_METHODS)}")
    trivial = _empty_range(stats)
    if trivial is not None:
        return trivial
    if method == "minmax":
        return (stats.min, stats.max)
    if stats.hist is None:
        raise ValueError(f"calibration method {method!r} needs histogram statistics")
    absmax = max(abs(stats.min), abs(stats.max))
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if symmetric:
            t = _percentile_abs(stats, percentile)
            return (max(stats.min, -t), min(stats.max, t))
        return _percentile_signed(stats, percentile)
    if method == "entropy":
        t = _entropy_threshold(stats, num_bins=num_bins, num_quantized_bins=num_quantized_bins)
        return (max(stats.min, -t), min(stats.max, t))
    # mse
    if symmetric:
        t = _mse_threshold(stats, levels=levels, absmax=absmax)
        return (max(stats.min, -t), min(stats.max, t))
    return _mse_range(stats, levels=levels)


def _percentile_abs(stats: TensorStats, percentile: float) -> float:
    counts, width = stats.abs_histogram()
    cum = np.cumsum(counts)
    k = int(np.searchsorted(cum, cum[-1] * percentile / 100.0, side="left"))
    return min((k + 1) * width, max(abs(stats.min), abs(stats.max)))


def _percentile_signed(stats: TensorStats, percentile: float) -> tuple[float, float]:
    cum = np.cumsum(stats.hist)
    total = cum[-1]
    edges = stats.signed_edges()
    lo_idx = int(np.searchsorted(cum, total * (100.0 - percentile) / 100.0, side="left"))
    hi_idx = int(np.searchsorted(cum, total * percentile / 100.0, side="left"))
    lo = max(stats.min, float(edges[lo_idx])) if percentile < 100 else stats.min
    hi = min(stats.max, float(edges[hi_idx + 1]))
    return (min(lo, hi), hi)


def _abs_view(stats: TensorStats, num_bins: int) -> tuple[np.ndarray, float]:
    """The |x| histogram merged (exactly, by adjacent groups) to at most ``num_bins`` bins."""
    counts, width = stats.abs_histogram()
    factor = 1
    while counts.size // factor > num_bins and counts.size % (factor * 2) == 0:
        factor *= 2
    if factor > 1:
        counts = counts.reshape(-1, factor).sum(axis=1)
        width *= factor
    return counts, width


def _entropy_threshold(stats: TensorStats, *, num_bins: int, num_quantized_bins: int) -> float:
    counts, width = _abs_view(stats, num_bins)
    counts = counts.astype(np.float64)
    nonzero = np.nonzero(counts)[0]
    top = int(nonzero[-1]) + 1 if nonzero.size else 0
    absmax = max(abs(stats.min), abs(stats.max))
    if top <= num_quantized_bins:
        return absmax
    hist = counts[:top].copy()
    hist[0] = hist[1]  # the spike of exact zeros (ReLU) would dominate P; as pytorch-quantization does
    kl = kl_divergences(hist, num_quantized_bins)
    finite = np.isfinite(kl)
    # the first minimum, as a loop keeping strict improvements would pick; none finite: keep all
    best_i = num_quantized_bins + int(np.argmin(np.where(finite, kl, np.inf))) if finite.any() else top
    return min((best_i + 0.5) * width, absmax)


#: candidate thresholds evaluated at once by :func:`kl_divergences` (bounds its temporaries)
KL_BLOCK = 512


def kl_divergences(hist: np.ndarray, num_quantized_bins: int, *, eps: float = 1e-10) -> np.ndarray:
    """``KL(P_i || Q_i)`` for every candidate ``i`` in ``[num_quantized_bins, len(hist)]``.

    The definitions of the module docstring (TensorRT's entropy calibration), in closed form
    from prefix sums instead of one pass over ``i`` bins per candidate (O(bins * groups) instead
    of O(bins^2), with no Python loop over candidates). With ``h`` the histogram, ``T = sum h``,
    ``C_k = sum(h[:k])``, ``H_k = sum(h_j log h_j, j < k, h_j > 0)``, and for candidate ``i`` the
    groups ``g = floor(j * n / i)`` (``n`` = ``num_quantized_bins``), i.e. bins
    ``[ceil(g i / n), ceil((g+1) i / n))``, with sums ``s_g`` and non-empty counts ``z_g``
    (both prefix-sum differences, exact for integer counts), mean ``m_g = s_g / z_g``:

    - ``P = h[:i]`` plus the outliers ``S = T - C_i`` in its last bin, normalised by ``T``;
      ``Q_j = m_{g(j)} / C_i`` where ``h_j > 0`` (``sum Q = C_i / C_i = 1``), else 0.
    - Bins ``j < i - 1`` (``P_j > 0`` iff ``h_j > 0``, and then ``Q_j > 0``) contribute
      ``(H_{i-1} - C_{i-1} log T) / T - (sum_g s_g log m_g - C_i log C_i - [h_{i-1} > 0] h_{i-1}
      log(m_last / C_i)) / T`` (the group sums count bin ``i - 1``, taken back out).
    - Bin ``i - 1``: ``p = (h_{i-1} + S) / T`` times ``log(p / q)`` with ``q = m_last / C_i``, or
      ``eps`` where ``h_{i-1} = 0`` (Q is 0 where P is not, as in the per-candidate loop).

    Infinite where ``C_i = 0`` (Q empty). Equal to the per-candidate loop up to float rounding.
    """
    hist = np.asarray(hist, dtype=np.float64)
    n = int(num_quantized_bins)
    top = hist.size
    if top < n:
        return np.empty(0)
    positive = hist > 0
    total = float(hist.sum())
    if total <= 0:
        return np.full(top - n + 1, np.inf)
    csum = np.concatenate(([0.0], np.cumsum(hist)))
    cnonzero = np.concatenate(([0], np.cumsum(positive)))
    hlogh = np.zeros_like(hist)
    hlogh[positive] = hist[positive] * np.log(hist[positive])
    chlogh = np.concatenate(([0.0], np.cumsum(hlogh)))
    log_total = math.log(total)
    groups = np.arange(n + 1)
    out = np.empty(top - n + 1)
    for first in range(n, top + 1, KL_BLOCK):
        i = np.arange(first, min(first + KL_BLOCK, top + 1))
        starts = (groups[None, :] * i[:, None] + n - 1) // n  # ceil(g i / n); the last column is i
        sums = csum[starts[:, 1:]] - csum[starts[:, :-1]]
        nonempty = cnonzero[starts[:, 1:]] - cnonzero[starts[:, :-1]]
        filled = sums > 0
        safe = np.where(filled, sums, 1.0)
        mean_log = np.log(safe / np.where(filled, nonempty, 1))
        cross_groups = np.where(filled, sums * mean_log, 0.0).sum(axis=1)
        c_i = csum[i]
        c_safe = np.where(c_i > 0, c_i, 1.0)
        log_c = np.log(c_safe)
        h_last = hist[i - 1]
        last_filled = h_last > 0
        log_q_last = np.where(last_filled, mean_log[:, -1] - log_c, math.log(eps))
        body_p = (chlogh[i - 1] - csum[i - 1] * log_total) / total
        body_cross = (cross_groups - c_i * log_c - np.where(last_filled, h_last * (mean_log[:, -1] - log_c), 0.0)) / total
        p_last = (h_last + (total - c_i)) / total
        safe_p = np.where(p_last > 0, p_last, 1.0)
        last = np.where(p_last > 0, p_last * (np.log(safe_p) - log_q_last), 0.0)
        out[first - n : first - n + i.size] = np.where(c_i > 0, body_p - body_cross + last, np.inf)
    return out


ALPHAS = np.linspace(0.005, 1.0, 200)


def _mse_threshold(stats: TensorStats, *, levels: int, absmax: float) -> float:
    counts, width = stats.abs_histogram()
    centres = (np.arange(counts.size) + 0.5) * width
    centres = np.minimum(centres, absmax)
    keep = counts > 0
    c, n = centres[keep], counts[keep].astype(np.float64)
    t = ALPHAS[:, None] * absmax
    step = 2.0 * t / levels  # symmetric grid over [-T, T]
    inside = c[None, :] <= t
    err = np.where(inside, step**2 / 12.0, (c[None, :] - t) ** 2) * n[None, :]
    best = int(np.argmin(err.sum(axis=1)))
    return float(ALPHAS[best] * absmax)


def _mse_range(stats: TensorStats, *, levels: int) -> tuple[float, float]:
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    edges = stats.signed_edges()
    centres = np.clip((edges[:-1] + edges[1:]) / 2.0, stats.min, stats.max)
    keep = stats.hist > 0
    c, n = centres[keep], stats.hist[keep].astype(np.float64)
    a_lo, a_hi = ALPHAS[:, None] * lo, ALPHAS[:, None] * hi
    step = (a_hi - a_lo) / levels
    below = np.clip(a_lo - c[None, :], 0.0, None)
    above = np.clip(c[None, :] - a_hi, 0.0, None)
    outside = below + above
    err = np.where(outside > 0, outside**2, step**2 / 12.0) * n[None, :]
    best = int(np.argmin(err.sum(axis=1)))
    return (max(stats.min, float(ALPHAS[best] * lo)), min(stats.max, float(ALPHAS[best] * hi)))


# ---------------------------------------------------------------------------------------------
# collection with ONNX Runtime


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names`` (intermediate tensors included)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {vi.name: vi for vi in list(out.graph.value_info) + list(out.graph.output) + list(out.graph.input)}
    del out.graph.output[:]
    for name in names:
        vi = onnx.ValueInfoProto()
        if name in known:
            vi.CopyFrom(known[name])
        else:
            vi.name = name
        out.graph.output.append(vi)
    return out


def _batch_axis_free(model: onnx.ModelProto) -> bool:
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def _batches(feeds: Iterable[Feed], batch_size: int, can_batch: bool) -> Iterator[tuple[Feed, int]]:
    """Concatenate consecutive feeds with matching shapes along axis 0, up to batch_size samples."""
    pending: list[Feed] = []
    pending_n = 0

    def flush() -> tuple[Feed, int]:
        if len(pending) == 1:
            return pending[0], pending_n
        return {k: np.concatenate([f[k] for f in pending], axis=0) for k in pending[0]}, pending_n

    def signature(feed: Feed):
        return tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in feed.items()))

    for feed in feeds:
        n = min((v.shape[0] for v in feed.values() if v.ndim), default=1)
        if not can_batch or batch_size <= 1 or any(v.ndim == 0 for v in feed.values()):
            yield feed, n
            continue
        if pending and (signature(pending[0]) != signature(feed) or pending_n + n > batch_size):
            yield flush()
            pending, pending_n = [], 0
        pending.append(feed)
        pending_n += n
        if pending_n >= batch_size:
            yield flush()
            pending, pending_n = [], 0
    if pending:
        yield flush()


#: ONNX Runtime graph optimisation for the calibration run, by name
ORT_LEVELS = ("disable", "basic", "extended", "all")


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def collect_statistics(
    model: onnx.ModelProto,
    calib: Iterable[Feed],
    tensor_names: Sequence[str],
    *,
    histogram: bool = True,
    bins: int = 4096,
    batch_size: int = 16,
    max_samples: int | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    ort_optimization: str = "basic",
) -> StatisticsCollector:
    """Stream ``calib`` through ``model`` in ONNX Runtime and collect statistics of ``tensor_names``.

    ``threads``: statistics of different tensors are updated in parallel by this many threads
    (default: the CPUs this process may use; 1 = in the calling thread); the statistics are the
    same for any count. ``ort_optimization``: ONNX Runtime's graph optimisation level for the
    calibration run. ``basic`` (default) computes every tensor exactly as the unoptimised graph
    does. ``all`` (NCHWc convolutions) ran ResNet-50's calibration 10-25 % faster in ONNX Runtime
    but took 0.37 GB more memory at batch 4 and changed tensors by float rounding, which moved
    18 of 73 entropy thresholds by up to 5 % (the KL curve is flat near its minimum).
    """
    import onnxruntime as ort

    if ort_optimization not in ORT_LEVELS:
        raise ValueError(f"ort_optimization must be one of {', '.join(ORT_LEVELS)}, got {ort_optimization!r}")
    names = list(dict.fromkeys(tensor_names))
    collector = StatisticsCollector(names, histogram=histogram, bins=bins)
    if not names:
        return collector
    probe = with_outputs(model, names)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[ort_optimization]
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del probe
    input_names = [i.name for i in session.get_inputs()]
    can_batch = _batch_axis_free(model)
    data = calib if max_samples is None else (f for i, f in enumerate(calib) if i < max_samples)
    total = getattr(calib, "size", None)
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    workers = _usable_cpus() if threads is None else max(1, int(threads))
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calibration") if workers > 1 else None
    try:
        batches = _batches(progress_bar(data, total=total, desc="calibrating", enabled=progress), batch_size, can_batch)
        for feed, n in batches:
            missing = [name for name in input_names if name not in feed]
            if missing:
                raise ValueError(f"calibration feed lacks input(s) {', '.join(missing)}")
            outputs = session.run(names, {k: feed[k] for k in input_names})
            collector.update(dict(zip(names, outputs)), samples=n, executor=executor)
            del outputs
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    if collector.samples == 0:
        raise ValueError("calibration data is empty")
    logger.info("calibrated %d tensors on %d samples", len(names), collector.samples)
    return collector


__all__ = [
    "CALIB_METHODS",
    "CalibrationSet",
    "ImagePreprocessing",
    "StatisticsCollector",
    "TensorStats",
    "bin_counts",
    "collect_statistics",
    "compute_range",
    "image_folder_source",
    "iterable_source",
    "kl_divergences",
    "load_calibration",
    "npz_folder_source",
    "npz_source",
    "progress_bar",
    "with_outputs",
]

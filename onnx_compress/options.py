"""Options of ``compress()``, defined once and shared by the Python API and the CLI.

Each field of :class:`CompressOptions` carries its command-line flag and help text in its
metadata; ``onnx_compress.cli`` builds its parser from them, and ``compress(model, **options)``
takes the same names as keyword arguments. Adding an option here adds it to both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .passes.fold_constants import DEFAULT_SIZE_LIMIT_BYTES


def _opt(default: Any, flag: str, help: str, *, kind: str = "value", metavar: str | None = None, factory=None):
    meta = {"flag": flag, "help": help, "kind": kind, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "CompressOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if kwargs.get("passes") is not None:
            kwargs["passes"] = tuple(kwargs["passes"])
        if "skip" in kwargs:
            kwargs["skip"] = tuple(kwargs["skip"])
        if "input_shapes" in kwargs:
            shapes = kwargs["input_shapes"]
            items = shapes.items() if isinstance(shapes, dict) else shapes
            kwargs["input_shapes"] = tuple((str(k), tuple(int(d) for d in v)) for k, v in items)
        return cls(**kwargs)


def option_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(CompressOptions))

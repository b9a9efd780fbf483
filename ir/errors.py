"""Error types shared by every layer of onnx-compress.

The CLI maps each to an exit code (see ``onnx_compress.cli``); library code raises them with a
one-line message that names the offending file, node or tensor and chains the original cause.
"""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class of every error onnx-compress raises on purpose."""


class InvalidModelError(OnnxCompressError):
    """The input is not a valid ONNX model (corrupt, truncated, fails the checker, ...)."""


class UnsupportedModelError(OnnxCompressError):
    """The model is valid ONNX but uses something onnx-compress cannot handle."""


class UnsupportedOpError(UnsupportedModelError):
    """An operator (or operator domain) onnx-compress has no rule or kernel for."""


class PassError(OnnxCompressError):
    """A pass raised; the message names the pass and the passes that ran before it."""


class VerificationError(OnnxCompressError):
    """The compressed model does not compute what the original computed, within tolerance."""

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class OutputPathError(OnnxCompressError):
    """The output cannot be written where the user asked (same as input, missing folder, ...)."""

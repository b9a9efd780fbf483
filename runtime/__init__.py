"""runtime: lowering QDQ graphs to Numba kernel plans (``lowering``) and the ``Session`` API with
the ``numba`` and ``onnxruntime`` back ends (``session``)."""

from .lowering import Plan, lower
from .session import BACKENDS, NodeArg, Session

__all__ = ["BACKENDS", "NodeArg", "Plan", "Session", "lower"]

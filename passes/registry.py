"""Names of the passes for the command line and the default lossless pipeline.

The default pipeline is what ``onnx-compress in.onnx out.onnx`` runs. Every pass in it is exact
(or exact up to float rounding of folded weights) and leaves plain, portable ONNX.
``fuse-conv-activation`` is lossless too but opt-in: it writes model-local functions, which ONNX
Runtime and our INT8 runtime read but some other toolchains do not (see its module docstring).
"""

from __future__ import annotations

from typing import Callable

from .base import Pass
from .batchnorm_to_mul_add import BatchNormToMulAddPass
from .cross_layer_equalization import CrossLayerEqualizationPass
from .eliminate_noop import EliminateNoOpPass
from .fold_affine_into_conv import FoldAffineIntoConvPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import FoldConstantsPass
from .fuse_conv_activation import FuseConvActivationPass, UnfuseConvActivationPass
from .remove_dead_nodes import RemoveDeadNodesPass

#: name -> factory taking the keyword options of :class:`onnx_compress.options.CompressOptions`
PASS_FACTORIES: dict[str, Callable[..., Pass]] = {
    "fold-constants": lambda opts: FoldConstantsPass(size_limit_bytes=opts.constant_fold_limit),
    "eliminate-noop": lambda opts: EliminateNoOpPass(),
    "fold-affine-into-conv": lambda opts: FoldAffineIntoConvPass(),
    "fold-batchnorm": lambda opts: FoldBatchNormPass(),
    "batchnorm-to-mul-add": lambda opts: BatchNormToMulAddPass(),
    "remove-dead-nodes": lambda opts: RemoveDeadNodesPass(),
    "fuse-conv-activation": lambda opts: FuseConvActivationPass(),
    "unfuse-conv-activation": lambda opts: UnfuseConvActivationPass(),
    "cross-layer-equalization": lambda opts: CrossLayerEqualizationPass(),
}

#: the order of the default pipeline (names above); run to a fixed point
DEFAULT_PIPELINE: list[str] = [
    "fold-constants",
    "eliminate-noop",
    "fold-affine-into-conv",
    "fold-batchnorm",
    "batchnorm-to-mul-add",
    "remove-dead-nodes",
]

#: passes that exist but are not in the default pipeline
OPT_IN_PASSES: list[str] = ["fuse-conv-activation", "unfuse-conv-activation", "cross-layer-equalization"]


def available_passes() -> list[str]:
    return list(PASS_FACTORIES)

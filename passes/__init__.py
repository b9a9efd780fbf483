"""passes: the Pass contract, the PassManager and one pass (or rule family) per module."""

from .base import Match, Pass, PassManager, PassResult, RewriteRule, RewriteRulePass
from .batchnorm_to_mul_add import BatchNormToMulAddPass
from .cross_layer_equalization import CrossLayerEqualizationPass
from .eliminate_noop import EliminateNoOpPass
from .fold_affine_into_conv import FoldAffineIntoConvPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import FoldConstantsPass
from .fuse_conv_activation import FuseConvActivationPass, UnfuseConvActivationPass
from .registry import DEFAULT_PIPELINE, OPT_IN_PASSES, PASS_FACTORIES, available_passes
from .remove_dead_nodes import RemoveDeadNodesPass

__all__ = [name for name in dir() if not name.startswith("_")]

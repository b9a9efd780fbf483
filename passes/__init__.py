"""passes: the Pass contract, the PassManager and one pass (or rule family) per module."""

from .base import Match, Pass, PassManager, PassResult, RewriteRule, RewriteRulePass
from .eliminate_noop import EliminateNoOpPass
from .fold_constants import FoldConstantsPass
from .registry import DEFAULT_PIPELINE, OPT_IN_PASSES, PASS_FACTORIES, available_passes
from .remove_dead_nodes import RemoveDeadNodesPass

__all__ = [name for name in dir() if not name.startswith("_")]

"""dependency_graph: coupled-channel groups for structured pruning (DepGraph / SPA style).

* :mod:`.rules` - per-op channel rules (the registry :data:`RULES`; no rule = barrier);
* :mod:`.graph` - building the coupled-channel graph and its :class:`PruningGroup` s;
* :mod:`.importance` - group-level channel scores (``l1``, ``l2``, ``random``, ``bn_scale``,
  ``activation``);
* :mod:`.strategy` - which channels each group keeps (uniform ratio, global ranking, MAC
  target, ``round_to``);
* :mod:`.reconstruct` - refitting consumer weights by ridge least squares (streamed);
* :mod:`.apply` - slicing weights / rewriting attributes, and the masked reference.

Imports only ``..ir``, numpy, networkx, onnx and onnx-graphsurgeon (no onnxruntime).
"""

from .apply import apply_mask, apply_plan, keep_masks
from .graph import DependencyGraph, Dim, Member, PruningGroup, build_dependency_graph
from .importance import IMPORTANCE, group_scores, score_groups
from .rules import RULES, Barrier, ChannelRule
from .strategy import (
    Plan,
    global_plan,
    kept_count,
    mac_fraction,
    mac_model,
    target_plan,
    threshold_plan,
    top_k,
    uniform_plan,
)

__all__ = [
    "IMPORTANCE",
    "RULES",
    "Barrier",
    "ChannelRule",
    "DependencyGraph",
    "Dim",
    "Member",
    "Plan",
    "PruningGroup",
    "apply_mask",
    "apply_plan",
    "build_dependency_graph",
    "group_scores",
    "keep_masks",
    "kept_count",
    "score_groups",
    "top_k",
    "uniform_plan",
    "global_plan",
    "target_plan",
    "threshold_plan",
    "mac_model",
    "mac_fraction",
]

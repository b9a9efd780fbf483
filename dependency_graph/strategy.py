"""Choosing which channels each group keeps.

Uniform ratio: a prunable group with ``C`` channels keeps ``k = kept_count(C, ratio, round_to)``
of them, the ``k`` highest-scoring (ties: lower channel index first), listed in ascending order.

Rounding (``round_to = r``): hardware kernels are fastest on channel counts that are multiples
of 8, but forcing a 12-channel group to 8 would prune 33 % when 30 % was asked. So rounding
applies only to groups with ``C >= 2r`` channels: ``k = r * round(C (1 - ratio) / r)`` (half up),
clamped to ``[r, C]``; smaller groups (and ``r <= 1``) keep ``round(C (1 - ratio))`` clamped to
``[1, C]``. A group is never pruned to zero channels. Note that a "channel" is the group's
pruning atom: for a grouped convolution it is a whole conv group.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .graph import DependencyGraph

Plan = dict[int, np.ndarray]  # group id -> kept channel indices (ascending)


def kept_count(channels: int, ratio: float, round_to: int = 8) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    target = channels * (1.0 - ratio)
    if round_to > 1 and channels >= 2 * round_to:
        k = round_to * int(math.floor(target / round_to + 0.5))
        return max(round_to, min(channels, k))
    return max(1, min(channels, int(math.floor(target + 0.5))))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((np.arange(scores.size), -scores))  # score desc, index asc
    return np.sort(order[:k])


def uniform_plan(
    dg: DependencyGraph, scores: Mapping[int, np.ndarray], ratio: float, *, round_to: int = 8
) -> Plan:
    """Kept channels per prunable group; groups that lose nothing are left out of the plan."""
    plan: Plan = {}
    for group in dg.prunable:
        k = kept_count(group.channels, ratio, round_to)
        if k < group.channels:
            plan[group.id] = top_k(np.asarray(scores[group.id]), k)
    return plan

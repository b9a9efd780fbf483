"""Group-level channel importance.

For a group with channels ``k = 0..C-1`` and weight members ``m`` (constants whose role is a
weight or a scale: Conv/Gemm/MatMul weights on their out- or in-channel axis, BatchNormalization
gamma, ...), each member first scores its own indices ``i`` along its axis:

* ``l1``: ``s_m(i) = sum |W_m[..., i, ...]|`` over every other axis;
* ``l2``: ``s_m(i) = sqrt(sum W_m[..., i, ...]^2)``.

A group channel may own several indices of a member (a whole conv group, ``H*W`` columns after
Flatten); its member score is the sum over those indices, ``S_m(k) = sum_{i: ch(i)=k} s_m(i)``.
Each member is normalised by its mean, ``S_m(k) / mean_k S_m(k)`` (a 3x3 conv with 512 inputs
must not drown a BatchNormalization gamma), and the group score is the sum over members:
``score(k) = sum_m S_m(k) / mean(S_m)``. ``random`` draws uniform scores from a
``numpy.random.default_rng(seed)`` stream keyed by the group id (deterministic, order-free).
Higher score = more important; the lowest are removed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..ir.graph import constant_value
from .graph import DependencyGraph, Member, PruningGroup

IMPORTANCE = ("l1", "l2", "random")


def _member_scores(member: Member, channels: int, norm: str) -> np.ndarray:
    value = np.asarray(constant_value(member.dim.tensor), dtype=np.float64)
    moved = np.moveaxis(value, member.axis, 0).reshape(value.shape[member.axis], -1)
    if norm == "l1":
        per_index = np.abs(moved).sum(axis=1)
    else:
        per_index = np.sqrt(np.square(moved).sum(axis=1))
    scores = np.zeros(channels, dtype=np.float64)
    np.add.at(scores, member.channels, per_index[member.indices])
    return scores


def group_scores(group: PruningGroup, method: str = "l1", *, seed: int = 0) -> np.ndarray:
    """Importance of each channel of ``group`` (length ``group.channels``)."""
    if method == "random":
        return np.random.default_rng([seed, group.id]).random(group.channels)
    if method not in ("l1", "l2"):
        raise ValueError(f"unknown importance '{method}'; choose one of {', '.join(IMPORTANCE)}")
    total = np.zeros(group.channels, dtype=np.float64)
    for member in group.weight_members:
        s = _member_scores(member, group.channels, method)
        mean = s.mean()
        if mean > 0:
            total += s / mean
    return total


def score_groups(dg: DependencyGraph, method: str = "l1", *, seed: int = 0) -> dict[int, np.ndarray]:
    """Scores of every prunable group, keyed by group id."""
    return {g.id: group_scores(g, method, seed=seed) for g in dg.prunable}


ScoreFn = Callable[[PruningGroup], np.ndarray]

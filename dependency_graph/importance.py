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

Two more methods read something other than the weights' magnitude, with the same per-member
normalisation and sum:

* ``bn_scale`` (network slimming): the members are the ``scale`` (gamma) inputs of the
  BatchNormalization nodes in the group, ``s_m(i) = |gamma_i|``. It needs the BN nodes as
  exported (score before BN folding); a group without one is an error that names the group.
* ``activation``: the members are the group's activation dims that a contraction (Conv,
  ConvTranspose, Gemm, MatMul with a constant matrix) reads as its data input, i.e. what the next
  layer actually sees, ``s_m(i) = E|x_i|`` (mean absolute value over the calibration samples and
  every other axis), given as ``activations[tensor_name] -> per-index means``. They are measured by
  the caller (ONNX Runtime lives outside this package, see :mod:`onnx_compress.prune`). A group
  with no such dim falls back to every activation dim of the group that was measured.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..ir.graph import constant_value
from .graph import DependencyGraph, Member, PruningGroup

IMPORTANCE = ("l1", "l2", "random", "bn_scale", "activation")

#: ops whose data input (input 0) is read by a weight contraction
CONTRACTIONS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


def _per_channel(member: Member, channels: int, per_index: np.ndarray) -> np.ndarray:
    scores = np.zeros(channels, dtype=np.float64)
    np.add.at(scores, member.channels, np.asarray(per_index, dtype=np.float64)[member.indices])
    return scores


def _is_bn_scale(member: Member) -> bool:
    if not member.is_param:
        return False
    for node in member.dim.tensor.outputs:
        if node.op == "BatchNormalization" and len(node.inputs) > 1 and node.inputs[1] is member.dim.tensor:
            return True
    return False


def _reads_as_data(member: Member) -> bool:
    tensor = member.dim.tensor
    return any(
        node.op in CONTRACTIONS and node.inputs and node.inputs[0] is tensor and len(node.inputs) > 1
        and (node.op != "MatMul" or constant_value(node.inputs[1]) is not None)
        for node in tensor.outputs
    )


def activation_members(group: PruningGroup) -> list[Member]:
    """The activation dims whose statistics ``activation`` importance reads (see the docstring)."""
    acts = [m for m in group.members if not m.is_param]
    data = [m for m in acts if _reads_as_data(m)]
    return data or acts


def group_scores(
    group: PruningGroup,
    method: str = "l1",
    *,
    seed: int = 0,
    activations: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Importance of each channel of ``group`` (length ``group.channels``)."""
    if method == "random":
        return np.random.default_rng([seed, group.id]).random(group.channels)
    if method not in IMPORTANCE:
        raise ValueError(f"unknown importance '{method}'; choose one of {', '.join(IMPORTANCE)}")
    if method in ("l1", "l2"):
        parts = [_member_scores(m, group.channels, method) for m in group.weight_members]
    elif method == "bn_scale":
        members = [m for m in group.members if _is_bn_scale(m)]
        if not members:
            raise ValueError(
                f"importance 'bn_scale': group {group.id} ({group.describe()[:120]}) has no "
                "BatchNormalization scale; use l1/l2 or keep BN unfolded"
            )
        parts = [_per_channel(m, group.channels, np.abs(constant_value(m.dim.tensor))) for m in members]
    else:
        if activations is None:
            raise ValueError("importance 'activation' needs calibration data")
        members = [m for m in activation_members(group) if m.tensor in activations]
        if not members:
            raise ValueError(f"importance 'activation': no activation of group {group.id} was measured")
        parts = [_per_channel(m, group.channels, activations[m.tensor]) for m in members]
    total = np.zeros(group.channels, dtype=np.float64)
    for s in parts:
        mean = s.mean()
        if mean > 0:
            total += s / mean
    return total


def score_groups(
    dg: DependencyGraph,
    method: str = "l1",
    *,
    seed: int = 0,
    activations: Mapping[str, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Scores of every prunable group, keyed by group id."""
    return {g.id: group_scores(g, method, seed=seed, activations=activations) for g in dg.prunable}


ScoreFn = Callable[[PruningGroup], np.ndarray]

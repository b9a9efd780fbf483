"""Choosing which channels each group keeps.

Uniform ratio: a prunable group with ``C`` channels keeps ``k = kept_count(C, ratio, round_to)``
of them, the ``k`` highest-scoring (ties: lower channel index first), listed in ascending order.

Rounding (``round_to = r``): hardware kernels run whole channel blocks (ONNX Runtime's NCHWc
convolutions: 8 channels on AVX2, 16 on AVX-512), so a group of ``C >= r`` channels keeps a
multiple of ``r`` (at least ``r``) or all ``C``, whichever is nearest to ``C (1 - ratio)`` (ties:
the larger). A kept count off the block costs more than it saves: ONNX Runtime pads the output
channels up to the block and runs a convolution whose input is narrower than the block outside
the blocked layout, with reorders around it. MobileNetV2 pruned to half its MACs on an AVX-512
machine runs 1.91x faster than unpruned at batch 1 with ``r = 16`` and 1.61x with ``r = 8``
(rows ``MACs 0.5`` and ``MACs 0.5 r8`` of ``benchmarks/bench_prune.py``, figures in
benchmarks/README.md). ``round_to="auto"`` takes the block of the CPU at hand
(:func:`host_channel_block`); the default stays 8, so that a model prunes the same everywhere.
A group of exactly ``r`` channels is therefore not pruned, and
``ratio = 0`` keeps all ``C`` (a 42-channel group is not rounded to 40). Groups with fewer than
``r`` channels (and every group when ``r <= 1``) keep ``round(C (1 - ratio))`` clamped to
``[1, C]``. A "channel" here is
the group's pruning atom, ``w`` tensor channels wide (:attr:`PruningGroup.atom_width`: a whole
conv group of a grouped convolution, a whole attention head); its atoms are rounded to
multiples of ``r / gcd(r, w)``, which keeps the tensor channels multiples of ``r`` (8 conv groups
of 4 channels under ``r = 8``: an even number of groups; heads of 64 channels: any number).

Global ranking (:func:`global_plan`): each group's scores are normalised by their mean,
``s'_g(k) = s_g(k) / mean_k s_g(k)`` (so groups measured on different scales compete fairly),
and one threshold ``t`` removes every channel with ``s'_g(k) < t``, at most
``floor(C_g * max_group_ratio)`` per group; the kept count is then rounded as above (raised to the
next allowed count when rounding broke the cap). With ``ratio`` the threshold is the smallest
``t`` that removes at least ``ratio`` of all prunable channels (bisection; capped groups can make
less reachable).

MAC target (:func:`target_plan`): the MACs of a contraction node after pruning follow from the
keep masks of its channel dims (:func:`mac_model`):

* Conv ``group == 1``, ConvTranspose ``group == 1``, Gemm, MatMul:
  ``M' = M * (kept_in / in) * (kept_out / out)``;
* MatMul of two activations (attention ``Q K^T``, ``P V``): ``M' = M * kept_heads / heads``
  when a batch axis of its output carries a group (the heads);
* grouped Conv / ConvTranspose: whole conv groups go, the channels per group stay, so
  ``M' = M * kept_groups / groups`` (the output resp. input fraction).

``M`` uses the formulas of :func:`onnx_compress.ir.stats.count_macs` (symbolic dimensions count
as 1). The MAC fraction ``sum M' / sum M`` is non-increasing in the uniform ratio and in the
global threshold, so bisection (60 steps) finds the least pruning whose fraction is at most
``target``; if even the heaviest allowed pruning stays above it, that plan is returned and the
caller reports the shortfall.

Latency-aware MAC target (the default of :func:`target_plan` without global ranking): MACs are
not wall time. A contraction that reads and writes large activations for few MACs (a depthwise
conv, a 1x1 conv at high resolution) is memory-bound; its time falls only linearly with its
channels, and the unpruned early layers of an inverted-residual net dominate the pruned model's
latency. Cost model per contraction ``n``: ``T_n = M_n + kappa * (N_in + N_out)`` with ``N`` the
element counts of its input and output activations and ``kappa = ELEMENT_COST`` (32 MAC
equivalents per element: roughly the compute/bandwidth balance of a 2-thread AVX2/AVX-512 CPU,
fitted on MobileNetV2's layer times in ONNX Runtime). For each prunable group
``g``, with ``share`` the fraction of a member dim's indices that belong to ``g``,
``M_g = sum share * M_n`` and ``T_g = sum share * (M_n + kappa * N_side)`` over the contractions
whose input (output) channel dim is a member (``N_side`` = ``N_in`` resp. ``N_out``; a grouped
conv counts both sides); ``rho_g = T_g / M_g`` is the wall time per MAC its channels carry. The
group's exponent is ``e_g = clip(rho_g / rho_ref, 1 / E, E)`` (``rho_ref`` the geometric mean over
groups, ``E = MAX_EXPONENT = 3``), and at the single bisected parameter ``r`` group ``g`` removes
``1 - (1 - r) ** e_g`` of its channels (capped by ``max_group_ratio``, then rounded as above).
``e_g = 1`` everywhere is the uniform plan; the removed fraction is increasing in ``r`` for every
group, so the MAC fraction stays monotone and the bisection is unchanged. Groups whose channels
carry more wall time than MACs (MobileNetV2's expanded channels, feeding a depthwise conv) give
more, compute-bound ones (its residual streams) less; ResNet-style nets, where every group is
compute-bound, stay close to uniform (exponents 0.96..1.32). Deterministic: the model depends
only on static shapes. Only *which* channels go changes; the masked-equivalence contract holds.
"""

from __future__ import annotations

import math
import logging
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..ir.graph import constant_value, static_shape
from .apply import keep_masks
from .graph import DependencyGraph

logger = logging.getLogger(__name__)

Plan = dict[int, np.ndarray]  # group id -> kept channel indices (ascending)


def host_channel_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 where it has AVX-512F, else 8 (MLAS's x86
    convolution kernels; read from ``/proc/cpuinfo``, 8 where that cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return 16 if "avx512f" in flags.split() else 8


def resolve_round_to(round_to: int | str) -> int:
    """``round_to`` as an integer: ``"auto"`` is :func:`host_channel_block`."""
    if round_to == "auto":
        return host_channel_block()
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1 or 'auto', got {round_to!r}")
    return int(round_to)


def allowed_counts(channels: int, round_to: int) -> list[int]:
    """Kept counts a group of ``channels`` may have under ``round_to`` (ascending)."""
    if round_to > 1 and channels >= round_to:
        counts = list(range(round_to, channels + 1, round_to))
        return counts if counts[-1] == channels else counts + [channels]
    return list(range(1, channels + 1))


def atom_round_to(group, round_to: int) -> int:
    """``round_to`` in units of the group's atoms (module docstring)."""
    return round_to // math.gcd(round_to, group.atom_width) if round_to > 1 else round_to


def kept_count(channels: int, ratio: float, round_to: int = 8) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:  # rounding alone never removes channels (42 would round to 40)
        return channels
    target = channels * (1.0 - ratio)
    if round_to > 1 and channels >= round_to:
        return min(allowed_counts(channels, round_to), key=lambda k: (abs(k - target), -k))
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
        k = kept_count(group.channels, ratio, atom_round_to(group, round_to))
        if k < group.channels:
            plan[group.id] = top_k(np.asarray(scores[group.id]), k)
    return plan


def _kept_with_cap(channels: int, removed: int, max_group_ratio: float, round_to: int) -> int:
    cap = int(math.floor(channels * max_group_ratio + 1e-9))
    removed = min(removed, cap)
    k = kept_count(channels, removed / channels, round_to) if removed else channels
    floor_k = channels - cap
    if k < floor_k:  # rounding broke the cap: the fewest allowed channels that respect it
        k = next(c for c in allowed_counts(channels, round_to) if c >= floor_k)
    return k


def normalised_scores(scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    out = {}
    for gid, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        mean = s.mean() if s.size else 0.0
        out[gid] = s / mean if mean > 0 else np.ones_like(s)
    return out


def threshold_plan(
    dg: DependencyGraph,
    normalised: Mapping[int, np.ndarray],
    threshold: float,
    *,
    round_to: int = 8,
    max_group_ratio: float = 0.9,
) -> Plan:
    """Global ranking at one threshold (see the module docstring)."""
    plan: Plan = {}
    for group in dg.prunable:
        s = normalised[group.id]
        k = _kept_with_cap(group.channels, int((s < threshold).sum()), max_group_ratio,
                           atom_round_to(group, round_to))
        if k < group.channels:
            plan[group.id] = top_k(s, k)
    return plan


def _bisect(make: Callable[[float], Plan], measure: Callable[[Plan], float], lo: float, hi: float,
            reached: Callable[[float], bool], steps: int = 60) -> Plan:
    """Smallest parameter in [lo, hi] whose plan's measure is ``reached`` (measure monotone)."""
    best = make(hi)
    if not reached(measure(best)):
        return best
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        plan = make(mid)
        if reached(measure(plan)):
            hi, best = mid, plan
        else:
            lo = mid
    return best


def global_plan(
    dg: DependencyGraph,
    scores: Mapping[int, np.ndarray],
    ratio: float,
    *,
    round_to: int = 8,
    max_group_ratio: float = 0.9,
) -> Plan:
    """Remove at least ``ratio`` of all prunable channels, ranked globally (module docstring)."""
    if ratio <= 0:
        return {}
    norm = normalised_scores(scores)
    total = sum(g.channels for g in dg.prunable)
    if total == 0:
        return {}
    top = max((float(v.max()) for v in norm.values() if v.size), default=1.0) * 1.000001 + 1e-12
    sizes = {g.id: g.channels for g in dg.prunable}

    def removed(plan: Plan) -> float:
        return sum(sizes[gid] - len(k) for gid, k in plan.items()) / total

    return _bisect(
        lambda t: threshold_plan(dg, norm, t, round_to=round_to, max_group_ratio=max_group_ratio),
        removed, 0.0, top, lambda r: r >= ratio - 1e-12,
    )


# --- MACs --------------------------------------------------------------------------------------


def _dims_of(shape) -> list[int] | None:
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]


def _contractions(dg: DependencyGraph) -> list[tuple[int, int | None, int | None, bool, int, int]]:
    """``(macs, in_dim_id, out_dim_id, grouped, in_elements, out_elements)`` per contraction node."""
    terms = []

    def dim_id(tensor, axis):
        d = dg.dim_of(tensor.name, axis)
        return None if d is None else d.id

    for node in dg.graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        xs, ws, ys = _dims_of(x.shape), _dims_of(static_shape(w) or w.shape), _dims_of(y.shape)
        if xs is None or ws is None or ys is None:
            continue
        elems = (int(np.prod(xs)), int(np.prod(ys)))
        if node.op in ("Conv", "ConvTranspose"):
            g = int(node.attrs.get("group", 1))
            kernel = int(np.prod(ws[2:])) if len(ws) > 2 else 1
            if node.op == "Conv":
                macs = ys[0] * ys[1] * int(np.prod(ys[2:])) * ws[1] * kernel
            else:
                macs = xs[0] * xs[1] * int(np.prod(xs[2:])) * ws[1] * kernel
            ins, outs = dim_id(x, 1), dim_id(y, 1)
            if g > 1:
                # whole conv groups: the fraction of the side that carries them
                terms.append((macs, None, outs if node.op == "Conv" else ins, True, *elems))
                continue
            terms.append((macs, ins, outs, False, *elems))
        elif node.op == "Gemm":
            ka = 0 if node.attrs.get("transA", 0) else 1
            terms.append((ys[0] * ys[1] * xs[ka], dim_id(x, ka), dim_id(y, 1), False, *elems))
        else:
            if len(xs) < 2:
                continue
            din, dout = dim_id(x, len(xs) - 1), dim_id(y, len(ys) - 1)
            if dout is None and constant_value(w) is None:  # attention product: heads on a batch axis
                dout = next((dim_id(y, a) for a in range(len(ys) - 2) if dim_id(y, a) is not None), None)
            terms.append((int(np.prod(ys)) * xs[-1], din, dout, False, *elems))
    return terms


def mac_model(dg: DependencyGraph) -> list[tuple[int, int | None, int | None, bool]]:
    """``(macs, in_dim_id, out_dim_id, grouped)`` per contraction node (see module docstring)."""
    return [t[:4] for t in _contractions(dg)]


def mac_fraction(terms, masks: Mapping[int, np.ndarray]) -> float:
    """MACs kept by ``masks`` (dim id -> keep mask) as a fraction of the model's."""
    total = sum(t[0] for t in terms)
    if total == 0:
        return 1.0
    kept = 0.0
    for macs, din, dout, _ in terms:
        f = 1.0
        for d in (din, dout):
            if d is not None and d in masks:
                f *= float(masks[d].mean())
        kept += macs * f
    return kept / total


# --- latency-aware MAC target -------------------------------------------------------------------

ELEMENT_COST = 32.0  # MAC-equivalents per activation element a contraction reads or writes
MAX_EXPONENT = 3.0  # latency exponents are clipped to [1 / MAX_EXPONENT, MAX_EXPONENT]


def latency_exponents(
    dg: DependencyGraph, *, element_cost: float = ELEMENT_COST, max_exponent: float = MAX_EXPONENT
) -> dict[int, float]:
    """Per prunable group, how much more wall time than MACs its channels carry (module docstring)."""
    by_dim: dict[int, list[tuple[float, float]]] = {}
    for macs, din, dout, grouped, n_in, n_out in _contractions(dg):
        if grouped:  # a depthwise/grouped conv reads and writes the channels it keeps
            if dout is not None:
                by_dim.setdefault(dout, []).append((macs, macs + element_cost * (n_in + n_out)))
            continue
        for d, n in ((din, n_in), (dout, n_out)):
            if d is not None:
                by_dim.setdefault(d, []).append((macs, macs + element_cost * n))
    ratios: dict[int, float] = {}
    for group in dg.prunable:
        m = t = 0.0
        for member in group.members:
            share = len(member.indices) / max(member.dim.size, 1)
            for macs, lat in by_dim.get(member.dim.id, ()):
                m += share * macs
                t += share * lat
        if m > 0:
            ratios[group.id] = t / m
    if not ratios:
        return {g.id: 1.0 for g in dg.prunable}
    ref = float(np.exp(np.mean(np.log(list(ratios.values())))))  # geometric mean: typical group -> 1
    lo, hi = 1.0 / max_exponent, max_exponent
    # a group that touches no contraction saves no MACs: it keeps the plain ratio (e = 1)
    return {g.id: float(np.clip(ratios[g.id] / ref, lo, hi)) if g.id in ratios else 1.0 for g in dg.prunable}


def weighted_plan(
    dg: DependencyGraph,
    scores: Mapping[int, np.ndarray],
    ratio: float,
    exponents: Mapping[int, float],
    *,
    round_to: int = 8,
    max_group_ratio: float = 0.9,
) -> Plan:
    """Group ``g`` removes ``1 - (1 - ratio) ** e_g`` of its channels (capped, then rounded)."""
    plan: Plan = {}
    for group in dg.prunable:
        r = 1.0 - (1.0 - ratio) ** exponents.get(group.id, 1.0)
        r = min(r, max_group_ratio, 0.999)
        k = kept_count(group.channels, r, atom_round_to(group, round_to)) if r > 0 else group.channels
        if k < group.channels:
            plan[group.id] = top_k(np.asarray(scores[group.id]), k)
    return plan


def target_plan(
    dg: DependencyGraph,
    scores: Mapping[int, np.ndarray],
    target_macs: float,
    *,
    round_to: int = 8,
    global_ranking: bool = False,
    max_group_ratio: float = 0.9,
    latency_aware: bool = True,
) -> Plan:
    """Least pruning whose MACs are at most ``target_macs`` of the model's (module docstring)."""
    if not 0.0 < target_macs <= 1.0:
        raise ValueError(f"target_macs must be in (0, 1], got {target_macs}")
    terms = mac_model(dg)

    def measure(plan: Plan) -> float:
        return mac_fraction(terms, keep_masks(dg, plan))

    if global_ranking:
        norm = normalised_scores(scores)
        top = max((float(v.max()) for v in norm.values() if v.size), default=1.0) * 1.000001 + 1e-12

        def make(t: float) -> Plan:
            return threshold_plan(dg, norm, t, round_to=round_to, max_group_ratio=max_group_ratio)

        hi = top
    elif latency_aware:
        exponents = latency_exponents(dg)

        def make(r: float) -> Plan:
            return weighted_plan(dg, scores, r, exponents, round_to=round_to, max_group_ratio=max_group_ratio)

        hi = 0.999
    else:
        def make(r: float) -> Plan:
            return uniform_plan(dg, scores, r, round_to=round_to)

        hi = min(max_group_ratio, 0.999)
    plan = _bisect(make, measure, 0.0, hi, lambda f: f <= target_macs + 1e-12)
    reached = measure(plan)
    if reached > target_macs + 1e-9:
        logger.warning("MAC target %.3f not reachable: the most pruning allowed keeps %.3f", target_macs, reached)
    return plan

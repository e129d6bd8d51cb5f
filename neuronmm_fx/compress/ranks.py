"""Ranks: which aligned rank each matrix gets, under the parameter budget ``ratio``.

Ranks are multiples of ``block``, below the break-even rank ``K·N/(K+N)`` (at or above it the factors
would not save parameters).  Two rules:

``uniform``  per matrix, the paper's rule: ``r = ⌊(1 − ratio)·K·N/(K+N) / block⌋·block``; a matrix
             whose ``r`` is 0 stays dense, with the reason.
``global``   across every matrix at once (the default): each matrix may stay dense or take any
             aligned rank, chosen to lose the least estimated loss for the parameters saved, until the
             MLPs as a whole keep at most ``(1 − ratio)`` of their parameters (met to within one
             block of one matrix).  The loss of a rank is measured (:mod:`neuronmm_fx.compress.sensitivity`:
             whitened truncation error weighted by the calibration loss's Fisher information at each
             output); without calibration data, the share of spectral energy a rank drops.

Guarantees: every rank is a positive multiple of ``block`` below break-even, or None (dense) with a
reason; the global rule keeps at most ``(1 − ratio)`` of the parameters, short by less than one block.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from neuronmm_fx.passes.match import break_even_rank

_ROUNDING = 1e-9  # a ratio computed from a parameter count must not lose a block to float error


@dataclass(frozen=True)
class RankDecision:
    """The rank chosen for one matrix (``None``: left dense) and why."""

    rank: int | None
    reason: str = ""


def aligned_ranks(in_features: int, out_features: int, block: int) -> list[int]:
    """Every rank that is a multiple of ``block`` and saves parameters, ascending."""
    even = break_even_rank(in_features, out_features)
    return list(range(block, math.ceil(even), block)) if block < even else []


def uniform_rank(in_features: int, out_features: int, ratio: float, block: int) -> RankDecision:
    """The uniform block-aligned rank rule of the paper."""
    even = break_even_rank(in_features, out_features)
    target = (1.0 - ratio) * even
    rank = math.floor(target / block) * block
    if rank <= 0:
        return RankDecision(
            None, f"aligned rank is 0: (1-ratio)·K·N/(K+N) = {target:.1f} is less than one block of {block}"
        )
    if rank >= even:
        return RankDecision(None, f"rank {rank} is at or above break-even {even:.1f}: factors would not save")
    return RankDecision(rank)


def truncation_loss(singular: torch.Tensor) -> Callable[[int], float]:
    """``loss(r)``: the share of spectral energy a rank-``r`` truncation drops."""
    energy = singular.double().square()
    total = float(energy.sum()) or 1.0
    kept = torch.cumsum(energy, 0)

    def loss(rank: int) -> float:
        if rank <= 0:
            return 1.0
        return max(0.0, 1.0 - float(kept[min(rank, kept.numel()) - 1]) / total)

    return loss


def weighted_truncation_loss(singular: torch.Tensor, weights: torch.Tensor) -> Callable[[int], float]:
    """``loss(r) = Σ_{i≥r} σᵢ²·wᵢ``: the estimated cost of dropping every direction from ``r`` on.

    With ``σ`` the singular values of the whitened weight (calibration inputs' Gram averaged per
    token) and ``wᵢ = Σⱼ fⱼ·pᵢⱼ²`` (``fⱼ`` the mean squared gradient of the loss at output ``j``,
    ``pᵢ`` the right singular vectors), this is twice the second-order (Fisher) estimate of the
    loss increase per token, comparable across matrices of any shape and position.
    """
    dropped = (singular.double().square() * weights.double()).flip(0).cumsum(0).flip(0)  # Σ_{i≥r}
    size = dropped.numel()

    def loss(rank: int) -> float:
        return float(dropped[rank]) if rank < size else 0.0

    return loss


@dataclass
class MatrixShape:
    """One matrix competing for parameters in a global allocation; ``loss(r)`` for aligned ``r``."""

    key: Hashable
    in_features: int
    out_features: int
    loss: Callable[[int], float]


def _options(m: MatrixShape, block: int) -> list[tuple[int, float, int | None]]:
    """``(parameters, loss, rank)`` of every choice for one matrix, dense first, then falling ranks."""
    dense = (m.in_features * m.out_features, 0.0, None)
    ranks = reversed(aligned_ranks(m.in_features, m.out_features, block))
    return [dense] + [(r * (m.in_features + m.out_features), m.loss(r), r) for r in ranks]


def _lower_hull(options: list[tuple[int, float, int | None]]) -> list[int]:
    """Indices of the options on the lower convex hull of (parameters saved, loss), in order."""
    hull: list[int] = []
    for index, (params, loss, _) in enumerate(options):
        while len(hull) >= 2:
            (p1, l1, _), (p2, l2, _) = options[hull[-2]], options[hull[-1]]
            # drop the middle point when it lies on or above the segment from hull[-2] to here
            if (l2 - l1) * (p1 - params) >= (loss - l1) * (p1 - p2):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def allocate_global(matrices: list[MatrixShape], ratio: float, block: int) -> dict[Hashable, RankDecision]:
    """Ranks for all matrices together: least total ``loss`` with at most ``(1 − ratio)`` of the parameters.

    Every matrix may stay dense or take any multiple of ``block`` below its break-even rank (a
    multiple-choice knapsack).  Solved greedily: from all-dense, repeatedly take the step along some
    matrix's lower convex hull of (parameters saved, loss) that costs the least loss per parameter
    saved, until the budget holds; then hand back parameters: while a single move to a larger
    option still fits the budget, take the one that lowers the loss most.  The result uses the
    budget to within one block of one matrix (any smaller slack would fit a move).
    """
    options = {m.key: _options(m, block) for m in matrices}
    budget = (1.0 - ratio) * sum(m.in_features * m.out_features for m in matrices) * (1.0 + _ROUNDING)
    state = {m.key: 0 for m in matrices}  # index into options: 0 = dense
    total = sum(options[m.key][0][0] for m in matrices)
    hulls = {m.key: _lower_hull(options[m.key]) for m in matrices}
    position = {m.key: 0 for m in matrices}  # position along the hull

    def next_step(index: int):
        key = matrices[index].key
        hull, at = hulls[key], position[key]
        if at + 1 >= len(hull):
            return None
        (p0, l0, _), (p1, l1, _) = options[key][hull[at]], options[key][hull[at + 1]]
        return ((l1 - l0) / (p0 - p1), index, p0 - p1)

    heap = [step for step in (next_step(i) for i in range(len(matrices))) if step is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        _, index, saved = heapq.heappop(heap)
        key = matrices[index].key
        position[key] += 1
        state[key] = hulls[key][position[key]]
        total -= saved
        step = next_step(index)
        if step is not None:
            heapq.heappush(heap, step)
    while True:  # hand back: the single upward move that fits and lowers the loss most
        best = None
        for m in matrices:
            params, loss, _ = options[m.key][state[m.key]]
            for choice in range(state[m.key]):
                more, lower, _ = options[m.key][choice]
                if total - params + more <= budget and lower < loss:
                    gain = loss - lower
                    if best is None or gain > best[0]:
                        best = (gain, m.key, choice, more - params)
        if best is None:
            break
        _, key, choice, extra = best
        state[key] = choice
        total += extra
    decisions: dict[Hashable, RankDecision] = {}
    for m in matrices:
        rank = options[m.key][state[m.key]][2]
        if rank is not None:
            decisions[m.key] = RankDecision(rank)
        elif not aligned_ranks(m.in_features, m.out_features, block):
            decisions[m.key] = RankDecision(None, f"no multiple of {block} is below break-even")
        else:
            decisions[m.key] = RankDecision(
                None, "global allocation kept it dense: cutting elsewhere lost less"
            )
    return decisions

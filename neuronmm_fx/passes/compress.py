"""Compress: choose each matrix's rank and factor it, without touching any graph.

Ranks are multiples of ``block``, below the break-even rank ``K·N/(K+N)`` (at or above it the factors
would not save parameters).  Two rules:

``uniform``  per matrix, the paper's rule: ``r = ⌊(1 − ratio)·K·N/(K+N) / block⌋·block``; a matrix
             whose ``r`` is 0 stays dense, with the reason.
``global``   across every matrix at once: each matrix gets one of the two aligned ranks around its
             exact per-matrix target, the lower one where it loses least per parameter saved, until
             the MLP parameters are at most ``(1 − ratio)`` of what they were (met to within one
             block of one matrix).  The loss of rank ``r`` is the share of the (whitened) spectrum's
             energy it drops, ``Σ_{i≥r} σᵢ² / Σ σᵢ²``.

Factorization is a plug-in (:class:`Factorizer`).  :class:`TruncatedSVD` factors the weight itself;
:class:`WhitenedSVD` (SVD-LLM) factors ``Sᵀ·W`` where ``G = XᵀX = S·Sᵀ`` is the Gram matrix of the
layer's calibration inputs, so that the dropped singular values are exactly the output error on the
calibration data, and folds ``S⁻ᵀ`` back into the left factor.  Both split ``√Σ`` evenly between ``U``
and ``V``.  Low-rank chains keep the factors they came with.

Guarantees: ``u`` is (in, r) and ``v`` is (r, out) with exactly the chosen rank; parameter counts
are ``r·(K+N)`` (+ bias); dtypes follow the original weight; no factor holds NaN.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from neuronmm_fx.modules import Factors
from neuronmm_fx.passes.match import Projection, Site, break_even_rank

_ROUNDING = 1e-9  # a ratio computed from a parameter count must not lose a block to float error
WHITENING_DAMPING = 1e-6  # added to the Gram's diagonal, relative to its mean diagonal
EIGEN_FLOOR = 1e-10  # smallest eigenvalue kept, relative to the largest


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


@dataclass
class MatrixShape:
    """One matrix competing for parameters in a global allocation."""

    key: Hashable
    in_features: int
    out_features: int
    loss: Callable[[int], float]


def allocate_global(matrices: list[MatrixShape], ratio: float, block: int) -> dict[Hashable, RankDecision]:
    """Aligned ranks for all matrices together, meeting ``(1 − ratio)`` of their parameters.

    Each matrix's per-matrix target ``(1 − ratio)·K·N/(K+N)`` lies between two aligned ranks ``lo``
    and ``hi = lo + block`` (``hi`` is "dense" when it reaches break-even).  Every matrix starts at
    ``hi``; the cheapest steps ``hi → lo`` by loss per parameter saved are taken until the budget
    holds, so the total lands within one step of one matrix of it.  Ranks stay within one block of
    the uniform rule's exact target: an unconstrained greedy over all ranks, tried first, cut some
    matrices to one block and kept others dense, and was far worse on SmolLM2 than the uniform rule
    at the same size (perplexity 1452 against 278), because spectral energy does not rank a matrix's
    importance to the model.
    """
    options: dict[Hashable, list[int | None]] = {}
    for m in matrices:
        even = break_even_rank(m.in_features, m.out_features)
        low = math.floor((1.0 - ratio) * even / block + _ROUNDING) * block
        high: int | None = low + block if low + block < even else None  # None = dense
        options[m.key] = [high] + ([low] if low > 0 else [])

    def params(m: MatrixShape, rank: int | None) -> int:
        return m.in_features * m.out_features if rank is None else rank * (m.in_features + m.out_features)

    def loss(m: MatrixShape, rank: int | None) -> float:
        return 0.0 if rank is None else m.loss(rank)

    budget = (1.0 - ratio) * sum(m.in_features * m.out_features for m in matrices) * (1.0 + _ROUNDING)
    state = {m.key: options[m.key][0] for m in matrices}
    total = sum(params(m, state[m.key]) for m in matrices)
    heap = []
    for index, m in enumerate(matrices):
        if len(options[m.key]) == 2:
            high, low = options[m.key]
            saved = params(m, high) - params(m, low)
            heap.append(((loss(m, low) - loss(m, high)) / saved, index, saved, low))
    heapq.heapify(heap)
    while total > budget and heap:
        _, index, saved, low = heapq.heappop(heap)
        state[matrices[index].key] = low
        total -= saved
    decisions: dict[Hashable, RankDecision] = {}
    for m in matrices:
        rank = state[m.key]
        if rank is not None:
            decisions[m.key] = RankDecision(rank)
        elif not aligned_ranks(m.in_features, m.out_features, block):
            decisions[m.key] = RankDecision(None, f"no multiple of {block} is below break-even")
        else:
            decisions[m.key] = RankDecision(
                None, "global allocation kept it dense: cutting elsewhere lost less"
            )
    return decisions


class Factorizer(Protocol):
    """Turns an (in, out) weight into ``u`` (in, r) and ``v`` (r, out)."""

    name: str

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self, projection: Projection, weight_in_out: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _CachedSVD:
    """Shared machinery: decompose once per projection, then truncate as often as asked."""

    name = ""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _decompose(self, projection: Projection, weight: torch.Tensor):
        raise NotImplementedError

    def _factors(self, projection: Projection, weight: torch.Tensor):
        key = id(projection)
        if key not in self._cache:
            self._cache[key] = self._decompose(projection, weight)
        return self._cache[key]

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor:
        return self._factors(projection, weight_in_out)[1]

    def __call__(self, projection: Projection, weight_in_out: torch.Tensor, rank: int):
        left, singular, right_t = self._factors(projection, weight_in_out)
        root = singular[:rank].sqrt()
        u = left[:, :rank] * root  # (in, r)
        v = root[:, None] * right_t[:rank]  # (r, out)
        return u.to(weight_in_out.dtype).contiguous(), v.to(weight_in_out.dtype).contiguous()


class TruncatedSVD(_CachedSVD):
    """Plain truncated SVD of the weight: ``W ≈ (Q_r·√Σ_r)·(√Σ_r·P_rᵀ)``, computed in float32."""

    name = "svd"

    def _decompose(self, projection: Projection, weight: torch.Tensor):
        return torch.linalg.svd(weight.float(), full_matrices=False)


def whitening(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Sᵀ, S⁻ᵀ)`` with ``S·Sᵀ = G``, robust to a Gram that is singular or not quite PSD.

    ``G`` is damped by ``WHITENING_DAMPING`` of its mean diagonal and its eigenvalues are floored at
    ``EIGEN_FLOOR`` of the largest, so dead channels and too few tokens give finite factors.
    """
    gram = gram.double()
    size = gram.shape[0]
    scale = float(gram.diagonal().mean()) if size else 0.0
    if not math.isfinite(scale) or scale <= 0.0:
        eye = torch.eye(size, dtype=torch.float64)
        return eye, eye
    gram = (gram + gram.t()) / 2 + WHITENING_DAMPING * scale * torch.eye(size, dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(EIGEN_FLOOR * float(eigenvalues.max()))
    root = eigenvalues.sqrt()
    return root[:, None] * vectors.t(), vectors / root[None, :]


class WhitenedSVD(_CachedSVD):
    """SVD-LLM: truncated SVD of ``Sᵀ·W`` with ``G = S·Sᵀ``, left factor mapped back by ``S⁻ᵀ``."""

    name = "whiten"

    def __init__(
        self, grams: dict[Hashable, torch.Tensor], gram_key: Callable[[Projection], Hashable]
    ) -> None:
        super().__init__()
        self.grams = grams
        self.gram_key = gram_key
        self._whitening: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    def covers(self, projection: Projection) -> bool:
        return self.gram_key(projection) in self.grams

    def _decompose(self, projection: Projection, weight: torch.Tensor):
        key = self.gram_key(projection)
        if key not in self._whitening:
            self._whitening[key] = whitening(self.grams[key])
        s_t, s_inv_t = self._whitening[key]
        left, singular, right_t = torch.linalg.svd(s_t @ weight.double(), full_matrices=False)
        return (s_inv_t @ left).float(), singular.float(), right_t.float()


@dataclass
class CompressedProjection:
    """The outcome for one projection of a site."""

    role: str
    name: str
    in_features: int
    out_features: int
    factors: Factors
    method: str  # "svd", "whiten", "existing" (a low-rank chain reused as is) or "dense"
    params_before: int
    reason: str = ""

    @property
    def rank(self) -> int | None:
        return self.factors.rank

    @property
    def params_after(self) -> int:
        return self.factors.numel()


def compress_projection(
    projection: Projection, decision: RankDecision, factorize: Factorizer
) -> CompressedProjection:
    common = dict(
        role=projection.role,
        name=projection.name,
        in_features=projection.in_features,
        out_features=projection.out_features,
        params_before=projection.parameter_count(),
    )
    if projection.is_lowrank:
        u = projection.first.weight_in_out()
        v = projection.second.weight_in_out()
        return CompressedProjection(factors=Factors(u, v, projection.bias), method="existing", **common)
    weight = projection.weight_in_out()
    if decision.rank is None:
        dense = Factors(weight.contiguous(), None, projection.bias)
        return CompressedProjection(factors=dense, method="dense", reason=decision.reason, **common)
    u, v = factorize(projection, weight, decision.rank)
    return CompressedProjection(factors=Factors(u, v, projection.bias), method=factorize.name, **common)


def compress_site(
    site: Site, decisions: dict[str, RankDecision], factorizers: dict[str, Factorizer]
) -> dict[str, CompressedProjection]:
    """Factors for every projection of a site, by role (``decisions``/``factorizers`` keyed by role)."""
    return {
        role: compress_projection(p, decisions.get(role, RankDecision(None)), factorizers[role])
        for role, p in site.projections.items()
    }

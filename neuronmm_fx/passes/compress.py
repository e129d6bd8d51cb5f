"""Compress: choose each matrix's rank and factor it, without touching any graph.

Ranks are multiples of ``block``, below the break-even rank ``K·N/(K+N)`` (at or above it the factors
would not save parameters).  Two rules:

``uniform``  per matrix, the paper's rule: ``r = ⌊(1 − ratio)·K·N/(K+N) / block⌋·block``; a matrix
             whose ``r`` is 0 stays dense, with the reason.
``global``   across every matrix at once: start dense, and repeatedly take the cheapest step (dense →
             largest aligned rank, or one block less) by *loss per parameter saved* until the MLP
             parameters are at most ``(1 − ratio)`` of what they were.  The loss of rank ``r`` is the
             share of the (whitened) spectrum's energy it drops, ``Σ_{i≥r} σᵢ² / Σ σᵢ²``.  The budget is
             met to within one step of one matrix (at most one block, or one dense→rank step).

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
    """Greedy global allocation of aligned ranks to meet ``(1 − ratio)`` of the parameters."""
    decisions: dict[Hashable, RankDecision] = {}
    options = {m.key: aligned_ranks(m.in_features, m.out_features, block) for m in matrices}
    total = sum(m.in_features * m.out_features for m in matrices)
    budget = (1.0 - ratio) * total
    state: dict[Hashable, int | None] = {m.key: None for m in matrices}  # None = dense
    by_key = {m.key: m for m in matrices}

    def next_step(key) -> tuple[float, int, Hashable, int] | None:
        m, ranks, rank = by_key[key], options[key], state[key]
        width = m.in_features + m.out_features
        if rank is None:
            if not ranks:
                return None
            new, saved, lost = (
                ranks[-1],
                m.in_features * m.out_features - ranks[-1] * width,
                m.loss(ranks[-1]),
            )
        else:
            if rank - block < block:
                return None
            new, saved, lost = rank - block, block * width, m.loss(rank - block) - m.loss(rank)
        return (lost / saved, saved, key, new)

    heap = [step for m in matrices if (step := next_step(m.key)) is not None]
    heapq.heapify(heap)
    order = {m.key: i for i, m in enumerate(matrices)}
    while total > budget and heap:
        _, saved, key, new = heapq.heappop(heap)
        state[key] = new
        total -= saved
        step = next_step(key)
        if step is not None:
            heapq.heappush(heap, step)
    for key, rank in sorted(state.items(), key=lambda item: order[item[0]]):
        if rank is not None:
            decisions[key] = RankDecision(rank)
        elif not options[key]:
            decisions[key] = RankDecision(None, f"no multiple of {block} is below break-even")
        else:
            decisions[key] = RankDecision(
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

"""Compress: choose each matrix's rank and factor it, without touching any graph.

Ranks are multiples of ``block``, below the break-even rank ``K·N/(K+N)`` (at or above it the factors
would not save parameters).  Two rules:

``uniform``  per matrix, the paper's rule: ``r = ⌊(1 − ratio)·K·N/(K+N) / block⌋·block``; a matrix
             whose ``r`` is 0 stays dense, with the reason.
``global``   across every matrix at once (the default): each matrix may stay dense or take any
             aligned rank, chosen to lose the least estimated loss for the parameters saved, until the
             MLPs as a whole keep at most ``(1 − ratio)`` of their parameters (met to within one
             block of one matrix).  The loss of a rank is measured (:mod:`neuronmm_fx.sensitivity`:
             whitened truncation error weighted by the calibration loss's Fisher information at each
             output); without calibration data, the share of spectral energy a rank drops.

Factorization is a plug-in (:class:`Factorizer`).  :class:`TruncatedSVD` factors the weight itself;
:class:`WhitenedSVD` (SVD-LLM, all Grams from one pass) factors ``Sᵀ·W`` where ``G = XᵀX = S·Sᵀ`` is
the Gram matrix of the layer's calibration inputs, so that the dropped singular values are exactly the
output error on the calibration data, and folds ``S⁻ᵀ`` back into the left factor.  Both split ``√Σ``
evenly between ``U`` and ``V``.  :class:`Precomputed` hands out factors that
:mod:`neuronmm_fx.sequential` computed block by block.  Low-rank chains keep the factors they came with.

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


class Factorizer(Protocol):
    """Turns an (in, out) weight into ``u`` (in, r) and ``v`` (r, out)."""

    name: str

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self, projection: Projection, weight_in_out: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def split_factors(
    left: torch.Tensor, singular: torch.Tensor, right_t: torch.Tensor, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = left_r·√Σ_r`` (in, r) and ``v = √Σ_r·right_tᵣ`` (r, out), in ``dtype``."""
    root = singular[:rank].sqrt()
    u = left[:, :rank] * root
    v = root[:, None] * right_t[:rank]
    return u.to(dtype).contiguous(), v.to(dtype).contiguous()


class TruncatedSVD:
    """Plain truncated SVD of the weight: ``W ≈ (Q_r·√Σ_r)·(√Σ_r·P_rᵀ)``, computed in float32."""

    name = "svd"

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(weight_in_out.float())

    def __call__(self, projection: Projection, weight_in_out: torch.Tensor, rank: int):
        left, singular, right_t = torch.linalg.svd(weight_in_out.float(), full_matrices=False)
        return split_factors(left, singular, right_t, rank, weight_in_out.dtype)


def whitening(gram: torch.Tensor, inverse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Sᵀ, S⁻ᵀ)`` with ``S·Sᵀ = G`` (float64), robust to a Gram that is singular or not quite PSD.

    ``G`` is damped by ``WHITENING_DAMPING`` of its mean diagonal.  The fast path is a Cholesky
    factor (``S`` lower triangular); if that fails, ``eigh`` with eigenvalues floored at
    ``EIGEN_FLOOR`` of the largest, so dead channels and too few tokens still give finite factors.
    ``inverse=False`` skips ``S⁻ᵀ`` (None) where only the spectrum is wanted.
    """
    gram = gram.double()
    size = gram.shape[0]
    scale = float(gram.diagonal().mean()) if size else 0.0
    eye = torch.eye(size, dtype=torch.float64)
    if not math.isfinite(scale) or scale <= 0.0:
        return eye, eye
    gram = (gram + gram.t()) / 2 + WHITENING_DAMPING * scale * eye
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        s_t = lower.t()
        return s_t, torch.linalg.solve_triangular(s_t, eye, upper=True) if inverse else None
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp_min(EIGEN_FLOOR * float(eigenvalues.max()))
    root = eigenvalues.sqrt()
    return root[:, None] * vectors.t(), vectors / root[None, :]


def whitened_svd(
    s_inv_t: torch.Tensor, whitened_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a whitened (in, out) target, the left vectors mapped back to input space by ``S⁻ᵀ``.

    ``whitened_target`` is ``Sᵀ·W`` for SVD-LLM, or ``S⁻¹·C·W`` for the target-aware least-squares
    fit (see :func:`neuronmm_fx.sequential.compress_layerwise`).  Returns ``(left, σ, right_t)``
    in float64 such that ``left_r·diag(σ_r)·right_tᵣ`` is the best rank-``r`` weight in the norm the
    calibration inputs induce.
    """
    left, singular, right_t = svd_by_gram(whitened_target)
    return s_inv_t @ left, singular, right_t


def svd_by_gram(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(left, σ, right_t)`` of a matrix from ``eigh`` of its smaller Gram form, in its dtype.

    Two to three times faster than ``torch.linalg.svd`` on the (576, 1536) shapes of small LLMs.
    Squaring loses relative precision only in singular values below ~1e-8 of the largest, which a
    truncation drops anyway; vectors of (numerically) zero singular values are arbitrary.
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.t() if wide else matrix.t() @ matrix
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)  # descending
    singular = eigenvalues.clamp_min(0.0).sqrt()
    finfo = torch.finfo(matrix.dtype)
    top = float(singular[0]) if singular.numel() else 0.0
    safe = singular.clamp_min(max(top * finfo.eps**2, finfo.tiny))  # vectors of σ ≈ 0 stay finite
    if wide:
        return vectors, singular, (vectors.t() @ matrix) / safe[:, None]
    return (matrix @ vectors) / safe[None, :], singular, vectors.t()


class WhitenedSVD:
    """SVD-LLM with every Gram collected in one pass: truncated SVD of ``Sᵀ·W`` with ``G = S·Sᵀ``.

    The fallback for models without a stack of layers that :mod:`neuronmm_fx.sequential` can walk;
    it holds every Gram at once.
    """

    name = "whiten"

    def __init__(
        self, grams: dict[Hashable, torch.Tensor], gram_key: Callable[[Projection], Hashable]
    ) -> None:
        self.grams = grams
        self.gram_key = gram_key
        self._whitening: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    def covers(self, projection: Projection) -> bool:
        return self.gram_key(projection) in self.grams

    def _whiten(self, projection: Projection) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.gram_key(projection)
        if key not in self._whitening:
            self._whitening[key] = whitening(self.grams[key])
        return self._whitening[key]

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor:
        s_t, _ = self._whiten(projection)
        return torch.linalg.svdvals(s_t @ weight_in_out.double())

    def __call__(self, projection: Projection, weight_in_out: torch.Tensor, rank: int):
        s_t, s_inv_t = self._whiten(projection)
        left, singular, right_t = whitened_svd(s_inv_t, s_t @ weight_in_out.double())
        return split_factors(left, singular, right_t, rank, weight_in_out.dtype)


class Precomputed:
    """Factors computed ahead (by the layer-wise sequential pass), handed out by projection."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, projection: Projection, u: torch.Tensor, v: torch.Tensor) -> None:
        self.factors[id(projection)] = (u, v)

    def covers(self, projection: Projection) -> bool:
        return id(projection) in self.factors

    def spectrum(self, projection: Projection, weight_in_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("precomputed factors carry no spectrum: ranks were allocated before")

    def __call__(self, projection: Projection, weight_in_out: torch.Tensor, rank: int):
        u, v = self.factors.pop(id(projection))
        if u.shape[1] != rank:
            raise AssertionError(f"{projection.name}: precomputed rank {u.shape[1]}, asked for {rank}")
        return u, v


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

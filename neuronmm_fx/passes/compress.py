"""Compress: choose each matrix's rank and factor it, without touching any graph.

Rank rule (uniform, per matrix): a K×N matrix keeps ``r = ⌊(1 − ratio)·K·N/(K+N) / block⌋·block``.
A matrix whose ``r`` is 0 stays dense, and so would one at or above the break-even rank
``K·N/(K+N)`` (factors would not save parameters).  Low-rank chains keep their factors as they are.

The factorization is a plug-in (:class:`Factorizer`): plain truncated SVD here, with ``U·√Σ`` and
``√Σ·V`` as the two factors.  A data-aware method only needs another factorizer; the passes do
not change.

Guarantees: ``factors.u @ factors.v`` approximates the projection's (in, out) weight with exactly the
chosen rank; parameter counts are ``rank·(K+N)`` (+ bias); dtypes follow the original weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from neuronmm_fx.modules import Factors
from neuronmm_fx.passes.match import Projection, Site, break_even_rank


@dataclass(frozen=True)
class RankDecision:
    """The rank chosen for one matrix (``None``: left dense) and why."""

    rank: int | None
    reason: str = ""


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


class Factorizer(Protocol):
    """Turns an (in, out) weight into ``u`` (in, r) and ``v`` (r, out)."""

    name: str

    def __call__(
        self, projection: Projection, weight_in_out: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TruncatedSVD:
    """Plain truncated SVD of the weight: ``W ≈ (Q_r·√Σ_r)·(√Σ_r·P_rᵀ)``, computed in float32."""

    name = "svd"

    def __call__(
        self, projection: Projection, weight_in_out: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        left, singular, right_t = torch.linalg.svd(weight_in_out.float(), full_matrices=False)
        root = singular[:rank].sqrt()
        u = left[:, :rank] * root  # (in, r)
        v = root[:, None] * right_t[:rank]  # (r, out)
        return u.to(weight_in_out.dtype), v.to(weight_in_out.dtype)


@dataclass
class CompressedProjection:
    """The outcome for one projection of a site."""

    role: str
    name: str
    in_features: int
    out_features: int
    factors: Factors
    method: str  # "svd", "existing" (a low-rank chain reused as is) or "dense"
    params_before: int
    reason: str = ""

    @property
    def rank(self) -> int | None:
        return self.factors.rank

    @property
    def params_after(self) -> int:
        return self.factors.numel()


def compress_projection(
    projection: Projection, ratio: float, block: int, factorize: Factorizer
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
    decision = uniform_rank(projection.in_features, projection.out_features, ratio, block)
    if decision.rank is None:
        dense = Factors(weight.contiguous(), None, projection.bias)
        return CompressedProjection(factors=dense, method="dense", reason=decision.reason, **common)
    u, v = factorize(projection, weight, decision.rank)
    return CompressedProjection(factors=Factors(u, v, projection.bias), method=factorize.name, **common)


def compress_site(
    site: Site, ratio: float, block: int, factorize: Factorizer
) -> dict[str, CompressedProjection]:
    """Factors for every projection of a site, by role."""
    return {role: compress_projection(p, ratio, block, factorize) for role, p in site.projections.items()}

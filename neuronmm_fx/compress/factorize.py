"""Factorize: turn an (in, out) weight into ``u`` (in, r) and ``v`` (r, out), without touching any graph.

Factorization is a plug-in (:class:`Factorizer`).  :class:`TruncatedSVD` factors the weight itself;
:class:`WhitenedSVD` (SVD-LLM, all Grams from one pass) factors ``Sᵀ·W`` where ``G = XᵀX = S·Sᵀ`` is
the Gram matrix of the layer's calibration inputs, so that the dropped singular values are exactly the
output error on the calibration data, and folds ``S⁻ᵀ`` back into the left factor.  Both split ``√Σ``
evenly between ``U`` and ``V``.  :class:`Precomputed` hands out factors that
:mod:`neuronmm_fx.compress.sequential` computed block by block.  Low-rank chains keep the factors they
came with.  :func:`compress_site` applies the rank decisions and factorizers to one matched site.

Guarantees: ``u`` is (in, r) and ``v`` is (r, out) with exactly the chosen rank; parameter counts
are ``r·(K+N)`` (+ bias); dtypes follow the original weight; no factor holds NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from neuronmm_fx.compress.ranks import RankDecision
from neuronmm_fx.modules import Factors
from neuronmm_fx.passes.match import Projection, Site

WHITENING_DAMPING = 1e-6  # added to the Gram's diagonal, relative to its mean diagonal
EIGEN_FLOOR = 1e-10  # smallest eigenvalue kept, relative to the largest
GRAM_BLOCKS = 4  # column blocks of a Gram product; only the upper block triangle is multiplied
GRAM_BLOCKED_WIDTH = 512  # narrower inputs take one plain product


def gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ·x`` of a (rows, width) matrix in its dtype, multiplying only the upper block triangle.

    The width is cut into ``GRAM_BLOCKS`` column blocks; block row ``i`` is ``x_iᵀ·x[:, i:]``, and
    the blocks below the diagonal are copied transposed from it: 10/16 of a full product's
    multiply-adds for the same dot products.  On 2 cores, a (1024, 1536) float32 input took 19 ms
    against 26 ms and a (1024, 576) one 2.6 ms against 4.6 ms; the calibration walks form a few
    hundred of these.
    """
    width = x.shape[-1]
    if width < GRAM_BLOCKED_WIDTH:
        return x.t() @ x
    step = -(-width // GRAM_BLOCKS)
    out = x.new_empty(width, width)
    for start in range(0, width, step):
        stop = min(start + step, width)
        block_row = x[:, start:stop].t() @ x[:, start:]  # (stop - start, width - start)
        out[start:stop, start:] = block_row
        out[stop:, start:stop] = block_row[:, stop - start :].t()
    return out


class GramAccumulator:
    """``Σ xᵀx`` per key over calibration batches: float32 products summed in float64."""

    def __init__(self) -> None:
        self.grams: dict[Hashable, torch.Tensor] = {}
        self.tokens: dict[Hashable, int] = {}

    def add(self, key: Hashable, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        product = gram(x).double()
        if key in self.grams:
            self.grams[key] += product
        else:
            self.grams[key] = product
        self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

    def mean(self, key: Hashable) -> torch.Tensor:
        """The Gram averaged per token (the scale the sensitivity estimate needs)."""
        return self.grams[key] / max(self.tokens[key], 1)


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
    size = gram.shape[0]
    scale = float(gram.diagonal().double().mean()) if size else 0.0
    if not math.isfinite(scale) or scale <= 0.0:
        eye = torch.eye(size, dtype=torch.float64)
        return eye, eye
    # (G + Gᵀ)/2 + damping·I, built in one new matrix: the (1536, 1536) Grams of small LLMs' down
    # projections are 18 MiB each in float64, and every temporary counts at the walk's peak
    damped = gram.double() + gram.t().double()
    damped.mul_(0.5).diagonal().add_(WHITENING_DAMPING * scale)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        del damped
        s_t = lower.t()
        if not inverse:
            return s_t, None
        return s_t, torch.linalg.solve_triangular(s_t, torch.eye(size, dtype=torch.float64), upper=True)
    eigenvalues, vectors = torch.linalg.eigh(damped)
    eigenvalues = eigenvalues.clamp_min(EIGEN_FLOOR * float(eigenvalues.max()))
    root = eigenvalues.sqrt()
    return root[:, None] * vectors.t(), vectors / root[None, :]


FISHER_DAMPING = (
    1.0  # output weights are √(f/mean f + this): a floor, so rarely sensitive channels still count
)


def fisher_weights(fisher: torch.Tensor | None) -> torch.Tensor | None:
    """Per-output-channel weights ``√(fⱼ/mean f + FISHER_DAMPING)`` (float64) for a Fisher-weighted
    factorization, or None without a (usable) Fisher measurement.

    On SmolLM2-135M at ratio 0.2 (default call), weighting the factorization's output channels this
    way took perplexity from 2.02× to 1.79× dense on WikiText-2 and from 2.10× to 1.87× on the Python
    text; a damping of 0.1 instead of 1 measured the same (1.81×, 1.87×).
    """
    if fisher is None:
        return None
    fisher = fisher.double()
    mean = float(fisher.mean())
    if not math.isfinite(mean) or mean <= 0.0:
        return None
    return (fisher / mean + FISHER_DAMPING).sqrt()


def whitened_svd(
    s_inv_t: torch.Tensor, whitened_target: torch.Tensor, output_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a whitened (in, out) target, the left vectors mapped back to input space by ``S⁻ᵀ``.

    With ``output_weights`` (out,), the error is weighted per output channel (FWSVD's idea, on top
    of SVD-LLM's whitening): the SVD is of ``target·diag(w)`` and ``diag(w)⁻¹`` goes back into the
    right vectors, so ``left_r·diag(σ_r)·right_tᵣ`` is then the best rank-``r`` weight in that norm.

    ``whitened_target`` is ``Sᵀ·W`` for SVD-LLM, or ``S⁻¹·C·W`` for the target-aware least-squares
    fit (see :func:`neuronmm_fx.compress.sequential.compress_layerwise`).  Returns ``(left, σ, right_t)``
    in float64 such that ``left_r·diag(σ_r)·right_tᵣ`` is the best rank-``r`` weight in the norm the
    calibration inputs induce.
    """
    if output_weights is None:
        left, singular, right_t = svd_by_gram(whitened_target)
        return s_inv_t @ left, singular, right_t
    left, singular, right_t = svd_by_gram(whitened_target * output_weights)
    return s_inv_t @ left, singular, right_t / output_weights


def svd_by_gram(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(left, σ, right_t)`` of a matrix from ``eigh`` of its smaller Gram form, in its dtype.

    Two to three times faster than ``torch.linalg.svd`` on the (576, 1536) shapes of small LLMs.
    Squaring loses relative precision only in singular values below ~1e-8 of the largest, which a
    truncation drops anyway; vectors of (numerically) zero singular values are arbitrary.
    """
    wide = matrix.shape[0] <= matrix.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(gram(matrix.t() if wide else matrix))
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

    The fallback for models without a stack of layers that :mod:`neuronmm_fx.compress.sequential` can walk;
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


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no storage with ``tensor`` (``contiguous()`` copies only views)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def compress_projection(
    projection: Projection, decision: RankDecision, factorize: Factorizer, materialize: bool = True
) -> CompressedProjection:
    """The outcome for one projection.  ``materialize=False`` leaves a dense weight (and a bias, and
    reused low-rank factors) a view of the model's parameter: no copy, for a caller that only reads
    the outcome (the compile backend) or that replaces the parameter's layer and never writes the
    view (``optimize`` without fine-tuning; on SmolLM2 the copies were 155 MiB at the peak)."""
    common = dict(
        role=projection.role,
        name=projection.name,
        in_features=projection.in_features,
        out_features=projection.out_features,
        params_before=projection.parameter_count(),
    )
    bias = projection.bias
    if materialize and bias is not None:
        bias = _own(bias)
    if projection.is_lowrank:
        u = projection.first.weight_in_out()
        v = projection.second.weight_in_out()
        if materialize:
            u, v = _own(u), _own(v)
        return CompressedProjection(factors=Factors(u, v, bias), method="existing", **common)
    weight = projection.weight_in_out()
    if decision.rank is None:
        dense = Factors(_own(weight) if materialize else weight, None, bias)
        return CompressedProjection(factors=dense, method="dense", reason=decision.reason, **common)
    u, v = factorize(projection, weight, decision.rank)
    return CompressedProjection(factors=Factors(u, v, bias), method=factorize.name, **common)


def all_dense(compressed: dict[str, CompressedProjection]) -> str | None:
    """Why a site is not worth fusing (every projection stayed dense), or None."""
    if not all(c.method == "dense" for c in compressed.values()):
        return None
    reasons = "; ".join(f"{c.name}: {c.reason}" for c in compressed.values())
    return f"every matrix stays dense ({reasons})"


def compress_site(
    site: Site,
    decisions: dict[str, RankDecision],
    factorizers: dict[str, Factorizer],
    materialize: bool = True,
) -> dict[str, CompressedProjection]:
    """Factors for every projection of a site, by role (``decisions``/``factorizers`` keyed by role)."""
    return {
        role: compress_projection(p, decisions.get(role, RankDecision(None)), factorizers[role], materialize)
        for role, p in site.projections.items()
    }

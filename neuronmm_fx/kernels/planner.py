"""Block planner: choose the kernels' block sizes from shapes, dtype and target.

The model
---------
Every kernel here keeps one *token block* of BM tokens on chip as a transposed strip and streams
the weights past it, so

* X is read once and Y written once, whatever the blocks;
* every weight that is streamed is read once per token block (``ceil(M/BM)`` times), and the
  first factor U of a fused chain once per *X sub-block* of BMX tokens (the X sub-block is what is
  resident while U streams; the rank strip is what is resident while V streams).

HBM traffic is therefore an exact, closed-form function of (BM, BMX), and it falls as BM grows.
What limits BM is SBUF: the cost model (:mod:`neuronmm_fx.kernels.costs`) writes down, term by
term, the bytes per partition that each kernel allocates; the planner subtracts the fixed part
from the budget and divides by the per-token part.  PSUM is the other constraint: ``ceil(BMX/512)`` banks for
the strip accumulation plus the kernel's fixed banks must stay <= 8; the banks BMX leaves free set how
many rank tiles each U slab carries (``u_group``, :func:`~neuronmm_fx.kernels.costs.u_group`), which
widens U's transfers without changing the traffic.

One search (:func:`_search`) serves the kernels that hold an X sub-block; another
(:func:`_search_kblocked`) serves the K-blocked kernels (:func:`plan_xuv_kblocked`,
:func:`plan_svd_mlp_kblocked`), each over its grid of K slabs, column and intermediate blocks and U
resident or not.  Among the candidates that fit (BMX over
multiples of 128, BN over {512, 1024, 2048} ({512, 1024} for the MLP), BI over {512, 256, 128} for
the MLP), it minimises the roofline time ``max(TensorE lower bound, HBM bytes / bandwidth)``, then
HBM bytes (i.e. maximises arithmetic intensity), then prefers larger column blocks (fewer, larger
DMAs).  A kernel whose X sub-block is its whole token block (the dense baseline, and an MLP with a
dense gate or up projection) searches BM alone.  For the MLP the planner keeps the largest
intermediate block BI whose time is within 5 % of the best, since small BI multiplies the
Vector-engine work of the fp32 down-projection accumulator (not in the roofline).

Nothing is keyed on sequence length: the same search runs for M = 1 and M = 32768.  The budget is
``sbuf_fraction`` (default 1.0) of the target's usable SBUF per partition: the physical SBUF less
what the compiler keeps (:data:`~neuronmm_fx.kernels.targets.COMPILER_RESERVED_SBUF`).  A shape
that cannot fit raises :class:`PlanError` saying what would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np

from .costs import (
    FIXED_PSUM_KBLOCKED,
    FIXED_PSUM_MLP,
    FIXED_PSUM_MLP_KBLOCKED,
    FIXED_PSUM_XUV,
    MlpShape,
    dense_dma_cost,
    dense_hbm_bytes,
    dense_sbuf_bytes,
    dtype_name_size,
    mlp_dma_cost,
    mlp_hbm_bytes,
    mlp_kblocked_dma_cost,
    mlp_kblocked_hbm_bytes,
    mlp_kblocked_sbuf_bytes,
    mlp_macs,
    mlp_psum_banks,
    mlp_sbuf_bytes,
    transpose_cycles,
    u_group,
    xuv_dma_cost,
    xuv_hbm_bytes,
    xuv_kblocked_dma_cost,
    xuv_kblocked_hbm_bytes,
    xuv_kblocked_sbuf_bytes,
    xuv_sbuf_bytes,
)
from .targets import MOVING_FMAX as MOV
from .targets import PARTITIONS as P
from .targets import Target, cdiv, get_target

DEFAULT_SBUF_FRACTION = 1.0


class PlanError(ValueError):
    """The requested shape cannot be blocked to fit the target's SBUF/PSUM."""


def _token_candidates(M: int, limit: int) -> list[int]:
    if M <= P:
        return [M]
    return list(range(P, min(limit, cdiv(M, P) * P) + 1, P))


def _col_candidates(n: int, sizes: tuple[int, ...]) -> list[int]:
    return sorted({min(n, b) for b in sizes})


# ----------------------------------------------------------------------------------------------
# the search


class _Env(NamedTuple):
    """What one planning call fixes: target, dtype, SBUF budget and the TensorE lower bound."""

    tgt: Target
    dtype: str
    size: int
    fraction: float
    budget: int
    t_te: float


def _env(target, dtype, sbuf_fraction: float, macs: int, transposed: tuple[int, int]) -> _Env:
    """``macs``: the kernel's multiply-accumulates; ``transposed``: the (tokens, features) of the
    activation it transposes on TensorE.  Both go into TensorE's time."""
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    budget = int(tgt.usable_sbuf_partition_bytes * sbuf_fraction)
    cycles = macs / (P * P) * (4 if s == 4 else 1) + transpose_cycles(*transposed, s == 4)
    return _Env(tgt, dname, s, sbuf_fraction, budget, cycles / tgt.clock_hz)


def _modelled_time(env: _Env, tensor_s: float, dma_cost: float) -> float:
    """The longer of TensorE's time and the DMA queues' time (the engines overlap)."""
    return max(tensor_s, dma_cost / env.tgt.hbm_bytes_per_s)


class _Blocks(NamedTuple):
    key: tuple
    BM: int
    BMX: int
    BN: int
    hbm: int
    t: float


def _search(
    M: int,
    env: _Env,
    col_blocks: list[int],
    sbuf: Callable[[int, int, int], int],
    hbm: Callable[[int, int], int],
    *,
    tied: bool,
    fixed_psum: int,
    psum: Callable[[int], int] | None = None,
) -> _Blocks | None:
    """The best (BM, BMX, BN) of one kernel, or None if nothing fits.

    ``sbuf(BM, BMX, BN)`` (bytes per partition, linear in BM for a fixed BMX, and in BM = BMX
    together) and ``hbm(BM, BMX)`` model the kernel.  Untied, BMX runs over multiples of 128 that
    keep ``ceil(BMX/512) + fixed_psum`` banks in PSUM.  ``tied``: the X sub-block is the token
    block (BMX = BM); ``psum(BMX)``, if given, is then checked and BM cut to what PSUM takes."""
    tgt = env.tgt
    max_chunks = tgt.psum_banks - fixed_psum
    best = None
    for BN in col_blocks:
        for BMX in [0] if tied else _token_candidates(M, max_chunks * MOV):
            fixed = sbuf(0, BMX, BN)
            bm_max = (env.budget - fixed) // (sbuf(1, 1 if tied else BMX, BN) - fixed)
            if bm_max < (min(M, P) if tied else BMX):
                continue
            options = {M} if bm_max >= M else {bm_max // P * P} | ({bm_max // BMX * BMX} if BMX else set())
            for BM in options:
                bmx = BM if tied else BMX
                if BM < bmx:
                    continue
                if tied and psum is not None and psum(bmx) > tgt.psum_banks:
                    # the strip accumulation of a low-rank partner needs ceil(BM/512) banks
                    BM = bmx = min(BM, max_chunks * MOV)
                traffic = hbm(BM, bmx)
                t = max(env.t_te, traffic / tgt.hbm_bytes_per_s)
                key = (t, traffic, -BN, -bmx, BM)
                if best is None or key < best.key:
                    best = _Blocks(key, BM, bmx, BN, traffic, t)
    return best


@dataclass(frozen=True)
class _Common:
    target: str
    dtype: str
    sbuf_bytes: int
    """SBUF bytes per partition the kernel allocates (all buffers live for the whole kernel)."""
    sbuf_budget: int
    psum_banks: int
    hbm_bytes: int
    """Predicted HBM bytes (read + written) of one run."""
    estimated_time_s: float = field(default=0.0)
    """Modelled time: the longer of TensorE's lower bound and the DMA queues' time (every transfer
    at the efficiency of its size, :func:`~neuronmm_fx.kernels.costs.dma_efficiency`)."""
    dma_cost_bytes: float = field(default=0.0)
    """HBM bytes weighted by their transfers' efficiencies (equals the stand-in's
    ``dma_queue_bytes``)."""

    _BLOCKS: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(field, label) of the plan's block sizes, in kernel-argument order."""

    @classmethod
    def _of(cls, env: _Env, b: _Blocks, sbuf_bytes: int, psum_banks: int, dma_cost: float, **shape):
        """The plan of the search result ``b``; ``shape`` are the plan's own fields."""
        blocks = {f: getattr(b, label) for f, label in cls._BLOCKS if label in b._fields}
        common = dict(target=env.tgt.name, dtype=env.dtype, sbuf_budget=env.budget, hbm_bytes=b.hbm)
        modelled = _modelled_time(env, env.t_te, dma_cost)
        return cls(
            **common,
            sbuf_bytes=sbuf_bytes,
            psum_banks=psum_banks,
            estimated_time_s=modelled,
            dma_cost_bytes=dma_cost,
            **blocks,
            **shape,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def kernel_kwargs(self) -> dict:
        return {f: getattr(self, f) for f, _ in self._BLOCKS}

    def describe(self) -> str:
        return " ".join(f"{label}={getattr(self, f)}" for f, label in self._BLOCKS)


# ----------------------------------------------------------------------------------------------
# fused X.U.V, dense X.W and the unfused chain


@dataclass(frozen=True)
class _XuvShape(_Common):
    """The shape fields every X.U.V plan carries."""

    M: int = 0
    K: int = 0
    r: int = 0
    N: int = 0
    bias: bool = False


@dataclass(frozen=True)
class XuvPlan(_XuvShape):
    block_m: int = 0
    block_mx: int = 0
    block_n: int = 0
    u_group: int = 1

    _BLOCKS: ClassVar = (("block_m", "BM"), ("block_mx", "BMX"), ("block_n", "BN"), ("u_group", "G"))


@dataclass(frozen=True)
class DensePlan(_Common):
    M: int = 0
    K: int = 0
    N: int = 0
    bias: bool = False
    block_m: int = 0
    block_n: int = 0

    _BLOCKS: ClassVar = (("block_m", "BM"), ("block_n", "BN"))


def plan_xuv(
    M: int,
    K: int,
    r: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    bias: bool = False,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> XuvPlan:
    """Blocks for the fused ``Y = X.U.V`` kernel (X M x K, U K x r, V r x N)."""
    _check_dims(M=M, K=K, r=r, N=N)
    env = _env(target, dtype, sbuf_fraction, M * r * (K + N), (M, K))
    s = env.size

    def group(BMX, rank=r):  # U slabs as wide as the PSUM banks left by BMX allow
        return u_group(cdiv(rank, P), BMX, FIXED_PSUM_XUV, env.tgt.psum_banks)

    def sbuf(BM, BMX, BN, rank=r):
        return xuv_sbuf_bytes(K, rank, N, BM, BMX, BN, s, bias, group(BMX, rank))

    def hbm(BM, BMX):
        return xuv_hbm_bytes(M, K, r, N, BM, BMX, s, bias)

    b = _search(
        M, env, _col_candidates(N, (512, 1024, 2048)), sbuf, hbm, tied=False, fixed_psum=FIXED_PSUM_XUV
    )
    if b is None:
        raise PlanError(_xuv_no_fit(env, K, r, N, min(M, P), bias, sbuf))
    G = group(b.BMX)
    psum = G * cdiv(b.BMX, MOV) + FIXED_PSUM_XUV
    dma = xuv_dma_cost(M, K, r, N, b.BM, b.BMX, b.BN, s, bias, G)
    return XuvPlan._of(env, b, sbuf(b.BM, b.BMX, b.BN), psum, dma, M=M, K=K, r=r, N=N, bias=bias, u_group=G)


def _xuv_no_fit(env: _Env, K, r, N, tok, bias, sbuf) -> str:
    tgt, bn = env.tgt, min(N, 512)
    msg = (
        f"fused X.U.V with K={K}, r={r}, N={N} ({env.dtype}{', bias' if bias else ''}) does not fit "
        f"{tgt.name}: even BM=BMX={tok}, BN={bn} needs {sbuf(tok, tok, bn) / 1024:.1f} KiB of SBUF per "
        f"partition, over the budget of {env.budget / 1024:.1f} KiB ({env.fraction:.0%} of the "
        f"{tgt.usable_sbuf_partition_bytes / 1024:.1f} KiB usable of {tgt.sbuf_partition_bytes // 1024} KiB)."
    )
    r_fit = next((rr for rr in range(r - 1, 0, -1) if sbuf(tok, tok, bn, rr) <= env.budget), 0)
    if r_fit:
        msg += f" It would fit with rank r <= {r_fit}"
        if bias:
            msg += " (or without the in-kernel bias, which keeps an N-wide row per partition)"
        msg += "."
    else:
        msg += f" K={K} alone exceeds the budget; split K (run X.U as partial sums) or use a smaller dtype."
    return msg


@dataclass(frozen=True)
class XuvKPlan(_XuvShape):
    """Blocks of the K-blocked fused kernel :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`."""

    block_m: int = 0
    block_k: int = 0
    block_n: int = 0
    u_resident: int = 0

    _BLOCKS: ClassVar = (
        ("block_m", "BM"),
        ("block_k", "BK"),
        ("block_n", "BN"),
        ("u_resident", "U_resident"),
    )


def _balanced_block(M: int, bm_max: int) -> int:
    """The token block for M tokens when at most ``bm_max`` fit: as few blocks as possible, of equal
    size (a multiple of 16 tokens where that still fits).  The kernel takes any block size."""
    if bm_max >= M:
        return M
    blocks = cdiv(M, bm_max)
    even = cdiv(M, blocks)
    rounded = cdiv(even, 16) * 16
    return rounded if rounded <= bm_max else even


def _search_kblocked(M: int, env: _Env, t_te: float, grid, sbuf, hbm, dma, prefer) -> dict | None:
    """The best blocks of a kernel that sums its strips over K slabs, or None if nothing fits.

    ``grid``: the candidate block sizes other than the token block, as dicts of kernel arguments.
    For each, ``sbuf(BM, **blocks)`` (bytes per partition, linear in BM) gives the fewest equal token
    blocks that fit (:func:`_balanced_block`); ``hbm`` and ``dma`` (same arguments) give traffic
    and DMA queue bytes.  The shortest modelled time wins, then the least traffic, then
    ``prefer(blocks)`` (a tuple, smaller first).  Returns the blocks with ``block_m`` added and the
    plan's figures (``traffic``, ``time``, ``dma``, ``sbuf``)."""
    best = None
    for blocks in grid:
        fixed = sbuf(0, **blocks)
        bm_max = (env.budget - fixed) // (sbuf(1, **blocks) - fixed)
        if bm_max < min(M, P):
            continue
        BM = _balanced_block(M, bm_max)
        traffic, cost = hbm(BM, **blocks), dma(BM, **blocks)
        t = _modelled_time(env, t_te, cost)
        key = (t, traffic, *prefer(blocks))
        if best is None or key < best[0]:
            best = (key, {"block_m": BM, **blocks}, traffic, t, cost, sbuf(BM, **blocks))
    if best is None:
        return None
    _, blocks, traffic, t, cost, sbuf_bytes = best
    return {"blocks": blocks, "traffic": traffic, "time": t, "dma": cost, "sbuf": sbuf_bytes}


def _kblocked_plan(cls, env: _Env, found: dict, psum_banks: int, **shape):
    """The plan of a :func:`_search_kblocked` result."""
    return cls(
        target=env.tgt.name,
        dtype=env.dtype,
        sbuf_bytes=found["sbuf"],
        sbuf_budget=env.budget,
        psum_banks=psum_banks,
        hbm_bytes=found["traffic"],
        estimated_time_s=found["time"],
        dma_cost_bytes=found["dma"],
        **shape,
        **found["blocks"],
    )


def plan_xuv_kblocked(
    M: int,
    K: int,
    r: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    bias: bool = False,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> XuvKPlan:
    """Blocks for :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`: for each K slab BK (128 to 2048)
    and column block BN, with U resident or not, the fewest token blocks that fit SBUF, of equal
    size; the shortest modelled time wins (TensorE against the DMA queues: a narrow K slab reads X
    in narrow rows), then the least HBM traffic, then the larger BN (larger stores)."""
    _check_dims(M=M, K=K, r=r, N=N)
    dname, _ = dtype_name_size(dtype)
    staged = dname == "bfloat16"
    # TensorE: X.U at the input precision; strip.V at fp32 speed unless staged in bf16
    env = _env(target, dtype, sbuf_fraction, M * r * K, (M, K))
    t_te = env.t_te + M * r * N / (P * P) * (1 if staged else 4) / env.tgt.clock_hz
    s = env.size
    grid = [
        {"block_k": BK, "block_n": BN, "u_resident": resident}
        for BK in _col_candidates(cdiv(K, P) * P, (128, 256, 512, 1024, 2048))
        for BN in _col_candidates(N, (512, 1024, 2048))
        for resident in (0, 1)
    ]
    found = _search_kblocked(
        M,
        env,
        t_te,
        grid,
        lambda BM, block_k, block_n, u_resident: xuv_kblocked_sbuf_bytes(
            K, r, N, BM, block_k, block_n, s, bias, bool(u_resident), staged
        ),
        lambda BM, block_k, block_n, u_resident: xuv_kblocked_hbm_bytes(
            M, K, r, N, BM, s, bias, bool(u_resident)
        ),
        lambda BM, block_k, block_n, u_resident: xuv_kblocked_dma_cost(
            M, K, r, N, BM, block_k, block_n, s, bias, bool(u_resident), staged
        ),
        lambda b: (-b["block_n"], b["u_resident"], -b["block_k"]),
    )
    if found is None:
        raise PlanError(
            f"K-blocked fused X.U.V with r={r}, N={N} ({env.dtype}) does not fit {env.tgt.name}: even "
            f"BM={min(M, P)}, BK=128, BN={min(N, 512)} needs more than the {env.budget / 1024:.1f} KiB budget"
        )
    return _kblocked_plan(XuvKPlan, env, found, FIXED_PSUM_KBLOCKED, M=M, K=K, r=r, N=N, bias=bias)


def plan_dense(
    M: int,
    K: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    bias: bool = False,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> DensePlan:
    """Blocks for the dense ``Y = X.W`` baseline (X M x K, W K x N)."""
    _check_dims(M=M, K=K, N=N)
    env = _env(target, dtype, sbuf_fraction, M * K * N, (M, K))
    s = env.size

    def sbuf(BM, _BMX, BN):
        return dense_sbuf_bytes(K, N, BM, BN, s, bias)

    def hbm(BM, _BMX):
        return dense_hbm_bytes(M, K, N, BM, s, bias)

    b = _search(
        M, env, _col_candidates(N, (512, 1024, 2048)), sbuf, hbm, tied=True, fixed_psum=FIXED_PSUM_XUV
    )
    if b is None:
        tok, bn = min(M, P), min(N, 512)
        raise PlanError(
            f"dense X.W with K={K}, N={N} ({env.dtype}) does not fit {env.tgt.name}: BM={tok}, BN={bn} needs "
            f"{sbuf(tok, tok, bn) / 1024:.1f} KiB per partition over the {env.budget / 1024:.1f} KiB budget; "
            f"K must be at most about {(env.budget - s * 2 * MOV) // (s * (tok + bn)) * P}."
        )
    dma = dense_dma_cost(M, K, N, b.BM, b.BN, s, bias)
    return DensePlan._of(env, b, sbuf(b.BM, b.BM, b.BN), FIXED_PSUM_XUV, dma, M=M, K=K, N=N, bias=bias)


@dataclass(frozen=True)
class UnfusedPlan:
    first: DensePlan
    second: DensePlan

    @property
    def hbm_bytes(self) -> int:
        return self.first.hbm_bytes + self.second.hbm_bytes

    @property
    def sbuf_bytes(self) -> int:
        return max(self.first.sbuf_bytes, self.second.sbuf_bytes)

    @property
    def dma_cost_bytes(self) -> float:
        return self.first.dma_cost_bytes + self.second.dma_cost_bytes

    @property
    def estimated_time_s(self) -> float:
        """The two launches one after the other."""
        return self.first.estimated_time_s + self.second.estimated_time_s

    def kernel_kwargs(self) -> dict:
        """The two launches' blocks as ``block_m1, block_n1, block_m2, block_n2``."""
        return {
            f"{k}{i}": v for i, p in ((1, self.first), (2, self.second)) for k, v in p.kernel_kwargs().items()
        }

    def describe(self) -> str:
        return f"XU: {self.first.describe()} / (XU)V: {self.second.describe()}"


def plan_xuv_unfused(
    M: int,
    K: int,
    r: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    bias: bool = False,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> UnfusedPlan:
    """Blocks for the unfused chain (two dense launches with ``X.U`` through HBM)."""
    return UnfusedPlan(
        plan_dense(M, K, r, dtype, target, sbuf_fraction=sbuf_fraction),
        plan_dense(M, r, N, dtype, target, bias=bias, sbuf_fraction=sbuf_fraction),
    )


@dataclass(frozen=True)
class XuvChoice:
    """The form :func:`choose_xuv` picks for one X.U.V, with every candidate's plan (None: does not
    fit) so that reports can show what was compared."""

    form: str  # "fused" (xuv_fused), "kblocked" (xuv_kblocked) or "unfused"
    plan: XuvPlan | XuvKPlan | UnfusedPlan
    candidates: dict

    @property
    def hbm_bytes(self) -> int:
        return self.plan.hbm_bytes


XUV_FORMS = ("fused", "kblocked", "unfused")


def _fewest_bytes(figures: dict, order: tuple) -> str:
    """The form choosers' rule: of ``figures`` (form -> (HBM bytes, modelled seconds)), the form
    that moves the fewest bytes, then the shorter time, then the earlier in ``order``."""
    return min(figures, key=lambda form: (*figures[form], order.index(form)))


@functools.lru_cache(maxsize=512)
def choose_xuv(
    M: int,
    K: int,
    r: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    bias: bool = False,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> XuvChoice:
    """The X.U.V form that moves the fewest HBM bytes (then: the shorter modelled time) among the
    two fused kernels and the unfused chain, each with its own best blocks.  So the chosen form
    never moves more than the cheaper of fused and unfused.  float16 always takes the K-blocked
    kernel, the one form whose X.U stays fp32 (the others can overflow where the reference does
    not).  Choices are cached per arguments: the launchers ask on every call."""
    planners = {"fused": plan_xuv, "kblocked": plan_xuv_kblocked, "unfused": plan_xuv_unfused}
    if dtype_name_size(dtype)[0] == "float16":
        # only the K-blocked kernel keeps X.U in fp32; the others would round it to fp16, which
        # overflows where the reference (fp32 throughout) stays finite
        planners = {"kblocked": plan_xuv_kblocked}
    candidates = {}
    for form, make in planners.items():
        try:
            candidates[form] = make(M, K, r, N, dtype, target, bias=bias, sbuf_fraction=sbuf_fraction)
        except PlanError:
            candidates[form] = None
    fitting = {form: plan for form, plan in candidates.items() if plan is not None}
    if not fitting:
        only = " (float16 runs on the K-blocked kernel only)" if len(planners) == 1 else ""
        raise PlanError(
            f"no X.U.V form fits K={K}, r={r}, N={N} ({dtype}) on {get_target(target).name}{only}"
        )
    form = _fewest_bytes({f: (p.hbm_bytes, p.estimated_time_s) for f, p in fitting.items()}, XUV_FORMS)
    return XuvChoice(form, fitting[form], candidates)


# ----------------------------------------------------------------------------------------------
# the (compressed) MLP


@dataclass(frozen=True)
class _MlpShapeFields(_Common):
    """The shape fields every MLP plan carries."""

    M: int = 0
    shape: MlpShape | None = None


@dataclass(frozen=True)
class MlpPlan(_MlpShapeFields):
    block_m: int = 0
    block_mx: int = 0
    block_i: int = 0
    block_n: int = 0
    u_group: int = 1

    _BLOCKS: ClassVar = (
        ("block_m", "BM"),
        ("block_mx", "BMX"),
        ("block_i", "BI"),
        ("block_n", "BN"),
        ("u_group", "G"),
    )


def plan_svd_mlp(
    M: int,
    shape: MlpShape,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> MlpPlan:
    """Blocks for the fused MLP kernel :func:`~neuronmm_fx.kernels.mlp.svd_mlp_fused`."""
    sh = shape
    _check_dims(M=M, K=sh.K, I=sh.I, H=sh.H)
    env = _env(target, dtype, sbuf_fraction, mlp_macs(sh, M), (M, sh.K))
    s = env.size
    if sh.r_down is None:
        bi_cands = [sh.I]
    else:
        bi_cands = sorted({min(b, cdiv(sh.I, P) * P) for b in (512, 256, 128)}, reverse=True)
    tied = any(r is None for r in sh.inputs)  # a dense gate/up projection uses X_blk^T as its strip
    lowrank_in = [r for r in sh.inputs if r is not None]

    def group(BMX):  # U slabs as wide as the PSUM banks left by BMX allow (1 for a tied search)
        if tied or not lowrank_in:
            return 1
        return u_group(cdiv(max(lowrank_in), P), BMX, FIXED_PSUM_MLP, env.tgt.psum_banks)

    per_bi = {}
    for BI in bi_cands:
        b = _search(
            M,
            env,
            _col_candidates(sh.H, (512, 1024)),
            lambda BM, BMX, BN, BI=BI: mlp_sbuf_bytes(sh, BM, BMX, BI, BN, s, group(BMX)),
            lambda BM, BMX: mlp_hbm_bytes(sh, M, BM, BMX, s),
            tied=tied,
            fixed_psum=FIXED_PSUM_MLP,
            psum=lambda BMX: mlp_psum_banks(sh, BMX),
        )
        if b is not None:
            per_bi[BI] = b
    if not per_bi:
        raise PlanError(_mlp_no_fit(sh, env, min(M, P)))
    t_best = min(b.t for b in per_bi.values())
    BI = max(bi for bi, b in per_bi.items() if b.t <= 1.05 * t_best)
    b = per_bi[BI]
    G = group(b.BMX)
    sbuf = mlp_sbuf_bytes(sh, b.BM, b.BMX, BI, b.BN, s, G)
    dma = mlp_dma_cost(sh, M, b.BM, b.BMX, BI, b.BN, s, G)
    psum = mlp_psum_banks(sh, b.BMX, G)
    return MlpPlan._of(env, b, sbuf, psum, dma, M=M, shape=sh, block_i=BI, u_group=G)


@dataclass(frozen=True)
class MlpKPlan(_MlpShapeFields):
    """Blocks of the K-blocked MLP kernel :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`."""

    block_m: int = 0
    block_k: int = 0
    block_i: int = 0
    block_n: int = 0
    u_resident: int = 0

    _BLOCKS: ClassVar = (
        ("block_m", "BM"),
        ("block_k", "BK"),
        ("block_i", "BI"),
        ("block_n", "BN"),
        ("u_resident", "U_resident"),
    )


def plan_svd_mlp_kblocked(
    M: int,
    shape: MlpShape,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> MlpKPlan:
    """Blocks for :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`: over K slabs BK and intermediate
    blocks BI (128 to 2048), column blocks BN (512 to 2048) and U resident or not, the
    fewest equal token blocks that fit SBUF; the shortest modelled time wins, then the least
    traffic, then larger BI and BN (fewer, larger transfers).  ``PlanError`` for an MLP with a dense
    projection, for float16, or when nothing fits."""
    sh = shape
    _check_dims(M=M, K=sh.K, I=sh.I, H=sh.H)
    dname, _ = dtype_name_size(dtype)
    if sh.r_down is None or any(r is None for r in sh.inputs):
        raise PlanError("the K-blocked MLP kernel needs every projection low-rank")
    if dname == "float16":
        raise PlanError(
            "the K-blocked MLP kernel takes bfloat16 or float32 (float16 runs projection by projection)"
        )
    staged = dname == "bfloat16"
    env = _env(target, dtype, sbuf_fraction, mlp_macs(sh, M), (M, sh.K))
    s = env.size
    grid = [
        {"block_k": BK, "block_i": BI, "block_n": BN, "u_resident": resident}
        for BK in _col_candidates(cdiv(sh.K, P) * P, (128, 256, 512, 1024, 2048))
        for BI in _col_candidates(cdiv(sh.I, P) * P, (128, 256, 512, 1024, 2048))
        for BN in _col_candidates(sh.H, (512, 1024, 2048))
        for resident in (0, 1)
    ]
    found = _search_kblocked(
        M,
        env,
        env.t_te,
        grid,
        lambda BM, block_k, block_i, block_n, u_resident: mlp_kblocked_sbuf_bytes(
            sh, BM, block_k, block_i, block_n, s, bool(u_resident), staged
        ),
        lambda BM, block_k, block_i, block_n, u_resident: mlp_kblocked_hbm_bytes(
            sh, M, BM, s, bool(u_resident)
        ),
        lambda BM, block_k, block_i, block_n, u_resident: mlp_kblocked_dma_cost(
            sh, M, BM, block_k, block_i, block_n, s, bool(u_resident)
        ),
        lambda b: (-b["block_i"], -b["block_n"], b["u_resident"], -b["block_k"]),
    )
    if found is None:
        raise PlanError(
            f"K-blocked MLP K={sh.K}, I={sh.I}, H={sh.H}, ranks act={sh.r_act} up={sh.r_up} "
            f"down={sh.r_down} ({env.dtype}) does not fit {env.tgt.name}: even BM={min(M, P)}, BK=128, "
            f"BI=128 needs more than the {env.budget / 1024:.1f} KiB budget"
        )
    return _kblocked_plan(MlpKPlan, env, found, FIXED_PSUM_MLP_KBLOCKED, M=M, shape=sh)


MLP_FORMS = ("fused", "kblocked", "split")


@dataclass(frozen=True)
class MlpChoice:
    """How :func:`choose_svd_mlp` runs an MLP: ``"fused"`` (:func:`~neuronmm_fx.kernels.mlp.
    svd_mlp_fused`), ``"kblocked"`` (:func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`) or
    ``"split"`` (each projection as its own X.U.V / X.W launch, h through HBM), with every
    candidate's figures: ``candidates`` maps the two MLP kernels to their plans (None: does not fit
    or does not apply)."""

    form: str
    plan: MlpPlan | MlpKPlan | None  # None for "split"
    candidates: dict
    split_bytes: int
    split_time_s: float

    @property
    def hbm_bytes(self) -> int:
        return self.split_bytes if self.plan is None else self.plan.hbm_bytes

    @property
    def estimated_time_s(self) -> float:
        return self.split_time_s if self.plan is None else self.plan.estimated_time_s


def _split_mlp(M: int, sh: MlpShape, dtype, target) -> tuple[int, float]:
    """(HBM bytes, modelled seconds) of an MLP run projection by projection: each projection's chosen
    form, plus the element-wise pass between them (gated: read both branches, write h; plain: read
    and write h) at full DMA speed."""
    _, s = dtype_name_size(dtype)

    def projection(k_in, k_out, r, bias):
        if r is None:
            plan = plan_dense(M, k_in, k_out, dtype, target, bias=bias)
        else:
            plan = choose_xuv(M, k_in, r, k_out, dtype, target, bias=bias).plan
        return plan.hbm_bytes, plan.estimated_time_s

    parts = [projection(sh.K, sh.I, sh.r_act, sh.act_bias)]
    if sh.gated:
        parts.append(projection(sh.K, sh.I, sh.r_up, sh.up_bias))
    parts.append(projection(sh.I, sh.H, sh.r_down, sh.down_bias))
    elementwise = s * M * sh.I * (3 if sh.gated else 2)
    seconds = sum(t for _, t in parts) + elementwise / get_target(target).hbm_bytes_per_s
    return sum(b for b, _ in parts) + elementwise, seconds


@functools.lru_cache(maxsize=512)
def choose_svd_mlp(M: int, shape: MlpShape, dtype="bfloat16", target: str | Target = "trn2") -> MlpChoice:
    """The MLP form that moves the fewest HBM bytes (then: the shorter modelled time) among the two
    MLP kernels and the projections one by one, by the same rule as :func:`choose_xuv`; so the
    chosen form never moves more than the cheaper of fused and unfused.  float16 runs the
    projections one by one, each on the K-blocked X.U.V kernel, since both MLP kernels keep h in
    the input dtype.  Cached per arguments, as :func:`choose_xuv`."""
    split_bytes, split_time = _split_mlp(M, shape, dtype, target)
    planners = {"fused": plan_svd_mlp, "kblocked": plan_svd_mlp_kblocked}
    candidates = {form: None for form in planners}
    if dtype_name_size(dtype)[0] != "float16":  # the MLP kernels keep their strips or h in fp16
        for form, make in planners.items():
            try:
                candidates[form] = make(M, shape, dtype, target)
            except PlanError:
                pass
    figures = {"split": (split_bytes, split_time)}
    figures.update(
        {form: (p.hbm_bytes, p.estimated_time_s) for form, p in candidates.items() if p is not None}
    )
    form = _fewest_bytes(figures, MLP_FORMS)
    return MlpChoice(form, candidates.get(form), candidates, split_bytes, split_time)


def _mlp_no_fit(sh: MlpShape, env: _Env, tok: int) -> str:
    BI = sh.I if sh.r_down is None else min(P, cdiv(sh.I, P) * P)
    need = mlp_sbuf_bytes(sh, tok, tok, BI, min(sh.H, 512), env.size)
    msg = (
        f"fused MLP K={sh.K}, I={sh.I}, H={sh.H}, "
        f"ranks act={sh.r_act} up={sh.r_up} down={sh.r_down} ({env.dtype}) "
        f"does not fit {env.tgt.name}: the smallest blocking (BM={tok}, BI={BI}) needs {need / 1024:.1f} "
        f"KiB of SBUF per partition, over the {env.budget / 1024:.1f} KiB budget."
    )
    if sh.r_down is None:
        msg += (
            " A dense down projection keeps all of h^T (I x BM) on chip; factorise it or run it separately."
        )
    else:
        msg += " Lower the ranks, or run the projections as separate X.U.V kernels (h through HBM)."
    return msg


def _check_dims(**dims: int) -> None:
    for k, v in dims.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


def rank_for_ratio(K: int, N: int, ratio: float, align: int = P) -> int:
    """Rank keeping ``1 - ratio`` of a K x N matrix's parameters, floored to ``align``:
    ``floor((1 - ratio) * K * N / (K + N) / align) * align`` (docs/kernels.md, "Rank and ratio")."""
    return max(align, math.floor((1.0 - ratio) * K * N / (K + N) / align) * align)

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
What limits BM is SBUF: the planner writes down, term by term, the bytes per partition that the
kernel allocates (the functions ``*_sbuf_bytes`` mirror the ``nl.ndarray`` calls of each kernel,
and the tests check them against the stand-in's measured peak), subtracts the fixed part from the
budget and divides by the per-token part.  PSUM is the other constraint: ``ceil(BMX/512)`` banks for
the strip accumulation plus the kernel's fixed banks must stay <= 8.

Among the candidates that fit (BMX over multiples of 128, BN over {512, 1024, 2048}, BI over
{512, 256, 128} for the MLP), the planner minimises the roofline time
``max(TensorE lower bound, HBM bytes / bandwidth)``, then HBM bytes (i.e. maximises arithmetic
intensity), then prefers larger column blocks (fewer, larger DMAs).  For the MLP it keeps the
largest intermediate block BI whose time is within 5 % of the best, since small BI multiplies the
Vector-engine work of the fp32 down-projection accumulator (not in the roofline).

Nothing is keyed on sequence length: the same search runs for M = 1 and M = 32768.  The budget is
``sbuf_fraction`` (default 0.9) of the target's SBUF per partition, leaving room for what the
compiler allocates itself.  A shape that cannot fit raises :class:`PlanError` saying what would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import ml_dtypes
import numpy as np

from .targets import PARTITIONS, Target, get_target

P = PARTITIONS
MOV = 512
DEFAULT_SBUF_FRACTION = 0.9
_FIXED_PSUM_XUV = 2
_FIXED_PSUM_MLP = 4


class PlanError(ValueError):
    """The requested shape cannot be blocked to fit the target's SBUF/PSUM."""


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dtype_name_size(dtype) -> tuple[str, int]:
    """('bfloat16', 2) etc. for a name, numpy dtype or torch dtype."""
    name = str(dtype).replace("torch.", "")
    if name in ("bfloat16", "bf16"):
        return "bfloat16", 2
    if name in ("float16", "half", "fp16"):
        return "float16", 2
    if name in ("float32", "float", "fp32"):
        return "float32", 4
    try:
        d = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None
    if d == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16", 2
    if d in (np.dtype(np.float16), np.dtype(np.float32)):
        return d.name, d.itemsize
    raise ValueError(f"unsupported dtype {dtype!r}; kernels take bfloat16, float16 or float32")


def _tensor_lower_bound_s(macs: float, size: int, tgt: Target) -> float:
    return macs / (P * P) * (4 if size == 4 else 1) / tgt.clock_hz


def _budget(tgt: Target, sbuf_fraction: float) -> int:
    return int(tgt.sbuf_partition_bytes * sbuf_fraction)


def _block_counts(M: int, BM: int, BMX: int) -> tuple[int, int]:
    """(token blocks, X sub-blocks) for M tokens."""
    full, rest = divmod(M, BM)
    return cdiv(M, BM), full * cdiv(BM, BMX) + (cdiv(rest, BMX) if rest else 0)


def _token_candidates(M: int, limit: int) -> list[int]:
    if M <= P:
        return [M]
    return list(range(P, min(limit, cdiv(M, P) * P) + 1, P))


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
    """Planner's roofline estimate (TensorE lower bound vs HBM); the stand-in counts the real one."""

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# fused X.U.V


def xuv_sbuf_bytes(K: int, r: int, N: int, BM: int, BMX: int, BN: int, size: int, bias: bool) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.xuv_fused`."""
    nk, nr = cdiv(K, P), cdiv(r, P)
    b = size * (nk * BMX + nr * BM + 2 * P + nr * BN + 2 * MOV)
    if bias:
        b += size * (P + MOV + N)
    return b


def xuv_hbm_bytes(M: int, K: int, r: int, N: int, BM: int, BMX: int, size: int, bias: bool) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    return size * (M * K + M * N + nsub * K * r + nb * r * N + (N if bias else 0))


@dataclass(frozen=True)
class XuvPlan(_Common):
    M: int = 0
    K: int = 0
    r: int = 0
    N: int = 0
    bias: bool = False
    block_m: int = 0
    block_mx: int = 0
    block_n: int = 0

    def kernel_kwargs(self) -> dict:
        return {"block_m": self.block_m, "block_mx": self.block_mx, "block_n": self.block_n}

    def describe(self) -> str:
        return f"BM={self.block_m} BMX={self.block_mx} BN={self.block_n}"


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
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    budget = _budget(tgt, sbuf_fraction)
    nr = cdiv(r, P)
    t_te = _tensor_lower_bound_s(M * r * (K + N), s, tgt)
    max_chunks = tgt.psum_banks - _FIXED_PSUM_XUV
    best = None
    for BN in sorted({min(N, b) for b in (512, 1024, 2048)}):
        for BMX in _token_candidates(M, max_chunks * MOV):
            fixed = xuv_sbuf_bytes(K, r, N, 0, BMX, BN, s, bias)
            bm_max = (budget - fixed) // (s * nr)
            if bm_max < BMX:
                continue
            options = {M} if bm_max >= M else {bm_max // P * P, bm_max // BMX * BMX}
            for BM in options:
                if BM < BMX:
                    continue
                hbm = xuv_hbm_bytes(M, K, r, N, BM, BMX, s, bias)
                t = max(t_te, hbm / tgt.hbm_bytes_per_s)
                key = (t, hbm, -BN, -BMX, BM)
                if best is None or key < best[0]:
                    best = (key, BM, BMX, BN, hbm, t)
    if best is None:
        raise PlanError(_xuv_no_fit(M, K, r, N, dname, s, tgt, bias, sbuf_fraction))
    _, BM, BMX, BN, hbm, t = best
    return XuvPlan(
        target=tgt.name,
        dtype=dname,
        sbuf_bytes=xuv_sbuf_bytes(K, r, N, BM, BMX, BN, s, bias),
        sbuf_budget=budget,
        psum_banks=cdiv(BMX, MOV) + _FIXED_PSUM_XUV,
        hbm_bytes=hbm,
        estimated_time_s=t,
        M=M,
        K=K,
        r=r,
        N=N,
        bias=bias,
        block_m=BM,
        block_mx=BMX,
        block_n=BN,
    )


def _xuv_no_fit(M, K, r, N, dname, s, tgt, bias, frac) -> str:
    tok = min(M, P)
    need = xuv_sbuf_bytes(K, r, N, tok, tok, min(N, 512), s, bias)
    budget = _budget(tgt, frac)
    msg = (
        f"fused X.U.V with K={K}, r={r}, N={N} ({dname}{', bias' if bias else ''}) does not fit {tgt.name}: "
        f"even BM=BMX={tok}, BN={min(N, 512)} needs {need / 1024:.1f} KiB of SBUF per partition, over the "
        f"budget of {budget / 1024:.1f} KiB ({frac:.0%} of {tgt.sbuf_partition_bytes // 1024} KiB)."
    )
    r_fit = next(
        (
            rr
            for rr in range(r - 1, 0, -1)
            if xuv_sbuf_bytes(K, rr, N, tok, tok, min(N, 512), s, bias) <= budget
        ),
        0,
    )
    if r_fit:
        msg += f" It would fit with rank r <= {r_fit}"
        if bias:
            msg += " (or without the in-kernel bias, which keeps an N-wide row per partition)"
        msg += "."
    else:
        msg += f" K={K} alone exceeds the budget; split K (run X.U as partial sums) or use a smaller dtype."
    return msg


# ----------------------------------------------------------------------------------------------
# dense X.W and the unfused chain


def dense_sbuf_bytes(K: int, N: int, BM: int, BN: int, size: int, bias: bool) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.matmul_dense`."""
    nk = cdiv(K, P)
    b = size * (nk * BM + nk * BN + 2 * MOV)
    if bias:
        b += size * (P + MOV + N)
    return b


def dense_hbm_bytes(M: int, K: int, N: int, BM: int, size: int, bias: bool) -> int:
    return size * (M * K + M * N + cdiv(M, BM) * K * N + (N if bias else 0))


@dataclass(frozen=True)
class DensePlan(_Common):
    M: int = 0
    K: int = 0
    N: int = 0
    bias: bool = False
    block_m: int = 0
    block_n: int = 0

    def kernel_kwargs(self) -> dict:
        return {"block_m": self.block_m, "block_n": self.block_n}

    def describe(self) -> str:
        return f"BM={self.block_m} BN={self.block_n}"


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
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    budget = _budget(tgt, sbuf_fraction)
    nk = cdiv(K, P)
    t_te = _tensor_lower_bound_s(M * K * N, s, tgt)
    best = None
    for BN in sorted({min(N, b) for b in (512, 1024, 2048)}):
        fixed = dense_sbuf_bytes(K, N, 0, BN, s, bias)
        bm_max = (budget - fixed) // (s * nk)
        if bm_max < min(M, P):
            continue
        BM = M if bm_max >= M else bm_max // P * P
        hbm = dense_hbm_bytes(M, K, N, BM, s, bias)
        t = max(t_te, hbm / tgt.hbm_bytes_per_s)
        key = (t, hbm, -BN)
        if best is None or key < best[0]:
            best = (key, BM, BN, hbm, t)
    if best is None:
        tok = min(M, P)
        need = dense_sbuf_bytes(K, N, tok, min(N, 512), s, bias)
        raise PlanError(
            f"dense X.W with K={K}, N={N} ({dname}) does not fit {tgt.name}: "
            f"BM={tok}, BN={min(N, 512)} needs "
            f"{need / 1024:.1f} KiB per partition over the {budget / 1024:.1f} KiB budget; K must be at most "
            f"about {(budget - s * 2 * MOV) // (s * (tok + min(N, 512))) * P}."
        )
    _, BM, BN, hbm, t = best
    return DensePlan(
        target=tgt.name,
        dtype=dname,
        sbuf_bytes=dense_sbuf_bytes(K, N, BM, BN, s, bias),
        sbuf_budget=budget,
        psum_banks=_FIXED_PSUM_XUV,
        hbm_bytes=hbm,
        estimated_time_s=t,
        M=M,
        K=K,
        N=N,
        bias=bias,
        block_m=BM,
        block_n=BN,
    )


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

    def kernel_kwargs(self) -> dict:
        return {
            "block_m1": self.first.block_m,
            "block_n1": self.first.block_n,
            "block_m2": self.second.block_m,
            "block_n2": self.second.block_n,
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


# ----------------------------------------------------------------------------------------------
# the (compressed) MLP


@dataclass(frozen=True)
class MlpShape:
    """Shapes of an MLP for :func:`plan_svd_mlp`; a rank of ``None`` means a dense projection."""

    K: int
    I: int  # noqa: E741 - the notes' name for the intermediate size
    H: int
    r_act: int | None
    r_up: int | None
    r_down: int | None
    gated: bool = True
    act_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False


def mlp_sbuf_bytes(sh: MlpShape, BM: int, BMX: int, BI: int, BN: int, size: int) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.mlp.svd_mlp`."""
    s = size
    nk, nI, nbi = cdiv(sh.K, P), cdiv(sh.I, P), cdiv(BI, P)
    ins = [sh.r_act] + ([sh.r_up] if sh.gated else [])
    b = s * nk * BMX
    for r in ins:
        if r is not None:
            b += s * cdiv(r, P) * BM
        b += s * cdiv(sh.K if r is None else r, P) * BI
    if any(r is not None for r in ins):
        b += s * 2 * P
    if sh.gated:
        b += 4 * MOV
    b += 4 * nI * (int(sh.act_bias) + int(sh.gated and sh.up_bias))
    b += s * nbi * BM
    if sh.r_down is not None:
        nd = cdiv(sh.r_down, P)
        b += s * nbi * sh.r_down + 4 * nd * BM + s * nd * BM + s * nd * BN
    else:
        b += s * nI * BN
    b += s * 2 * MOV
    if sh.down_bias:
        b += s * (P + MOV + sh.H)
    return b


def mlp_psum_banks(sh: MlpShape, BMX: int) -> int:
    needs_acc = sh.r_act is not None or (sh.gated and sh.r_up is not None) or sh.r_down is not None
    return (cdiv(BMX, MOV) if needs_acc else 0) + _FIXED_PSUM_MLP


def mlp_hbm_bytes(sh: MlpShape, M: int, BM: int, BMX: int, size: int) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    ins = [sh.r_act] + ([sh.r_up] if sh.gated else [])
    per_sub = sum(sh.K * r for r in ins if r is not None)
    per_blk = sum((sh.K if r is None else r) * sh.I for r in ins)
    per_blk += sh.I * sh.H if sh.r_down is None else sh.I * sh.r_down + sh.r_down * sh.H
    once = M * sh.K + M * sh.H
    once += sh.I * (int(sh.act_bias) + int(sh.gated and sh.up_bias)) + (sh.H if sh.down_bias else 0)
    return size * (once + nsub * per_sub + nb * per_blk)


def mlp_macs(sh: MlpShape, M: int) -> int:
    ins = [sh.r_act] + ([sh.r_up] if sh.gated else [])
    m = sum(sh.K * sh.I if r is None else r * (sh.K + sh.I) for r in ins)
    m += sh.I * sh.H if sh.r_down is None else sh.r_down * (sh.I + sh.H)
    return M * m


@dataclass(frozen=True)
class MlpPlan(_Common):
    M: int = 0
    shape: MlpShape | None = None
    block_m: int = 0
    block_mx: int = 0
    block_i: int = 0
    block_n: int = 0

    def kernel_kwargs(self) -> dict:
        return {
            "block_m": self.block_m,
            "block_mx": self.block_mx,
            "block_i": self.block_i,
            "block_n": self.block_n,
        }

    def describe(self) -> str:
        return f"BM={self.block_m} BMX={self.block_mx} BI={self.block_i} BN={self.block_n}"


def plan_svd_mlp(
    M: int,
    shape: MlpShape,
    dtype="bfloat16",
    target: str | Target = "trn2",
    *,
    sbuf_fraction: float = DEFAULT_SBUF_FRACTION,
) -> MlpPlan:
    """Blocks for the fused MLP kernel :func:`~neuronmm_fx.kernels.mlp.svd_mlp`."""
    sh = shape
    _check_dims(M=M, K=sh.K, I=sh.I, H=sh.H)
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    budget = _budget(tgt, sbuf_fraction)
    t_te = _tensor_lower_bound_s(mlp_macs(sh, M), s, tgt)
    tied = sh.r_act is None or (sh.gated and sh.r_up is None)  # a dense gate/up uses X_blk^T as its strip
    i_round = cdiv(sh.I, P) * P
    if sh.r_down is None:
        bi_cands = [sh.I]
    else:
        bi_cands = sorted({min(b, i_round) for b in (512, 256, 128)}, reverse=True)
    max_chunks = tgt.psum_banks - _FIXED_PSUM_MLP
    per_bi: dict[int, tuple] = {}
    for BI in bi_cands:
        for BN in sorted({min(sh.H, b) for b in (512, 1024)}):
            mx_cands = [0] if tied else _token_candidates(M, max_chunks * MOV)
            for BMX in mx_cands:
                if tied:
                    fixed = mlp_sbuf_bytes(sh, 0, 0, BI, BN, s)
                    per_tok = mlp_sbuf_bytes(sh, 1, 1, BI, BN, s) - fixed
                else:
                    fixed = mlp_sbuf_bytes(sh, 0, BMX, BI, BN, s)
                    per_tok = mlp_sbuf_bytes(sh, 1, BMX, BI, BN, s) - fixed
                bm_max = (budget - fixed) // per_tok
                if bm_max < min(M, P) or (not tied and bm_max < BMX):
                    continue
                options = (
                    {M} if bm_max >= M else {bm_max // P * P} | ({bm_max // BMX * BMX} if BMX else set())
                )
                for BM in options:
                    bmx = BM if tied else BMX
                    if BM < bmx or BM <= 0:
                        continue
                    if tied and mlp_psum_banks(sh, bmx) > tgt.psum_banks:
                        # the strip accumulation of a low-rank partner needs ceil(BM/512) banks
                        BM = bmx = min(BM, max_chunks * MOV)
                    hbm = mlp_hbm_bytes(sh, M, BM, bmx, s)
                    t = max(t_te, hbm / tgt.hbm_bytes_per_s)
                    key = (t, hbm, -BN, -bmx, BM)
                    if BI not in per_bi or key < per_bi[BI][0]:
                        per_bi[BI] = (key, BM, bmx, BI, BN, hbm, t)
    if not per_bi:
        raise PlanError(_mlp_no_fit(sh, dname, s, tgt, sbuf_fraction, min(M, P)))
    t_best = min(v[6] for v in per_bi.values())
    BI = max(b for b, v in per_bi.items() if v[6] <= 1.05 * t_best)
    _, BM, BMX, BI, BN, hbm, t = per_bi[BI]
    return MlpPlan(
        target=tgt.name,
        dtype=dname,
        sbuf_bytes=mlp_sbuf_bytes(sh, BM, BMX, BI, BN, s),
        sbuf_budget=budget,
        psum_banks=mlp_psum_banks(sh, BMX),
        hbm_bytes=hbm,
        estimated_time_s=t,
        M=M,
        shape=sh,
        block_m=BM,
        block_mx=BMX,
        block_i=BI,
        block_n=BN,
    )


def _mlp_no_fit(sh: MlpShape, dname, s, tgt, frac, tok) -> str:
    BI = sh.I if sh.r_down is None else min(P, cdiv(sh.I, P) * P)
    need = mlp_sbuf_bytes(sh, tok, tok, BI, min(sh.H, 512), s)
    budget = _budget(tgt, frac)
    msg = (
        f"fused MLP K={sh.K}, I={sh.I}, H={sh.H}, "
        f"ranks act={sh.r_act} up={sh.r_up} down={sh.r_down} ({dname}) "
        f"does not fit {tgt.name}: the smallest blocking (BM={tok}, BI={BI}) needs {need / 1024:.1f} KiB of "
        f"SBUF per partition, over the {budget / 1024:.1f} KiB budget."
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
    ``floor((1 - ratio) * K * N / (K + N) / align) * align`` (notes, section 3)."""
    return max(align, math.floor((1.0 - ratio) * K * N / (K + N) / align) * align)

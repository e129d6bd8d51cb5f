"""The closed-form cost model of each kernel: SBUF, PSUM, HBM traffic and multiply-accumulates.

Each ``*_sbuf_bytes`` writes down, term by term, the bytes per partition that the kernel's
``nl.ndarray`` calls allocate (the tests check them against the stand-in's measured peak); each
``*_hbm_bytes`` is the exact traffic of a run with the given blocks: X read and Y written once,
every streamed weight read once per token block of BM tokens, and a chain's first factor once per
X sub-block of BMX tokens.  :mod:`neuronmm_fx.kernels.planner` searches over these.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .targets import MOVING_FMAX as MOV
from .targets import PARTITIONS as P
from .targets import cdiv

FIXED_PSUM_XUV = 2
"""PSUM banks of the X.U.V and dense kernels besides the strip accumulation: the output pair."""
FIXED_PSUM_MLP = 4
"""PSUM banks of the MLP kernel besides the strip accumulation: the gate/up pair and the output pair."""


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


def _broadcast_bias_bytes(N: int, size: int) -> int:
    """SBUF per partition of :func:`~neuronmm_fx.kernels._blocks.broadcast_bias` for an N-wide bias."""
    return size * (P + MOV + N)


def _block_counts(M: int, BM: int, BMX: int) -> tuple[int, int]:
    """(token blocks, X sub-blocks) for M tokens."""
    full, rest = divmod(M, BM)
    return cdiv(M, BM), full * cdiv(BM, BMX) + (cdiv(rest, BMX) if rest else 0)


# ----------------------------------------------------------------------------------------------
# fused X.U.V and dense X.W


def xuv_sbuf_bytes(K: int, r: int, N: int, BM: int, BMX: int, BN: int, size: int, bias: bool) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.xuv_fused`."""
    nk, nr = cdiv(K, P), cdiv(r, P)
    b = size * (nk * BMX + nr * BM + 2 * P + nr * BN + 2 * MOV)
    return b + (_broadcast_bias_bytes(N, size) if bias else 0)


def xuv_hbm_bytes(M: int, K: int, r: int, N: int, BM: int, BMX: int, size: int, bias: bool) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    return size * (M * K + M * N + nsub * K * r + nb * r * N + (N if bias else 0))


FIXED_PSUM_KBLOCKED = 4
"""PSUM banks of :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`: two strip slabs, two output tiles."""


def xuv_kblocked_sbuf_bytes(
    K: int, r: int, N: int, BM: int, BK: int, BN: int, size: int, bias: bool, resident: bool, staged: bool
) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`
    (``staged``: bf16 inputs, whose strip tiles are cast for the second product)."""
    nk, nr, nbk = cdiv(K, P), cdiv(r, P), cdiv(BK, P)
    second = size if staged else 4
    b = 4 * nr * BM + size * nbk * BM + size * (nk if resident else nbk) * r
    b += (size * nr * P if staged else 0) + second * nr * BN + size * 2 * BN
    return b + (_broadcast_bias_bytes(N, size) if bias else 0)


def xuv_kblocked_hbm_bytes(
    M: int, K: int, r: int, N: int, BM: int, size: int, bias: bool, resident: bool
) -> int:
    nb = cdiv(M, BM)
    return size * (M * K + M * N + nb * r * N + (1 if resident else nb) * K * r + (N if bias else 0))


def capacity_bound_bytes(M: int, K: int, r: int, N: int, size: int, sbuf_partition_bytes: int) -> int:
    """The capacity bound of a fused X.U.V that sums its strip over K slabs: ``X + Y + ceil(M/BM*)·(U
    + V)``, BM* the largest token block whose strip (ceil(r/128) fp32 tiles of BM tokens) fits in
    80 % of a partition's physical SBUF.  Staging buffers are ignored; keeping U resident goes below."""
    bm_star = max(1, int(0.8 * sbuf_partition_bytes) // (4 * cdiv(r, P)))
    return size * (M * K + M * N + cdiv(M, bm_star) * (K * r + r * N))


def dense_sbuf_bytes(K: int, N: int, BM: int, BN: int, size: int, bias: bool) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.matmul_dense`."""
    nk = cdiv(K, P)
    b = size * (nk * BM + nk * BN + 2 * MOV)
    return b + (_broadcast_bias_bytes(N, size) if bias else 0)


def dense_hbm_bytes(M: int, K: int, N: int, BM: int, size: int, bias: bool) -> int:
    return size * (M * K + M * N + cdiv(M, BM) * K * N + (N if bias else 0))


# ----------------------------------------------------------------------------------------------
# the (compressed) MLP


@dataclass(frozen=True)
class MlpShape:
    """Shapes of an MLP for :func:`plan_svd_mlp`; a rank of ``None`` means a dense projection."""

    K: int
    I: int  # noqa: E741 - the intermediate size, as in docs/kernels.md
    H: int
    r_act: int | None
    r_up: int | None
    r_down: int | None
    gated: bool = True
    act_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False

    @property
    def inputs(self) -> list[int | None]:
        """Ranks of the projections that read X: the activation's, and the up projection's if gated."""
        return [self.r_act] + ([self.r_up] if self.gated else [])

    @property
    def bias_columns(self) -> int:
        """How many (I, 1) bias columns the act and up projections have."""
        return int(self.act_bias) + int(self.gated and self.up_bias)


def mlp_sbuf_bytes(sh: MlpShape, BM: int, BMX: int, BI: int, BN: int, size: int) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.mlp.svd_mlp_fused`."""
    s = size
    nk, nI, nbi = cdiv(sh.K, P), cdiv(sh.I, P), cdiv(BI, P)
    b = s * nk * BMX
    for r in sh.inputs:
        if r is not None:
            b += s * cdiv(r, P) * BM
        b += s * cdiv(sh.K if r is None else r, P) * BI
    if any(r is not None for r in sh.inputs):
        b += s * 2 * P
    if sh.gated:
        b += 4 * MOV
    b += 4 * nI * sh.bias_columns
    b += s * nbi * BM
    if sh.r_down is not None:
        nd = cdiv(sh.r_down, P)
        b += s * nbi * sh.r_down + 4 * nd * BM + s * nd * BM + s * nd * BN
    else:
        b += s * nI * BN
    b += s * 2 * MOV
    return b + (_broadcast_bias_bytes(sh.H, s) if sh.down_bias else 0)


def mlp_psum_banks(sh: MlpShape, BMX: int) -> int:
    needs_acc = any(r is not None for r in sh.inputs) or sh.r_down is not None
    return (cdiv(BMX, MOV) if needs_acc else 0) + FIXED_PSUM_MLP


def mlp_hbm_bytes(sh: MlpShape, M: int, BM: int, BMX: int, size: int) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    per_sub = sum(sh.K * r for r in sh.inputs if r is not None)
    per_blk = sum((sh.K if r is None else r) * sh.I for r in sh.inputs)
    per_blk += sh.I * sh.H if sh.r_down is None else sh.I * sh.r_down + sh.r_down * sh.H
    once = M * sh.K + M * sh.H + sh.I * sh.bias_columns + (sh.H if sh.down_bias else 0)
    return size * (once + nsub * per_sub + nb * per_blk)


def mlp_macs(sh: MlpShape, M: int) -> int:
    m = sum(sh.K * sh.I if r is None else r * (sh.K + sh.I) for r in sh.inputs)
    m += sh.I * sh.H if sh.r_down is None else sh.r_down * (sh.I + sh.H)
    return M * m

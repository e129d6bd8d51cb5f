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

FIXED_PSUM_XUV = 3
"""PSUM banks of the X.U.V and dense kernels besides the strip accumulation: the output pair and
the X transposes."""
FIXED_PSUM_MLP = 5
"""PSUM banks of the MLP kernel besides the strip accumulation: the gate/up pair, the output pair
and the X transposes."""
X_ROW_COLS = 1024
"""Features per natural X load of the kernels that hold all of K: rows of 2 KiB (bf16/fp16) or 4 KiB
(fp32) per partition, the size from which a DMA runs near peak."""


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


def u_group(rank_tiles: int, BMX: int, fixed_psum: int, psum_banks: int) -> int:
    """Rank tiles per U slab of the kernels that hold an X sub-block (``u_group``): as many as the
    PSUM banks left after ``fixed_psum`` hold, ``ceil(BMX/512)`` banks per tile, at most
    ``rank_tiles`` and at least 1.  Wider slabs are longer rows per DMA transfer."""
    free = (psum_banks - fixed_psum) // max(1, cdiv(BMX, MOV))
    return max(1, min(rank_tiles, free))


def _block_counts(M: int, BM: int, BMX: int) -> tuple[int, int]:
    """(token blocks, X sub-blocks) for M tokens."""
    full, rest = divmod(M, BM)
    return cdiv(M, BM), full * cdiv(BM, BMX) + (cdiv(rest, BMX) if rest else 0)


# ----------------------------------------------------------------------------------------------
# fused X.U.V and dense X.W


def xuv_sbuf_bytes(
    K: int, r: int, N: int, BM: int, BMX: int, BN: int, size: int, bias: bool, group: int = 1
) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.xuv_fused` (``group``:
    its ``u_group``)."""
    nk, nr = cdiv(K, P), cdiv(r, P)
    b = size * (nk * BMX + min(K, X_ROW_COLS) + nr * BM + 2 * P * group + nr * BN + 2 * MOV)
    return b + (_broadcast_bias_bytes(N, size) if bias else 0)


def xuv_hbm_bytes(M: int, K: int, r: int, N: int, BM: int, BMX: int, size: int, bias: bool) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    return size * (M * K + M * N + nsub * K * r + nb * r * N + (N if bias else 0))


FIXED_PSUM_KBLOCKED = 5
"""PSUM banks of :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`: two strip slabs, two output tiles,
the X transposes."""


def xuv_kblocked_sbuf_bytes(
    K: int, r: int, N: int, BM: int, BK: int, BN: int, size: int, bias: bool, resident: bool, staged: bool
) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`
    (``staged``: bf16 inputs, whose strip tiles are cast for the second product)."""
    nk, nr, nbk = cdiv(K, P), cdiv(r, P), cdiv(BK, P)
    second = size if staged else 4
    b = 4 * nr * BM + size * nbk * BM + size * BK + size * (nk if resident else nbk) * r
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
    b = size * (nk * BM + min(K, X_ROW_COLS) + nk * BN + 2 * MOV)
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


def mlp_sbuf_bytes(sh: MlpShape, BM: int, BMX: int, BI: int, BN: int, size: int, group: int = 1) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.mlp.svd_mlp_fused` (``group``:
    its ``u_group``)."""
    s = size
    nk, nI, nbi = cdiv(sh.K, P), cdiv(sh.I, P), cdiv(BI, P)
    b = s * (nk * BMX + min(sh.K, X_ROW_COLS))
    for r in sh.inputs:
        if r is not None:
            b += s * cdiv(r, P) * BM
        b += s * cdiv(sh.K if r is None else r, P) * BI
    if any(r is not None for r in sh.inputs):
        b += s * 2 * P * group
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


def mlp_psum_banks(sh: MlpShape, BMX: int, group: int = 1) -> int:
    needs_acc = any(r is not None for r in sh.inputs) or sh.r_down is not None
    return (group * cdiv(BMX, MOV) if needs_acc else 0) + FIXED_PSUM_MLP


def mlp_hbm_bytes(sh: MlpShape, M: int, BM: int, BMX: int, size: int) -> int:
    nb, nsub = _block_counts(M, BM, BMX)
    per_sub = sum(sh.K * r for r in sh.inputs if r is not None)
    per_blk = sum((sh.K if r is None else r) * sh.I for r in sh.inputs)
    per_blk += sh.I * sh.H if sh.r_down is None else sh.I * sh.r_down + sh.r_down * sh.H
    once = M * sh.K + M * sh.H + sh.I * sh.bias_columns + (sh.H if sh.down_bias else 0)
    return size * (once + nsub * per_sub + nb * per_blk)


FIXED_PSUM_MLP_KBLOCKED = 7
"""PSUM banks of :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`: two strip slabs (which step C
reuses), the gate/up pair, the output pair and the X transposes."""


def mlp_kblocked_sbuf_bytes(
    sh: MlpShape, BM: int, BK: int, BI: int, BN: int, size: int, resident: bool, staged: bool
) -> int:
    """SBUF bytes per partition allocated by :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`
    (``staged``: bf16 inputs, whose fp32 strips are cast a chunk or a tile at a time)."""
    s = size
    nk, nbk, nbi, nI = cdiv(sh.K, P), cdiv(BK, P), cdiv(BI, P), cdiv(sh.I, P)
    nd = cdiv(sh.r_down, P)
    b = s * (nbk * BM + BK)
    for r in sh.inputs:
        nr = cdiv(r, P)
        b += (
            4 * nr * BM
            + s * (nk if resident else nbk) * r
            + (s * nr * min(MOV, BM) if staged else 0)
            + s * nr * BI
        )
    if sh.gated:
        b += 4 * MOV
    b += 4 * nI * sh.bias_columns
    b += s * nbi * BM + s * nbi * sh.r_down + 4 * nd * BM + (s * nd * P if staged else 0)
    b += s * nd * BN + s * 2 * BN
    return b + (_broadcast_bias_bytes(sh.H, s) if sh.down_bias else 0)


def mlp_kblocked_hbm_bytes(sh: MlpShape, M: int, BM: int, size: int, resident: bool) -> int:
    nb = cdiv(M, BM)
    first = sh.K * sum(sh.inputs)
    per_blk = sum(r * sh.I for r in sh.inputs) + sh.I * sh.r_down + sh.r_down * sh.H
    once = M * sh.K + M * sh.H + sh.I * sh.bias_columns + (sh.H if sh.down_bias else 0)
    return size * (once + nb * per_blk + (1 if resident else nb) * first)


def mlp_macs(sh: MlpShape, M: int) -> int:
    m = sum(sh.K * sh.I if r is None else r * (sh.K + sh.I) for r in sh.inputs)
    m += sh.I * sh.H if sh.r_down is None else sh.r_down * (sh.I + sh.H)
    return M * m


# ----------------------------------------------------------------------------------------------
# DMA queue time: every transfer's bytes over its efficiency (the stand-in's engine model)

DMA_FULL_SPEED_BYTES = 2048
"""Bytes one partition moves in one transfer from which a DMA runs near its peak bandwidth."""
DMA_TRANSPOSE_CEILING = 0.9
"""A transposing DMA runs below a plain copy: at most this fraction of peak."""


def dma_efficiency(row_bytes: int, transpose: bool = False) -> float:
    """Modelled fraction of peak bandwidth of a transfer that moves ``row_bytes`` per partition."""
    efficiency = min(1.0, row_bytes / DMA_FULL_SPEED_BYTES)
    return min(efficiency, DMA_TRANSPOSE_CEILING) if transpose else efficiency


def _dma(moved: int, row_bytes: int, transpose: bool = False) -> float:
    return moved / dma_efficiency(row_bytes, transpose)


def _widths(total: int, block: int):
    """The widths of ``total`` cut into blocks of ``block`` (the last one ragged)."""
    for start in range(0, total, block):
        yield min(block, total - start)


def _over(total: int, block: int, cost) -> float:
    """``sum(cost(w) for w in _widths(total, block))`` with one call per distinct width."""
    full, rest = divmod(total, block)
    return full * cost(block) + (cost(rest) if rest else 0.0)


def _bias_dma(N: int, size: int) -> float:
    """:func:`~neuronmm_fx.kernels._blocks.broadcast_bias`: the (1, N) row in 512-column pieces."""
    return sum(_dma(jw * size, jw * size) for jw in _widths(N, MOV))


def _x_transposed_dma(tokens: int, K: int, size: int, width: int = X_ROW_COLS) -> float:
    """:func:`~neuronmm_fx.kernels._blocks.load_x_transposed` of ``tokens`` rows: X read in its own
    layout, 128 tokens by ``width`` features per transfer (the transposes run on TensorE)."""
    return _over(tokens, P, lambda tp: _over(K, width, lambda cw: _dma(tp * cw * size, cw * size)))


def transpose_cycles(M: int, K: int, fp32: bool) -> int:
    """TensorE cycles of transposing an M x K activation in 128 x 128 tiles (``nc_transpose``: a
    matmul of the tile against an identity), for the planner's TensorE time."""
    per_tile = sum(max(min(64, kp), tp) for tp in _widths(M, P) for kp in _widths(K, P))
    return per_tile * (4 if fp32 else 1)


def _u_tiles_dma(K: int, r: int, size: int, group: int = 1) -> float:
    """:func:`~neuronmm_fx.kernels._blocks.strip_from_xt`: U in 128-row slabs of ``group`` rank tiles
    (rows of up to group*128 columns)."""
    return sum(_dma(kp * cw * size, cw * size) for cw in _widths(r, group * P) for kp in _widths(K, P))


def _second_factor_dma(tokens: int, R: int, N: int, BN: int, size: int) -> float:
    """:func:`~neuronmm_fx.kernels._blocks.stream_second_factor`: W slabs, Y in 512-column tiles."""
    cost = 0.0
    for bn in _widths(N, BN):
        cost += sum(_dma(rp * bn * size, bn * size) for rp in _widths(R, P))
        cost += sum(_dma(tp * jw * size, jw * size) for tp in _widths(tokens, P) for jw in _widths(bn, MOV))
    return cost


def xuv_dma_cost(
    M: int, K: int, r: int, N: int, BM: int, BMX: int, BN: int, size: int, bias: bool, group: int = 1
) -> float:
    """DMA queue bytes of :func:`~neuronmm_fx.kernels.xuv.xuv_fused`."""
    cost = _bias_dma(N, size) if bias else 0.0
    for bm in _widths(M, BM):
        for sw in _widths(bm, BMX):
            cost += _x_transposed_dma(sw, K, size) + _u_tiles_dma(K, r, size, group)
        cost += _second_factor_dma(bm, r, N, BN, size)
    return cost


def dense_dma_cost(M: int, K: int, N: int, BM: int, BN: int, size: int, bias: bool) -> float:
    """DMA queue bytes of :func:`~neuronmm_fx.kernels.xuv.matmul_dense`."""
    cost = _bias_dma(N, size) if bias else 0.0
    for bm in _widths(M, BM):
        cost += _x_transposed_dma(bm, K, size) + _second_factor_dma(bm, K, N, BN, size)
    return cost


def _fp32_strip_stream_dma(tokens: int, R: int, N: int, BN: int, size: int, on_chip: int) -> float:
    """:func:`~neuronmm_fx.kernels._blocks.stream_from_fp32_strip`: W slabs (``on_chip`` bytes per
    element in SBUF), Y in BN-wide rows per 128-token tile."""
    slabs = _over(N, BN, lambda bn: _over(R, P, lambda rp: _dma(rp * bn * size, bn * on_chip)))
    return slabs + _over(N, BN, lambda bn: _over(tokens, P, lambda tp: _dma(tp * bn * size, bn * size)))


def xuv_kblocked_dma_cost(
    M: int,
    K: int,
    r: int,
    N: int,
    BM: int,
    BK: int,
    BN: int,
    size: int,
    bias: bool,
    resident: bool,
    staged: bool,
) -> float:
    """DMA queue bytes of :func:`~neuronmm_fx.kernels.xuv.xuv_kblocked`: X slabs transposed, U in
    rows of r, V slabs (cast to fp32 on chip unless ``staged``), Y in rows of BN."""
    on_chip_v = size if staged else 4

    def slab(bm: int, bk: int) -> float:
        u_rows = 0.0 if resident else _over(bk, P, lambda kp: _dma(kp * r * size, r * size))
        return _x_transposed_dma(bm, bk, size, BK) + u_rows

    def block(bm: int) -> float:
        return _over(K, BK, lambda bk: slab(bm, bk)) + _fp32_strip_stream_dma(bm, r, N, BN, size, on_chip_v)

    cost = _bias_dma(N, size) if bias else 0.0
    if resident:
        cost += _over(K, P, lambda kp: _dma(kp * r * size, r * size))
    return cost + _over(M, BM, block)


def _mlp_bias_dma(sh: MlpShape, size: int) -> float:
    """The MLP kernels' biases: (I, 1) columns into fp32 tiles, the (1, H) down bias broadcast."""
    cost = sh.bias_columns * sum(_dma(ip * size, 4) for ip in _widths(sh.I, P))
    return cost + (_bias_dma(sh.H, size) if sh.down_bias else 0.0)


def _intermediate_block_dma(sh: MlpShape, bi: int, size: int) -> float:
    """One intermediate block of steps B and C: the second factors' (R, bi) slabs, Ud's bi rows."""
    second = [sh.K if r is None else r for r in sh.inputs]  # contraction of each h-producing product
    cost = sum(_dma(rp * bi * size, bi * size) for R in second for rp in _widths(R, P))
    if sh.r_down is not None:
        cost += sum(_dma(ip * sh.r_down * size, sh.r_down * size) for ip in _widths(bi, P))
    return cost


def mlp_kblocked_dma_cost(
    sh: MlpShape, M: int, BM: int, BK: int, BI: int, BN: int, size: int, resident: bool
) -> float:
    """DMA queue bytes of :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`: X slabs transposed,
    Ua/Uu in rows of r, the intermediate blocks' slabs, Vd slabs and Y tiles."""
    s = size

    def u_rows(rows: int) -> float:
        return sum(_over(rows, P, lambda kp, r=r: _dma(kp * r * s, r * s)) for r in sh.inputs)

    def slab(bm: int, bk: int) -> float:
        return _x_transposed_dma(bm, bk, s, BK) + (0.0 if resident else u_rows(bk))

    def block(bm: int) -> float:
        cost = _over(sh.K, BK, lambda bk: slab(bm, bk))
        cost += _over(sh.I, BI, lambda bi: _intermediate_block_dma(sh, bi, s))
        return cost + _fp32_strip_stream_dma(bm, sh.r_down, sh.H, BN, s, s)

    return _mlp_bias_dma(sh, s) + (u_rows(sh.K) if resident else 0.0) + _over(M, BM, block)


def mlp_dma_cost(
    sh: MlpShape, M: int, BM: int, BMX: int, BI: int, BN: int, size: int, group: int = 1
) -> float:
    """DMA queue bytes of :func:`~neuronmm_fx.kernels.mlp.svd_mlp_fused`."""
    s = size
    cost = _mlp_bias_dma(sh, s)
    for bm in _widths(M, BM):
        for sw in _widths(bm, BMX):
            cost += _x_transposed_dma(sw, sh.K, s)
            cost += sum(_u_tiles_dma(sh.K, r, s, group) for r in sh.inputs if r is not None)
        for bi in _widths(sh.I, BI):
            cost += _intermediate_block_dma(sh, bi, s)
        cost += _second_factor_dma(bm, sh.I if sh.r_down is None else sh.r_down, sh.H, BN, s)
    return cost

"""Building blocks shared by the kernels (traced into each kernel; plain Python loops).

Notation (docs/kernels.md): X is M x K (tokens x features), U is K x r, V is r x N.  On chip, a
"strip" is a transposed activation block with the contraction dimension of the *next* product on
partitions: ``strip[p, t, m]`` holds row ``t*128 + p`` of ``(X_blk U)^T`` (or of ``X_blk^T`` for a
dense projection), token ``m`` of the block.  Such a strip is exactly the stationary operand of the
next matmul, which is why no transpose instruction is ever issued.
"""

from __future__ import annotations

from ._nki import nisa, nl
from .costs import X_ROW_COLS
from .targets import MOVING_FMAX as MOV
from .targets import PARTITIONS as P
from .targets import cdiv

__all__ = [
    "X_ROW_COLS",
    "MOV",
    "P",
    "accumulate_strip_slab",
    "accumulate_tiles",
    "broadcast_bias",
    "cdiv",
    "load_row_tiles",
    "load_x_transposed",
    "stream_from_fp32_strip",
    "stream_second_factor",
    "strip_from_xt",
    "strips_for_block",
]


def load_x_transposed(x, m0, mw, k0, kw, xt, x_rows, t_ps):
    """``xt[0:kp, kt, 0:mw] = X[m0:m0+mw, k0 + kt*128 : ...]^T`` for every 128-feature tile kt of the
    ``kw`` features from ``k0``.

    X is read in its own layout, 128 tokens by ``x_rows.shape[1]`` features per DMA (rows of 2 KiB or
    more for the kernels' widths), into ``x_rows`` (SBUF (128, width)); each tile is transposed on
    TensorE (``nc_transpose``) into ``t_ps`` (PSUM (128, 128) in x's dtype) and copied into ``xt``
    (SBUF (128, tiles, >= mw)).  The hardware DGE transposes only 16 x 128 tiles of 2-byte types, 32 B
    per partition per transfer, so the DMA transpose is not used."""
    width = x_rows.shape[1]
    for t0 in range(0, mw, P):
        tp = min(P, mw - t0)
        for c0 in range(0, kw, width):
            cw = min(width, kw - c0)
            nisa.dma_copy(dst=x_rows[0:tp, 0:cw], src=x[m0 + t0 : m0 + t0 + tp, k0 + c0 : k0 + c0 + cw])
            for j0 in range(0, cw, P):
                kp = min(P, cw - j0)
                nisa.nc_transpose(dst=t_ps[0:kp, 0:tp], data=x_rows[0:tp, j0 : j0 + kp])
                nisa.tensor_copy(dst=xt[0:kp, (c0 + j0) // P, t0 : t0 + tp], src=t_ps[0:kp, 0:tp])


def strip_from_xt(xt, mw, u, strip, s0, u_tile, acc):
    """``strip[:, :, s0:s0+mw] = (X_sub U)^T`` over the whole rank, from the loaded ``xt``.

    U tiles are the stationary operand and ``X_sub^T`` tiles the moving one, so TensorE produces
    ``(X_sub U)^T`` (rank on partitions) directly: the implicit transposition.  U is loaded in
    slabs of G rank tiles (128 rows x G*128 columns, G = ``u_tile.shape[2] // 128``: rows of
    G*128*s bytes per partition per transfer), each used for all token chunks; the K contraction of
    every rank tile of the group and 512-token chunk accumulates in its own PSUM bank of ``acc``
    (PSUM (128, G*chunks, 512) fp32), so a group holds G*ceil(mw/512) banks.
    ``u_tile``: SBUF (128, 2, G*128) double buffer for the streamed U slabs."""
    K, R = u.shape
    nk = cdiv(K, P)
    nr = cdiv(R, P)
    nchunks = cdiv(mw, MOV)
    group = u_tile.shape[2] // P
    slot = 0
    for g0 in range(0, nr, group):
        gw = min(group, nr - g0)  # rank tiles in this group
        cols = min(gw * P, R - g0 * P)
        for kt in range(nk):
            kp = min(P, K - kt * P)
            nisa.dma_copy(dst=u_tile[0:kp, slot, 0:cols], src=u[kt * P : kt * P + kp, g0 * P : g0 * P + cols])
            for j in range(gw):
                rp = min(P, R - (g0 + j) * P)
                ut = u_tile[0:kp, slot, j * P : j * P + rp]
                for c in range(nchunks):
                    cw = min(MOV, mw - c * MOV)
                    # moving: X_sub^T[kt-tile, chunk c]; the (tile, chunk) PSUM bank accumulates over kt
                    moving = xt[0:kp, kt, c * MOV : c * MOV + cw]
                    nisa.nc_matmul(
                        acc[0:rp, j * nchunks + c, 0:cw], stationary=ut, moving=moving, accumulate=kt > 0
                    )
            slot = 1 - slot
        for j in range(gw):
            rp = min(P, R - (g0 + j) * P)
            for c in range(nchunks):
                cw = min(MOV, mw - c * MOV)
                # PSUM (fp32) -> SBUF strip in the compute dtype
                dst = strip[0:rp, g0 + j, s0 + c * MOV : s0 + c * MOV + cw]
                nisa.tensor_copy(dst=dst, src=acc[0:rp, j * nchunks + c, 0:cw])


def strips_for_block(x, m0, bm, block_mx, xt, x_rows, t_ps, factors, u_tile, acc):
    """Fill the strips ``(X_blk U)^T`` of ``factors`` (pairs ``(u, strip)``) for the token block
    ``X[m0 : m0+bm]``, which is loaded (transposed, :func:`load_x_transposed`) in sub-blocks of
    ``block_mx`` tokens into ``xt``; every strip is computed from each loaded sub-block, so the loads
    of X are shared."""
    for s0 in range(0, bm, block_mx):
        sw = min(block_mx, bm - s0)
        load_x_transposed(x, m0 + s0, sw, 0, x.shape[1], xt, x_rows, t_ps)
        for u, strip in factors:
            strip_from_xt(xt, sw, u, strip, s0, u_tile, acc)


def load_row_tiles(src, r0, rows, c0, cols, dst, first):
    """``dst[:, first + t, 0:cols] = src[r0 + t*128 : ..., c0 : c0 + cols]`` for the 128-row tiles t of
    the ``rows`` rows of ``src`` from ``r0``: one DMA per tile, rows of ``cols`` columns (cols*s bytes
    per partition per transfer).  Loads U's rows of a K slab (all r columns) and a second factor's
    R x width column slab alike."""
    for t in range(cdiv(rows, P)):
        tp = min(P, rows - t * P)
        nisa.dma_copy(dst=dst[0:tp, first + t, 0:cols], src=src[r0 + t * P : r0 + t * P + tp, c0 : c0 + cols])


def accumulate_strip_slab(u_sb, u_first, xt, bk, bm, strip, R, first_slab, acc, slot):
    """``strip[:, :, 0:bm] (+)= (X_slab . U_slab)^T`` for one K slab of ``bk`` features.

    ``xt`` holds ``X_slab^T`` (SBUF (128, >= ceil(bk/128), >= bm)), ``u_sb[:, u_first + kt, 0:R]`` the
    slab's U rows; ``strip`` is the fp32 SBUF strip (128, ceil(R/128), >= bm), overwritten on the
    ``first_slab`` and added to after it.  Each rank tile and 512-token chunk sums the slab in one
    PSUM bank of ``acc`` (PSUM (128, 2, 512) fp32), alternating between the two so that the
    evacuation of one overlaps the next; returns the slot to use next."""
    for rt in range(cdiv(R, P)):
        rp = min(P, R - rt * P)
        for c0 in range(0, bm, MOV):
            cw = min(MOV, bm - c0)
            ps = acc[0:rp, slot, 0:cw]
            for kt in range(cdiv(bk, P)):
                kp = min(P, bk - kt * P)
                stationary = u_sb[0:kp, u_first + kt, rt * P : rt * P + rp]
                nisa.nc_matmul(
                    ps, stationary=stationary, moving=xt[0:kp, kt, c0 : c0 + cw], accumulate=kt > 0
                )
            dst = strip[0:rp, rt, c0 : c0 + cw]
            if first_slab:
                nisa.tensor_copy(dst=dst, src=ps)
            else:
                nisa.tensor_tensor(dst=dst, data1=dst, data2=ps, op=nl.add)
            slot = 1 - slot
    return slot


def broadcast_bias(bias, dt, ps):
    """``None`` without a bias; else an SBUF (128, N) tile holding the (1, N) HBM row ``bias`` on
    every partition, made by rank-1 matmuls (``ones^T . row``) through the PSUM bank ``ps``
    ((128, 512) scratch).  SBUF: s*(128 + 512 + N) per partition."""
    if bias == None:  # noqa: E711 - NKI 0.3 compiles no `is`
        return None
    N = bias.shape[1]
    ones = nl.ndarray((1, P), dtype=dt, buffer=nl.sbuf)
    row = nl.ndarray((1, MOV), dtype=dt, buffer=nl.sbuf)
    bias_bc = nl.ndarray((P, N), dtype=dt, buffer=nl.sbuf)
    nisa.memset(ones[0:1, 0:P], 1.0)
    for j0 in range(0, N, MOV):
        jw = min(MOV, N - j0)
        nisa.dma_copy(dst=row[0:1, 0:jw], src=bias[0:1, j0 : j0 + jw])
        nisa.nc_matmul(ps[0:P, 0:jw], stationary=ones[0:1, 0:P], moving=row[0:1, 0:jw], accumulate=False)
        nisa.tensor_copy(dst=bias_bc[0:P, j0 : j0 + jw], src=ps[0:P, 0:jw])
    return bias_bc


def accumulate_tiles(ps, stationary, s0, sw, moving, m0, mw, depth):
    """``ps = sum_t stationary[:, t, s0:s0+sw]^T . moving[:, t, m0:m0+mw]`` over the partition tiles
    ``t`` of a ``depth``-long contraction, accumulated in the PSUM tile ``ps``."""
    for t in range(cdiv(depth, P)):
        tp = min(P, depth - t * P)
        nisa.nc_matmul(
            ps,
            stationary=stationary[0:tp, t, s0 : s0 + sw],
            moving=moving[0:tp, t, m0 : m0 + mw],
            accumulate=t > 0,
        )


def stream_second_factor(y, m0, mw, strip, R, w, w_blk, out_ps, out_sb, bias_bc, block_n):
    """``Y[m0:m0+mw, :] = strip[:, :, 0:mw]^T . W (+ bias)`` with W (R x N) streamed in column blocks.

    For every block of ``block_n`` output columns, the R x block_n slab of W is loaded once into
    ``w_blk`` (SBUF (128, ceil(R/128), block_n)) and reused by all the token tiles of the block.
    Each output tile (<=128 tokens x <=512 columns) accumulates the whole R contraction in one PSUM
    bank (fp32), alternating between two banks (``out_ps``: PSUM (128, 2, 512)) so that the
    evacuation of one overlaps the next; the epilogue (bias add, cast) runs while evacuating into
    ``out_sb`` (SBUF (128, 2, 512)), which is then stored to HBM."""
    N = w.shape[1]
    nr = cdiv(R, P)
    slot = 0
    for n0 in range(0, N, block_n):
        bn = min(block_n, N - n0)
        load_row_tiles(w, 0, R, n0, bn, w_blk, 0)
        for t0 in range(0, mw, P):
            tp = min(P, mw - t0)
            for j0 in range(0, bn, MOV):
                jw = min(MOV, bn - j0)
                ps = out_ps[0:tp, slot, 0:jw]
                for rt in range(nr):
                    rp = min(P, R - rt * P)
                    # stationary: the strip's rt-tile for tokens t0..; moving: the slab's columns j0..
                    stationary = strip[0:rp, rt, t0 : t0 + tp]
                    nisa.nc_matmul(
                        ps, stationary=stationary, moving=w_blk[0:rp, rt, j0 : j0 + jw], accumulate=rt > 0
                    )
                ob = out_sb[0:tp, slot, 0:jw]
                if bias_bc == None:  # noqa: E711 - NKI 0.3 compiles no `is`
                    nisa.tensor_copy(dst=ob, src=ps)
                else:
                    nisa.tensor_tensor(
                        dst=ob, data1=ps, data2=bias_bc[0:tp, n0 + j0 : n0 + j0 + jw], op=nl.add
                    )
                nisa.dma_copy(dst=y[m0 + t0 : m0 + t0 + tp, n0 + j0 : n0 + j0 + jw], src=ob)
                slot = 1 - slot


def stream_from_fp32_strip(y, m0, bm, strip, R, w, w_blk, stage, out_ps, out_sb, bias_bc, block_n, slot, row):
    """``Y[m0:m0+bm, :] = strip[:, :, 0:bm]^T . W (+ bias)`` from an fp32 strip (R on partitions),
    W (R x N) streamed in R x ``block_n`` slabs (once per call) into ``w_blk``.

    With ``stage`` (SBUF (128, ceil(R/128), 128) in the compute dtype: bf16 inputs) each 128-token
    tile of the strip is cast once per slab and the products run at bf16 speed; without it (fp32,
    or fp16 whose strip must stay fp32) the fp32 strip is the stationary operand and ``w_blk`` is
    fp32 (a converting load).  Each 128 x 512 output tile sums all of R in one PSUM bank of
    ``out_ps`` (alternating ``slot``); the bias is added while evacuating into a BN-wide row of
    ``out_sb`` (SBUF (128, 2, BN), alternating ``row``), stored with one DMA per 128-token tile and
    slab (BN*s bytes per partition).  Returns the next ``(slot, row)``."""
    N = w.shape[1]
    nr = cdiv(R, P)
    for n0 in range(0, N, block_n):
        bn = min(block_n, N - n0)
        load_row_tiles(w, 0, R, n0, bn, w_blk, 0)
        for t0 in range(0, bm, P):
            tp = min(P, bm - t0)
            if stage != None:  # noqa: E711 - NKI 0.3 compiles no `is`
                for rt in range(nr):
                    rp = min(P, R - rt * P)
                    nisa.tensor_copy(dst=stage[0:rp, rt, 0:tp], src=strip[0:rp, rt, t0 : t0 + tp])
            for j0 in range(0, bn, MOV):
                jw = min(MOV, bn - j0)
                ps = out_ps[0:tp, slot, 0:jw]
                for rt in range(nr):
                    rp = min(P, R - rt * P)
                    stationary = strip[0:rp, rt, t0 : t0 + tp]
                    if stage != None:  # noqa: E711
                        stationary = stage[0:rp, rt, 0:tp]
                    nisa.nc_matmul(
                        ps, stationary=stationary, moving=w_blk[0:rp, rt, j0 : j0 + jw], accumulate=rt > 0
                    )
                ob = out_sb[0:tp, row, j0 : j0 + jw]
                if bias_bc == None:  # noqa: E711
                    nisa.tensor_copy(dst=ob, src=ps)
                else:
                    nisa.tensor_tensor(
                        dst=ob, data1=ps, data2=bias_bc[0:tp, n0 + j0 : n0 + j0 + jw], op=nl.add
                    )
                slot = 1 - slot
            nisa.dma_copy(dst=y[m0 + t0 : m0 + t0 + tp, n0 : n0 + bn], src=out_sb[0:tp, row, 0:bn])
            row = 1 - row
    return slot, row

"""NKI kernels for ``Y = X.U.V`` (fused, the paper's TrainiumFusion) and its baselines.

Written in the current NKI dialect (``import nki``; NKI 0.3/0.4, Neuron SDK 2.29-2.30; every
``nisa`` call destination-first, plain ``range`` loops).  On machines without the Neuron SDK they
run on the CPU stand-in.  Block sizes are compile-time constants chosen by
:mod:`neuronmm_fx.kernels.planner`; the SBUF figures below are bytes *per partition*, ``s`` the
element size (2 for bf16/fp16, 4 for fp32), ``nk = ceil(K/128)``, ``nr = ceil(r/128)``.

Tiles (hardware limits): contraction 128 partitions, stationary free <= 128, moving free <= 512,
one PSUM bank (128 x 512 fp32) per result tile.
"""

from __future__ import annotations

from ._blocks import (
    MOV,
    X_ROW_COLS,
    P,
    accumulate_strip_slab,
    broadcast_bias,
    cdiv,
    load_row_tiles,
    load_x_transposed,
    stream_from_fp32_strip,
    stream_second_factor,
    strips_for_block,
)
from ._nki import nki, nl


@nki.jit
def xuv_fused(x, u, v, bias=None, block_m=512, block_mx=512, block_n=512, u_group=1):
    """Fused ``Y = X.U.V (+ bias)``: ``X.U`` never leaves the chip and is never recomputed.

    Shapes: x (M, K), u (K, r), v (r, N), bias (1, N) or None -> y (M, N), all one dtype
    (bf16, fp16 or fp32); any M, K, r, N (ragged edges are sliced, not padded).

    Dataflow per token block of ``block_m`` (BM) tokens:

    1. For each sub-block of ``block_mx`` (BMX <= BM) tokens: load ``X_sub^T`` (read in rows,
       transposed on TensorE: K on partitions), then compute ``(X_sub.U)^T`` over the whole rank
       with U tiles stationary and ``X_sub^T`` moving; the K contraction accumulates in PSUM
       (fp32), the result is cast into the SBUF strip ``(X_blk.U)^T`` (r x BM, rank on partitions).
       U is read once per sub-block, in slabs of ``u_group`` (G) rank tiles (rows of G*128*s bytes),
       G as large as PSUM allows: G*ceil(BMX/512) accumulation banks.
    2. The strip is the stationary operand of the second product.  V is streamed in r x BN slabs
       (read once per token block), each 128-token x 512-column output tile accumulates the whole
       r contraction in one PSUM bank, the bias is added while evacuating, and Y is stored.

    SBUF per partition (all allocated once):
        xt  (128, nk, BMX)   s*nk*BMX      X_sub^T
        X rows (128, min(K, 1024)) s*min(K, 1024)  X as it lies in HBM, before its transposes
        strip (128, nr, BM)  s*nr*BM       (X_blk U)^T
        U slabs (128, 2, G*128) s*256*G
        V slab (128, nr, BN) s*nr*BN
        out (128, 2, 512)    s*1024
        bias (only with bias): s*(128 + 512 + N)
    PSUM: G*ceil(BMX/512) banks for step 1 + 2 banks for step 2 + 1 for the transposes (<= 8 in
    total, so BMX <= 2560).
    HBM traffic: X and Y once, U once per X sub-block, V once per token block, bias once.
    """
    M, K = x.shape
    R = u.shape[1]
    N = v.shape[1]
    dt = x.dtype
    nk = cdiv(K, P)
    nr = cdiv(R, P)
    y = nl.ndarray((M, N), dtype=dt, buffer=nl.shared_hbm)

    xt = nl.ndarray((P, nk, block_mx), dtype=dt, buffer=nl.sbuf)
    x_rows = nl.ndarray((P, min(K, X_ROW_COLS)), dtype=dt, buffer=nl.sbuf)
    strip = nl.ndarray((P, nr, block_m), dtype=dt, buffer=nl.sbuf)
    u_tile = nl.ndarray((P, 2, u_group * P), dtype=dt, buffer=nl.sbuf)
    v_blk = nl.ndarray((P, nr, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, MOV), dtype=dt, buffer=nl.sbuf)
    acc = nl.ndarray((P, u_group * cdiv(block_mx, MOV), MOV), dtype=nl.float32, buffer=nl.psum)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    t_ps = nl.ndarray((P, P), dtype=dt, buffer=nl.psum)
    bias_bc = broadcast_bias(bias, dt, out_ps[0:P, 0, 0:MOV])

    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        # step 1: the (X_blk U)^T strip, X_blk loaded in sub-blocks of block_mx tokens
        strips_for_block(x, m0, bm, block_mx, xt, x_rows, t_ps, [(u, strip)], u_tile, acc)
        # step 2: Y_blk = strip^T . V, V streamed
        stream_second_factor(y, m0, bm, strip, R, v, v_blk, out_ps, out_sb, bias_bc, block_n)
    return y


@nki.jit
def xuv_kblocked(x, u, v, bias=None, block_m=512, block_k=512, block_n=1024, u_resident=0):
    """Fused ``Y = X.U.V (+ bias)`` with the ``(X.U)`` strip summed over K slabs in fp32.

    Shapes as :func:`xuv_fused`.  Made for large K (down projections) and long prefills: nothing
    holds all of K for a token, so the token block BM is limited by the strip alone.

    Dataflow per token block of ``block_m`` (BM) tokens:

    1. For each K slab of ``block_k`` (BK) features: load ``X_slab^T`` (rows of BK features,
       transposed on TensorE) and, unless U is resident, the ``U`` slab (BK x r); for every rank tile and
       512-token chunk accumulate the slab's contraction in a PSUM bank (two banks alternate) and
       add it into the fp32 SBUF strip ``(X_blk.U)^T`` (r x BM).  X is read once; U once per token
       block, or once per kernel when ``u_resident`` (all of U loaded before the first block).
    2. Stream V in r x BN slabs (once per token block).  For each 128-token tile the strip is the
       stationary operand: bf16 inputs use a bf16 copy of the tile (cast once per tile and slab);
       float32 and float16 inputs use the fp32 strip itself with V cast to fp32 on the way in, so
       an fp16 ``X.U`` that would overflow fp16 stays finite, as in the reference.  Each output tile
       accumulates all of r in one PSUM bank; the bias is added while evacuating into an SBUF row of
       BN columns, which is stored with one DMA per 128-token tile (BN·s bytes per partition, 2 KiB
       and more for BN >= 1024 in bf16/fp16, BN >= 512 in fp32).

    SBUF per partition (s element size, s2 = 4 for fp32/fp16 inputs and s for bf16; nr = ceil(r/128),
    nbk = ceil(BK/128), nk = ceil(K/128)), all allocated once:
        strip (128, nr, BM) fp32           4*nr*BM
        xt (128, nbk, BM)                  s*nbk*BM
        X rows (128, BK)                   s*BK
        U slab (128, nbk, r) / all of U    s*nbk*r  /  s*nk*r when resident
        bf16 stationary tile (128, nr, 128) s*nr*128 (bf16 only)
        V slab (128, nr, BN)               s2*nr*BN
        out rows (128, 2, BN)              s*2*BN
        bias (only with bias)              s*(128 + 512 + N)
    PSUM: 2 banks for the strip slabs + 2 for the output tiles + 1 for the transposes of X.
    HBM traffic: X and Y once, V once per token block, U once per token block (once if resident).
    """
    M, K = x.shape
    R = u.shape[1]
    N = v.shape[1]
    dt = x.dtype
    nk = cdiv(K, P)
    nr = cdiv(R, P)
    nbk = cdiv(block_k, P)
    staged = dt == nl.bfloat16  # fp32 and fp16 multiply the fp32 strip itself
    second_dt = dt if staged else nl.float32
    y = nl.ndarray((M, N), dtype=dt, buffer=nl.shared_hbm)

    strip = nl.ndarray((P, nr, block_m), dtype=nl.float32, buffer=nl.sbuf)
    xt = nl.ndarray((P, nbk, block_m), dtype=dt, buffer=nl.sbuf)
    x_rows = nl.ndarray((P, block_k), dtype=dt, buffer=nl.sbuf)
    u_tiles = nbk
    if u_resident:
        u_tiles = nk
    u_sb = nl.ndarray((P, u_tiles, R), dtype=dt, buffer=nl.sbuf)
    stage = None
    if staged:
        stage = nl.ndarray((P, nr, P), dtype=dt, buffer=nl.sbuf)
    v_blk = nl.ndarray((P, nr, block_n), dtype=second_dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, block_n), dtype=dt, buffer=nl.sbuf)
    acc = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    t_ps = nl.ndarray((P, P), dtype=dt, buffer=nl.psum)
    bias_bc = broadcast_bias(bias, dt, out_ps[0:P, 0, 0:MOV])

    if u_resident:
        load_row_tiles(u, 0, K, 0, R, u_sb, 0)
    slot = 0
    row = 0
    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        # step 1: strip = sum over K slabs of (X_slab . U_slab)^T, in fp32
        for k0 in range(0, K, block_k):
            bk = min(block_k, K - k0)
            load_x_transposed(x, m0, bm, k0, bk, xt, x_rows, t_ps)
            u_first = k0 // P
            if u_resident == 0:
                load_row_tiles(u, k0, bk, 0, R, u_sb, 0)
                u_first = 0
            slot = accumulate_strip_slab(u_sb, u_first, xt, bk, bm, strip, R, k0 == 0, acc, slot)
        # step 2: Y_blk = strip^T . V, V streamed in slabs, one store per 128-token tile and slab
        slot, row = stream_from_fp32_strip(
            y, m0, bm, strip, R, v, v_blk, stage, out_ps, out_sb, bias_bc, block_n, slot, row
        )
    return y


def _matmul_dense(x, w, bias=None, block_m=512, block_n=512):
    """Dense baseline ``Y = X.W (+ bias)``, blocked for HBM traffic.

    Shapes: x (M, K), w (K, N), bias (1, N) or None -> y (M, N).

    A block of BM tokens is loaded once, transposed on TensorE (``X_blk^T``, K on partitions) and
    kept in SBUF as the stationary operand; W is streamed in K x BN slabs (read once per token
    block); each 128 x 512 output tile accumulates all of K in one PSUM bank (fp32).  X and Y move
    once, W ``ceil(M/BM)`` times: the planner takes the largest BM that fits.

    SBUF per partition: s*nk*BM (X_blk^T) + s*min(K, 1024) (X rows) + s*nk*BN (W slab) + s*1024
    (out) [+ s*(640 + N) bias].  PSUM: 3 banks (the output pair, the transposes).
    """
    M, K = x.shape
    N = w.shape[1]
    dt = x.dtype
    nk = cdiv(K, P)
    y = nl.ndarray((M, N), dtype=dt, buffer=nl.shared_hbm)
    xt = nl.ndarray((P, nk, block_m), dtype=dt, buffer=nl.sbuf)
    x_rows = nl.ndarray((P, min(K, X_ROW_COLS)), dtype=dt, buffer=nl.sbuf)
    w_blk = nl.ndarray((P, nk, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, MOV), dtype=dt, buffer=nl.sbuf)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    t_ps = nl.ndarray((P, P), dtype=dt, buffer=nl.psum)
    bias_bc = broadcast_bias(bias, dt, out_ps[0:P, 0, 0:MOV])
    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        load_x_transposed(x, m0, bm, 0, K, xt, x_rows, t_ps)
        stream_second_factor(y, m0, bm, xt, K, w, w_blk, out_ps, out_sb, bias_bc, block_n)
    return y


matmul_dense = nki.jit(_matmul_dense)


@nki.jit
def xuv_unfused(x, u, v, bias=None, block_m1=512, block_n1=512, block_m2=512, block_n2=512):
    """Unfused baseline: ``T = X.U`` written to HBM, then ``Y = T.V (+ bias)``.

    Two launches of :func:`matmul_dense` (each with its own blocks; its SBUF is released between
    them); the M x r intermediate T makes a round trip through HBM.  This is what running the
    factorised layer as two ordinary linear layers costs."""
    t = _matmul_dense(x, u, None, block_m=block_m1, block_n=block_n1)
    return _matmul_dense(t, v, bias, block_m=block_m2, block_n=block_n2)

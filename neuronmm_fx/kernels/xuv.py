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

from ._blocks import MOV, P, broadcast_bias, cdiv, load_x_transposed, stream_second_factor, strips_for_block
from ._nki import nki, nl


@nki.jit
def xuv_fused(x, u, v, bias=None, block_m=512, block_mx=512, block_n=512):
    """Fused ``Y = X.U.V (+ bias)``: ``X.U`` never leaves the chip and is never recomputed.

    Shapes: x (M, K), u (K, r), v (r, N), bias (1, N) or None -> y (M, N), all one dtype
    (bf16, fp16 or fp32); any M, K, r, N (ragged edges are sliced, not padded).

    Dataflow per token block of ``block_m`` (BM) tokens:

    1. For each sub-block of ``block_mx`` (BMX <= BM) tokens: load ``X_sub^T`` transposed by the DMA
       (K on partitions), then compute ``(X_sub.U)^T`` over the whole rank with U tiles stationary
       and ``X_sub^T`` moving; the K contraction accumulates in PSUM (fp32), the result is cast into
       the SBUF strip ``(X_blk.U)^T`` (r x BM, rank on partitions).  U is read once per sub-block.
    2. The strip is the stationary operand of the second product.  V is streamed in r x BN slabs
       (read once per token block), each 128-token x 512-column output tile accumulates the whole
       r contraction in one PSUM bank, the bias is added while evacuating, and Y is stored.

    SBUF per partition (all allocated once):
        xt  (128, nk, BMX)   s*nk*BMX      X_sub^T
        strip (128, nr, BM)  s*nr*BM       (X_blk U)^T
        U tiles (128, 2, 128) s*256
        V slab (128, nr, BN) s*nr*BN
        out (128, 2, 512)    s*1024
        bias (only with bias): s*(128 + 512 + N)
    PSUM: ceil(BMX/512) banks for step 1 + 2 banks for step 2 (<= 8 in total, so BMX <= 3072).
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
    strip = nl.ndarray((P, nr, block_m), dtype=dt, buffer=nl.sbuf)
    u_tile = nl.ndarray((P, 2, P), dtype=dt, buffer=nl.sbuf)
    v_blk = nl.ndarray((P, nr, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, MOV), dtype=dt, buffer=nl.sbuf)
    acc = nl.ndarray((P, cdiv(block_mx, MOV), MOV), dtype=nl.float32, buffer=nl.psum)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    bias_bc = broadcast_bias(bias, dt, out_ps[0:P, 0, 0:MOV])

    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        # step 1: the (X_blk U)^T strip, X_blk loaded in sub-blocks of block_mx tokens
        strips_for_block(x, m0, bm, block_mx, xt, [(u, strip)], u_tile, acc)
        # step 2: Y_blk = strip^T . V, V streamed
        stream_second_factor(y, m0, bm, strip, R, v, v_blk, out_ps, out_sb, bias_bc, block_n)
    return y


def _matmul_dense(x, w, bias=None, block_m=512, block_n=512):
    """Dense baseline ``Y = X.W (+ bias)``, blocked for HBM traffic.

    Shapes: x (M, K), w (K, N), bias (1, N) or None -> y (M, N).

    A block of BM tokens is loaded once, transposed by the DMA (``X_blk^T``, K on partitions) and
    kept in SBUF as the stationary operand; W is streamed in K x BN slabs (read once per token
    block); each 128 x 512 output tile accumulates all of K in one PSUM bank (fp32).  X and Y move
    once, W ``ceil(M/BM)`` times: the planner takes the largest BM that fits.

    SBUF per partition: s*nk*BM (X_blk^T) + s*nk*BN (W slab) + s*1024 (out) [+ s*(640 + N) bias].
    PSUM: 2 banks.
    """
    M, K = x.shape
    N = w.shape[1]
    dt = x.dtype
    nk = cdiv(K, P)
    y = nl.ndarray((M, N), dtype=dt, buffer=nl.shared_hbm)
    xt = nl.ndarray((P, nk, block_m), dtype=dt, buffer=nl.sbuf)
    w_blk = nl.ndarray((P, nk, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, MOV), dtype=dt, buffer=nl.sbuf)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    bias_bc = broadcast_bias(bias, dt, out_ps[0:P, 0, 0:MOV])
    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        load_x_transposed(x, m0, bm, xt)
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

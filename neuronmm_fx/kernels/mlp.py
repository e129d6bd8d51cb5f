"""NKI kernel for a (compressed) MLP: gated ``(act(X.Wg) * (X.Wu)).Wd`` or plain ``act(X.W1).W2``.

Current NKI dialect (``import nki``; NKI 0.3/0.4, Neuron SDK 2.29-2.30), destination-first
``nisa`` calls, plain ``range`` loops; runs on the CPU stand-in where the Neuron SDK is absent.
"""

from __future__ import annotations

from ..activations import ACTIVATION_NAMES, check_activation
from ._blocks import (
    MOV,
    X_ROW_COLS,
    P,
    accumulate_tiles,
    broadcast_bias,
    cdiv,
    stream_second_factor,
    strips_for_block,
)
from ._nki import nisa, nki, nl

ACTIVATIONS = ACTIVATION_NAMES
"""Activation names accepted by :func:`svd_mlp_fused`: those of :mod:`neuronmm_fx.activations`."""


def activation_op(name: str):
    """The ``nl`` activation function for one of :data:`ACTIVATIONS` (``nl.relu`` for the last);
    the name is checked on the host (:func:`check_mlp_launch`), since a kernel cannot raise."""
    if name == "silu":
        return nl.silu
    if name == "gelu":
        return nl.gelu
    if name == "gelu_tanh":
        return nl.gelu_apprx_tanh
    return nl.relu


def check_mlp_launch(
    activation: str, intermediate: int, dense_in: bool, dense_down: bool, blocks: dict
) -> None:
    """Host-side checks of a :func:`svd_mlp_fused` launch (``ValueError``): a known activation, and
    the block sizes its dense projections need (the planner's plans always pass)."""
    check_activation(activation)
    if dense_down and blocks["block_i"] < intermediate:
        raise ValueError(
            "a dense down projection needs the whole h^T on chip: "
            f"block_i={blocks['block_i']} < I={intermediate}"
        )
    if dense_in and blocks["block_mx"] < blocks["block_m"]:
        raise ValueError("a dense gate/up projection uses X_blk^T as its strip: block_mx must equal block_m")


@nki.jit
def svd_mlp_fused(
    x,
    act_u,
    act_v,
    act_bias,
    up_u,
    up_v,
    up_bias,
    down_u,
    down_v,
    down_bias,
    activation="silu",
    block_m=512,
    block_mx=512,
    block_i=512,
    block_n=512,
):
    """Whole MLP in one kernel; the hidden activation h (M x I) never goes to HBM.

    Semantics (I = intermediate size, H = output size)::

        h = act(X.Ua.Va + ba)                      # "act" projection (gate, or W1 of a plain MLP)
        h = h * (X.Uu.Vu + bu)       if up_u given  # gated form (LLaMA, Qwen, Mistral, Gemma)
        Y = h.Ud.Vd + bd

    Shapes: x (M, K); each projection is a factor pair ``*_u`` (K_in, r), ``*_v`` (r, K_out), or
    dense when ``*_v`` is None (``*_u`` is then the (K_in, K_out) matrix); act/up biases (I, 1),
    down bias (1, H); all one dtype.  ``activation`` in :data:`ACTIVATIONS`.

    Dataflow per token block of ``block_m`` (BM) tokens:

    A. X is loaded (in rows, transposed on TensorE) in sub-blocks of ``block_mx`` (BMX) tokens and each
       sub-block feeds both the gate and the up strips ``(X.Ua)^T`` and ``(X.Uu)^T`` (rank on
       partitions), the paper's shared loads.  A dense projection uses ``X_blk^T`` itself as its
       strip (then BMX = BM).
    B. The intermediate dimension is walked in blocks of ``block_i`` (BI) features.  For each
       128-feature tile and 512-token chunk, ``Va^T.strip_a`` and ``Vu^T.strip_u`` accumulate
       in two PSUM banks: this is ``h^T`` with features on partitions, so the per-feature biases
       are per-partition scalars.  The epilogue runs while evacuating PSUM: the Scalar engine
       applies ``act(. + ba)`` into an fp32 tile, the Vector engine forms ``(. + bu) * act``
       straight from the up bank and writes ``h^T`` (compute dtype) into SBUF.
    C. ``h^T`` is already the moving operand of the down projection's first factor, with Ud tiles
       stationary: ``(h_blk.Ud)^T`` is accumulated over the I tiles of the block in PSUM and over
       the I blocks in an fp32 SBUF accumulator (never in bf16), then cast into the down strip.
       With a dense down projection the whole ``h^T`` (I x BM) is kept instead (BI = I).
    D. The down strip is the stationary operand of ``.Vd`` (or ``.Wd``), streamed in column slabs
       exactly as in the fused X.U.V kernel; the down bias is added while evacuating.

    Every weight is read once per token block (Ua, Uu once per X sub-block); X and Y once.

    Keeping h on chip: h exists only as a BI x BM tile, so it stays on chip for every shape the
    planner accepts.  What large ranks cost instead is a smaller token block: per token and
    partition the kernel keeps ``s*(n_act + n_up + nbi + n_down) + 4*n_down`` bytes (two strips,
    the h block, the down strip and its fp32 accumulator), e.g. ~200 B for LLaMA-3.1-8B at ratio 0.2,
    so BM is 384 (trn1) / 512 (trn2) there and all six factors are re-read every 384-512 tokens.
    For long prefills of such models that re-reading costs more HBM traffic than writing and
    reading h once would (see docs/kernels.md); the fused form wins for decode and short prompts.
    The planner refuses (``PlanError``) when even BM = 128, BI = 128 does not fit (for the LLaMA-8B
    shape on trn1 that happens at ranks around 7000); the launcher then runs the three projections
    as separate kernels with h going through memory, as in the authors' two-kernel version.

    SBUF per partition (s = element size, nk = ceil(K/128), n? = ceil(r?/128), nI = ceil(I/128),
    nbi = ceil(BI/128)); all allocated once:
        xt (128, nk, BMX) s*nk*BMX           strips s*(na + nu)*BM (low-rank gate/up only)
        X rows s*min(K, 1024)
        U tiles s*256                         gate/up second-factor slabs s*(Ra + Ru)/128*BI
        act tile fp32 2048 (gated)            biases fp32 4*nI each
        h^T block s*nbi*BM                    (low-rank down) Ud rows s*nbi*rd, fp32 acc 4*nd*BM,
                                              down strip s*nd*BM, Vd slab s*nd*BN
        (dense down) Wd slab s*nI*BN          out s*1024 [+ s*(640 + H) down bias]
    PSUM: ceil(BMX/512) banks (strip accumulation, reused by step C) + 2 (gate/up) + 2 (output)
    + 1 (the transposes of X).
    """
    M, K = x.shape
    lowrank_down = down_v != None  # noqa: E711 - NKI 0.3 compiles no `is`
    I = act_u.shape[1]  # noqa: E741 - intermediate size
    if act_v != None:  # noqa: E711
        I = act_v.shape[1]  # noqa: E741
    H = down_u.shape[1]
    if lowrank_down:
        H = down_v.shape[1]
    gated = up_u != None  # noqa: E711
    dt = x.dtype
    act_fn = activation_op(activation)
    nk = cdiv(K, P)
    nI = cdiv(I, P)
    nbi = cdiv(block_i, P)
    y = nl.ndarray((M, H), dtype=dt, buffer=nl.shared_hbm)

    # -- projections into the intermediate dimension: (first factor, second factor) -------------
    ins = [(act_u, act_v)]
    if gated:
        ins.append((up_u, up_v))
    lowrank_count = 0  # how many of ins are low-rank
    for j in range(len(ins)):
        if ins[j][1] != None:  # noqa: E711
            lowrank_count = lowrank_count + 1

    xt = nl.ndarray((P, nk, block_mx), dtype=dt, buffer=nl.sbuf)
    x_rows = nl.ndarray((P, min(K, X_ROW_COLS)), dtype=dt, buffer=nl.sbuf)
    strips = []  # (strip, contraction size R, second factor (R, I))
    lowrank_factors = []  # (first factor, its strip) of the low-rank projections, filled in step A
    for j in range(len(ins)):
        pu, pv = ins[j]
        if pv != None:  # noqa: E711
            r = pu.shape[1]
            strip = nl.ndarray((P, cdiv(r, P), block_m), dtype=dt, buffer=nl.sbuf)
            strips.append((strip, r, pv))
            lowrank_factors.append((pu, strip))
        else:
            strips.append((xt, K, pu))
    u_tile = nl.ndarray((P, 2, P), dtype=dt, buffer=nl.sbuf) if lowrank_count > 0 else None
    sec = []  # the second factors' slabs, one per strip
    for j in range(len(strips)):
        sec.append(nl.ndarray((P, cdiv(strips[j][1], P), block_i), dtype=dt, buffer=nl.sbuf))
    g_sb = nl.ndarray((P, MOV), dtype=nl.float32, buffer=nl.sbuf) if gated else None
    bias_cols = []
    for b in (act_bias, up_bias if gated else None):
        if b == None:  # noqa: E711
            bias_cols.append(None)
            continue
        col = nl.ndarray((P, nI), dtype=nl.float32, buffer=nl.sbuf)
        for it in range(nI):
            ip = min(P, I - it * P)
            nisa.dma_copy(dst=col[0:ip, it : it + 1], src=b[it * P : it * P + ip, 0:1])
        bias_cols.append(col)
    h = nl.ndarray((P, nbi, block_m), dtype=dt, buffer=nl.sbuf)  # h^T block: features on partitions
    if lowrank_down:
        rd = down_u.shape[1]
        nd = cdiv(rd, P)
        ud_blk = nl.ndarray((P, nbi, rd), dtype=dt, buffer=nl.sbuf)
        sd_acc = nl.ndarray((P, nd, block_m), dtype=nl.float32, buffer=nl.sbuf)
        sd = nl.ndarray((P, nd, block_m), dtype=dt, buffer=nl.sbuf)
        d_blk = nl.ndarray((P, nd, block_n), dtype=dt, buffer=nl.sbuf)
    else:
        d_blk = nl.ndarray((P, nI, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, MOV), dtype=dt, buffer=nl.sbuf)

    acc = None
    if lowrank_count > 0 or lowrank_down:
        acc = nl.ndarray((P, cdiv(block_mx, MOV), MOV), dtype=nl.float32, buffer=nl.psum)
    gu_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    t_ps = nl.ndarray((P, P), dtype=dt, buffer=nl.psum)

    bias_bc = broadcast_bias(down_bias, dt, out_ps[0:P, 0, 0:MOV])

    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        # A. gate/up strips, sharing each loaded X sub-block
        strips_for_block(x, m0, bm, block_mx, xt, x_rows, t_ps, lowrank_factors, u_tile, acc)

        for i0 in range(0, I, block_i):
            bi = min(block_i, I - i0)
            # B. h^T for features i0 : i0+bi
            for j in range(len(strips)):
                R, w2, blk = strips[j][1], strips[j][2], sec[j]
                for rt in range(cdiv(R, P)):
                    rp = min(P, R - rt * P)
                    nisa.dma_copy(dst=blk[0:rp, rt, 0:bi], src=w2[rt * P : rt * P + rp, i0 : i0 + bi])
            for il in range(cdiv(bi, P)):
                ip = min(P, bi - il * P)
                ig = i0 // P + il
                for c0 in range(0, bm, MOV):
                    cw = min(MOV, bm - c0)
                    pre = []
                    for j in range(len(strips)):
                        ps = gu_ps[0:ip, j, 0:cw]
                        accumulate_tiles(ps, sec[j], il * P, ip, strips[j][0], c0, cw, strips[j][1])
                        pre.append(ps)
                    hb = h[0:ip, il, c0 : c0 + cw]
                    ab = None if bias_cols[0] == None else bias_cols[0][0:ip, ig : ig + 1]  # noqa: E711
                    if gated:
                        gs = g_sb[0:ip, 0:cw]
                        nisa.activation(dst=gs, op=act_fn, data=pre[0], bias=ab)
                        if bias_cols[1] == None:  # noqa: E711
                            nisa.tensor_tensor(dst=hb, data1=pre[1], data2=gs, op=nl.multiply)
                        else:
                            nisa.scalar_tensor_tensor(
                                dst=hb,
                                data=pre[1],
                                op0=nl.add,
                                operand0=bias_cols[1][0:ip, ig : ig + 1],
                                op1=nl.multiply,
                                operand1=gs,
                            )
                    else:
                        nisa.activation(dst=hb, op=act_fn, data=pre[0], bias=ab)
            # C. (h_blk . Ud)^T accumulated over the I blocks in fp32
            if lowrank_down:
                nil = cdiv(bi, P)
                for il in range(nil):
                    ip = min(P, bi - il * P)
                    nisa.dma_copy(
                        dst=ud_blk[0:ip, il, 0:rd], src=down_u[i0 + il * P : i0 + il * P + ip, 0:rd]
                    )
                for dtile in range(nd):
                    dp = min(P, rd - dtile * P)
                    for c0 in range(0, bm, MOV):
                        cw = min(MOV, bm - c0)
                        ps = acc[0:dp, 0, 0:cw]
                        accumulate_tiles(ps, ud_blk, dtile * P, dp, h, c0, cw, bi)
                        dst = sd_acc[0:dp, dtile, c0 : c0 + cw]
                        if i0 == 0:
                            nisa.tensor_copy(dst=dst, src=ps)
                        else:
                            nisa.tensor_tensor(dst=dst, data1=dst, data2=ps, op=nl.add)
        # D. Y_blk = down strip^T . Vd (+ bias)
        if lowrank_down:
            for dtile in range(nd):
                dp = min(P, rd - dtile * P)
                nisa.tensor_copy(dst=sd[0:dp, dtile, 0:bm], src=sd_acc[0:dp, dtile, 0:bm])
            stream_second_factor(y, m0, bm, sd, rd, down_v, d_blk, out_ps, out_sb, bias_bc, block_n)
        else:
            stream_second_factor(y, m0, bm, h, I, down_u, d_blk, out_ps, out_sb, bias_bc, block_n)
    return y

"""NKI kernels for a (compressed) MLP: gated ``(act(X.Wg) * (X.Wu)).Wd`` or plain ``act(X.W1).W2``.

Two kernels share the intermediate and down-projection steps (:func:`intermediate_block`,
:func:`accumulate_down_strip`): :func:`svd_mlp_fused` forms the gate/up strips from X sub-blocks
held with all of K (any mix of dense and low-rank projections), :func:`svd_mlp_kblocked` sums them
over K slabs in fp32 (every projection low-rank), which lets it read each factor in wide rows.

Current NKI dialect (``import nki``; NKI 0.3/0.4, Neuron SDK 2.29-2.30), destination-first
``nisa`` calls, plain ``range`` loops; runs on the CPU stand-in where the Neuron SDK is absent.
"""

from __future__ import annotations

from ..activations import ACTIVATION_NAMES, check_activation
from ._blocks import (
    MOV,
    X_ROW_COLS,
    P,
    accumulate_strip_slab,
    accumulate_tiles,
    broadcast_bias,
    cdiv,
    load_row_tiles,
    load_x_transposed,
    stream_from_fp32_strip,
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
    u_group=1,
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

    Every weight is read once per token block (Ua, Uu once per X sub-block, in slabs of ``u_group``
    rank tiles as in :func:`~neuronmm_fx.kernels.xuv.xuv_fused`); X and Y once.

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
        U slabs s*256*G                       gate/up second-factor slabs s*(Ra + Ru)/128*BI
        act tile fp32 2048 (gated)            biases fp32 4*nI each
        h^T block s*nbi*BM                    (low-rank down) Ud rows s*nbi*rd, fp32 acc 4*nd*BM,
                                              down strip s*nd*BM, Vd slab s*nd*BN
        (dense down) Wd slab s*nI*BN          out s*1024 [+ s*(640 + H) down bias]
    PSUM: G*ceil(BMX/512) banks (strip accumulation, reused by step C) + 2 (gate/up) + 2 (output)
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
    u_tile = nl.ndarray((P, 2, u_group * P), dtype=dt, buffer=nl.sbuf) if lowrank_count > 0 else None
    sec = []  # the second factors' slabs, one per strip
    for j in range(len(strips)):
        sec.append(nl.ndarray((P, cdiv(strips[j][1], P), block_i), dtype=dt, buffer=nl.sbuf))
    g_sb = nl.ndarray((P, MOV), dtype=nl.float32, buffer=nl.sbuf) if gated else None
    bias_cols = load_bias_columns((act_bias, up_bias if gated else None), I)
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
        acc = nl.ndarray((P, u_group * cdiv(block_mx, MOV), MOV), dtype=nl.float32, buffer=nl.psum)
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
            intermediate_block(strips, sec, bias_cols, act_fn, gated, i0, bi, bm, h, g_sb, gu_ps, None)
            # C. (h_blk . Ud)^T accumulated over the I blocks in fp32
            if lowrank_down:
                accumulate_down_strip(down_u, i0, bi, bm, h, ud_blk, acc, sd_acc)
        # D. Y_blk = down strip^T . Vd (+ bias)
        if lowrank_down:
            cast_tiles(sd, sd_acc, rd, bm)
            stream_second_factor(y, m0, bm, sd, rd, down_v, d_blk, out_ps, out_sb, bias_bc, block_n)
        else:
            stream_second_factor(y, m0, bm, h, I, down_u, d_blk, out_ps, out_sb, bias_bc, block_n)
    return y


def check_mlp_kblocked_launch(activation: str, dtype_name: str, lowrank: tuple) -> None:
    """Host-side checks of a :func:`svd_mlp_kblocked` launch (``ValueError``): a known activation,
    every projection low-rank, and bf16 or fp32 inputs (the planner only plans such launches)."""
    check_activation(activation)
    if not all(lowrank):
        raise ValueError(
            "the K-blocked MLP kernel needs every projection low-rank; an MLP with a dense projection "
            "runs on svd_mlp_fused or projection by projection"
        )
    if dtype_name not in ("bfloat16", "float32"):
        raise ValueError(
            f"the K-blocked MLP kernel takes bfloat16 or float32, not {dtype_name}: h between the "
            "products is kept in the input dtype, so a float16 MLP runs projection by projection"
        )


@nki.jit
def svd_mlp_kblocked(
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
    block_k=512,
    block_i=512,
    block_n=512,
    u_resident=0,
):
    """Whole low-rank MLP in one kernel with the gate/up strips summed over K slabs in fp32.

    Same semantics and arguments as :func:`svd_mlp_fused`, but every projection must be low-rank
    (``*_v`` given) and the inputs bf16 or fp32 (checked on the host, :func:`check_mlp_kblocked_launch`).

    Dataflow per token block of ``block_m`` (BM) tokens:

    A. For each K slab of ``block_k`` (BK) features: load ``X_slab^T`` (rows of BK features,
       transposed on TensorE) and, unless ``u_resident``, the slab's rows of Ua and Uu (all r
       columns per row: r*s bytes per partition per transfer, where :func:`svd_mlp_fused` reads U
       in 128-column tiles); add ``(X_slab.Ua)^T`` and ``(X_slab.Uu)^T`` into two fp32 SBUF strips.
       X is read once; Ua and Uu once per token block (once per kernel when resident).  Nothing
       holds all of K for a token, so BM is limited by the strips, not by K.
    B, C as in :func:`svd_mlp_fused`; bf16 inputs cast each 512-token chunk of the fp32 strips into
       a bf16 buffer before its products (once per intermediate block: Vector work that falls as BI
       grows), fp32 inputs use the fp32 strips themselves.
    D. The fp32 down accumulator is the stationary operand of ``.Vd`` directly (fp32) or through a
       bf16 copy of each 128-token tile (bf16), Vd streamed in slabs, Y stored in BN-wide rows
       (:func:`~neuronmm_fx.kernels._blocks.stream_from_fp32_strip`).

    What it is for: decode and short prompts, where it reads every weight once in wide rows, and
    MLPs whose K would not leave room for a useful X sub-block.  What it is not for: long
    prefills of large ranks.  Per token and partition it keeps ``4*(na + nu) + s*nbk + s*nbi +
    4*nd`` bytes, ~240 B for LLaMA-3.1-8B at ratio 0.2 (the fused kernel: ~260 B), so BM stays
    near 512-700 and every factor is re-read per token block, where writing h once costs less; the
    planner then runs the projections one by one (:func:`~neuronmm_fx.kernels.planner.choose_svd_mlp`).

    SBUF per partition (s element size; na, nu, nd = ceil(r/128) of act, up, down; nbk =
    ceil(BK/128), nk = ceil(K/128), nbi = ceil(BI/128)), all allocated once:
        strips fp32 4*(na + nu)*BM            bf16 chunks s*(na + nu)*min(512, BM) (bf16 only)
        xt s*nbk*BM                           X rows s*BK
        U rows s*nbk*(Ra + Ru) / s*nk*(Ra + Ru) resident
        second-factor slabs s*(na + nu)*BI    act tile fp32 2048 (gated)   biases fp32 4*ceil(I/128) each
        h^T block s*nbi*BM                    Ud rows s*nbi*rd, fp32 down accumulator 4*nd*BM
        bf16 down tile s*nd*128 (bf16 only)   Vd slab s*nd*BN, out rows s*2*BN [+ s*(640 + H) down bias]
    PSUM: 2 banks for the strip slabs (also step C's accumulation) + 2 (gate/up) + 2 (output) + 1
    (the transposes of X) = 7.
    """
    M, K = x.shape
    I = act_v.shape[1]  # noqa: E741 - intermediate size
    H = down_v.shape[1]
    rd = down_u.shape[1]
    gated = up_u != None  # noqa: E711 - NKI 0.3 compiles no `is`
    dt = x.dtype
    staged = dt == nl.bfloat16  # fp32 multiplies its fp32 strips directly
    act_fn = activation_op(activation)
    nk = cdiv(K, P)
    nbk = cdiv(block_k, P)
    nbi = cdiv(block_i, P)
    nd = cdiv(rd, P)
    y = nl.ndarray((M, H), dtype=dt, buffer=nl.shared_hbm)

    ins = [(act_u, act_v)]
    if gated:
        ins.append((up_u, up_v))
    u_tiles = nbk
    if u_resident:
        u_tiles = nk
    xt = nl.ndarray((P, nbk, block_m), dtype=dt, buffer=nl.sbuf)
    x_rows = nl.ndarray((P, block_k), dtype=dt, buffer=nl.sbuf)
    sums = []  # fp32 strips (X_blk.U)^T, summed over the K slabs
    u_rows = []  # the slab's (or all) rows of each first factor
    strips = []  # (moving operand of step B, R, second factor), as svd_mlp_fused's
    sec = []
    for j in range(len(ins)):
        pu, pv = ins[j]
        r = pu.shape[1]
        total = nl.ndarray((P, cdiv(r, P), block_m), dtype=nl.float32, buffer=nl.sbuf)
        sums.append(total)
        u_rows.append(nl.ndarray((P, u_tiles, r), dtype=dt, buffer=nl.sbuf))
        moving = total
        if staged:  # one 512-token chunk of the strip at a time, cast for bf16 products
            moving = nl.ndarray((P, cdiv(r, P), min(MOV, block_m)), dtype=dt, buffer=nl.sbuf)
        strips.append((moving, r, pv))
        sec.append(nl.ndarray((P, cdiv(r, P), block_i), dtype=dt, buffer=nl.sbuf))
    staged_sums = None
    if staged:
        staged_sums = sums
    g_sb = nl.ndarray((P, MOV), dtype=nl.float32, buffer=nl.sbuf) if gated else None
    bias_cols = load_bias_columns((act_bias, up_bias if gated else None), I)
    h = nl.ndarray((P, nbi, block_m), dtype=dt, buffer=nl.sbuf)  # h^T block: features on partitions
    ud_blk = nl.ndarray((P, nbi, rd), dtype=dt, buffer=nl.sbuf)
    sd_acc = nl.ndarray((P, nd, block_m), dtype=nl.float32, buffer=nl.sbuf)
    stage = None
    if staged:
        stage = nl.ndarray((P, nd, P), dtype=dt, buffer=nl.sbuf)
    d_blk = nl.ndarray((P, nd, block_n), dtype=dt, buffer=nl.sbuf)
    out_sb = nl.ndarray((P, 2, block_n), dtype=dt, buffer=nl.sbuf)

    acc = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    gu_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    out_ps = nl.ndarray((P, 2, MOV), dtype=nl.float32, buffer=nl.psum)
    t_ps = nl.ndarray((P, P), dtype=dt, buffer=nl.psum)
    bias_bc = broadcast_bias(down_bias, dt, out_ps[0:P, 0, 0:MOV])

    if u_resident:
        for j in range(len(ins)):
            load_row_tiles(ins[j][0], 0, K, 0, ins[j][0].shape[1], u_rows[j], 0)
    slot = 0  # strip-slab PSUM bank
    out_slot = 0  # output PSUM bank
    row = 0  # output SBUF row
    for m0 in range(0, M, block_m):
        bm = min(block_m, M - m0)
        # A. both strips summed over the K slabs, each X slab loaded once for both
        for k0 in range(0, K, block_k):
            bk = min(block_k, K - k0)
            load_x_transposed(x, m0, bm, k0, bk, xt, x_rows, t_ps)
            u_first = k0 // P
            if u_resident == 0:
                u_first = 0
            for j in range(len(ins)):
                pu = ins[j][0]
                if u_resident == 0:
                    load_row_tiles(pu, k0, bk, 0, pu.shape[1], u_rows[j], 0)
                slot = accumulate_strip_slab(
                    u_rows[j], u_first, xt, bk, bm, sums[j], pu.shape[1], k0 == 0, acc, slot
                )
        for i0 in range(0, I, block_i):
            bi = min(block_i, I - i0)
            # B. h^T for features i0 : i0+bi;  C. (h_blk . Ud)^T summed over the I blocks in fp32
            intermediate_block(strips, sec, bias_cols, act_fn, gated, i0, bi, bm, h, g_sb, gu_ps, staged_sums)
            accumulate_down_strip(down_u, i0, bi, bm, h, ud_blk, acc, sd_acc)
        # D. Y_blk = down strip^T . Vd (+ bias), from the fp32 accumulator
        out_slot, row = stream_from_fp32_strip(
            y, m0, bm, sd_acc, rd, down_v, d_blk, stage, out_ps, out_sb, bias_bc, block_n, out_slot, row
        )
    return y


def cast_tiles(dst, src, R, bm):
    """``dst[:, t, 0:bm] = src[:, t, 0:bm]`` for the ceil(R/128) partition tiles of an R-row strip
    (fp32 accumulator into the compute dtype, one Vector-engine copy per tile)."""
    for t in range(cdiv(R, P)):
        rp = min(P, R - t * P)
        nisa.tensor_copy(dst=dst[0:rp, t, 0:bm], src=src[0:rp, t, 0:bm])


def load_bias_columns(biases, I):  # noqa: E741 - the intermediate size
    """Each (I, 1) bias of ``biases`` (None: no bias) as an fp32 SBUF column tile (128, ceil(I/128)):
    feature ``i`` on partition ``i % 128`` of column ``i // 128``, a per-partition scalar for the
    epilogue of ``h^T``."""
    columns = []
    for b in biases:
        if b == None:  # noqa: E711 - NKI 0.3 compiles no `is`
            columns.append(None)
            continue
        col = nl.ndarray((P, cdiv(I, P)), dtype=nl.float32, buffer=nl.sbuf)
        for it in range(cdiv(I, P)):
            ip = min(P, I - it * P)
            nisa.dma_copy(dst=col[0:ip, it : it + 1], src=b[it * P : it * P + ip, 0:1])
        columns.append(col)
    return columns


def intermediate_block(strips, sec, bias_cols, act_fn, gated, i0, bi, bm, h, g_sb, gu_ps, sums):
    """``h^T`` for the intermediate features ``i0 : i0+bi`` of a token block of ``bm`` tokens.

    ``strips``: per projection into the intermediate dimension, ``(strip, R, w2)``: the moving
    side's strip (R on partitions, tokens on the free axis) and the (R, I) matrix it multiplies
    (the second factor, or the dense weight with ``X_blk^T`` as strip).  The slab ``w2[:, i0:i0+bi]``
    is loaded into ``sec`` (SBUF (128, ceil(R/128), >= bi)) per projection.  For each 512-token
    chunk and 128-feature tile both products accumulate in the two PSUM banks of ``gu_ps``, and the
    epilogue (``act(. + ba)`` on the Scalar engine into the fp32 ``g_sb``, ``(. + bu) * act`` on the
    Vector engine) writes ``h`` (SBUF (128, ceil(bi/128), >= bm), compute dtype).

    ``sums``: None, or per projection an fp32 strip whose chunk is first cast into the (128,
    ceil(R/128), 512) buffer ``strip`` (bf16 inputs of the K-blocked kernel: the products then run
    at bf16 speed without a whole bf16 copy of the strips on chip)."""
    for j in range(len(strips)):
        R, w2, blk = strips[j][1], strips[j][2], sec[j]
        load_row_tiles(w2, 0, R, i0, bi, blk, 0)
    for c0 in range(0, bm, MOV):
        cw = min(MOV, bm - c0)
        at = c0  # where the chunk lies in the moving strips
        if sums != None:  # noqa: E711 - NKI 0.3 compiles no `is`
            at = 0
            for j in range(len(strips)):
                for rt in range(cdiv(strips[j][1], P)):
                    rp = min(P, strips[j][1] - rt * P)
                    nisa.tensor_copy(dst=strips[j][0][0:rp, rt, 0:cw], src=sums[j][0:rp, rt, c0 : c0 + cw])
        for il in range(cdiv(bi, P)):
            ip = min(P, bi - il * P)
            ig = i0 // P + il
            pre = []
            for j in range(len(strips)):
                ps = gu_ps[0:ip, j, 0:cw]
                accumulate_tiles(ps, sec[j], il * P, ip, strips[j][0], at, cw, strips[j][1])
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


def accumulate_down_strip(down_u, i0, bi, bm, h, ud_blk, acc, sd_acc):
    """``sd_acc (+)= (h_blk . Ud[i0:i0+bi])^T``: the down projection's first factor over one
    intermediate block, rows of Ud (all its rd columns) loaded into ``ud_blk``; each rank tile and
    512-token chunk sums the block's tiles in the PSUM bank ``acc[:, 0]`` and is added into the
    fp32 SBUF accumulator ``sd_acc`` (128, ceil(rd/128), >= bm), overwritten for ``i0 == 0``."""
    rd = down_u.shape[1]
    for il in range(cdiv(bi, P)):
        ip = min(P, bi - il * P)
        nisa.dma_copy(dst=ud_blk[0:ip, il, 0:rd], src=down_u[i0 + il * P : i0 + il * P + ip, 0:rd])
    for dtile in range(cdiv(rd, P)):
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

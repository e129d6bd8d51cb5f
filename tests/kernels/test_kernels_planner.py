"""The block planner: its SBUF/PSUM/traffic model equals what the kernels do on the stand-in, plans
fit, and impossible shapes are refused with a useful message."""

from __future__ import annotations

import pytest

from neuronmm_fx.kernels import (
    MlpShape,
    PlanError,
    analyse_svd_mlp,
    analyse_xuv,
    get_target,
    plan_dense,
    plan_svd_mlp,
    plan_xuv,
    rank_for_ratio,
)
from neuronmm_fx.kernels.costs import _u_tiles_dma


def test_rank_for_ratio_matches_the_documented_examples():
    assert rank_for_ratio(2048, 8192, 0.2) == 1280
    assert rank_for_ratio(3072, 8192, 0.2) == 1664
    assert rank_for_ratio(4096, 14336, 0.2) == 2432
    assert rank_for_ratio(576, 1536, 0.2) == 256


@pytest.mark.parametrize("target", ["trn1", "trn2"])
@pytest.mark.parametrize(
    "shape",
    [(1, 2048, 1280, 8192), (300, 200, 130, 600), (4096, 2048, 1280, 8192), (3000, 4096, 2432, 14336)],
    ids=str,
)
@pytest.mark.parametrize("variant", ["fused", "unfused", "dense"])
def test_planner_model_equals_standin_counts(shape, target, variant):
    M, K, r, N = shape
    a = analyse_xuv(M, K, r, N, "bfloat16", target, variant)
    tgt = get_target(target)
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.peak_sbuf_bytes == a.plan.sbuf_bytes <= tgt.sbuf_partition_bytes
    assert a.stats.peak_psum_banks <= 8
    assert a.stats.hbm_bytes >= a.compulsory_bytes or variant == "dense"


@pytest.mark.parametrize("variant", ["fused", "unfused", "dense"])
@pytest.mark.parametrize("shape", [(1, 2048, 1280, 8192), (700, 200, 130, 600)], ids=str)
def test_planner_model_equals_standin_counts_with_bias(shape, variant):
    """The bias broadcast's buffers are part of the SBUF peak the planner predicts."""
    M, K, r, N = shape
    a = analyse_xuv(M, K, r, N, "bfloat16", "trn1", variant, bias=True)
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.peak_sbuf_bytes == a.plan.sbuf_bytes
    assert a.stats.hbm_bytes >= a.compulsory_bytes or variant == "dense"


def test_fused_traffic_is_compulsory_when_one_block_holds_all_tokens():
    for M in (1, 128, 512):
        a = analyse_xuv(M, 2048, 1280, 8192, "bfloat16", "trn1", "fused")
        assert a.plan.block_m == M
        assert a.stats.hbm_bytes == a.compulsory_bytes


def test_fused_beats_unfused_and_dense_traffic_for_short_sequences():
    for M in (128, 512):
        f, u, d = (
            analyse_xuv(M, 4096, 2432, 14336, "bfloat16", "trn2", v) for v in ("fused", "unfused", "dense")
        )
        assert f.stats.hbm_bytes < u.stats.hbm_bytes < d.stats.hbm_bytes


def test_larger_sbuf_allows_larger_token_blocks():
    p1 = plan_xuv(32768, 4096, 2432, 14336, "bfloat16", "trn1")
    p2 = plan_xuv(32768, 4096, 2432, 14336, "bfloat16", "trn2")
    assert p1.sbuf_bytes <= p1.sbuf_budget and p2.sbuf_bytes <= p2.sbuf_budget
    assert p2.hbm_bytes <= p1.hbm_bytes
    assert p1.block_m % 128 == 0 and p1.block_mx % 128 == 0


def test_plan_error_says_what_would_fit():
    with pytest.raises(PlanError) as exc:
        plan_xuv(4096, 8192, 16384, 8192, "bfloat16", "trn1")
    msg = str(exc.value)
    assert "does not fit trn1" in msg and "It would fit with rank r <=" in msg
    with pytest.raises(PlanError, match="K must be at most"):
        plan_dense(1024, 200_000, 4096, "float32", "trn1")


def test_planner_rejects_bad_inputs():
    with pytest.raises(ValueError, match="M must be a positive integer"):
        plan_xuv(0, 64, 64, 64)
    with pytest.raises(ValueError, match="unknown target"):
        plan_xuv(1, 64, 64, 64, target="trn9")
    with pytest.raises(ValueError, match="unsupported dtype"):
        plan_xuv(1, 64, 64, 64, dtype="int8")


@pytest.mark.parametrize("target", ["trn1", "trn2"])
@pytest.mark.parametrize(
    "shape",
    [
        MlpShape(2048, 8192, 2048, 1280, 1280, 1280),  # LLaMA-3.2-1B at ratio 0.2
        MlpShape(576, 1536, 576, 256, 256, None, act_bias=True, up_bias=True, down_bias=True),
        MlpShape(768, 3072, 768, None, None, 512, gated=False, act_bias=True, down_bias=True),
        MlpShape(768, 3072, 768, 384, None, None, gated=False),
    ],
    ids=["llama1b", "dense-down", "dense-in", "plain-dense-down"],
)
@pytest.mark.parametrize("M", [1, 700, 4096])
def test_mlp_planner_model_equals_standin_counts(shape, target, M):
    a = analyse_svd_mlp(M, shape, "bfloat16", target)
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.peak_sbuf_bytes == a.plan.sbuf_bytes <= a.plan.sbuf_budget
    assert a.stats.peak_psum_banks == a.plan.psum_banks <= 8
    if a.plan.block_m >= M and a.plan.block_mx >= M:
        assert a.stats.hbm_bytes == a.compulsory_bytes


def test_mlp_plan_error_for_huge_dense_down():
    with pytest.raises(PlanError, match="dense down projection keeps all of h"):
        plan_svd_mlp(4096, MlpShape(4096, 14336 * 8, 4096, 512, 512, None), "bfloat16", "trn1")


def test_u_slabs_take_the_psum_banks_the_x_sub_block_leaves():
    """G rank tiles per U slab: what PSUM holds besides the fixed banks, ceil(BMX/512) per tile."""
    decode = plan_xuv(1, 2048, 1280, 8192, "bfloat16", "trn2")  # 10 rank tiles, one chunk
    assert decode.u_group == 8 - 3
    assert plan_xuv(1, 512, 256, 1024, "bfloat16", "trn2").u_group == 2  # no more than the rank has
    prefill = plan_xuv(4096, 2048, 1280, 8192, "bfloat16", "trn2")
    assert prefill.u_group == max(1, (8 - 3) // -(-prefill.block_mx // 512))
    mlp = plan_svd_mlp(1, MlpShape(2048, 8192, 2048, 1280, 1280, 1280), "bfloat16", "trn2")
    assert mlp.u_group == 8 - 5 and mlp.psum_banks == 8
    planned = analyse_xuv(1, 2048, 1280, 8192, "bfloat16", "trn2", "fused")
    assert planned.stats.dma_queue_bytes == pytest.approx(planned.plan.dma_cost_bytes, rel=1e-12)
    # U rows of 5 x 128 bf16 columns (1,280 B) move at 5/8 of peak in the model, 128-column rows at 1/8
    assert _u_tiles_dma(2048, 1280, 2, 1) == pytest.approx(5 * _u_tiles_dma(2048, 1280, 2, 5))

"""The K-blocked fused X.U.V kernel: numerics against float64 on ragged shapes of both projection
directions in every dtype, fp16 results finite where the reference is, the planner's model against
the stand-in's counts, the choice among forms, and the launcher's token-bounded launches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernels_numerics import NP, _cast, _check, _rand, _round

from neuronmm_fx.kernels import TensorSpec, analyse_xuv, dispatch, rank_for_ratio, run_kernel
from neuronmm_fx.kernels.costs import capacity_bound_bytes
from neuronmm_fx.kernels.planner import choose_xuv, plan_xuv_kblocked
from neuronmm_fx.kernels.targets import get_target
from neuronmm_fx.kernels.xuv import xuv_fused, xuv_kblocked

# (M, K, r, N): an up projection (K < N) and a down projection (K > N), ragged everywhere
SHAPES = [(300, 200, 130, 600), (259, 700, 140, 150), (1, 390, 70, 129)]
BLOCKS = [  # several token blocks, several K slabs with a ragged last one, several V slabs
    {"block_m": 256, "block_k": 256, "block_n": 512, "u_resident": 0},
    {"block_m": 128, "block_k": 128, "block_n": 1024, "u_resident": 1},
]


def _inputs(shape, dtype, seed):
    M, K, r, N = shape
    rng = np.random.default_rng(seed)
    return (
        _cast(_rand(rng, M, K, scale=1.0), dtype),
        _cast(_rand(rng, K, r), dtype),
        _cast(_rand(rng, r, N), dtype),
        _cast(_rand(rng, 1, N, scale=1.0), dtype),
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=["streamed-U", "resident-U"])
def test_kblocked_equals_the_reference(shape, dtype, blocks):
    (xq, x64), (uq, u64), (vq, v64), (bq, b64) = _inputs(shape, dtype, sum(shape))
    y = run_kernel(xuv_kblocked, xq, uq, vq, bq, **blocks).outputs
    assert y.dtype == NP[dtype]
    # the strip is summed in fp32; bf16 multiplies a bf16 copy of it, fp32 and fp16 the fp32 strip
    strip = _round(x64 @ u64, dtype) if dtype == "bfloat16" else x64 @ u64
    _check(y, strip @ v64 + b64, dtype)


def test_fp16_results_are_finite_where_the_reference_is():
    """X.U above the fp16 range, X.U.V inside it: the K-blocked kernel keeps the strip in fp32."""
    M, K, r, N = 64, 256, 128, 256
    rng = np.random.default_rng(0)
    x = np.full((M, K), 16.0, dtype=np.float16)
    u = np.full((K, r), 32.0, dtype=np.float16)  # x.u = 256 * 16 * 32 = 131072 > 65504
    v = (rng.standard_normal((r, N)) * 1e-3).astype(np.float16)
    reference = x.astype(np.float64) @ u.astype(np.float64) @ v.astype(np.float64)
    assert np.isfinite(reference.astype(np.float16)).all() and (x.astype(np.float64) @ u).max() > 65504
    y = run_kernel(xuv_kblocked, x, u, v, None, block_m=64, block_k=128, block_n=256).outputs
    assert np.isfinite(y).all()
    np.testing.assert_allclose(
        y.astype(np.float64), reference, rtol=4e-3, atol=4e-3 * np.abs(reference).max()
    )
    old = run_kernel(xuv_fused, x, u, v, None, block_m=64, block_mx=64, block_n=256).outputs
    assert not np.isfinite(old).all()  # the fp16 strip of the other fused kernel overflows


# the kernel-traffic benchmark's shapes: LLaMA-3.2-1B and 3.1-8B up and down projections
BENCH = [(2048, 8192), (8192, 2048), (4096, 14336), (14336, 4096)]


@pytest.mark.parametrize("hidden_in, hidden_out", BENCH)
@pytest.mark.parametrize("M", [1, 512, 2048])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_plan_equals_the_standin_count(hidden_in, hidden_out, M, dtype):
    K, N = hidden_in, hidden_out
    r = rank_for_ratio(K, N, 0.2)
    plan = plan_xuv_kblocked(M, K, r, N, dtype, "trn2")
    specs = [TensorSpec(shape, dtype) for shape in ((M, K), (K, r), (r, N))]
    stats = run_kernel(xuv_kblocked, *specs, None, shape_only=True, **plan.kernel_kwargs()).stats
    assert stats.hbm_bytes == plan.hbm_bytes
    assert stats.peak_sbuf_bytes == plan.sbuf_bytes <= plan.sbuf_budget
    assert stats.peak_psum_banks == plan.psum_banks
    assert stats.dma_queue_bytes == pytest.approx(plan.dma_cost_bytes, rel=1e-12)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("variant", ["dense", "unfused", "fused", "kblocked"])
@pytest.mark.parametrize(
    "shape", [(1, 2048, 1280, 8192), (700, 8192, 1280, 2048), (2048, 4096, 2432, 14336)], ids=str
)
def test_the_planner_models_every_kernel_as_the_standin_counts_it(shape, variant, target):
    """Traffic, and the DMA queues' bytes at each transfer's efficiency, which set modelled time."""
    a = analyse_xuv(*shape, "bfloat16", target, variant, bias=shape[0] == 700)
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.dma_queue_bytes == pytest.approx(a.plan.dma_cost_bytes, rel=1e-12)
    engines = a.stats.engine_times_s()
    assert set(engines) == {"tensor", "vector", "scalar", "dma"}
    assert a.stats.estimated_time_s == max(engines.values())
    assert engines["dma"] == pytest.approx(a.plan.dma_cost_bytes / get_target(target).hbm_bytes_per_s)


@pytest.mark.parametrize("M", [1, 600])
def test_the_mlp_plan_models_its_dma_as_the_standin_counts_it(M):
    from neuronmm_fx.kernels import MlpShape, analyse_svd_mlp

    shape = MlpShape(512, 1408, 512, 256, 256, 384, True, True, True, True)
    a = analyse_svd_mlp(M, shape, "bfloat16", "trn2")
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.dma_queue_bytes == pytest.approx(a.plan.dma_cost_bytes, rel=1e-12)


def test_narrow_transfers_cost_more_dma_time_than_their_bytes():
    from neuronmm_fx.kernels.costs import dma_efficiency

    assert dma_efficiency(4096) == 1.0 and dma_efficiency(2048) == 1.0
    assert dma_efficiency(256) == 0.125  # a 128-column bf16 tile row
    assert dma_efficiency(4096, transpose=True) == 0.9
    # decode (one token): both fused kernels move the same bytes, but the K-blocked one reads U in
    # rows of r columns rather than 128-column tiles, so the planner picks it
    choice = choose_xuv(1, 2048, 1280, 8192, "bfloat16", "trn2")
    fused, kblocked = choice.candidates["fused"], choice.candidates["kblocked"]
    assert fused.hbm_bytes == kblocked.hbm_bytes and kblocked.dma_cost_bytes < fused.dma_cost_bytes
    assert choice.form == "kblocked"


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("hidden_in, hidden_out", BENCH)
@pytest.mark.parametrize("M", [512, 2048, 8192, 32768])
def test_the_choice_never_moves_more_than_the_cheaper_form_and_fused_is_near_the_bound(
    hidden_in, hidden_out, M, target
):
    K, N = hidden_in, hidden_out
    r = rank_for_ratio(K, N, 0.2)
    choice = choose_xuv(M, K, r, N, "bfloat16", target)
    fused = min(p.hbm_bytes for form, p in choice.candidates.items() if p is not None and form != "unfused")
    assert choice.hbm_bytes <= min(fused, choice.candidates["unfused"].hbm_bytes)
    bound = capacity_bound_bytes(M, K, r, N, 2, get_target(target).sbuf_partition_bytes)
    assert fused <= 1.10 * bound


def test_the_launcher_runs_the_chosen_kernel_in_token_bounded_launches(monkeypatch):
    M, K, r, N = 300, 700, 140, 150  # a down projection: the K-blocked kernel moves the least
    rng = np.random.default_rng(1)
    x = torch.from_numpy(_rand(rng, M, K, scale=1.0)).float()
    u, v = torch.from_numpy(_rand(rng, K, r)).float(), torch.from_numpy(_rand(rng, r, N)).float()
    reference = (x.double() @ u.double() @ v.double()).float()
    launched = []
    real_run = dispatch._run
    monkeypatch.setattr(
        dispatch, "_run", lambda kernel, *a: launched.append(kernel.__name__) or real_run(kernel, *a)
    )
    monkeypatch.setattr(dispatch, "MAX_TOKENS_PER_LAUNCH", 128)
    with dispatch.use_standin_kernels():
        y = dispatch.xuv(x, u, v)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4)
    expected = [choose_xuv(rows, K, r, N, "float32", "trn2").form for rows in (128, 128, 44)]
    names = {"fused": "xuv_fused", "kblocked": "xuv_kblocked", "unfused": "xuv_unfused"}
    assert launched == [names[form] for form in expected]


def test_float16_launches_keep_x_u_in_fp32():
    """Through the launcher: the op's fp16 result is finite where the fp32 reference is."""
    from neuronmm_fx.kernels.costs import MlpShape
    from neuronmm_fx.kernels.planner import choose_svd_mlp

    for M, K, r, N in [(1, 2048, 1280, 8192), (512, 8192, 1280, 2048), (4096, 4096, 2432, 14336)]:
        assert choose_xuv(M, K, r, N, "float16", "trn2").form == "kblocked"
    assert choose_svd_mlp(512, MlpShape(2048, 8192, 2048, 1280, 1280, 1280), "float16").form == "split"
    x = torch.full((8, 256), 16.0, dtype=torch.float16)
    u = torch.full((256, 128), 32.0, dtype=torch.float16)  # x.u = 131072, beyond fp16
    v = torch.full((128, 64), 1e-3, dtype=torch.float16)
    with dispatch.use_standin_kernels():
        y = dispatch.xuv(x, u, v)
    reference = x.double() @ u.double() @ v.double()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference, rtol=4e-3, atol=0.0)

"""The K-blocked MLP kernel: numerics against float64 on ragged shapes (gated and plain, bf16 and
fp32, U streamed or resident), the planner's model against the stand-in's counts on the benchmark's
MLP shapes, the choice among the MLP forms, the host-side refusals, and the launcher using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernels_numerics import _check, _mlp_case, _mlp_reference

from neuronmm_fx.kernels import (
    MlpShape,
    PlanError,
    TensorSpec,
    dispatch,
    get_target,
    plan_svd_mlp_kblocked,
    rank_for_ratio,
    run_kernel,
)
from neuronmm_fx.kernels.mlp import check_mlp_kblocked_launch, svd_mlp_kblocked
from neuronmm_fx.kernels.planner import choose_svd_mlp

BLOCKS = [  # several token blocks, ragged K slabs and intermediate blocks, several Vd slabs
    {"block_m": 128, "block_k": 128, "block_i": 128, "block_n": 512, "u_resident": 0},
    {"block_m": 200, "block_k": 256, "block_i": 256, "block_n": 1024, "u_resident": 1},
]


def _run(a, activation, **blocks):
    def arr(p):
        return None if p is None else p[0]

    args = [a["x"], a["act"][0], a["act"][1], a["act_b"], a["up"][0], a["up"][1], a["up_b"]]
    args += [a["down"][0], a["down"][1], a["down_b"]]
    return run_kernel(svd_mlp_kblocked, *map(arr, args), activation=activation, **blocks)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=["streamed-U", "resident-U"])
def test_kblocked_mlp_equals_the_reference(dtype, gated, blocks):
    rng = np.random.default_rng(7 if gated else 8)
    M, K, I, H = 261, 300, 390, 200  # noqa: E741 - every dimension ragged against 128
    a = _mlp_case(rng, M, K, I, H, (140, 100, 260), gated, True, dtype)
    y = _run(a, "silu" if gated else "gelu_tanh", **blocks).outputs
    # fp32 strips cast once to the compute dtype, h and the down strip in the compute dtype: the
    # same roundings as the fused MLP kernel's reference
    _check(y, _mlp_reference(a, "silu" if gated else "gelu_tanh", dtype), dtype)


def test_one_token_decode_step():
    rng = np.random.default_rng(3)
    a = _mlp_case(rng, 1, 520, 700, 260, (256, 256, 384), True, False, "bfloat16")
    y = _run(a, "silu", block_m=1, block_k=512, block_i=512, block_n=512, u_resident=0).outputs
    _check(y, _mlp_reference(a, "silu", "bfloat16"), "bfloat16")


# the kernel-traffic benchmark's MLPs (LLaMA-3.2-1B, 3.2-3B, 3.1-8B) at ratio 0.2
MODELS = [(2048, 8192), (3072, 8192), (4096, 14336)]


def _shape(hidden, intermediate, biases=False):
    r = rank_for_ratio(hidden, intermediate, 0.2)
    return MlpShape(hidden, intermediate, hidden, r, r, r, True, biases, biases, biases)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("hidden, intermediate", MODELS)
@pytest.mark.parametrize("M", [1, 512, 2048])
def test_the_plan_equals_the_standin_count(hidden, intermediate, M, target):
    from neuronmm_fx.kernels import analyse_svd_mlp

    a = analyse_svd_mlp(
        M, _shape(hidden, intermediate, biases=M == 512), "bfloat16", target, variant="kblocked"
    )
    assert a.stats.hbm_bytes == a.plan.hbm_bytes
    assert a.stats.peak_sbuf_bytes == a.plan.sbuf_bytes <= a.plan.sbuf_budget
    assert a.stats.peak_psum_banks == a.plan.psum_banks
    assert a.stats.dma_queue_bytes == pytest.approx(a.plan.dma_cost_bytes, rel=1e-12)
    # the DMA queues' time, one side of the planner's modelled time, is the stand-in's DMA engine time
    rate = get_target(target).hbm_bytes_per_s
    assert a.stats.engine_times_s()["dma"] == pytest.approx(a.plan.dma_cost_bytes / rate, rel=1e-12)


def test_the_fp32_plan_equals_the_standin_count():
    shape = MlpShape(520, 1408, 300, 256, 256, 384, False, True, False, True)
    plan = plan_svd_mlp_kblocked(700, shape, "float32", "trn2")
    specs = [TensorSpec(s, "float32") for s in ((700, 520), (520, 256), (256, 1408))]
    bias = TensorSpec((1408, 1), "float32")
    down = [TensorSpec(s, "float32") for s in ((1408, 384), (384, 300), (1, 300))]
    stats = run_kernel(
        svd_mlp_kblocked, *specs, bias, None, None, None, *down, shape_only=True, **plan.kernel_kwargs()
    ).stats
    assert stats.hbm_bytes == plan.hbm_bytes and stats.peak_sbuf_bytes == plan.sbuf_bytes
    assert stats.dma_queue_bytes == pytest.approx(plan.dma_cost_bytes, rel=1e-12)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("hidden, intermediate", MODELS)
@pytest.mark.parametrize("M", [1, 128, 512, 2048, 8192])
def test_the_choice_moves_the_fewest_bytes_of_the_three_forms(hidden, intermediate, M, target):
    choice = choose_svd_mlp(M, _shape(hidden, intermediate), "bfloat16", target)
    kernels = [p.hbm_bytes for p in choice.candidates.values() if p is not None]
    assert choice.hbm_bytes == min([choice.split_bytes, *kernels])
    if M <= 128:  # decode and short prompts: one launch that reads each weight once, in wide rows
        assert choice.form == "kblocked"
        assert choice.estimated_time_s <= 1.01 * choice.split_time_s
        assert choice.estimated_time_s < choice.candidates["fused"].estimated_time_s


def test_the_kblocked_mlp_refuses_what_it_cannot_run():
    dense_down = MlpShape(512, 1024, 512, 256, 256, None)
    with pytest.raises(PlanError, match="needs every projection low-rank"):
        plan_svd_mlp_kblocked(64, dense_down)
    with pytest.raises(PlanError, match="bfloat16 or float32"):
        plan_svd_mlp_kblocked(64, MlpShape(512, 1024, 512, 256, 256, 256), "float16")
    with pytest.raises(ValueError, match="needs every projection low-rank"):
        check_mlp_kblocked_launch("silu", "bfloat16", (True, False, True))
    with pytest.raises(ValueError, match="not float16"):
        check_mlp_kblocked_launch("silu", "float16", (True, True, True))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        check_mlp_kblocked_launch("swish", "float32", (True, True, True))


def test_the_launcher_runs_the_kblocked_mlp_where_it_is_chosen(monkeypatch):
    rng = np.random.default_rng(0)
    M, K, I, H, r = 4, 256, 640, 256, 128  # noqa: E741 - a decode-sized batch

    def t(*shape, scale=None):
        return torch.from_numpy(
            rng.standard_normal(shape) / np.sqrt(shape[0] if scale is None else scale)
        ).float()

    x = t(M, K, scale=1)
    gate_u, gate_v, up_u, up_v = t(K, r), t(r, I), t(K, r), t(r, I)
    down_u, down_v, down_b = t(I, r), t(r, H), t(H, scale=1)
    shape = MlpShape(K, I, H, r, r, r, True, False, False, True)
    assert choose_svd_mlp(M, shape, "float32", "trn2").form == "kblocked"
    launched = []
    real_run = dispatch._run
    monkeypatch.setattr(
        dispatch,
        "_run",
        lambda kernel, *a, **k: launched.append(kernel.__name__) or real_run(kernel, *a, **k),
    )
    with dispatch.use_standin_kernels():
        y = dispatch.svd_mlp(x, gate_u, gate_v, None, up_u, up_v, None, down_u, down_v, down_b, "silu")
    xd = x.double()
    h = torch.nn.functional.silu(xd @ gate_u.double() @ gate_v.double()) * (
        xd @ up_u.double() @ up_v.double()
    )
    reference = h @ down_u.double() @ down_v.double() + down_b.double()
    assert launched == ["svd_mlp_kblocked"]
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)

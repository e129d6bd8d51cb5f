"""The kernels on the stand-in equal a float64 reference.

Tolerances
----------
float32: the kernels accumulate in fp32 like the reference up to summation order, so errors are a
few ulps of the accumulated magnitude: ``atol = 1e-5 * max|ref|``, ``rtol = 1e-5``.

bfloat16 / float16: inputs are rounded to the dtype before both computations, so the remaining
differences are (a) the kernel's rounding of intermediates it stores on chip in the compute dtype
(the X.U strip, the gated activation h, the down strip) and (b) the final rounding of Y.  The
reference mirrors (a) by rounding the same intermediates, leaving only fp32-vs-fp64 summation
(negligible) and rounding of values near ties, so each output may differ by one ulp of the dtype:
``|y - ref| <= 2 * eps * |ref| + eps * rms(ref)`` with eps = 2^-8 (bf16) or 2^-11 (fp16); the
rms term covers values close to zero, where one step of an intermediate's rounding dominates.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuronmm_fx.kernels import (
    MlpShape,
    matmul_dense,
    plan_svd_mlp,
    plan_xuv,
    run_kernel,
    svd_mlp_fused,
    xuv_fused,
    xuv_unfused,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
NP = {"float32": np.float32, "bfloat16": BF16, "float16": np.float16}


def _rand(rng, *shape, scale=None):
    s = 1.0 / math.sqrt(shape[0]) if scale is None else scale
    return rng.standard_normal(shape) * s


def _cast(a, dtype):
    """Round to ``dtype`` and return (array in dtype, float64 copy of the rounded values)."""
    q = np.asarray(a, dtype=np.float64).astype(np.float32).astype(NP[dtype])
    return q, q.astype(np.float64)


def _round(a, dtype):
    return _cast(a, dtype)[1] if dtype != "float32" else a


def _check(y, ref, dtype):
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    if dtype == "float32":
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:
        eps = EPS[dtype]
        tol = 2 * eps * np.abs(ref) + eps * np.sqrt(np.mean(ref**2))
        bad = np.abs(y - ref) > tol
        assert not bad.any(), f"{bad.sum()} of {bad.size} outside tolerance; max err {np.abs(y - ref).max()}"


# (M, K, r, N): decode, r below one block, ragged everything, r of three blocks, N over one slab
XUV_SHAPES = [
    (1, 64, 40, 70),
    (1, 300, 256, 513),
    (37, 129, 100, 200),
    (300, 200, 130, 600),
    (129, 256, 384, 1030),
]


@pytest.mark.parametrize("shape", XUV_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_xuv_fused_float32_planned_blocks(shape, bias):
    M, K, r, N = shape
    rng = np.random.default_rng(M * 7 + N)
    x, u, v = _rand(rng, M, K, scale=1.0), _rand(rng, K, r), _rand(rng, r, N)
    b = _rand(rng, 1, N, scale=1.0) if bias else None
    plan = plan_xuv(M, K, r, N, "float32", "trn1", bias=bias)
    f32 = [None if a is None else a.astype(np.float32) for a in (x, u, v, b)]
    y = run_kernel(xuv_fused, *f32, target="trn1", **plan.kernel_kwargs()).outputs
    ref = f32[0].astype(np.float64) @ f32[1] @ f32[2] + (0 if b is None else f32[3])
    _check(y, ref, "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", XUV_SHAPES[1:4])
def test_xuv_fused_low_precision_small_blocks(shape, dtype):
    """Small forced blocks: several token blocks, ragged X sub-blocks and several V slabs."""
    M, K, r, N = shape
    rng = np.random.default_rng(M + K)
    (xq, x64), (uq, u64), (vq, v64), (bq, b64) = (
        _cast(_rand(rng, M, K, scale=1.0), dtype),
        _cast(_rand(rng, K, r), dtype),
        _cast(_rand(rng, r, N), dtype),
        _cast(_rand(rng, 1, N, scale=1.0), dtype),
    )
    y = run_kernel(xuv_fused, xq, uq, vq, bq, block_m=256, block_mx=128, block_n=512).outputs
    assert y.dtype == NP[dtype]
    strip = _round(x64 @ u64, dtype)  # the kernel keeps X.U on chip in the compute dtype
    _check(y, strip @ v64 + b64, dtype)


@pytest.mark.parametrize("u_group, block_mx", [(2, 640), (3, 512)])
def test_xuv_fused_grouped_u_slabs(u_group, block_mx):
    """U loaded in slabs of several rank tiles (r = 300: groups of two or three tiles, the last
    ragged), one or two token chunks per X sub-block: each (tile, chunk) in its own PSUM bank."""
    M, K, r, N = 700, 260, 300, 200
    rng = np.random.default_rng(u_group)
    x, u, v = (_rand(rng, M, K, scale=1.0), _rand(rng, K, r), _rand(rng, r, N))
    f32 = [a.astype(np.float32) for a in (x, u, v)]
    run = run_kernel(xuv_fused, *f32, None, block_m=700, block_mx=block_mx, block_n=512, u_group=u_group)
    _check(run.outputs, f32[0].astype(np.float64) @ f32[1] @ f32[2], "float32")
    chunks = -(-block_mx // 512)
    assert run.stats.peak_psum_banks == u_group * chunks + 3


def test_svd_mlp_grouped_u_slabs_bfloat16():
    rng = np.random.default_rng(4)
    M, K, I, H = 300, 192, 320, 160  # noqa: E741
    a = _mlp_case(rng, M, K, I, H, (300, 260, 200), True, True, "bfloat16")
    y = _run_mlp(a, "silu", block_m=300, block_mx=300, block_i=256, block_n=512, u_group=3).outputs
    _check(y, _mlp_reference(a, "silu", "bfloat16"), "bfloat16")


@pytest.mark.parametrize("shape", [(37, 129, 100, 200), (300, 200, 130, 600)])
def test_baselines_equal_reference(shape):
    M, K, r, N = shape
    rng = np.random.default_rng(3)
    x, u, v, b = (
        _rand(rng, M, K, scale=1.0).astype(np.float32),
        _rand(rng, K, r).astype(np.float32),
        _rand(rng, r, N).astype(np.float32),
        _rand(rng, 1, N, scale=1.0).astype(np.float32),
    )
    ref = x.astype(np.float64) @ u @ v + b
    y_unf = run_kernel(
        xuv_unfused, x, u, v, b, block_m1=128, block_n1=512, block_m2=256, block_n2=512
    ).outputs
    _check(y_unf, ref, "float32")
    w = (u.astype(np.float64) @ v).astype(np.float32)
    y_dense = run_kernel(matmul_dense, x, w, b, block_m=128, block_n=512).outputs
    _check(y_dense, x.astype(np.float64) @ w + b, "float32")


ACT = {
    "silu": lambda z: z / (1 + np.exp(-z)),
    "gelu": lambda z: F.gelu(torch.from_numpy(z)).numpy(),
    "gelu_tanh": lambda z: F.gelu(torch.from_numpy(z), approximate="tanh").numpy(),
    "relu": lambda z: np.maximum(z, 0.0),
}


def _mlp_case(rng, M, K, I, H, ranks, gated, biases, dtype):  # noqa: E741
    """Random factors (rounded to dtype) and their float64 copies."""

    def pair(k_in, k_out, r):
        if r is None:
            return _cast(_rand(rng, k_in, k_out), dtype), None
        return _cast(_rand(rng, k_in, r), dtype), _cast(_rand(rng, r, k_out), dtype)

    args = {"x": _cast(_rand(rng, M, K, scale=1.0), dtype)}
    args["act"] = pair(K, I, ranks[0])
    args["up"] = pair(K, I, ranks[1]) if gated else (None, None)
    args["down"] = pair(I, H, ranks[2])
    args["act_b"] = _cast(_rand(rng, I, 1, scale=0.5), dtype) if biases else None
    args["up_b"] = _cast(_rand(rng, I, 1, scale=0.5), dtype) if biases and gated else None
    args["down_b"] = _cast(_rand(rng, 1, H, scale=0.5), dtype) if biases else None
    return args


def _mlp_reference(a, activation, dtype):
    def q(p):
        return None if p is None else p[1]

    def proj(z, pair, round_strip):
        u, v = pair
        if v is None:
            return z @ u[1]
        s = z @ u[1]
        return (_round(s, dtype) if round_strip else s) @ v[1]

    x = a["x"][1]
    pre = proj(x, a["act"], True) + (0 if a["act_b"] is None else q(a["act_b"]).T)
    h = ACT[activation](pre)
    if a["up"][0] is not None:
        h = h * (proj(x, a["up"], True) + (0 if a["up_b"] is None else q(a["up_b"]).T))
    h = _round(h, dtype)  # h^T is stored on chip in the compute dtype
    d_u, d_v = a["down"]
    if d_v is None:
        y = h @ d_u[1]
    else:
        y = _round(h @ d_u[1], dtype) @ d_v[1]  # fp32-accumulated down strip, cast once
    return y + (0 if a["down_b"] is None else q(a["down_b"]))


def _run_mlp(a, activation, **blocks):
    def arr(p):
        return None if p is None else p[0]

    return run_kernel(
        svd_mlp_fused,
        arr(a["x"]),
        arr(a["act"][0]),
        arr(a["act"][1]),
        arr(a["act_b"]),
        arr(a["up"][0]),
        arr(a["up"][1]),
        arr(a["up_b"]),
        arr(a["down"][0]),
        arr(a["down"][1]),
        arr(a["down_b"]),
        activation=activation,
        **blocks,
    )


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_svd_mlp_float32_all_activations(activation, gated):
    rng = np.random.default_rng(11)
    M, K, I, H = 133, 200, 300, 190  # noqa: E741
    a = _mlp_case(rng, M, K, I, H, (40, 140, 260), gated, True, "float32")
    shape = MlpShape(K, I, H, 40, 140 if gated else None, 260, gated, True, gated, True)
    plan = plan_svd_mlp(M, shape, "float32", "trn2")
    y = _run_mlp(a, activation, **plan.kernel_kwargs()).outputs
    _check(y, _mlp_reference(a, activation, "float32"), "float32")


@pytest.mark.parametrize(
    "ranks", [(None, None, 260), (40, 140, None), (None, None, None), (300, 40, 384)], ids=str
)
def test_svd_mlp_float32_dense_and_lowrank_mixes_small_blocks(ranks):
    rng = np.random.default_rng(5)
    M, K, I, H = 261, 130, 300, 200  # noqa: E741
    a = _mlp_case(rng, M, K, I, H, ranks, True, True, "float32")
    tied = ranks[0] is None or ranks[1] is None
    blocks = {
        "block_m": 256,
        "block_mx": 256 if tied else 128,
        "block_i": I if ranks[2] is None else 128,
        "block_n": 512,
    }
    y = _run_mlp(a, "silu", **blocks).outputs
    _check(y, _mlp_reference(a, "silu", "float32"), "float32")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("M", [1, 200])
def test_svd_mlp_bfloat16(activation, M):
    rng = np.random.default_rng(M)
    K, I, H = 192, 320, 160  # noqa: E741
    a = _mlp_case(rng, M, K, I, H, (64, 100, 200), True, M > 1, "bfloat16")
    y = _run_mlp(a, activation, block_m=128, block_mx=128, block_i=256, block_n=512).outputs
    assert y.dtype == BF16
    _check(y, _mlp_reference(a, activation, "bfloat16"), "bfloat16")


def test_mlp_kernel_takes_every_activation_of_the_project():
    from neuronmm_fx.activations import ACTIVATION_NAMES
    from neuronmm_fx.kernels import nl
    from neuronmm_fx.kernels.mlp import activation_op, check_mlp_launch

    ops = {name: activation_op(name) for name in ACTIVATION_NAMES}
    assert ops["gelu_tanh"] is nl.gelu_apprx_tanh and ops["silu"] is nl.silu and ops["relu"] is nl.relu
    assert len(set(map(id, ops.values()))) == len(ACTIVATION_NAMES)
    blocks = {"block_m": 256, "block_mx": 256, "block_i": 512, "block_n": 512}
    with pytest.raises(ValueError, match="unknown activation 'swish'"):  # checked on the host
        check_mlp_launch("swish", 512, False, False, blocks)
    with pytest.raises(ValueError, match="needs the whole h\\^T on chip: block_i=512 < I=1024"):
        check_mlp_launch("silu", 1024, False, True, blocks)
    with pytest.raises(ValueError, match="block_mx must equal block_m"):
        check_mlp_launch("silu", 512, True, False, {**blocks, "block_mx": 128})


def test_xuv_and_mlp_shape_only_runs_count_without_values():
    from neuronmm_fx.kernels import TensorSpec

    x, u, v = (
        TensorSpec((300, 200), "bfloat16"),
        TensorSpec((200, 130), "bfloat16"),
        TensorSpec((130, 600), "bfloat16"),
    )
    res = run_kernel(xuv_fused, x, u, v, None, block_m=256, block_mx=128, block_n=512, shape_only=True)
    assert isinstance(res.outputs, TensorSpec) and res.outputs.shape == (300, 600)
    assert res.stats.matmul_count > 0 and res.stats.hbm_bytes > 0

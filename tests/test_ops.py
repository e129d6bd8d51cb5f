"""The neuronmm custom ops: registration, semantics, dtypes and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import neuronmm_fx  # noqa: F401  (registers the ops)

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_xuv_opcheck(dtype, with_bias):
    x, u, v = _randn(2, 5, 16, dtype=dtype), _randn(16, 4, dtype=dtype), _randn(4, 12, dtype=dtype)
    bias = _randn(12, dtype=dtype) if with_bias else None
    args = [t.requires_grad_() if t is not None else None for t in (x, u, v, bias)]
    opcheck(torch.ops.neuronmm.xuv.default, tuple(args))


def _mlp_args(gated: bool, activation: str, dtype, dense_down: bool = False):
    x = _randn(3, 16, dtype=dtype)
    args = [x, _randn(16, 4, dtype=dtype), _randn(4, 24, dtype=dtype), _randn(24, dtype=dtype)]
    if gated:
        args += [_randn(16, 6, dtype=dtype), _randn(6, 24, dtype=dtype), None]
    else:
        args += [None, None, None]
    args += (
        [_randn(24, 16, dtype=dtype), None, _randn(16, dtype=dtype)]
        if dense_down
        else [_randn(24, 5, dtype=dtype), _randn(5, 16, dtype=dtype), None]
    )
    return args + [activation]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
def test_svd_mlp_opcheck(dtype, gated):
    args = _mlp_args(gated, "silu", dtype)
    for t in args[:-1]:
        if t is not None:
            t.requires_grad_()
    opcheck(torch.ops.neuronmm.svd_mlp.default, tuple(args))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_svd_mlp_matches_the_formula(activation, gated):
    x, gu, gv, gb, uu, uv, ub, du, dv, db, act = _mlp_args(gated, activation, torch.float32, dense_down=True)
    fn = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
    }
    hidden = fn[activation](x @ gu @ gv + gb)
    if gated:
        hidden = hidden * (x @ uu @ uv)
    expected = hidden @ du + db
    got = torch.ops.neuronmm.svd_mlp(x, gu, gv, gb, uu, uv, ub, du, dv, db, act)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_xuv_matches_the_formula_on_batched_input():
    x, u, v, b = _randn(2, 3, 8), _randn(8, 2), _randn(2, 5), _randn(5)
    torch.testing.assert_close(torch.ops.neuronmm.xuv(x, u, v, b), x @ u @ v + b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    x, u, v = _randn(4, 256, dtype=dtype), _randn(256, 128, dtype=dtype), _randn(128, 64, dtype=dtype)
    expected = (x.float() @ u.float() @ v.float()).to(dtype)
    got = torch.ops.neuronmm.xuv(x, u, v)
    assert got.dtype == dtype
    assert torch.equal(got, expected)  # one rounding at the end, as the fp32 PSUM path does


def test_unknown_activation_is_rejected():
    args = _mlp_args(True, "swish", torch.float32)
    with pytest.raises(ValueError, match="unknown activation 'swish'.*'silu', 'gelu', 'gelu_tanh', 'relu'"):
        torch.ops.neuronmm.svd_mlp(*args)


def test_mismatched_dtypes_and_shapes_are_rejected():
    x, u, v = _randn(2, 8), _randn(8, 2), _randn(2, 4)
    with pytest.raises(ValueError, match="u is torch.bfloat16 but x is torch.float32"):
        torch.ops.neuronmm.xuv(x, u.bfloat16(), v)
    with pytest.raises(ValueError, match=r"xuv_u must be \(8, r\), got \(7, 2\)"):
        torch.ops.neuronmm.xuv(x, _randn(7, 2), v)
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        torch.ops.neuronmm.xuv(x.double(), u.double(), v.double())


def test_gradients_flow_to_the_factors():
    x, u, v = _randn(3, 8), _randn(8, 2).requires_grad_(), _randn(2, 4).requires_grad_()
    torch.ops.neuronmm.xuv(x, u, v).sum().backward()
    u_ref, v_ref = u.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    (x @ u_ref @ v_ref).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad)
    torch.testing.assert_close(v.grad, v_ref.grad)


def _mm_calls(fn) -> int:
    """How many ``aten::mm`` calls ``fn`` makes, seen by the profiler (inside the custom op too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(event.name == "aten::mm" for event in profile.events())


def test_joint_first_factors_are_one_gemm_with_the_same_result_and_gradients():
    from neuronmm_fx.modules import CompressedMLP, Factors
    from neuronmm_fx.ops import joint_columns

    x = _randn(2, 5, 16)
    gate = Factors(_randn(16, 4, seed=1), _randn(4, 24, seed=2), _randn(24, seed=3))
    up = Factors(_randn(16, 6, seed=4), _randn(6, 24, seed=5))
    down = Factors(_randn(24, 5, seed=6), _randn(5, 16, seed=7), _randn(16, seed=8))
    joint = CompressedMLP("silu", gate, down, up=up)
    apart = CompressedMLP("silu", gate, down, up=up, share_first=False)
    assert joint.shares_first and not apart.shares_first
    assert joint.gate_up_u.shape == (16, 10) and not hasattr(joint, "gate_u")
    assert [n for n, _ in apart.named_parameters()][:1] == ["gate_u"]
    views = joint.factors("gate").u, joint.factors("up").u
    matrix, gate_rank = joint_columns(*views)
    assert gate_rank == 4 and matrix.data_ptr() == joint.gate_up_u.data_ptr() and matrix.shape == (16, 10)
    assert joint_columns(views[1], views[0]) is None  # up before gate: not one matrix in that order
    assert joint_columns(gate.u, up.u) is None  # two storages

    with torch.no_grad():
        assert _mm_calls(lambda: joint(x)) == 5 and _mm_calls(lambda: apart(x)) == 6
        expected = apart(x)  # float32 GEMMs of other widths: equal up to rounding
        torch.testing.assert_close(joint(x), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())

    joint(x).square().sum().backward()
    apart(x).square().sum().backward()
    apart_grad = torch.cat([apart.gate_u.grad, apart.up_u.grad], dim=1)
    for got, want in ((joint.gate_up_u.grad, apart_grad), (joint.down_v.grad, apart.down_v.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())

"""Torch launchers of neuronmm_fx.kernels.dispatch on the stand-in equal the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuronmm_fx.kernels import dispatch

TOL = {  # see test_kernels_numerics for the derivation; here against a plain PyTorch reference
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def _ref_mlp(x, act_u, act_v, act_b, up_u, up_v, up_b, down_u, down_v, down_b, activation):
    f = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
    }[activation]

    def proj(z, u, v, b):
        y = z @ u if v is None else z @ u @ v
        return y if b is None else y + b

    h = f(proj(x, act_u, act_v, act_b))
    if up_u is not None:
        h = h * proj(x, up_u, up_v, up_b)
    return proj(h, down_u, down_v, down_b)


def test_mode_switch():
    assert dispatch.active_mode() is None
    with dispatch.use_standin_kernels():
        assert dispatch.active_mode() == "standin"
    assert dispatch.active_mode() is None
    assert not dispatch.nki_available()
    with pytest.raises(RuntimeError, match="Neuron SDK"):
        with dispatch.use_nki_kernels():
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_xuv_launcher(dtype, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 96, generator=g).to(dtype)
    u = (torch.randn(96, 40, generator=g) / 10).to(dtype)
    v = (torch.randn(40, 150, generator=g) / 6).to(dtype)
    b = torch.randn(150, generator=g).to(dtype) if bias else None
    with dispatch.use_standin_kernels():
        y = dispatch.xuv(x, u, v, b)
    assert y.shape == (2, 3, 150) and y.dtype == dtype
    ref = x.double() @ u.double() @ v.double() + (0 if b is None else b.double())
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    st = dispatch.last_stats()
    assert st is not None and st.matmul_count > 0


def test_xuv_launcher_falls_back_to_unfused_when_fused_cannot_be_planned(monkeypatch):
    from neuronmm_fx.kernels import planner

    def refuse(*a, **k):
        raise planner.PlanError("no")

    monkeypatch.setattr(planner, "plan_xuv", refuse)
    x, u, v = torch.randn(5, 64), torch.randn(64, 16) / 8, torch.randn(16, 33) / 4
    y = dispatch.xuv(x, u, v)
    torch.testing.assert_close(y, x @ u @ v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_svd_mlp_launcher_gated(activation):
    g = torch.Generator().manual_seed(1)
    K, I, H, r = 64, 160, 64, 32  # noqa: E741
    x = torch.randn(2, 7, K, generator=g)
    args = (
        torch.randn(K, r, generator=g) / 8,
        torch.randn(r, I, generator=g) / 6,
        None,
        torch.randn(K, r, generator=g) / 8,
        torch.randn(r, I, generator=g) / 6,
        None,
        torch.randn(I, r, generator=g) / 12,
        torch.randn(r, H, generator=g) / 6,
        None,
    )
    with dispatch.use_standin_kernels():
        y = dispatch.svd_mlp(x, *args, activation)
    torch.testing.assert_close(y, _ref_mlp(x, *args, activation), rtol=1e-5, atol=1e-5)


def test_svd_mlp_launcher_plain_mlp_dense_with_biases_bf16():
    g = torch.Generator().manual_seed(2)
    K, I = 48, 192  # noqa: E741
    x = torch.randn(9, K, generator=g).bfloat16()
    w1 = (torch.randn(K, I, generator=g) / 7).bfloat16()
    b1 = torch.randn(I, generator=g).bfloat16()
    w2 = (torch.randn(I, K, generator=g) / 14).bfloat16()
    b2 = torch.randn(K, generator=g).bfloat16()
    y = dispatch.svd_mlp(x, w1, None, b1, None, None, None, w2, None, b2, "gelu_tanh")
    assert y.dtype == torch.bfloat16
    ref = _ref_mlp(
        x.double(),
        w1.double(),
        None,
        b1.double(),
        None,
        None,
        None,
        w2.double(),
        None,
        b2.double(),
        "gelu_tanh",
    )
    torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2)


def test_svd_mlp_launcher_split_fallback(monkeypatch):
    from neuronmm_fx.kernels import planner

    def refuse(*a, **k):
        raise planner.PlanError("no")

    monkeypatch.setattr(planner, "plan_svd_mlp", refuse)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g)
    args = (
        torch.randn(32, 8, generator=g) / 5,
        torch.randn(8, 64, generator=g) / 3,
        torch.randn(64, generator=g),
        torch.randn(32, 64, generator=g) / 6,
        None,
        None,
        torch.randn(64, 32, generator=g) / 8,
        None,
        torch.randn(32, generator=g),
    )
    y = dispatch.svd_mlp(x, *args, "silu")
    torch.testing.assert_close(y, _ref_mlp(x, *args, "silu"), rtol=1e-5, atol=1e-5)


def test_svd_mlp_launcher_validates():
    x = torch.randn(3, 16)
    u, v, d = torch.randn(16, 4), torch.randn(4, 32), torch.randn(32, 16)
    with pytest.raises(ValueError, match="unknown activation 'swish': .*'silu', 'gelu', 'gelu_tanh', 'relu'"):
        dispatch.svd_mlp(x, u, v, None, None, None, None, d, None, None, "swish")
    with pytest.raises(ValueError, match="does not chain"):
        dispatch.svd_mlp(x, u, torch.randn(5, 32), None, None, None, None, d, None, None, "silu")
    with pytest.raises(ValueError, match="bias must have shape"):
        dispatch.svd_mlp(x, u, v, torch.randn(31), None, None, None, d, None, None, "silu")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        dispatch.xuv(x.double(), u, v)


def test_empty_batch():
    x = torch.randn(0, 16)
    assert dispatch.xuv(x, torch.randn(16, 4), torch.randn(4, 8)).shape == (0, 8)

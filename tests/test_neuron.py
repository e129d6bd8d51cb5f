"""The hand-off to the Neuron SDK: a clear error without it, and the right calls with it (faked)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import neuronmm_fx
from neuronmm_fx import neuron
from neuronmm_fx.kernels import dispatch
from neuronmm_fx.modules import CompressedMLP


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 160), nn.SiLU(), nn.Linear(160, 64)).eval()


@pytest.fixture
def no_sdk(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # import raises ImportError


@pytest.fixture
def fake_sdk(monkeypatch):
    """An XLA-era torch_neuronx whose ``trace`` records its arguments."""
    module = types.ModuleType("torch_neuronx")
    module.__version__ = "2.9.0.2.0-fake"
    module.calls = []

    def trace(func, example_inputs, **kwargs):
        module.calls.append((func, example_inputs, kwargs))
        return "traced"

    module.trace = trace
    monkeypatch.setitem(sys.modules, "torch_neuronx", module)
    monkeypatch.setattr(neuron, "_REGISTERED", set())
    return module


def test_trace_without_sdk_fails_at_once_with_what_to_install(no_sdk):
    status = neuron.sdk_status()
    assert not status.torch_neuronx and not status.has_trace
    with pytest.raises(neuron.NeuronSDKError) as caught:
        neuron.trace(object(), (torch.zeros(1),), ratio=0.2)  # fails before looking at the model
    message = str(caught.value)
    assert "neuronmm_fx.neuron.trace needs the AWS Neuron SDK" in message
    assert "pip install torch-neuronx neuronx-cc" in message
    assert neuron.NEURON_PIP_INDEX in message and "not PyPI" in message
    assert isinstance(caught.value, neuronmm_fx.NeuronMMError)


def test_kernel_registration_is_a_no_op_without_sdk(no_sdk):
    registration = neuron.register_neuron_kernels()
    assert registration.registered == () and registration.device_type is None
    assert "torch-neuronx" in registration.reason


def test_trace_optimizes_then_calls_torch_neuronx_trace(fake_sdk, monkeypatch):
    for name in ("use_nki_kernels",):  # as if the kernels were absent
        monkeypatch.delattr(dispatch, name, raising=False)
    x = torch.randn(4, 64)
    result = neuron.trace(
        mlp(), x, ratio=0.05, block=8, optimize_options={"method": "svd"}, compiler_args=["--auto-cast=none"]
    )
    assert result == "traced"
    ((traced, inputs, kwargs),) = fake_sdk.calls
    assert isinstance(traced, CompressedMLP)  # optimized before the hand-off
    assert inputs == (x,) and kwargs == {"compiler_args": ["--auto-cast=none"]}
    registration = neuron.register_neuron_kernels()  # kernels absent: nothing registered, no error
    assert registration.device_type == "xla" and registration.registered == ()
    assert "dispatch.xuv with use_nki_kernels" in registration.reason


def test_trace_without_ratio_passes_the_model_through(fake_sdk):
    model = mlp()
    neuron.trace(model, (torch.randn(2, 64),), register_kernels=False)
    assert fake_sdk.calls[0][0] is model


def test_kernels_register_for_the_sdk_device(fake_sdk):
    assert neuron._launcher(dispatch, "xuv") is not None  # dispatch's launchers in use_nki_kernels() mode
    registration = neuron.register_neuron_kernels()
    assert registration.device_type == "xla" and registration.registered == ("xuv", "svd_mlp")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("neuronmm::xuv", "XLA")
    assert neuron.register_neuron_kernels().registered == ("xuv", "svd_mlp")  # idempotent
    x = torch.randn(2, 8)
    torch.testing.assert_close(  # the CPU implementation is untouched
        torch.ops.neuronmm.xuv(x, torch.eye(8)[:, :4], torch.eye(8)[:4]),
        x @ torch.eye(8)[:, :4] @ torch.eye(8)[:4],
    )


def test_sdk_without_trace_points_to_the_neuron_compile_backend(fake_sdk, monkeypatch):
    monkeypatch.delattr(fake_sdk, "trace")
    fake_sdk.__version__ = "2.13.3.0"
    with pytest.raises(neuron.NeuronSDKError, match=r"backend='neuronmm'.*'compiler': 'neuron'"):
        neuron.trace(mlp(), (torch.randn(2, 64),))

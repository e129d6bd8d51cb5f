"""Bad input is refused with a message naming the problem, and the model is left exactly as it was."""

import pytest
import torch
from helpers import assert_unchanged, state_snapshot, tiny_model
from torch import nn

import neuronmm_fx
from neuronmm_fx import ConfigError, NothingToCompressError, UnsupportedModelError, install


def _snapshot(model):
    return state_snapshot(model), [type(m) for m in model.modules()]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 0.0}, r"ratio must satisfy 0 < ratio < 1 .* got 0.0"),
        ({"ratio": 1.0}, r"ratio must satisfy 0 < ratio < 1 .* got 1.0"),
        ({"ratio": -0.3}, r"ratio must satisfy 0 < ratio < 1 .* got -0.3"),
        ({"ratio": float("nan")}, r"ratio must satisfy 0 < ratio < 1"),
        ({"ratio": "0.2"}, r"ratio must be a number .* got '0.2'"),
        ({"block": 0}, r"block must be a positive integer .* got 0"),
        ({"block": -128}, r"block must be a positive integer .* got -128"),
        ({"block": 12.5}, r"block must be a positive integer .* got 12.5"),
        ({"method": "magic"}, r"unknown method 'magic'"),
    ],
)
def test_bad_options_are_refused_and_the_model_is_untouched(options, message):
    model = tiny_model("llama")
    state, types = _snapshot(model)
    with pytest.raises(ConfigError, match=message):
        neuronmm_fx.optimize(model, **options)
    assert_unchanged(model, state, types)


def test_a_model_without_linear_layers_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(
        UnsupportedModelError, match="has no nn.Linear or Conv1D layers: there is nothing to compress"
    ):
        neuronmm_fx.optimize(model)


def test_an_integer_quantized_weight_is_refused():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    model[2].weight = nn.Parameter(torch.randint(-8, 8, (16, 64), dtype=torch.int8), requires_grad=False)
    state, types = _snapshot(model)
    with pytest.raises(
        UnsupportedModelError, match=r"2.weight has dtype torch.int8: .*floating-point weights only"
    ):
        neuronmm_fx.optimize(model, ratio=0.2, block=4)
    assert_unchanged(model, state, types)


def test_a_double_precision_model_is_refused():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).double()
    with pytest.raises(UnsupportedModelError, match="0.weight has unsupported dtype torch.float64"):
        neuronmm_fx.optimize(model, ratio=0.2, block=4)


def test_a_model_with_nothing_to_compress_says_why():
    model = tiny_model("llama")
    state, types = _snapshot(model)
    with pytest.raises(
        NothingToCompressError,
        match=r"model.layers.0.mlp: every matrix stays dense .*no multiple of 128 is below break-even",
    ):
        neuronmm_fx.optimize(
            model, ratio=0.2, block=128
        )  # 64×128 matrices: no 128-aligned rank saves anything
    assert_unchanged(model, state, types)

    linear_only = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(NothingToCompressError, match="no MLP or low-rank chain"):
        neuronmm_fx.optimize(linear_only)


def test_a_failure_while_installing_rolls_everything_back(monkeypatch):
    model = tiny_model("llama")
    state, types = _snapshot(model)
    real_set = install.set_submodule
    calls = []

    def failing_set(root, path, module):
        calls.append(path)
        if len(calls) == 2:  # the first site is already installed when the second fails
            raise RuntimeError("simulated failure")
        return real_set(root, path, module)

    monkeypatch.setattr(install, "set_submodule", failing_set)
    with pytest.raises(RuntimeError, match="simulated failure"):
        neuronmm_fx.optimize(model, ratio=0.2, block=8)
    assert_unchanged(model, state, types)


def test_include_and_exclude_select_sites_and_are_reported():
    model = tiny_model("llama")
    optimized = neuronmm_fx.optimize(model, ratio=0.2, block=8, exclude="model.layers.1.*")
    report = neuronmm_fx.report_of(optimized)
    assert [s.path for s in report.sites] == ["model.layers.0.mlp"]
    assert [(s.path, s.reason) for s in report.skipped] == [
        ("model.layers.1.mlp", "excluded by pattern 'model.layers.1.*'")
    ]
    assert isinstance(optimized.model.layers[1].mlp.gate_proj, nn.Linear)

    model = tiny_model("llama")
    report = neuronmm_fx.report_of(neuronmm_fx.optimize(model, ratio=0.2, block=8, include=["*.1.mlp"]))
    assert [s.path for s in report.sites] == ["model.layers.1.mlp"]
    assert "not matched by include" in report.skipped[0].reason


def test_report_is_readable_and_is_data():
    model = tiny_model("gpt2")
    report = neuronmm_fx.report_of(neuronmm_fx.optimize(model, ratio=0.2, block=8, allocation="uniform"))
    text = str(report)
    assert "transformer.h.0.mlp" in text and "plain_mlp" in text and "gelu_tanh" in text
    assert "transformer.h.0.mlp.c_fc" in text and "64×128" in text
    data = report.to_dict()
    assert data["params_removed"] == report.params_removed > 0
    assert data["sites"][0]["matrices"][0]["rank"] == 32

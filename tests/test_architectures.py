"""optimize() on tiny random models of every supported family: found, installed, meaning preserved."""

import pytest
import torch
from helpers import ARCHITECTURES, EXPECTED, LAYERS, make_low_rank_, model_output, tiny_model, token_ids
from torch import nn

import neuronmm_fx
from neuronmm_fx import CompressedMLP


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_mlp_is_found_and_exact_low_rank_weights_survive(name):
    model = make_low_rank_(tiny_model(name), rank=8)
    ids = token_ids()
    reference = model_output(model, ids)
    model_class = type(model)

    optimized = neuronmm_fx.optimize(  # rank 40 >= 8: truncation is exact
        model, ratio=0.05, block=8, allocation="uniform"
    )

    report = neuronmm_fx.report_of(optimized)
    pattern, activation = EXPECTED[name]
    assert optimized is model and type(optimized) is model_class
    assert report.count(pattern) == LAYERS and len(report.sites) == LAYERS
    assert {s.activation for s in report.sites} == {activation}
    assert sum(isinstance(m, CompressedMLP) for m in optimized.modules()) == LAYERS
    assert not report.skipped
    for site in report.sites:
        assert all(m.rank == 40 for m in site.matrices), site
    torch.testing.assert_close(model_output(optimized, ids), reference, rtol=1e-4, atol=1e-4)


def _factor_params(in_features, out_features, rank):
    return rank * (in_features + out_features)


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2", "opt"])
def test_ratio_0_2_parameter_counts_are_exact(name):
    model = tiny_model(name)
    before = sum(p.numel() for p in model.parameters())
    optimized = neuronmm_fx.optimize(model, ratio=0.2, block=8, allocation="uniform")
    report = neuronmm_fx.report_of(optimized)
    # 64×128: break-even 42.7, (1 - 0.2)·42.7 = 34.1 → 32 with block 8
    expected_rank = 32
    removed = 0
    for site in report.sites:
        for matrix in site.matrices:
            assert matrix.rank == expected_rank
            bias = matrix.params_after - _factor_params(
                matrix.in_features, matrix.out_features, expected_rank
            )
            assert bias in (0, matrix.out_features)
            assert matrix.params_before == matrix.in_features * matrix.out_features + bias
            removed += matrix.params_before - matrix.params_after
    mlps = [m for m in optimized.modules() if isinstance(m, CompressedMLP)]
    for mlp in mlps:
        for role in mlp.roles:
            factors = mlp.factors(role)
            assert factors.u.shape[1] == expected_rank and factors.v.shape[0] == expected_rank
    after = sum(p.numel() for p in optimized.parameters())
    assert removed == report.params_removed == before - after > 0
    assert report.model_params_before == before and report.model_params_after == after


class UserMLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        return self.net(x)


class UserNet(nn.Module):
    def __init__(self, width=32, hidden=96, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList(UserMLP(width, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return x


def test_a_users_own_mlp_modules_are_found():
    torch.manual_seed(0)
    model = make_low_rank_(UserNet(), rank=4).eval()
    x = torch.randn(5, 32)
    reference = model(x)
    optimized = neuronmm_fx.optimize(model, ratio=0.1, block=4)
    report = neuronmm_fx.report_of(optimized)
    assert report.count("plain_mlp") == 3
    assert [s.path for s in report.sites] == [f"blocks.{i}.net" for i in range(3)]
    assert all(isinstance(b.net, CompressedMLP) for b in optimized.blocks)
    torch.testing.assert_close(optimized(x), reference, rtol=1e-4, atol=1e-5)


def test_optimized_model_generates_and_saves(tmp_path):
    model = tiny_model("llama")
    optimized = neuronmm_fx.optimize(model, ratio=0.2, block=8, allocation="uniform")
    ids = token_ids(batch=1, length=4)
    generated = optimized.generate(ids, max_new_tokens=6, do_sample=False)
    # greedy decoding with the KV cache equals re-running the whole prefix without one, step by step
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            logits = optimized(expected, use_cache=False).logits
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)
    path = tmp_path / "state.pt"
    torch.save(optimized.state_dict(), path)
    state = torch.load(path)
    # the gate and up first factors (64, 32) each, side by side in one parameter
    assert state["model.layers.0.mlp.gate_up_u"].shape == (64, 64)
    assert "model.layers.0.mlp.gate_u" not in state and "model.layers.0.mlp.up_u" not in state
    assert state["model.layers.0.mlp.down_v"].shape == (32, 64)
    assert not any(key.startswith("model.layers.0.mlp.gate_proj") for key in state)

"""Property: any MLP-shaped module with exactly low-rank weights is found and its outputs preserved."""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import neuronmm_fx

FUNCTIONAL = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
SPELLED_OUT = {  # the same functions written as elementwise arithmetic
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "relu": torch.relu,
}
MODULES = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


class RandomMLP(nn.Module):
    def __init__(self, width, hidden, activation, form, gated, commuted, bias):
        super().__init__()
        self.gated, self.commuted = gated, commuted
        self.first = nn.Linear(width, hidden, bias=bias)
        self.up = nn.Linear(width, hidden, bias=bias) if gated else None
        self.last = nn.Linear(hidden, width, bias=bias)
        self.act_module = MODULES[activation]() if form == "module" else None
        self.act_function = FUNCTIONAL[activation] if form == "functional" else SPELLED_OUT[activation]

    def act(self, x):
        return self.act_module(x) if self.act_module is not None else self.act_function(x)

    def forward(self, x):
        hidden = self.act(self.first(x))
        if self.gated:
            up = self.up(x)
            hidden = up * hidden if self.commuted else hidden * up
        return self.last(hidden)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(16, 48),
    hidden=st.integers(16, 96),
    activation=st.sampled_from(sorted(FUNCTIONAL)),
    form=st.sampled_from(["module", "functional", "spelled_out"]),
    gated=st.booleans(),
    commuted=st.booleans(),
    bias=st.booleans(),
    true_rank=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_optimize_finds_and_preserves_random_mlps(
    width, hidden, activation, form, gated, commuted, bias, true_rank, seed
):
    torch.manual_seed(seed)
    model = RandomMLP(width, hidden, activation, form, gated, commuted, bias).eval()
    for linear in (model.first, model.up, model.last):
        if linear is not None:
            rows, cols = linear.weight.shape
            linear.weight.data = torch.randn(rows, true_rank) @ torch.randn(true_rank, cols) / math.sqrt(cols)
    x = torch.randn(3, width)
    reference = model(x)

    # block 4 and ratio 0.01 keep rank >= 4 >= true_rank for every matrix of at least 16×16
    fused = neuronmm_fx.optimize(model, ratio=0.01, block=4, allocation="uniform")

    report = neuronmm_fx.report_of(fused)
    assert [(s.pattern, s.activation) for s in report.sites] == [
        ("gated_mlp" if gated else "plain_mlp", activation)
    ]
    assert isinstance(fused, neuronmm_fx.CompressedMLP) and fused.gated == gated
    for matrix in report.sites[0].matrices:
        breakeven = matrix.in_features * matrix.out_features / (matrix.in_features + matrix.out_features)
        assert matrix.rank == math.floor(0.99 * breakeven / 4) * 4
    torch.testing.assert_close(fused(x), reference, rtol=1e-4, atol=1e-4)

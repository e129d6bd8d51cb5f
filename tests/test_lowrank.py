"""Existing low-rank chains become neuronmm::xuv with their own factors (no SVD)."""

import torch
from torch import nn

import neuronmm_fx
from neuronmm_fx import LowRankLinear


class SVDLLMProjection(nn.Module):
    """The shape SVD-LLM checkpoints use: u_proj (K→r, no bias) then v_proj (r→N)."""

    def __init__(self, in_features, rank, out_features):
        super().__init__()
        self.u_proj = nn.Linear(in_features, rank, bias=False)
        self.v_proj = nn.Linear(rank, out_features)

    def forward(self, x):
        return self.v_proj(self.u_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.proj = SVDLLMProjection(64, 8, 96)
        self.head = nn.Linear(96, 64)
        self.dense_pair = nn.Sequential(
            nn.Linear(64, 60, bias=False), nn.Linear(60, 64)
        )  # r above break-even

    def forward(self, x):
        return self.dense_pair(self.head(torch.tanh(self.proj(self.norm(x)))))


def test_low_rank_chain_becomes_xuv_with_the_same_weights():
    torch.manual_seed(0)
    model = Block().eval()
    u_weight = model.proj.u_proj.weight.detach().clone()
    v_weight = model.proj.v_proj.weight.detach().clone()
    x = torch.randn(3, 7, 64)
    reference = model(x)

    optimized = neuronmm_fx.optimize(model, ratio=0.2, block=8)
    report = neuronmm_fx.report_of(optimized)

    assert [(s.pattern, s.path, s.installed) for s in report.sites] == [("lowrank", "proj", "module")]
    (matrix,) = report.sites[0].matrices
    assert (matrix.method, matrix.rank, matrix.in_features, matrix.out_features) == ("existing", 8, 64, 96)
    assert isinstance(optimized.proj, LowRankLinear)
    assert torch.equal(optimized.proj.u, u_weight.t()) and torch.equal(optimized.proj.v, v_weight.t())
    assert isinstance(optimized.dense_pair[0], nn.Linear)  # 60 >= break-even 32: not a low-rank chain
    torch.testing.assert_close(optimized(x), reference, rtol=1e-5, atol=1e-5)


def test_gated_mlp_of_low_rank_chains_fuses_without_svd():
    class LowRankGated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = SVDLLMProjection(32, 4, 80)
            self.up = SVDLLMProjection(32, 4, 80)
            self.down = SVDLLMProjection(80, 4, 32)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(1)
    model = LowRankGated().eval()
    x = torch.randn(4, 32)
    reference = model(x)
    fused = neuronmm_fx.optimize(model, ratio=0.5, block=128)  # block 128 would leave any dense matrix dense
    report = neuronmm_fx.report_of(fused)
    assert isinstance(fused, neuronmm_fx.CompressedMLP)  # the whole model was one site
    assert [m.method for m in report.sites[0].matrices] == ["existing"] * 3
    torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=1e-5)

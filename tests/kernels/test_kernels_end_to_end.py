"""A whole optimized tiny LLaMA runs its MLPs through the NKI kernels on the CPU stand-in."""

import torch
from support import logits, random_ids, tiny_llama

import neuronmm_fx
from neuronmm_fx.kernels import dispatch


def test_optimized_llama_logits_match_on_the_standin(monkeypatch):
    model = neuronmm_fx.optimize(tiny_llama(), ratio=0.2, block=8, method="svd")
    ids = random_ids(batch=1, length=12)
    reference = logits(model, ids)

    launches = []
    real_launcher = dispatch.svd_mlp

    def counting_launcher(*args):
        launches.append(args[0].shape)
        return real_launcher(*args)

    monkeypatch.setattr(dispatch, "svd_mlp", counting_launcher)
    with neuronmm_fx.use_standin_kernels():
        on_standin = logits(model, ids)

    assert len(launches) == 2  # one fused MLP kernel per layer
    torch.testing.assert_close(on_standin, reference, rtol=1e-4, atol=1e-4)

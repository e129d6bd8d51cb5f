"""The real SmolLM2-135M from its PyPI package: every MLP rewritten, and it still generates."""

import pytest
import torch

import neuronmm_fx
from neuronmm_fx.models import load_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_smollm2_all_30_mlps_are_rewritten_and_it_generates(smollm2):
    model, tokenizer = smollm2
    dense_params = sum(p.numel() for p in model.parameters())
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

    optimized = neuronmm_fx.optimize(model, ratio=0.2)

    report = neuronmm_fx.report_of(optimized)
    assert type(optimized).__name__ == "LlamaForCausalLM"
    assert report.count("gated_mlp") == 30 and not report.skipped
    for site in report.sites:
        # 576×1536: break-even 418.9, 0.8·418.9 = 335.1 → 256 with 128-aligned ranks
        assert [(m.in_features, m.out_features, m.rank) for m in site.matrices] == [
            (576, 1536, 256),
            (576, 1536, 256),
            (1536, 576, 256),
        ]
    removed = 30 * 3 * (576 * 1536 - 256 * (576 + 1536))
    assert report.params_removed == removed
    assert sum(p.numel() for p in optimized.parameters()) == dense_params - removed
    with torch.no_grad():
        out = optimized.generate(ids, max_new_tokens=8, do_sample=False)
    new_tokens = out[0, ids.shape[1] :]
    assert new_tokens.numel() == 8
    assert len(tokenizer.decode(new_tokens, skip_special_tokens=True).strip()) > 0

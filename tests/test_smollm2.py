"""The real SmolLM2-135M from its PyPI package: every MLP rewritten, and it still generates."""

import pytest
import torch

import neuronmm_fx
from neuronmm_fx.models import load_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_smollm2_default_call_meets_the_budget_and_keeps_the_answer(smollm2):
    model, tokenizer = smollm2
    dense_params = sum(p.numel() for p in model.parameters())
    mlp_params = 30 * 3 * 576 * 1536
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

    # the one-line call: global allocation, sequential, self-calibrated
    optimized = neuronmm_fx.optimize(model, ratio=0.2)

    report = neuronmm_fx.report_of(optimized)
    assert type(optimized).__name__ == "LlamaForCausalLM"
    dense_sites = [s for s in report.skipped if "every matrix stays dense" in s.reason]
    assert report.count("gated_mlp") + len(dense_sites) == 30 and len(report.skipped) == len(dense_sites)
    ranks = [m.rank for site in report.sites for m in site.matrices]
    assert set(ranks) <= {None, 128, 256, 384} and None in ranks  # some matrices are left dense
    # 20 % of the MLP parameters removed, to within one block of one 576×1536 matrix
    assert 0.2 * mlp_params - 1 <= report.params_removed < 0.2 * mlp_params + 128 * (576 + 1536)
    assert sum(p.numel() for p in optimized.parameters()) == dense_params - report.params_removed
    assert "Fisher-weighted" in report.calibration and "block by block" in report.calibration
    with torch.no_grad():
        out = optimized.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

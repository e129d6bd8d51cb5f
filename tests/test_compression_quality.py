"""Whitened compression, rank allocation, fine-tuning, evaluation, and save/load."""

import math

import pytest
import torch
from helpers import LAYERS, make_low_rank_, model_output, tiny_llama, tiny_model, token_ids
from torch import nn

import neuronmm_fx
from neuronmm_fx import ConfigError
from neuronmm_fx.checkpoint import CheckpointError, load_compressed, save_compressed
from neuronmm_fx.compress.calibration import split_tokens
from neuronmm_fx.compress.factorize import WhitenedSVD, whitening
from neuronmm_fx.compress.finetune import FinetuneConfig, distillation_loss, finetune
from neuronmm_fx.compress.ranks import MatrixShape, allocate_global, truncation_loss
from neuronmm_fx.evaluate import fidelity, perplexity
from neuronmm_fx.passes.match import break_even_rank

# --- whitening ------------------------------------------------------------------------------------


def _whitened_reconstruction(inputs: torch.Tensor, weight: torch.Tensor, rank: int):
    """The factors :class:`WhitenedSVD` gives ``weight`` (in, out) for these calibration inputs."""
    gram = inputs.double().t() @ inputs.double()
    factorize = WhitenedSVD({"x": gram}, gram_key=lambda projection: "x")
    u, v = factorize(None, weight.double(), rank)
    return u, v


def test_whitening_a_gram_with_a_dead_channel_gives_finite_exact_factors():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 12, generator=generator)
    inputs[:, 3] = 0.0  # a channel that never fires
    weight = torch.randn(12, 9, generator=generator)
    u, v = _whitened_reconstruction(inputs, weight, rank=9)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(
        inputs.double() @ u @ v, inputs.double() @ weight.double(), rtol=1e-6, atol=1e-6
    )


def test_whitening_a_rank_deficient_gram_keeps_the_calibration_output():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 16, generator=generator)  # 5 tokens: a Gram of rank 5 in 16 dimensions
    weight = torch.randn(16, 10, generator=generator)
    u, v = _whitened_reconstruction(inputs, weight, rank=5)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # five directions carry all the calibration data, so rank 5 reproduces its outputs
    torch.testing.assert_close(
        inputs.double() @ u @ v, inputs.double() @ weight.double(), rtol=1e-5, atol=1e-5
    )


def test_whitening_an_all_zero_gram_is_the_identity():
    s_t, s_inv_t = whitening(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(s_t, torch.eye(4, dtype=torch.float64)) and torch.equal(s_inv_t, s_t)


def test_whitened_beats_plain_svd_on_the_calibration_data():
    torch.manual_seed(0)
    model = tiny_model("llama")
    calibration = [token_ids(batch=4, length=32, seed=s) for s in range(4)]
    ids = token_ids(batch=2, length=32, seed=99)
    dense = model_output(model, ids)

    def error(method):
        fresh = tiny_model("llama")
        neuronmm_fx.optimize(fresh, ratio=0.5, block=8, method=method, calibration=calibration)
        return (model_output(fresh, ids) - dense).pow(2).mean().item()

    # random weights have flat spectra; whitening still has to win where the inputs are not isotropic
    assert error("whiten") < error("svd")


# --- method choice and its report -----------------------------------------------------------------


def test_auto_whitens_a_causal_lm_on_its_own_text_and_says_so():
    model = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.2, block=8)
    report = neuronmm_fx.report_of(model)
    assert report.method == "auto" and "self-generated" in report.calibration
    assert {m.method for s in report.sites for m in s.matrices if m.rank is not None} == {"whiten"}


def test_auto_falls_back_to_plain_svd_without_calibration_and_says_why():
    model = neuronmm_fx.optimize(tiny_model("bert"), ratio=0.2, block=8)
    report = neuronmm_fx.report_of(model)
    assert {m.method for s in report.sites for m in s.matrices} == {"svd"}
    assert "no calibration data was given and the model cannot generate its own" in report.calibration


def test_whiten_without_data_is_refused_and_texts_need_a_tokenizer():
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
    with pytest.raises(ConfigError, match="method='whiten' needs calibration data"):
        neuronmm_fx.optimize(mlp, ratio=0.2, block=4, method="whiten")
    with pytest.raises(ValueError, match="calibration texts need a tokenizer"):
        neuronmm_fx.optimize(tiny_model("llama"), ratio=0.2, block=8, calibration=["some text"])


def test_feature_calibration_for_a_model_without_tokens():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    fused = neuronmm_fx.optimize(mlp, ratio=0.2, block=4, calibration=[torch.randn(32, 16)])
    report = neuronmm_fx.report_of(fused)
    assert {m.method for m in report.sites[0].matrices if m.rank is not None} == {"whiten"}
    assert "1 user batch(es)" in report.calibration


# --- global allocation ----------------------------------------------------------------------------


def test_global_allocation_meets_the_budget_with_block_multiples():
    generator = torch.Generator().manual_seed(0)
    shapes = [(576, 1536), (1536, 576), (576, 1536), (1024, 1024), (300, 700)] * 3
    matrices = []
    for index, (rows, cols) in enumerate(shapes):
        decay = 0.5 + index % 4  # different spectra: some matrices compress far better than others
        singular = torch.exp(-decay * torch.linspace(0, 4, min(rows, cols))) * torch.rand(
            1, generator=generator
        )
        matrices.append(MatrixShape(index, rows, cols, truncation_loss(singular)))
    block, ratio = 128, 0.2
    decisions = allocate_global(matrices, ratio, block)
    dense = sum(r * c for r, c in shapes)
    after = 0
    biggest_step = 0
    for m in matrices:
        rank = decisions[m.key].rank
        width = m.in_features + m.out_features
        if rank is None:
            after += m.in_features * m.out_features
        else:
            assert rank % block == 0 and 0 < rank < break_even_rank(m.in_features, m.out_features)
            after += rank * width
        biggest_step = max(biggest_step, block * width)
    budget = (1 - ratio) * dense
    assert budget - biggest_step < after <= budget  # met, within one block of one matrix


def test_global_allocation_spends_parameters_where_the_loss_is():
    steep = torch.exp(-torch.arange(512.0) / 8)  # almost all energy in a few directions
    flat = torch.ones(512)
    matrices = [
        MatrixShape("steep", 512, 512, truncation_loss(steep)),
        MatrixShape("flat", 512, 512, truncation_loss(flat)),
    ]
    decisions = allocate_global(matrices, 0.3, 32)
    assert decisions["steep"].rank is not None
    assert decisions["flat"].rank is None or decisions["flat"].rank > decisions["steep"].rank


def test_global_allocation_in_optimize_meets_the_mlp_budget():
    model = tiny_model("llama")
    before = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    optimized = neuronmm_fx.optimize(model, ratio=0.3, block=8, allocation="global")
    report = neuronmm_fx.report_of(optimized)
    after = sum(p.numel() for layer in optimized.model.layers for p in layer.mlp.parameters())
    assert report.allocation == "global" and len(report.sites) == LAYERS
    assert 0.7 * before - 8 * (64 + 128) < after <= 0.7 * before
    assert all(m.rank is None or m.rank % 8 == 0 for s in report.sites for m in s.matrices)


# --- fine-tuning --------------------------------------------------------------------------------


def test_finetuning_lowers_the_calibration_loss_and_trains_only_factors():
    teacher = tiny_model("llama")
    student = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.5, block=8, method="svd")
    batches = [token_ids(batch=2, length=24, seed=s) for s in range(3)]
    frozen_before = {k: v.clone() for k, v in student.named_parameters() if "mlp" not in k}
    with torch.no_grad():
        before = sum(distillation_loss(student, teacher, b).item() for b in batches)
    result = finetune(student, teacher, batches, FinetuneConfig(steps=12, lr=3e-3, seed=0, progress=False))
    with torch.no_grad():
        after = sum(distillation_loss(student, teacher, b).item() for b in batches)
    assert result.steps == 12 and after < 0.8 * before
    for name, value in student.named_parameters():
        if "mlp" not in name:
            assert torch.equal(value, frozen_before[name]), name


def test_finetuning_is_deterministic_for_a_seed():
    teacher = tiny_model("llama")
    batches = [token_ids(batch=1, length=16, seed=s) for s in range(2)]
    losses = []
    for _ in range(2):
        student = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.5, block=8, method="svd")
        losses.append(
            finetune(student, teacher, batches, FinetuneConfig(steps=3, lr=1e-3, progress=False)).losses
        )
    assert losses[0] == losses[1]


def test_optimize_can_finetune_as_its_last_step():
    model = neuronmm_fx.optimize(
        tiny_model("llama"),
        ratio=0.5,
        block=8,
        method="svd",
        finetune=FinetuneConfig(steps=4, lr=3e-3, progress=False),
    )
    report = neuronmm_fx.report_of(model)
    assert report.finetune["steps"] == 4 and report.finetune["last_loss"] < report.finetune["first_loss"]
    assert report.timings["finetune_s"] > 0
    with pytest.raises(ConfigError, match="finetune= distils a causal language model"):
        neuronmm_fx.optimize(tiny_model("bert"), ratio=0.2, block=8, finetune=FinetuneConfig(steps=1))


# --- evaluation -----------------------------------------------------------------------------------


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama")
    ids = token_ids(batch=1, length=40, seed=3)[0]
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
    result = perplexity(model, ids, seq_len=64)
    assert result.tokens == 39 and math.isclose(result.perplexity, math.exp(nll), rel_tol=1e-5)


def test_strided_windows_score_every_token_once():
    model = tiny_model("llama")
    ids = token_ids(batch=1, length=50, seed=4)[0]
    assert perplexity(model, ids, seq_len=16, stride=8).tokens == 49
    assert perplexity(model, ids, seq_len=16).tokens == 50 - math.ceil(50 / 16)


def test_fidelity_of_a_model_to_itself_is_perfect():
    model = tiny_model("llama")
    ids = token_ids(batch=1, length=30, seed=5)[0]
    result = fidelity(model, model, ids, seq_len=16)
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.top1_agreement == 1.0


def test_split_tokens_cuts_full_sequences_and_keeps_the_tail():
    pieces = split_tokens(torch.arange(100), 30, max_tokens=95)
    assert [p.shape for p in pieces] == [(1, 30)] * 3 + [(1, 5)]
    assert torch.equal(pieces[1][0], torch.arange(30, 60)) and torch.equal(pieces[3][0], torch.arange(90, 95))
    assert [p.shape[1] for p in split_tokens(torch.arange(61), 30)] == [30, 30]  # a 1-token tail is no text


# --- save and load --------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = neuronmm_fx.optimize(
        make_low_rank_(tiny_model("phi3"), 8), ratio=0.2, block=8, allocation="global"
    )
    save_compressed(model, tmp_path)
    fresh = tiny_model("phi3", seed=7)  # different weights: everything must come from the checkpoint
    load_compressed(fresh, tmp_path)
    ids = token_ids()
    assert torch.equal(model_output(fresh, ids), model_output(model, ids))
    assert neuronmm_fx.report_of(fresh).params_removed == neuronmm_fx.report_of(model).params_removed


def test_save_load_works_for_chain_installs(tmp_path):
    model = neuronmm_fx.optimize(tiny_model("opt"), ratio=0.2, block=8, method="svd")
    save_compressed(model, tmp_path)
    fresh = load_compressed(tiny_model("opt", seed=3), tmp_path)
    ids = token_ids()
    assert torch.equal(model_output(fresh, ids), model_output(model, ids))


def test_checkpoints_keep_the_gate_up_layout_they_were_saved_in(tmp_path):
    import json

    from neuronmm_fx.checkpoint import RECIPE_FILE
    from neuronmm_fx.install import set_submodule
    from neuronmm_fx.modules import CompressedMLP

    model = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.2, block=8, method="svd", allocation="uniform")
    ids = token_ids()
    save_compressed(model, tmp_path / "joint")
    joint = load_compressed(tiny_model("llama", seed=3), tmp_path / "joint")
    mlps = [m for m in joint.modules() if isinstance(m, CompressedMLP)]
    assert len(mlps) == LAYERS and all(m.shares_first for m in mlps)
    assert torch.equal(model_output(joint, ids), model_output(model, ids))

    # format 3 stored gate_u and up_u apart: such a checkpoint loads into modules that keep them apart
    for path, module in list(model.named_modules()):
        if isinstance(module, CompressedMLP):
            factors = {role: module.factors(role) for role in module.roles}
            for part in factors["gate"], factors["up"]:
                part.u = part.u.detach().clone()  # own storage, as format 3 wrote them
            apart = CompressedMLP(
                module.activation, factors["gate"], factors["down"], up=factors["up"], share_first=False
            )
            set_submodule(model, path, apart)
    save_compressed(model, tmp_path / "apart")
    recipe_path = tmp_path / "apart" / RECIPE_FILE
    recipe = json.loads(recipe_path.read_text())
    shapes = next(iter(recipe["replaced"].values()))["shapes"]
    assert "gate_u" in shapes and "gate_up_u" not in shapes
    recipe_path.write_text(json.dumps({**recipe, "format": 3}))
    apart = load_compressed(tiny_model("llama", seed=4), tmp_path / "apart")
    mlps = [m for m in apart.modules() if isinstance(m, CompressedMLP)]
    assert len(mlps) == LAYERS and not any(m.shares_first for m in mlps)
    torch.testing.assert_close(model_output(apart, ids), model_output(joint, ids), rtol=1e-5, atol=1e-5)


def test_a_mismatched_checkpoint_is_refused_and_the_model_untouched(tmp_path):
    model = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.2, block=8, method="svd")
    save_compressed(model, tmp_path)
    with pytest.raises(
        CheckpointError, match="the checkpoint is for a LlamaForCausalLM, not a Qwen3ForCausalLM"
    ):
        load_compressed(tiny_model("qwen3"), tmp_path)

    wider = tiny_llama(intermediate_size=160)
    types = [type(m) for m in wider.modules()]
    with pytest.raises(
        CheckpointError, match=r"mlp.gate_proj.weight is \(160, 64\) in this model but .* 64×128"
    ):
        load_compressed(wider, tmp_path)
    assert [type(m) for m in wider.modules()] == types
    model.lm_head = nn.Linear(64, 100, bias=True)  # a tensor the fresh model lacks
    save_compressed(model, tmp_path, overwrite=True)
    with pytest.raises(
        CheckpointError, match=r"tensors do not fit this model: missing \[\], unexpected \['lm_head.bias'\]"
    ):
        load_compressed(tiny_model("llama"), tmp_path)
    with pytest.raises(CheckpointError, match="is not a neuronmm_fx checkpoint"):
        load_compressed(tiny_model("llama"), tmp_path / "nowhere")

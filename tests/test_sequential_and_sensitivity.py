"""Quality by default: measured sensitivity, free global allocation, sequential compression,
reusable calibration, and the fine-tuning schedule."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import make_low_rank_, model_output, tiny_model, token_ids
from torch import nn

import neuronmm_fx
from neuronmm_fx import ConfigError
from neuronmm_fx.compress import sensitivity
from neuronmm_fx.compress.calibration import Calibration, calibrate
from neuronmm_fx.compress.factorize import GRAM_BLOCKED_WIDTH, GRAM_BLOCKS, gram, svd_by_gram, whitening
from neuronmm_fx.compress.finetune import FinetuneConfig, _held_out_loss, _split, finetune
from neuronmm_fx.compress.ranks import MatrixShape, allocate_global, weighted_truncation_loss
from neuronmm_fx.passes.match import break_even_rank

# --- allocation -----------------------------------------------------------------------------------


def _flat_loss(scale: float):
    return weighted_truncation_loss(torch.ones(576), torch.full((576,), scale))


def test_allocation_meets_the_budget_and_leaves_the_most_sensitive_matrix_dense():
    shapes = {"fragile": (576, 1536), "robust_a": (576, 1536), "robust_b": (1536, 576)}
    scales = {"fragile": 1000.0, "robust_a": 1.0, "robust_b": 1.0}
    matrices = [MatrixShape(k, *shapes[k], _flat_loss(scales[k])) for k in shapes]
    decisions = allocate_global(matrices, ratio=0.2, block=128)
    assert decisions["fragile"].rank is None
    assert "kept it dense" in decisions["fragile"].reason
    dense = sum(k * n for k, n in shapes.values())
    after = sum(
        k * n if decisions[key].rank is None else decisions[key].rank * (k + n)
        for key, (k, n) in shapes.items()
    )
    one_block = 128 * (576 + 1536)
    assert 0.8 * dense - one_block < after <= 0.8 * dense
    for key, (k, n) in shapes.items():
        rank = decisions[key].rank
        assert rank is None or (rank % 128 == 0 and rank < break_even_rank(k, n))


def test_allocation_may_cut_one_matrix_deep_rather_than_all_a_little():
    # the first direction carries everything: rank 128 loses nothing, so cutting deep is free
    steep = weighted_truncation_loss(torch.cat([torch.ones(1), torch.zeros(575)]), torch.ones(576))
    matrices = [MatrixShape("steep", 576, 1536, steep), MatrixShape("flat", 576, 1536, _flat_loss(1.0))]
    decisions = allocate_global(matrices, ratio=0.3, block=128)
    assert decisions["steep"].rank == 128 and decisions["flat"].rank is None


def test_weighted_truncation_loss_sums_the_dropped_directions():
    loss = weighted_truncation_loss(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 0.5, 2.0]))
    assert [loss(r) for r in (0, 1, 2, 3)] == pytest.approx([9 + 2 + 2, 2 + 2, 2, 0])


def test_svd_by_gram_equals_the_svd_for_wide_and_tall_matrices():
    generator = torch.Generator().manual_seed(0)
    for shape in ((12, 30), (30, 12)):
        matrix = torch.randn(*shape, generator=generator, dtype=torch.float64)
        left, singular, right_t = svd_by_gram(matrix)
        torch.testing.assert_close(singular, torch.linalg.svdvals(matrix))
        torch.testing.assert_close(left @ torch.diag(singular) @ right_t, matrix)


@pytest.mark.parametrize("width", [GRAM_BLOCKED_WIDTH - 1, GRAM_BLOCKED_WIDTH, 577, 1536])
def test_gram_multiplies_the_upper_block_triangle_and_equals_the_full_product(width):
    x = torch.randn(40, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    product = gram(x)
    torch.testing.assert_close(product, x.t() @ x, rtol=1e-12, atol=1e-10)
    if width >= GRAM_BLOCKED_WIDTH:  # blocks below the diagonal blocks are copies: exactly symmetric
        block = torch.arange(width) // -(-width // GRAM_BLOCKS)
        apart = block[:, None] != block[None, :]
        assert torch.equal(product[apart], product.t()[apart])
    assert product.dtype == x.dtype and product.shape == (width, width)


# --- sensitivity ----------------------------------------------------------------------------------


class TwoPathLM(nn.Module):
    """Embedding → two identical projections; logits = head(loud(e)) + 0.1·head(quiet(e))."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.loud = nn.Linear(width, width, bias=False)
        self.quiet = nn.Linear(width, width, bias=False)
        self.quiet.weight.data.copy_(self.loud.weight.data)
        self.head = nn.Linear(width, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids, use_cache=False):
        e = self.embed(ids)
        return SimpleNamespace(logits=self.head(self.loud(e)) + 0.1 * self.head(self.quiet(e)))


def test_sensitivity_ranks_the_matrix_whose_compression_hurts_more_above_the_other():
    model = TwoPathLM()
    batches = [torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))]
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    fisher, why = sensitivity.output_fisher(model, {"loud": "loud", "quiet": "quiet"}, batches, 1024)
    assert why == "" and all(p.grad is None for p in model.parameters())
    assert requires_grad == {name: p.requires_grad for name, p in model.named_parameters()}
    # the gradient at `quiet` is the one at `loud` scaled by 0.1: Fisher 100× smaller
    torch.testing.assert_close(fisher["quiet"] * 100, fisher["loud"], rtol=1e-6, atol=0)
    s_t, _ = whitening(torch.eye(16, dtype=torch.float64), inverse=False)
    loud = sensitivity.loss_curve(s_t, model.loud.weight.detach().t(), fisher["loud"])
    quiet = sensitivity.loss_curve(s_t, model.quiet.weight.detach().t(), fisher["quiet"])
    assert loud(4) > 50 * quiet(4) > 0
    decisions = allocate_global(
        [MatrixShape("loud", 16, 16, loud), MatrixShape("quiet", 16, 16, quiet)], ratio=0.4, block=2
    )
    quiet_rank = decisions["quiet"].rank
    assert quiet_rank is not None
    assert decisions["loud"].rank is None or decisions["loud"].rank > quiet_rank


def test_checkpointed_fisher_equals_the_plain_backward_and_leaves_the_blocks_as_they_were():
    from neuronmm_fx.compress import layerwise

    model = tiny_model("llama")
    paths = [name for name, module in model.named_modules() if name.endswith("mlp.down_proj")]
    stack, why = layerwise.find_layer_stack(model, paths)
    assert stack is not None, why
    batches = [token_ids(batch=2, length=24)]
    outputs = {path: path for path in paths}
    plain, _ = sensitivity.output_fisher(model, outputs, batches, 1024)
    saved_activations = []

    def count(tensor):
        saved_activations.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        checkpointed, _ = sensitivity.output_fisher(model, outputs, batches, 1024, stack)
    for path in paths:
        torch.testing.assert_close(checkpointed[path], plain[path], rtol=1e-5, atol=1e-12)
    assert all("forward" not in vars(block) for block in stack.blocks)
    assert all(p.grad is None for p in model.parameters())
    # only block inputs (and the head's tensors) are saved for backward, not every block's internals
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        saved_activations.clear()
        sensitivity.output_fisher(model, outputs, batches, 1024)
        plain_saved = sum(saved_activations)
        saved_activations.clear()
        sensitivity.output_fisher(model, outputs, batches, 1024, stack)
        assert sum(saved_activations) < plain_saved / 2


def test_the_default_call_allocates_globally_by_measured_sensitivity():
    model = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.3, block=8)
    report = neuronmm_fx.report_of(model)
    assert report.allocation == "global"
    assert "ranks allocated by Fisher-weighted whitened truncation error" in report.calibration
    assert "factored block by block" in report.calibration
    notes = {m.role: m.method_note for s in report.sites for m in s.matrices if m.rank is not None}
    assert notes and all(note.startswith("sequential: ") for note in notes.values())


# --- sequential compression -----------------------------------------------------------------------


class ResidualStack(nn.Module):
    """Two pre-norm residual MLP blocks over float features: each block's input depends on the last."""

    def __init__(self, width: int = 24, hidden: int = 96) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width),
                    "mlp": nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)),
                }
            )
            for _ in range(2)
        )
        for block in self.layers:  # a strong first block: compressing it moves the second's inputs
            block["mlp"][0].weight.data *= 3.0

    def forward(self, x):
        for block in self.layers:
            x = x + block["mlp"](block["norm"](x))
        return x


class _Block(nn.Module):
    def __init__(self, norm: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ResidualModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        source = ResidualStack()
        self.layers = nn.ModuleList(_Block(b["norm"], b["mlp"]) for b in source.layers)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_sequential_compression_beats_independent_when_upstream_compression_shifts_inputs():
    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(24, 24, generator=generator) * torch.logspace(0, -1.5, 24)  # anisotropic inputs
    calibration = [torch.randn(256, 24, generator=generator) @ mixing for _ in range(8)]
    held_out = torch.randn(512, 24, generator=generator) @ mixing
    dense = ResidualModel().eval()
    reference = dense(held_out).detach()
    errors = {}
    for sequential in (False, True):
        model = neuronmm_fx.optimize(
            copy.deepcopy(dense),
            ratio=0.6,
            block=4,
            allocation="uniform",
            calibration=calibration,
            calibration_dtype="float32",
            sequential=sequential,
            example_inputs=(held_out[:8],),
        )
        report = neuronmm_fx.report_of(model)
        assert ("block by block" in report.calibration) is sequential
        errors[sequential] = (model(held_out) - reference).square().mean().item()
    assert errors[True] < 0.95 * errors[False]


def test_sequential_factors_are_exact_on_exactly_low_rank_weights():
    model = make_low_rank_(tiny_model("qwen3"), 8)
    ids = token_ids()
    reference = model_output(model, ids)
    optimized = neuronmm_fx.optimize(
        model, ratio=0.5, block=8, allocation="uniform", calibration_dtype="float32"
    )
    assert "block by block" in neuronmm_fx.report_of(optimized).calibration
    torch.testing.assert_close(model_output(optimized, ids), reference, rtol=1e-4, atol=1e-4)


# --- reusable calibration -------------------------------------------------------------------------


def test_a_calibration_is_reused_across_calls_and_refused_for_another_model(monkeypatch):
    model = tiny_model("llama")
    calibration = calibrate(model, tokens=512)
    assert isinstance(calibration, Calibration) and calibration.tokens == 512
    measured = []
    real = sensitivity.output_fisher
    monkeypatch.setattr(sensitivity, "output_fisher", lambda *a, **k: measured.append(1) or real(*a, **k))
    first = neuronmm_fx.optimize(copy.deepcopy(model), ratio=0.2, block=8, calibration=calibration)
    second = neuronmm_fx.optimize(copy.deepcopy(model), ratio=0.4, block=8, calibration=calibration)
    assert len(measured) == 1  # the loss curves were measured once, for both ratios
    assert neuronmm_fx.report_of(second).params_removed > neuronmm_fx.report_of(first).params_removed
    other = tiny_model("llama", seed=1)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="made for another model"):
        neuronmm_fx.optimize(other, ratio=0.2, block=8, calibration=calibration)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    with pytest.raises(ConfigError, match="tokens must be a positive integer"):
        calibrate(model, tokens=0)


def first_token(model) -> int:
    return model.config.bos_token_id


def test_self_generated_calibration_is_deterministic_deduplicated_and_packed():
    model = tiny_model("llama")
    first, second = calibrate(model, tokens=640), calibrate(model, tokens=640)
    assert all(torch.equal(a, b) for a, b in zip(first.batches, second.batches, strict=True))
    # 10 sequences of 64 tokens: tiny LLaMA allows 2048 positions, so 8 are packed into one row of 512
    assert [tuple(b.shape) for b in first.batches] == [(1, 512), (2, 64)]
    rows = torch.cat([b.reshape(-1, 64) for b in first.batches])
    assert (rows[:, 0] == first_token(model)).all()  # every packed sequence starts at BOS
    prefixes = {tuple(row[1:9].tolist()) for row in rows}
    assert len(prefixes) == rows.shape[0]  # no two kept sequences start alike
    assert "self-generated" in first.source and "packed into rows of 512" in first.source


# --- fine-tuning schedule and early stop ----------------------------------------------------------


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    config = FinetuneConfig(steps=20, lr=1e-3, warmup=0.1)
    rates = [config.learning_rate(step) for step in range(20)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # two warm-up steps
    assert rates[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))  # non-increasing after the warm-up
    assert rates[11] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 18)).item()))
    assert rates[-1] < 1e-5


def test_early_stopping_keeps_the_best_held_out_factors():
    teacher = tiny_model("llama")
    student = neuronmm_fx.optimize(tiny_model("llama"), ratio=0.5, block=8, method="svd")
    batches = [token_ids(batch=4, length=64, seed=s) for s in range(5)]  # 5 steps of 256 tokens
    result = finetune(
        student,
        teacher,
        batches,
        FinetuneConfig(steps=40, lr=5.0, warmup=0.0, eval_every=2, patience=2, progress=False),
    )
    assert result.stopped_early and result.steps < 40  # a huge rate makes held-out KL rise
    best = min(loss for _, loss in result.held_out)
    assert result.held_out[-1][1] > best
    training, held = _split(batches)
    assert len(held) == 1 and len(training) == 2  # 1,280 tokens: three steps of 512, the last held out
    assert _held_out_loss(student, teacher, held) == pytest.approx(best, rel=1e-5)
    assert len(result.learning_rates) == result.steps == len(result.losses)


def test_fisher_weighted_factors_lose_less_where_the_loss_is_sensitive():
    from neuronmm_fx.compress.factorize import fisher_weights, split_factors, whitened_svd

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 16, generator=generator, dtype=torch.float64)  # (in, out)
    fisher = torch.ones(16, dtype=torch.float64)
    fisher[:4] = 50.0  # four output channels the loss is sensitive to
    identity = torch.eye(24, dtype=torch.float64)

    def weighted_error(weights):
        u, v = split_factors(*whitened_svd(identity, weight, weights), 6, torch.float64)
        return float(((u @ v - weight).square().sum(0) * fisher).sum())

    weights = fisher_weights(fisher)
    torch.testing.assert_close(weights, (fisher / fisher.mean() + 1.0).sqrt())
    assert weighted_error(weights) < 0.8 * weighted_error(None)
    # weights undone on the right factor: full rank still reproduces the weight exactly
    u, v = split_factors(*whitened_svd(identity, weight, weights), 16, torch.float64)
    torch.testing.assert_close(u @ v, weight)
    assert fisher_weights(torch.zeros(16)) is None and fisher_weights(None) is None


# --- memory: no copies of what stays dense, one layer's KV cache ----------------------------------


class _Wrapped(nn.Module):
    """A plain MLP whose second projection (64 → 4) is too narrow to factor at block 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("tuned", [False, True])
def test_a_projection_left_dense_shares_its_weight_unless_fine_tuning_may_write_it(tuned, monkeypatch):
    from neuronmm_fx import api

    model = _Wrapped()
    weight, bias = model.mlp[2].weight, model.mlp[2].bias
    inputs = torch.randn(8, 16)
    reference = model(inputs)
    if tuned:  # fine-tuning needs a language model; only its effect on copying is under test here
        monkeypatch.setattr(api, "can_generate", lambda m: True)
        monkeypatch.setattr(api, "_finetune", lambda *args: {})
        monkeypatch.setattr(api, "_finetune_data", lambda *args: None)
    finetune = neuronmm_fx.FinetuneConfig(steps=1) if tuned else None
    optimized = neuronmm_fx.optimize(
        model,
        ratio=0.2,
        block=4,
        method="svd",
        allocation="uniform",
        example_inputs=(inputs,),
        finetune=finetune,
    )
    fused = optimized.mlp
    assert fused.in_v is not None and fused.out_v is None  # the first projection factored, the second dense
    shares = fused.out_u.data_ptr() == weight.data_ptr() and fused.out_bias.data_ptr() == bias.data_ptr()
    assert shares is not tuned
    torch.testing.assert_close(fused.out_u, weight.detach().t())
    torch.testing.assert_close(optimized(inputs), reference, rtol=0.5, atol=0.5)


def test_calibration_text_is_sampled_in_batches_whose_kv_cache_fits_the_budget(monkeypatch):
    from neuronmm_fx.compress import calibration as calib

    model = tiny_model("llama")
    per_sequence = calib.kv_bytes_per_sequence(model, 64, torch.bfloat16)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert per_sequence == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 64 * 2
    assert calib.generation_batch(model, 64, torch.bfloat16) == calib.GENERATION_BATCH
    monkeypatch.setattr(calib, "GENERATION_KV_BUDGET", 3 * per_sequence + 1)
    assert calib.generation_batch(model, 64, torch.bfloat16) == 3
    widths = []
    real = calib._sample_sequences
    monkeypatch.setattr(
        calib, "_sample_sequences", lambda m, start, *a: widths.append(start.shape[0]) or real(m, start, *a)
    )
    calib.self_generated(model, 10, 64)
    assert widths == [3, 3, 3, 1]


def test_replaying_what_ran_before_the_mlp_gives_the_factors_of_rerunning_the_whole_block(monkeypatch):
    from neuronmm_fx.compress import sequential

    calibration = [token_ids(batch=2, length=32, seed=s) for s in range(4)]
    results, attention_calls = {}, {}
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(sequential, "container_of", lambda jobs: "")
        model = tiny_model("llama")
        calls = {"n": 0}
        for layer in model.model.layers:  # q_proj runs only when attention is computed, not replayed
            layer.self_attn.q_proj.register_forward_pre_hook(
                lambda *args, calls=calls: calls.__setitem__("n", calls["n"] + 1)
            )
        optimized = neuronmm_fx.optimize(
            model,
            ratio=0.3,
            block=8,
            allocation="uniform",
            calibration=calibration,
            calibration_dtype="float32",
        )
        results[replay] = {k: v.detach().clone() for k, v in optimized.state_dict().items()}
        attention_calls[replay] = calls["n"]
    assert results[True].keys() == results[False].keys()
    for name, value in results[True].items():
        torch.testing.assert_close(value, results[False][name], rtol=1e-5, atol=1e-6, msg=name)
    # attention no longer runs for the pass over the compressed intermediate (every block) nor for
    # the compressed block's outputs (every block but the last); the 256 tokens are one batch
    layers = len(model.model.layers)
    assert attention_calls[False] - attention_calls[True] == 2 * layers - 1

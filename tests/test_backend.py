"""torch.compile(backend="neuronmm"): registration, rewrites on Dynamo graphs, options, records, dumps."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from helpers import tiny_decoder
from torch import nn
from torch._inductor.utils import run_and_get_code

import neuronmm_fx
from neuronmm_fx import backend
from neuronmm_fx.compress.ranks import uniform_rank
from neuronmm_fx.frontends import dynamo
from neuronmm_fx.kernels.dispatch import use_standin_kernels
from neuronmm_fx.modules import CompressedMLP
from neuronmm_fx.passes.ir import clean_module_path
from neuronmm_fx.passes.lower import FLAT_INPUT, Lower, PanelMatmul, float32_matmul

EAGER = {"compiler": "eager"}


def tiny_llama() -> nn.Module:
    return tiny_decoder("llama")


def tiny_qwen3() -> nn.Module:
    return tiny_decoder("qwen3")


class SvdLlmLinear(nn.Module):
    """An SVD-LLM-style factored linear: ``u_proj(v_proj(x))``, ``v_proj`` K→r without bias."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.v_proj = nn.Linear(linear.in_features, rank, bias=False)
        self.u_proj = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u_proj(self.v_proj(x))


def svd_llm_llama() -> nn.Module:
    """Tiny LLaMA whose MLP projections and o_proj are low-rank pairs, as in an SVD-LLM checkpoint."""
    model = tiny_llama()
    torch.manual_seed(1)
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, SvdLlmLinear(getattr(layer.mlp, name), 16))
        layer.self_attn.o_proj = SvdLlmLinear(layer.self_attn.o_proj, 8)
    return model


IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8]])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    backend.clear_records()
    yield
    torch._dynamo.reset()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_backend_is_registered_by_entry_point_without_importing_the_package():
    script = (
        "import sys, torch\n"
        "assert 'neuronmm' in torch._dynamo.list_backends()\n"
        "assert 'neuronmm_fx' not in sys.modules\n"
        "lin = torch.nn.Linear(4, 3)\n"
        "x = torch.randn(2, 4)\n"
        "out = torch.compile(lin, backend='neuronmm', options={'compiler': 'eager'})(x)\n"
        "assert torch.allclose(out, lin(x))\n"
        "assert 'neuronmm_fx.backend' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# Inductor compiles take seconds each on two cores: one model goes through it, the other through "eager".
@pytest.mark.parametrize(
    ("make", "compiler"), [(tiny_llama, "inductor"), (tiny_qwen3, "eager")], ids=["llama", "qwen3"]
)
def test_optimized_model_compiles_with_its_ops_written_out_where_no_kernel_implements_them(make, compiler):
    model = neuronmm_fx.optimize(make(), ratio=0.05, block=8, method="svd", allocation="uniform")
    assert isinstance(model.model.layers[0].mlp, CompressedMLP)
    expected = logits(model)
    options = {} if compiler == "inductor" else EAGER  # inductor is the default
    got = logits(torch.compile(model, backend="neuronmm", options=options))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    assert record.compiler == compiler
    assert record.existing["neuronmm::svd_mlp"] == 2
    assert record.count("svd_mlp") == 2
    assert (
        record.form == "decomposed" and "no kernel implements the neuronmm ops on cpu" in record.form_reason
    )
    assert "neuronmm.svd_mlp" in record.after  # the rewrite, then written out for the compiler
    assert "neuronmm.svd_mlp" not in record.handed and "silu" in record.handed
    assert "handed on decomposed" in record.summary()


def _generated_code(model, options: dict | None = None) -> tuple[torch.Tensor, str]:
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend="neuronmm", options=options), IDS)
    return out.logits, "\n".join(codes)


def wide_llama() -> nn.Module:
    """Tiny LLaMA compressed with an intermediate size of 512: per MLP, the gate and up second factors
    (r, 512) split into two column panels of 256; [U_gate | U_up] (64, 2r), U_down (512, r) and
    V_down (r, 64) are narrower than two panels of 128."""
    model = tiny_decoder(intermediate_size=512)
    return neuronmm_fx.optimize(model, ratio=0.05, block=8, method="svd", allocation="uniform")


@pytest.mark.parametrize("panels", [2, 1])
def test_lowered_products_by_wide_factors_take_one_column_panel_per_thread(panels):
    model = wide_llama()
    expected = logits(model)
    got = logits(torch.compile(model, backend="neuronmm", options={**EAGER, "gemm_panels": panels}))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    assert record.gemm_panels == panels
    bmm_calls = record.handed.count("call_function[bmm]")
    if panels == 2:  # 2 MLPs: V_gate and V_up on panels, the 3 narrower products one mm each
        assert (record.paneled, bmm_calls) == (4, 4)
        assert sum(record.whole.values()) == 6
        assert all(reason.endswith("do not make 2 panels of at least 128") for reason in record.whole)
    else:
        assert (record.paneled, bmm_calls) == (0, 0)
        assert record.whole == Counter({"one panel asked": 10})
    assert f"{record.paneled} of 10 product(s) by a factor on {panels} column panels" in record.summary()


def test_inductor_runs_the_panel_products_on_views_of_the_factors():
    model = wide_llama()
    expected = logits(model)
    got, code = _generated_code(model, {"gemm_panels": 2})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # each V (r, 512) is read in place as (2, r, 256) panels: a strided view of the argument, no copy
    views = re.findall(r"extern_kernels\.bmm\(.*?reinterpret_tensor\((arg\d+_1), \(2, \d+, 256\)", code)
    assert len(views) == 4, views
    fused = re.findall(r"\b(cpp_fused_\w+)\s*=\s*async_compile", code)
    assert any("silu" in name and "mul" in name for name in fused), fused
    assert "neuronmm" not in code


def test_lower_writes_one_mm_and_says_why_where_x_has_no_known_shape():
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Parameter(torch.randn(64, 8))
            self.v = nn.Parameter(torch.randn(8, 512))  # wide enough for 2 panels

        def forward(self, x):
            return torch.ops.neuronmm.xuv(x, self.u, self.v, None)

    chain = Chain()
    graph_module = torch.fx.symbolic_trace(chain)  # no example values on the nodes
    result = Lower(2)(graph_module)
    assert result.lowered == Counter({"neuronmm::xuv": 1})
    assert result.paneled == 0 and result.whole == Counter({FLAT_INPUT: 2})
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), x @ chain.u @ chain.v)
    with pytest.raises(ValueError, match="panels must be a positive int"):
        Lower(0)


def test_panel_matmul_is_the_same_product_for_any_leading_dimensions_and_weight_dtype():
    torch.manual_seed(0)
    left = torch.randn(2, 3, 40)  # (batch, tokens, K), float32 as the references pass it
    weight = torch.randn(40, 24).bfloat16()
    matmul = PanelMatmul(3, min_width=8)
    got = matmul(left, weight)  # 3 panels of 8 columns
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, float32_matmul(left, weight), rtol=1e-6, atol=1e-5)
    assert matmul.paneled == 1 and not matmul.whole
    narrow = PanelMatmul(3, min_width=16)
    torch.testing.assert_close(narrow(left, weight), float32_matmul(left, weight))
    uneven = PanelMatmul(3, min_width=4)
    uneven(left, weight[:, :20])
    assert narrow.whole == Counter({"24 columns do not make 3 panels of at least 16": 1})
    assert uneven.whole == Counter({"20 columns do not make 3 panels of at least 4": 1})
    assert narrow.paneled == uneven.paneled == 0


def test_inductor_computes_the_activation_and_gate_up_product_in_a_generated_kernel():
    model = neuronmm_fx.optimize(tiny_llama(), ratio=0.05, block=8, method="svd", allocation="uniform")
    expected = logits(model)
    got, code = _generated_code(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    assert len(record.sites) == 0 and record.existing["neuronmm::svd_mlp"] == 2  # both MLPs, as compressed
    assert "neuronmm" not in code  # no opaque call left
    fused = re.findall(r"\b(cpp_fused_\w+)\s*=\s*async_compile", code)
    assert any("silu" in name and "mul" in name for name in fused), fused
    # each MLP reads x against [U_gate | U_up] in one GEMM: 5 matmuls per MLP where 6 were
    assert record.joint_first == 2
    lowered = record.handed
    assert lowered.count("gate_up_u") and "split" not in lowered
    assert lowered.count("call_function[matmul]") == 2 * 5


def test_with_the_standin_kernels_active_the_op_stays_opaque():
    model = neuronmm_fx.optimize(tiny_llama(), ratio=0.05, block=8, method="svd", allocation="uniform")
    with use_standin_kernels():
        expected = logits(model)
        got, code = _generated_code(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    assert record.form == "opaque" and "stand-in" in record.form_reason
    assert record.handed == record.after and "neuronmm.svd_mlp" in record.handed
    assert code.count("torch.ops.neuronmm.svd_mlp.default(") == 2


def test_dense_model_without_ratio_stays_dense_and_correct():
    model = tiny_llama()
    expected = logits(model)
    got = logits(torch.compile(model, backend="neuronmm", options=EAGER))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (record,) = backend.records()
    assert not record.op_counts and not record.sites
    assert len(record.skipped) == 2 and all("stays dense" in s.reason for s in record.skipped)
    assert "neuronmm.svd_mlp" not in record.after and "neuronmm.xuv" not in record.after
    assert len(record.dense_linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head


def test_svd_llm_pairs_become_neuronmm_ops_from_the_existing_weights(monkeypatch):
    model = svd_llm_llama()
    expected = logits(model)
    got = logits(torch.compile(model, backend="neuronmm", options=EAGER))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    assert record.form == "decomposed" and "neuronmm" not in record.handed  # written out for eager
    assert record.count("svd_mlp") == 2 and record.count("xuv") == 2
    mlps = [r for r in record.sites if r.installed == "neuronmm::svd_mlp"]
    assert {r.path for r in mlps} == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all({m.method for m in r.matrices} == {"existing"} for r in mlps)
    assert all({m.rank for m in r.matrices} == {16} for r in mlps)
    assert record.frozen_inputs == 0
    assert "get_attr" not in record.after  # built from the weight placeholders: no new tensors


def test_graph_break_still_fuses_every_mlp_and_the_dump_says_where(monkeypatch, tmp_path):
    model = svd_llm_llama()
    model.model.layers[1].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    expected = logits(model)
    options = {**EAGER, "dump_dir": str(tmp_path)}
    got = logits(torch.compile(model, backend="neuronmm", options=options))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    records = backend.records()
    assert len(records) >= 2  # the break split the forward
    # the break makes the decoder layer a frame of its own: one graph, fused once, run by both layers
    assert sum(record.count("svd_mlp") for record in records) == 1
    rewritten = [r for record in records for r in record.sites if r.installed == "neuronmm::svd_mlp"]
    assert rewritten and all(r.pattern == "gated_mlp" for r in rewritten)

    summary = (tmp_path / "summary.txt").read_text()
    for record in records:
        folder = tmp_path / f"graph_{record.index:03d}"
        assert (folder / "0_dynamo.txt").exists() and (folder / "1_neuronmm.dot").exists()
        assert f"graph {record.index:03d} [{record.compile_id}]" in summary
    fused = next(r for r in records if r.sites)
    after = (tmp_path / f"graph_{fused.index:03d}" / "1_neuronmm.txt").read_text()
    assert "neuronmm.svd_mlp" in after and "neuronmm.xuv" in after
    before = (tmp_path / f"graph_{fused.index:03d}" / "0_dynamo.txt").read_text()
    assert "neuronmm.svd_mlp" not in before
    lowered = (tmp_path / f"graph_{fused.index:03d}" / "2_lowered.txt").read_text()
    assert "neuronmm" not in lowered.split("\n", 1)[1] and "silu" in lowered  # what eager received
    assert "rewrote gated_mlp at " in summary and "-> neuronmm::svd_mlp" in summary


def truncated(model: nn.Module, ratio: float, block: int) -> nn.Module:
    """A copy whose MLP weights are replaced by their uniform-rank truncated SVD reconstructions."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                rank = uniform_rank(linear.in_features, linear.out_features, ratio, block).rank
                left, singular, right_t = torch.linalg.svd(linear.weight.t(), full_matrices=False)
                linear.weight.copy_(((left[:, :rank] * singular[:rank]) @ right_t[:rank]).t())
    return model


def test_ratio_compresses_on_the_fly(monkeypatch):
    model = tiny_llama()
    expected = logits(truncated(model, 0.05, 8))
    assert (expected - logits(model)).abs().max() > 1e-3  # the compression is visible
    options = {**EAGER, "ratio": 0.05, "block": 8}
    got = logits(torch.compile(model, backend="neuronmm", options=options))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (record,) = backend.records()
    # per layer: gate and up first factors in one joint tensor, their two second factors, down's two
    assert record.count("svd_mlp") == 2 and record.frozen_inputs == 2 * (1 + 2 + 2)
    assert record.joint_first == 2  # written out with one GEMM for the gate and up first factors
    assert all({m.method for m in r.matrices} == {"svd"} for r in record.sites)
    assert sum(isinstance(m, CompressedMLP) for m in model.modules()) == 0


def test_ratio_refuses_a_weight_changed_after_compile():
    model = tiny_llama()
    compiled = torch.compile(model, backend="neuronmm", options={**EAGER, "ratio": 0.05, "block": 8})
    logits(compiled)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed after it was compressed"):
        logits(compiled)


def test_ratio_refuses_training_mode_and_points_to_optimize():
    model = tiny_llama()
    compiled = torch.compile(model, backend="neuronmm", options={**EAGER, "ratio": 0.05, "block": 8})
    with pytest.raises(Exception, match=r"freezing semantics.*neuronmm_fx\.optimize"):
        compiled(IDS, use_cache=False)  # grad mode on, weights require grad


def test_plain_lowrank_mlp_and_lone_chain():
    torch.manual_seed(0)
    # a plain MLP whose first projection is a low-rank pair, then a lone chain reading the MLP's output
    model = nn.Sequential(
        nn.Linear(32, 4, bias=False),
        nn.Linear(4, 48),
        nn.GELU(),
        nn.Linear(48, 32),
        nn.Linear(32, 3, bias=False),
    )
    model.append(nn.Linear(3, 40))
    x = torch.randn(5, 32)
    expected = model(x)
    got = torch.compile(model, backend="neuronmm", options=EAGER)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (record,) = backend.records()
    patterns = sorted(r.pattern for r in record.sites)
    assert patterns == ["lowrank", "plain_mlp"]
    plain = next(r for r in record.sites if r.pattern == "plain_mlp")
    assert {m.role: m.method for m in plain.matrices} == {"in": "existing", "out": "dense"}


def test_clone_before_an_inplace_op_is_kept():
    weight = nn.Parameter(torch.randn(6, 4))

    def f(x):
        y = x.clone()
        y.add_(1.0)
        return torch.nn.functional.linear(x, weight) + y.sum()

    x = torch.randn(3, 4)
    expected = f(x.clone())
    got = torch.compile(f, backend="neuronmm", options=EAGER)(x)
    torch.testing.assert_close(got, expected)


def test_unknown_option_and_missing_neuron_compiler_are_refused():
    lin = nn.Linear(4, 3)
    with pytest.raises(Exception, match="unknown option.*compiler, dump_dir, ratio"):
        torch.compile(lin, backend="neuronmm", options={"bogus": 1})(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="TorchNeuron"):
        torch.compile(lin, backend="neuronmm", options={"compiler": "neuron"})(torch.randn(2, 4))
    with pytest.raises(neuronmm_fx.ConfigError, match="ratio"):
        backend.BackendOptions.from_dict({"ratio": 1.5})
    for bad in (0, -2, True, "two", 1.5):
        with pytest.raises(
            neuronmm_fx.ConfigError, match=r"options\['gemm_panels'\] must be 'auto' or a positive"
        ):
            backend.BackendOptions.from_dict({"gemm_panels": bad})


def test_a_refused_gemm_panels_option_leaves_the_compressed_model_as_it_was():
    model = neuronmm_fx.optimize(tiny_llama(), ratio=0.05, block=8, method="svd", allocation="uniform")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules_before = [(name, type(module)) for name, module in model.named_modules()]
    expected = logits(model)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"options\['gemm_panels'\] must be 'auto' or a positive int, got 0"):
        logits(torch.compile(model, backend="neuronmm", options={"gemm_panels": 0}))
    torch._dynamo.reset()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert [(name, type(module)) for name, module in model.named_modules()] == modules_before
    assert torch.equal(logits(model), expected)


def test_gemm_panels_auto_is_the_thread_count_on_a_cpu_and_one_elsewhere():
    auto = backend.BackendOptions.from_dict({})
    assert auto.gemm_panels == "auto"
    assert auto.panels_for([torch.zeros(2), 3]) == torch.get_num_threads()
    assert auto.panels_for([torch.zeros(2), torch.zeros(2, device="meta")]) == 1
    assert backend.BackendOptions.from_dict({"gemm_panels": 3}).panels_for([torch.zeros(2)]) == 3


def test_source_paths_are_cleaned():
    assert clean_module_path("L['args'][0].model.layers[0].mlp") == "model.layers.0.mlp"
    assert clean_module_path("L['self'].mlp.up_proj") == "mlp.up_proj"
    assert clean_module_path("model.layers.0.mlp") == "model.layers.0.mlp"
    name = "l_args_0_modules_model_modules_layers_modules_0_modules_mlp_modules_gate_proj_parameters_weight_"
    assert dynamo.parameter_path(name) == "model.layers.0.mlp.gate_proj.weight"

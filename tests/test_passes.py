"""Each pass on its own: canonicalize, match, fuse, decanonicalize, their checked guarantees, the
pattern registry, and optimize()'s config handling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from helpers import tiny_model, token_ids
from torch import nn

import neuronmm_fx
from neuronmm_fx import ConfigError, OptimizeConfig, PassCheckError, patterns
from neuronmm_fx.compress.factorize import TruncatedSVD, compress_site
from neuronmm_fx.frontends.export import capture, default_example_inputs
from neuronmm_fx.passes import checks, checks_enabled
from neuronmm_fx.passes.canonicalize import Canonicalize
from neuronmm_fx.passes.decanonicalize import Decanonicalize
from neuronmm_fx.passes.fuse import Fuse
from neuronmm_fx.passes.ir import DENSE, is_activation, is_dense
from neuronmm_fx.passes.match import GATED, LOWRANK, PLAIN, Match


class TwoMLPs(nn.Module):
    """A gated MLP, a plain GELU MLP and a low-rank chain, each written inline."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc_in, self.fc_out = nn.Linear(16, 24), nn.Linear(24, 16)
        self.u, self.v = nn.Linear(16, 3, bias=False), nn.Linear(3, 16)

    def forward(self, x):
        x = self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        x = self.fc_out(torch.nn.functional.gelu(self.fc_in(x)))
        return self.v(self.u(x))


def canonical(model: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    captured = capture(model, args, kwargs or {})
    Canonicalize(captured.resolve_param)(captured.graph_module)
    gm = captured.graph_module
    gm.lifted = {name: captured.parameters[path] for name, path in captured.parameter_names.items()}
    return gm


def run(gm: fx.GraphModule, *inputs: torch.Tensor) -> torch.Tensor:
    """Call an exported graph: lifted parameters by placeholder name, then the user's inputs."""
    user = iter(inputs)
    values = [
        gm.lifted[n.name] if n.name in gm.lifted else next(user)
        for n in gm.graph.nodes
        if n.op == "placeholder"
    ]
    return gm(*values)[0]


def test_checks_are_on_in_the_test_suite():
    assert checks_enabled()
    with checks(False):
        assert not checks_enabled()
    assert checks_enabled()


def test_canonicalize_turns_every_linear_and_activation_into_the_canonical_ir():
    model = tiny_model("llama")
    args, kwargs = default_example_inputs(model)
    captured = capture(model, args, kwargs)
    result = Canonicalize(captured.resolve_param)(captured.graph_module)
    graph = captured.graph_module.graph
    dense_nodes = [n for n in graph.nodes if is_dense(n)]
    # 2 layers × (q, k, v, o, gate, up, down) + lm_head
    assert len(dense_nodes) == result.counts["dense"] == 2 * 7 + 1
    assert {n.meta[DENSE].weight.path for n in dense_nodes} >= {"model.layers.0.mlp.gate_proj.weight"}
    assert [n.args[1] for n in graph.nodes if is_activation(n)] == ["silu", "silu"]


def test_canonical_graph_computes_what_the_model_computes():
    model = TwoMLPs()
    x = torch.randn(3, 16)
    gm = canonical(model, (x,))
    assert sum(map(is_dense, gm.graph.nodes)) == 7 and sum(map(is_activation, gm.graph.nodes)) == 2
    torch.testing.assert_close(run(gm, x), model(x), rtol=1e-6, atol=1e-6)


def test_canonicalize_check_names_a_dense_node_whose_layout_is_wrong():
    gm = canonical(TwoMLPs(), (torch.randn(2, 16),))
    node = next(n for n in gm.graph.nodes if is_dense(n))
    node.args = (*node.args[:3], "in_out" if node.args[3] == "out_in" else "out_in")
    with pytest.raises(PassCheckError, match=f"Canonicalize: dense node {node.name}"):
        Canonicalize(lambda n: None).ensures(gm)


def test_match_counts_each_declared_pattern_and_its_check_catches_a_shared_intermediate():
    gm = canonical(TwoMLPs(), (torch.randn(2, 16),))
    result = Match()(gm)
    assert result.counts == {GATED: 1, PLAIN: 1, LOWRANK: 1}
    assert [s.pattern for s in result.sites] == [GATED, PLAIN, LOWRANK]
    gated = result.sites[0]
    assert {p.dense.module_path for p in gated.projections.values()} == {"gate", "up", "down"}
    # a second reader of the gated product: the site no longer owns it and is not matched
    mul = next(n for n in gated.nodes if n.target in (torch.ops.aten.mul.Tensor,))
    with gm.graph.inserting_after(mul):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (mul,))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], extra),)
    assert Match()(gm).counts == {PLAIN: 1, LOWRANK: 1}


def test_fuse_replaces_each_site_by_one_op_call_and_keeps_the_values():
    model = TwoMLPs()
    x = torch.randn(4, 16)
    gm = canonical(model, (x,))
    sites = Match()(gm).sites
    # no rank decisions: every dense projection stays dense, so the fused graph must equal the model
    outcomes = [
        (site, compress_site(site, {}, dict.fromkeys(site.projections, TruncatedSVD()))) for site in sites
    ]
    result = Fuse(outcomes)(gm)
    ops = [n.target for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "neuronmm"]
    assert ops == [torch.ops.neuronmm.svd_mlp.default] * 2 + [torch.ops.neuronmm.xuv.default]
    assert result.counts == {GATED: 1, PLAIN: 1, LOWRANK: 1} and not result.left_alone
    assert not any(is_activation(n) for n in gm.graph.nodes)  # the activations went into the ops
    torch.testing.assert_close(run(gm, x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_check_refuses_an_op_that_appears_from_nowhere():
    gm = canonical(TwoMLPs(), (torch.randn(2, 16),))
    fuse = Fuse([])
    fuse.call(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "x")
    with gm.graph.inserting_after(x):
        gm.graph.call_function(torch.ops.neuronmm.xuv.default, (x, x, x, None))
    with pytest.raises(PassCheckError, match="neuronmm ops after fusing"):
        fuse.ensures(gm)


def test_decanonicalize_leaves_no_canonical_node_and_the_same_values():
    model = TwoMLPs()
    x = torch.randn(3, 16)
    gm = canonical(model, (x,))
    result = Decanonicalize()(gm)
    assert sorted(result.dense_paths) == sorted(["gate", "up", "down", "fc_in", "fc_out", "u", "v"])
    assert not any(is_dense(n) or is_activation(n) for n in gm.graph.nodes)
    torch.testing.assert_close(run(gm, x), model(x), rtol=1e-6, atol=1e-6)


def test_patterns_are_registered_once_and_looked_up_by_name_or_module():
    assert [p.name for p in patterns.PATTERNS] == [GATED, PLAIN, LOWRANK]
    with pytest.raises(ValueError, match="already registered"):
        patterns.register(patterns.pattern_of(GATED))
    with pytest.raises(KeyError, match="unknown pattern 'swiglu'"):
        patterns.pattern_of("swiglu")
    site_module = neuronmm_fx.CompressedMLP("silu", *[neuronmm_fx.Factors(torch.ones(4, 4))] * 2)
    assert patterns.pattern_of_module(site_module).name == PLAIN
    assert patterns.pattern_of_module(nn.Linear(2, 2)) is None


def test_optimize_takes_a_config_with_keyword_overrides_and_refuses_unknown_options():
    model = tiny_model("llama")
    config = OptimizeConfig(ratio=0.5, block=8, method="svd", allocation="uniform")
    ids = token_ids()
    by_config = neuronmm_fx.optimize(copy.deepcopy(model), config)
    by_keywords = neuronmm_fx.optimize(
        copy.deepcopy(model), ratio=0.5, block=8, method="svd", allocation="uniform"
    )
    torch.testing.assert_close(by_config(ids).logits, by_keywords(ids).logits)
    overridden = neuronmm_fx.report_of(neuronmm_fx.optimize(copy.deepcopy(model), config, block=16))
    assert overridden.block == 16 and {m.rank for s in overridden.sites for m in s.matrices} <= {16, None}
    positional = neuronmm_fx.report_of(neuronmm_fx.optimize(copy.deepcopy(model), 0.5, block=8, method="svd"))
    assert positional.ratio == 0.5
    with pytest.raises(ConfigError, match="unknown option.*bogus.*it takes ratio, block"):
        neuronmm_fx.optimize(model, 0.2, bogus=1)


def test_install_swaps_a_module_site_chains_a_module_chain_and_falls_back_matrix_by_matrix():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))  # the site itself
            self.inline = TwoMLPs()  # sites written inline in a bigger forward

        def forward(self, x):
            return self.inline(self.mlp(x))

    model = Block()
    x = torch.randn(3, 16)
    optimized = neuronmm_fx.optimize(
        model, 0.5, block=4, method="svd", allocation="uniform", example_inputs=(x,)
    )
    installed = [(s.path, s.pattern, s.installed, s.replaced) for s in neuronmm_fx.report_of(optimized).sites]
    assert installed == [
        ("mlp", PLAIN, "module", ["mlp"]),  # the module is the site: replaced whole
        ("inline", GATED, "per_matrix", ["inline.down", "inline.gate", "inline.up"]),  # computed inline
        ("inline", PLAIN, "per_matrix", ["inline.fc_in", "inline.fc_out"]),
        ("inline", LOWRANK, "chain", ["inline.u", "inline.v"]),  # each step its own module
    ]
    assert isinstance(optimized.mlp, neuronmm_fx.CompressedMLP)
    assert isinstance(optimized.inline.gate, neuronmm_fx.LowRankLinear)
    assert isinstance(optimized.inline.u, neuronmm_fx.LowRankLinear) and isinstance(
        optimized.inline.v, nn.Identity
    )

"""Tensor-parallel compressed MLPs: the cost model's figures, and 2- and 4-process gloo runs of tiny
LLaMA and Qwen3 models against the one-process optimized model (logits, generate, the collectives
counted by wrapping them, refusals that change nothing)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import VOCAB, tiny_model

import neuronmm_fx
from neuronmm_fx.parallel import cost, shard
from neuronmm_fx.parallel.cost import IMPLEMENTED, LLAMA_SHAPES, MLPShape, scheme_cost

KINDS = ("llama", "qwen3")
TOKENS = (2, 12)  # batch, sequence of the compared forward


def test_the_cost_model_gives_the_issue_figures_for_llama_8b():
    """MACs per token per rank, replicated first factors + r-reduced down against dense TP."""
    hidden, intermediate = LLAMA_SHAPES["LLaMA-3.1-8B"]
    shape = MLPShape.uniform(hidden, intermediate, 0.2)
    assert (shape.gate_rank, shape.up_rank, shape.down_rank) == (2432, 2432, 2432)
    figures = {
        tp: (
            scheme_cost(shape, tp, "replicated").macs_per_token,
            scheme_cost(shape, tp, "dense").macs_per_token,
        )
        for tp in (2, 4, 8)
    }
    assert {tp: (round(ours / 1e6), round(dense / 1e6)) for tp, (ours, dense) in figures.items()} == {
        2: (82, 88),
        4: (56, 44),
        8: (43, 22),
    }
    # by hand: 2·(H·r + r·I/t) + I/t·r + r·H at TP 4
    assert figures[4][0] == 2 * (4096 * 2432 + 2432 * 14336 / 4) + 14336 / 4 * 2432 + 2432 * 4096


def test_each_scheme_states_its_collectives_and_the_r_reduced_down_is_smaller():
    shape = MLPShape(4096, 14336, 2432, 2048, 2560)
    kinds = {s: [(c.kind, c.per_token) for c in scheme_cost(shape, 4, s).collectives] for s in cost.SCHEMES}
    assert kinds == {
        "dense": [("all_reduce", 4096)],
        "naive": [("all_reduce", 4096)],
        "replicated": [("all_reduce", 2560)],
        "r_sharded": [("all_gather", 2432 + 2048), ("all_reduce", 2560)],
    }
    assert scheme_cost(shape, 1, "r_sharded").collectives == []  # one rank talks to nobody
    naive, replicated = scheme_cost(shape, 4, "naive"), scheme_cost(shape, 4, "replicated")
    assert naive.macs_per_token == replicated.macs_per_token
    for tokens in (1, 2048):
        assert cost.step_time(replicated, tokens).total_s < cost.step_time(naive, tokens).total_s
    dense_down = MLPShape(4096, 14336, 2432, 2432, None)  # a down projection left dense: row-parallel
    assert [c.per_token for c in scheme_cost(dense_down, 2, "replicated").collectives] == [4096]
    with pytest.raises(ValueError, match="unknown scheme 'diagonal'"):
        scheme_cost(shape, 2, "diagonal")


def test_modelled_time_is_the_slower_of_compute_and_weights_plus_ring_collectives():
    hidden, intermediate = LLAMA_SHAPES["LLaMA-3.1-8B"]
    figures = scheme_cost(MLPShape.uniform(hidden, intermediate, 0.2), 2, "replicated")
    machine = cost.TRN2
    for tokens in (1, 2048):
        compute = 2 * figures.macs_per_token * tokens / machine.flops_per_s
        weights = 2 * figures.weight_elements / machine.hbm_bytes_per_s
        # one all-reduce of r_down = 2432 bf16 values per token: 2·(t−1) = 2 ring steps of 1/t of it
        ring = 2 * machine.step_latency_s + 2 / 2 * 2432 * 2 * tokens / machine.link_bytes_per_s
        modelled = cost.step_time(figures, tokens, machine)
        assert modelled.total_s == pytest.approx(max(compute, weights) + ring, rel=1e-12)
    assert cost.step_time(figures, 1).weights_s > cost.step_time(figures, 1).compute_s  # decode reads weights


def test_auto_picks_the_least_modelled_time_for_the_workload():
    shape = MLPShape.uniform(2048, 8192, 0.2)
    workload = cost.Workload(prompt_tokens=512, new_tokens=8)
    for tp in (2, 4, 8):
        times = {s: workload.time_s(scheme_cost(shape, tp, s)) for s in IMPLEMENTED}
        assert cost.choose_scheme(shape, tp, workload=workload) == min(times, key=times.get)
    rows = cost.table(ratios=(0.2,), tps=(2, 8))
    assert len(rows) == 3 * 2 * len(cost.SCHEMES)
    for group in {(r["model"], r["tp"]) for r in rows}:
        picked = [r for r in rows if (r["model"], r["tp"]) == group and r["picked"]]
        assert len(picked) == 1 and picked[0]["scheme"] in IMPLEMENTED


def test_shard_refuses_bad_arguments_before_looking_at_the_model():
    model = tiny_model("llama")
    with pytest.raises(neuronmm_fx.ConfigError, match="unknown scheme 'rows'; choose 'auto' or one of"):
        shard(model, scheme="rows")
    with pytest.raises(neuronmm_fx.ConfigError, match="unknown machine 'trn9'"):
        shard(model, machine="trn9")
    with pytest.raises(neuronmm_fx.ConfigError, match="needs an initialised torch.distributed process group"):
        shard(model)


def _optimized(kind: str):
    model = tiny_model(kind)
    return neuronmm_fx.optimize(model, 0.2, block=8, method="svd", allocation="uniform", progress=False)


def _counting(calls: list):
    """Wrap the functional collectives ShardedMLP calls; record each one's kind and result size."""
    from torch.distributed import _functional_collectives as funcol

    originals = {"all_reduce": funcol.all_reduce, "all_gather": funcol.all_gather_single}

    def wrap(kind):
        def counted(*args, **kwargs):
            result = originals[kind](*args, **kwargs)
            calls.append((kind, result.numel()))
            return result

        return counted

    funcol.all_reduce, funcol.all_gather_single = wrap("all_reduce"), wrap("all_gather")


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from neuronmm_fx.parallel import parallel_report
    from neuronmm_fx.parallel.nxd import nxd_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls: list = []
    _counting(calls)
    results = {}
    ids = torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(3))
    prompt = ids[:1, :5]
    for kind in KINDS:
        model = _optimized(kind)
        with torch.no_grad():
            reference = model(ids).logits
            reference_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
        for scheme in IMPLEMENTED:
            sharded = shard(copy.deepcopy(model), scheme=scheme)
            calls.clear()
            with torch.no_grad():
                logits = sharded(ids).logits
            forward_calls = list(calls)
            with torch.no_grad():
                tokens = sharded.generate(prompt, max_new_tokens=4, do_sample=False)
            report = parallel_report(sharded)
            plan = nxd_plan(sharded)
            results[f"{kind}/{scheme}"] = {
                "relative_error": ((logits - reference).abs().max() / reference.abs().max()).item(),
                "generate_equal": torch.equal(tokens, reference_tokens),
                "calls": forward_calls,
                "sites": [
                    {
                        "path": s.path,
                        "scheme": s.scheme,
                        "collectives": [[c.kind, c.per_token] for c in s.collectives],
                    }
                    for s in report.sites
                ],
                "weights_per_rank": [s.weight_elements_per_rank for s in report.sites],
                "modelled_weights": [
                    scheme_cost(s.shape, world, scheme).weight_elements for s in report.sites
                ],
                "report": str(report),
                "nxd": plan[0]["factors"],
            }
    model = _optimized("qwen3")
    with torch.no_grad():
        reference = model(ids).logits
        sharded = shard(copy.deepcopy(model))  # scheme="auto"
        logits = sharded(ids).logits
    results["auto"] = {
        "schemes": [s.scheme for s in parallel_report(sharded).sites],
        "picked": [cost.choose_scheme(s.shape, world) for s in parallel_report(sharded).sites],
        "relative_error": ((logits - reference).abs().max() / reference.abs().max()).item(),
    }
    # refusals: a shard of r = 32 or of I = 128 that is half a block (block twice the shard)
    model = _optimized("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    refusals = []
    for scheme, block in (("r_sharded", 2 * 32 // world), ("replicated", 2 * 128 // world)):
        try:
            shard(model, scheme=scheme, block=block)
            refusals.append(None)
        except neuronmm_fx.ConfigError as error:
            refusals.append(str(error))
    after = model.state_dict()
    results["refusals"] = refusals
    results["unchanged"] = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before
    )
    results["still_compressed"] = sum(isinstance(m, neuronmm_fx.CompressedMLP) for m in model.modules())
    results["xuv"] = _xuv_forms(rank, world, calls)
    holder = torch.nn.Module()  # a compressed MLP beside a low-rank chain of its own
    holder.mlp = copy.deepcopy(_optimized("llama").model.layers[0].mlp)
    holder.proj = neuronmm_fx.LowRankLinear(neuronmm_fx.Factors(torch.randn(64, 8), torch.randn(8, 64)))
    mixed = parallel_report(shard(holder, block=8))
    results["mixed"] = {"sites": [s.path for s in mixed.sites], "unsharded": [p for p, _ in mixed.unsharded]}
    results["mixed"]["text"] = str(mixed)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


def _xuv_forms(rank: int, world: int, calls: list) -> dict:
    """A column form then the row form of two low-rank layers against the one-process pair."""
    import torch.distributed as dist

    from neuronmm_fx.parallel.modules import ShardedLowRankLinear

    generator = torch.Generator().manual_seed(5)

    def lowrank(k, r, n):
        tensors = (torch.randn(k, r, generator=generator), torch.randn(r, n, generator=generator))
        return neuronmm_fx.LowRankLinear(neuronmm_fx.Factors(*tensors, torch.randn(n, generator=generator)))

    first, second = lowrank(64, 16, 128), lowrank(128, 16, 64)
    x = torch.randn(3, 5, 64, generator=generator)
    with torch.no_grad():
        reference = second(first(x))
    forms = {}
    for form in ("column", "gathered_column"):
        pair = [
            ShardedLowRankLinear(layer, f, dist.group.WORLD, rank, world)
            for layer, f in ((first, form), (second, "row"))
        ]
        calls.clear()
        with torch.no_grad():
            out = pair[1](pair[0](x))
        forms[form] = {
            "relative_error": ((out - reference).abs().max() / reference.abs().max()).item(),
            "calls": list(calls),
        }
    try:
        ShardedLowRankLinear(lowrank(64, world + 1, 128), "gathered_column", dist.group.WORLD, rank, world)
        forms["refusal"] = None
    except neuronmm_fx.ConfigError as error:
        forms["refusal"] = str(error)
    return forms


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"{world}-processes")
def runs(request, tmp_path_factory):
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"tp{world}")
    mp.spawn(_worker, args=(world, str(out_dir / "store"), str(out_dir)), nprocs=world, join=True)
    return world, [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", IMPLEMENTED)
def test_sharded_logits_and_generate_match_the_one_process_model(runs, kind, scheme):
    world, ranks = runs
    for result in (r[f"{kind}/{scheme}"] for r in ranks):
        assert result["relative_error"] <= 1e-5
        assert result["generate_equal"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", IMPLEMENTED)
def test_the_collectives_counted_are_those_the_cost_model_states(runs, kind, scheme):
    world, ranks = runs
    tokens = TOKENS[0] * TOKENS[1]
    for result in (r[f"{kind}/{scheme}"] for r in ranks):
        assert [site["scheme"] for site in result["sites"]] == [scheme, scheme]
        expected = [
            [kind_, per_token * tokens]
            for site in result["sites"]
            for kind_, per_token in site["collectives"]
        ]
        assert result["calls"] == expected
        assert len(expected) == 2 * (2 if scheme == "r_sharded" else 1)  # two layers
        # tiny model: H = 64, I = 128, every rank 32 (uniform rule, block 8, ratio 0.2)
        gathered = [per for site in result["sites"] for k, per in site["collectives"] if k == "all_gather"]
        assert gathered == ([64, 64] if scheme == "r_sharded" else [])
        assert result["weights_per_rank"] == result["modelled_weights"]
        assert f"sharded over {world} ranks" in result["report"] and scheme in result["report"]


def test_a_shard_that_is_not_whole_blocks_is_refused_and_changes_nothing(runs):
    world, ranks = runs
    r_block, i_block = 2 * 32 // world, 2 * 128 // world
    for result in ranks:
        r_refusal, i_refusal = result["refusals"]
        assert (
            f"model.layers.0.mlp: the gate rank = 32 does not split into {world} shards of whole "
            f"{r_block}-blocks ({32 // world} per rank)"
        ) in r_refusal
        assert "or the 'replicated' scheme" in r_refusal
        assert (
            f"I (intermediate) = 128 does not split into {world} shards of whole {i_block}-blocks "
            f"({128 // world} per rank)"
        ) in i_refusal
        assert result["unchanged"] and result["still_compressed"] == 2


def test_the_xuv_forms_pair_a_column_form_with_the_row_form(runs):
    world, ranks = runs
    tokens = 3 * 5
    for result in (r["xuv"] for r in ranks):
        assert result["column"]["relative_error"] <= 1e-5
        assert result["gathered_column"]["relative_error"] <= 1e-5
        assert result["column"]["calls"] == [["all_reduce", 16 * tokens]]  # over the second layer's r
        assert result["gathered_column"]["calls"] == [
            ["all_gather", 16 * tokens],
            ["all_reduce", 16 * tokens],
        ]
        assert result["refusal"] == (
            f"the gathered_column form splits the rank ({world + 1}) into {world} ranks: not a whole split"
        )


@pytest.mark.parametrize("scheme", IMPLEMENTED)
def test_the_nxd_plan_names_each_factors_layer_and_local_shape(runs, scheme):
    world, ranks = runs
    hidden, intermediate, rank_ = 64, 128, 32  # tiny model, uniform rule at ratio 0.2, block 8
    first_u = [hidden, rank_] if scheme == "replicated" else [hidden, rank_ // world]
    expected = [
        ["gate.U", first_u],
        ["gate.V", [rank_, intermediate // world]],
        ["up.U", first_u],
        ["up.V", [rank_, intermediate // world]],
        ["down.U", [intermediate // world, rank_]],
        ["down.V", [rank_, hidden]],
    ]
    factors = ranks[0][f"llama/{scheme}"]["nxd"]
    assert [[row["factor"], row["local_shape"]] for row in factors] == expected
    layers = [row["layer"] for row in factors]
    first = "replicated weight" if scheme == "replicated" else "ColumnParallelLinear"
    assert layers == [first, "ColumnParallelLinear"] * 2 + ["RowParallelLinear", "replicated weight"]


def test_nxd_status_says_once_whether_the_package_imports():
    from neuronmm_fx.parallel.nxd import nxd_status

    status = nxd_status()
    try:
        import neuronx_distributed  # noqa: F401
    except ImportError:
        assert status.startswith("neuronx_distributed does not import here (ModuleNotFoundError)")
    else:
        assert status.startswith("neuronx_distributed ") and "imports here" in status


def test_auto_shards_each_site_with_the_scheme_the_cost_model_picks(runs):
    world, ranks = runs
    for result in (r["auto"] for r in ranks):
        assert result["schemes"] == result["picked"] and len(result["schemes"]) == 2
        assert result["relative_error"] <= 1e-5


def test_auto_takes_the_fastest_scheme_whose_splits_are_whole_blocks_and_says_so():
    from neuronmm_fx.parallel import _pick

    shape = MLPShape.uniform(4096, 14336, 0.2)  # LLaMA-3.1-8B: r = 2432 = 19 blocks of 128
    workload = cost.Workload()
    assert cost.choose_scheme(shape, 4, workload=workload) == "r_sharded"
    assert _pick("mlp", shape, 4, 128, "auto", cost.TRN2, workload) == (
        "replicated",
        "r_sharded is modelled faster, but the gate rank = 2432 does not split into 4 shards of whole "
        "128-blocks (608 per rank)",
    )
    assert _pick("mlp", shape, 4, 32, "auto", cost.TRN2, workload) == ("r_sharded", "")  # 608 = 19 × 32
    with pytest.raises(
        neuronmm_fx.ConfigError, match="I \\(intermediate\\) = 14336 does not split into 3 shards"
    ):
        _pick("mlp", shape, 3, 128, "auto", cost.TRN2, workload)  # no scheme fits: the refusal of the first


def test_the_torchrun_example_runs_on_two_processes():
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(example),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 MLP(s) sharded over 2 ranks (this is rank 0)" in done.stdout
    difference = float(
        re.search(r"max \|logit difference\| against the unsharded model: (\S+)", done.stdout)[1]
    )
    assert difference < 1e-4 and len(re.search(r"generated: \[(.*)\]", done.stdout)[1].split(",")) == 12


def _compile_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from neuronmm_fx import backend

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _optimized("llama")
    ids = torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(3))
    results = {}
    with torch.no_grad():
        reference = model(ids).logits
        for scheme in IMPLEMENTED:
            backend.clear_records()
            compiled = torch.compile(shard(copy.deepcopy(model), scheme=scheme), backend="neuronmm")
            logits = compiled(ids).logits
            results[scheme] = {
                "relative_error": ((logits - reference).abs().max() / reference.abs().max()).item(),
                "graphs": len(backend.records()),
                "svd_mlp": sum(record.count("svd_mlp") for record in backend.records()),
            }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


def test_sharded_models_compile_with_the_neuronmm_backend(tmp_path):
    mp.spawn(_compile_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for scheme in IMPLEMENTED:
            assert results[scheme]["relative_error"] <= 1e-5
            assert results[scheme]["graphs"] == 1  # no graph break at the functional collectives
        assert results["replicated"]["svd_mlp"] == 2  # each rank's local part stays one fused op
        assert results["r_sharded"]["svd_mlp"] == 0  # its local part is plain matmuls around the gather


def test_a_low_rank_chain_outside_an_mlp_is_left_replicated_and_reported(runs):
    world, ranks = runs
    for result in (r["mixed"] for r in ranks):
        assert result["sites"] == ["mlp"] and result["unsharded"] == ["proj"]
        assert "left replicated: proj: a low-rank chain outside a compressed MLP" in result["text"]

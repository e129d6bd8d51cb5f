"""How much each matrix's compression costs the model: the loss curves global allocation spends by.

For a projection ``y = x·W`` whose inputs have the per-token Gram ``G = S·Sᵀ``, the whitened weight
``Sᵀ·W = Q·Σ·Pᵀ`` gives the output error of a rank-``r`` truncation per token and output channel,
``Σ_{i≥r} σᵢ²·pᵢⱼ²``.  The calibration loss's sensitivity to output ``j`` is its Fisher information
``fⱼ = mean over tokens of (∂L/∂yⱼ)²`` (one backward pass, no labels beyond the calibration text
itself), so the estimated loss increase of rank ``r`` is ``½·Σ_{i≥r} σᵢ²·Σⱼ fⱼ·pᵢⱼ²``
(Fisher-weighted, as in FWSVD, on top of SVD-LLM's whitening).  One number per candidate rank and
matrix, comparable across layers, projections and shapes, which is what a global allocation needs.

Measured on SmolLM2-135M (docs/compression.md), the unweighted alternatives (share of the
whitened spectrum's energy) ranked matrices badly enough that a free allocation was far worse than
the uniform rule; the Fisher weighting is what lets the allocator leave some matrices dense and cut
others deeply.

The Grams come from a layer-wise walk over the dense model (:mod:`neuronmm_fx.compress.layerwise`), one block
at a time, so memory grows with one layer; only the curves (a few numbers per matrix) are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from neuronmm_fx.compress import layerwise
from neuronmm_fx.compress.calibration import forward_dtype, forward_precision
from neuronmm_fx.compress.factorize import GramAccumulator, svd_by_gram, whitening
from neuronmm_fx.compress.ranks import weighted_truncation_loss
from neuronmm_fx.compress.sequential import Job

FISHER_MICROBATCH_TOKENS = 512  # tokens per backward pass (longer rows are cut to this): bounds the
#   activations kept for autograd.  On SmolLM2, 512-token pieces cost 0.9 GiB more peak memory than
#   128-token pieces, but the Fisher of 128-token contexts allocated worse: 2.26×/2.54× dense
#   perplexity (WikiText/Python text) against 2.03×/2.15× at ratio 0.2.  Quality wins.
HEAD_CHUNK_TOKENS = 64  # positions whose logits exist at once (a 512-token piece's logits alone are
#   96 MiB in float32 for a 49k vocabulary; softmax and gradient triple that)


def _cut(batches: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """Rows longer than ``length`` cut into ``length``-token pieces (a shorter tail kept if ≥ 2 tokens)."""
    pieces = []
    for batch in batches:
        for start in range(0, batch.shape[1], length):
            piece = batch[:, start : start + length]
            if piece.shape[1] >= 2:
                pieces.append(piece)
    return pieces


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output projection if the logits are exactly ``head(hidden)`` (no soft-capping),
    so the loss may be taken through it a few positions at a time; otherwise None."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    softcapped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if not isinstance(head, nn.Linear) or softcapped:
        return None
    return head


class _Head:
    """A plain output projection with its weight cast once to the pass's dtype (instead of once per
    chunk, as autocast would: 56 MiB of bf16 copy per chunk for SmolLM2's 49k × 576 head)."""

    def __init__(self, module: nn.Linear, dtype: torch.dtype) -> None:
        self.module = module
        self.weight = module.weight.detach().to(dtype)
        self.bias = None if module.bias is None else module.bias.detach().to(dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def _next_token_backward(
    model: nn.Module, head: _Head | None, batch: torch.Tensor, leaf: dict[str, torch.Tensor]
) -> str:
    """Back-propagate the summed next-token loss of ``batch`` (rows, tokens) to ``leaf["x"]``.

    With a plain ``head`` the forward stops at the head's input ``h`` (rows, tokens, width); the
    loss's gradient at ``h`` is formed ``HEAD_CHUNK_TOKENS`` positions at a time, and one backward
    pass carries it into the blocks.  Returns "" or why no loss could be taken.
    """
    captured: dict[str, torch.Tensor] = {}

    def stop_at_head(module, args):
        captured["h"] = args[0]
        raise layerwise.StopForward

    handle = head.module.register_forward_pre_hook(stop_at_head) if head is not None else None
    try:
        out = model(batch, use_cache=False)
    except layerwise.StopForward:
        out = None
    finally:
        if handle is not None:
            handle.remove()
    targets = batch[:, 1:]  # (rows, tokens - 1)
    if out is None:
        hidden = captured["h"]
        grad = torch.zeros_like(hidden)  # the last position predicts nothing: its gradient stays 0
        for start in range(0, targets.shape[1], HEAD_CHUNK_TOKENS):
            stop = start + HEAD_CHUNK_TOKENS
            part = hidden[:, start : min(stop, targets.shape[1])].detach().requires_grad_(True)
            logits = head(part)  # (rows, chunk, vocabulary)
            chunk_targets = targets[:, start:stop].flatten()
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk_targets, reduction="sum")
            grad[:, start : start + part.shape[1]] = torch.autograd.grad(loss, part)[0]
        torch.autograd.grad(hidden, leaf["x"], grad_outputs=grad)
        return ""
    logits = getattr(out, "logits", None)
    if logits is None:
        return "the model returns no logits to take a next-token loss of"
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    torch.autograd.grad(loss, leaf["x"])
    return ""


def output_fisher(
    model: nn.Module,
    outputs: dict[Hashable, str],
    batches: list[torch.Tensor],
    max_tokens: int,
    stack: layerwise.LayerStack | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[Hashable, torch.Tensor] | None, str]:
    """Mean squared gradient of the next-token loss at every output channel of the given modules.

    ``outputs`` maps a key to the path of an ``nn.Linear``/``Conv1D``.  Gradients flow to the
    activations only: no parameter's ``.grad`` or ``requires_grad`` is touched.  With the model's
    block ``stack`` given, the blocks run under activation checkpointing, so the backward pass holds
    one block's activations at a time.  The forward and backward passes run in ``dtype`` (autocast);
    on SmolLM2, bfloat16 took 10.2 s where float32 took 14.0 s, and the Fisher values of all 90
    matrices agreed to within 3 % in sum (log-correlation ≥ 0.998 per matrix).  Returns
    ``(None, why)`` for a model that has no token embedding or no logits.
    """
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        return None, "the model has no input embedding to differentiate from"
    leaf: dict[str, torch.Tensor] = {}
    sums: dict[Hashable, torch.Tensor] = {}
    counts: dict[Hashable, int] = {}

    def make_leaf(module, args, output):
        leaf["x"] = output.detach().requires_grad_(True)
        return leaf["x"]

    def watch(key):
        def accumulate(grad: torch.Tensor) -> None:
            grad = grad.detach().reshape(-1, grad.shape[-1])  # (tokens, out)
            # Σ over tokens of grad², reduced in float32 without a full-size float copy of the gradient
            squares = torch.linalg.vector_norm(grad, dim=0, dtype=torch.float32).double().square()
            sums[key] = sums[key] + squares if key in sums else squares
            counts[key] = counts.get(key, 0) + grad.shape[0]

        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    handles = [embeddings.register_forward_hook(make_leaf)]
    handles += [model.get_submodule(path).register_forward_hook(watch(key)) for key, path in outputs.items()]
    device = next(model.parameters()).device
    plain = _plain_head(model)
    head = _Head(plain, forward_dtype(model, dtype)) if plain is not None else None
    checkpointing = layerwise.checkpointed(stack) if stack is not None else contextlib.nullcontext()
    try:
        with torch.enable_grad(), checkpointing, forward_precision(model, dtype):
            for batch in layerwise.micro_batches(
                _cut(batches, FISHER_MICROBATCH_TOKENS), FISHER_MICROBATCH_TOKENS, max_tokens
            ):
                why = _next_token_backward(model, head, batch.to(device), leaf)
                if why:
                    return None, why
                layerwise.release_free_memory()
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}, ""


def loss_curve(
    s_t: torch.Tensor, weight_in_out: torch.Tensor, fisher: torch.Tensor | None
) -> Callable[[int], float]:
    """``loss(r)`` of truncating the weight whitened by ``Sᵀ`` (of the per-token Gram) to rank ``r``,
    Fisher-weighted where ``fisher`` is given: ``Σ_{i≥r} σᵢ²·Σⱼ fⱼ·pᵢⱼ²``.

    The estimate is of the plain whitened truncation, although the sequential factorization then
    weights its output channels by the Fisher information too: estimating the weighted truncation
    instead allocated worse on SmolLM2 at ratio 0.2 (2.02× against 1.87× dense perplexity on the
    Python text, 1.80× against 1.79× on WikiText-2).
    """
    # float32 is ample for a loss estimate, and several times faster than float64 here
    _, singular, right_t = svd_by_gram(s_t.float() @ weight_in_out.float())
    if fisher is None:
        weights = torch.ones_like(singular)
    else:
        weights = right_t.double().square() @ fisher.double()
    return weighted_truncation_loss(singular, weights)


def fisher_of(job: Job, fisher: dict[Hashable, torch.Tensor] | None) -> torch.Tensor | None:
    if fisher is None:
        return None
    values = fisher[job.module_path]
    out_slice = job.projection.out_slice
    return values[slice(*out_slice)] if out_slice is not None else values


def loss_curves_layerwise(
    model: nn.Module,
    stack: layerwise.LayerStack,
    jobs: list[Job],
    batches: list[torch.Tensor],
    fisher: dict[Hashable, torch.Tensor] | None,
    dtype: torch.dtype,
    progress: bool = False,
) -> dict[int, Callable[[int], float]]:
    """Loss curves of every job, from Grams measured block by block on the dense model."""
    curves: dict[int, Callable[[int], float]] = {}
    last_block = max(job.block for job in jobs)
    for step in layerwise.walk(model, stack, batches, dtype, last_block, "sensitivity", progress):
        block_jobs = [job for job in jobs if job.block == step.index]
        grams = GramAccumulator()
        paths: dict[Hashable, str] = {}
        for job in block_jobs:  # gate and up read one tensor: one Gram
            paths.setdefault(job.gram_key, job.path)
        observers = {
            path: (lambda i, x, key=key, into=grams: into.add(key, x)) for key, path in paths.items()
        }
        step.outputs = layerwise.run_observed(step.work, step.inputs, observers)  # the walk reuses them
        whitened = {key: whitening(grams.mean(key), inverse=False)[0] for key in grams.grams}
        for job in block_jobs:
            curves[id(job.projection)] = loss_curve(
                whitened[job.gram_key], job.projection.weight_in_out(), fisher_of(job, fisher)
            )
    return curves

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

The Grams come from a layer-wise walk over the dense model (:mod:`neuronmm_fx.layerwise`), one block
at a time, so memory grows with one layer; only the curves (a few numbers per matrix) are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from neuronmm_fx import layerwise
from neuronmm_fx.passes.compress import svd_by_gram, weighted_truncation_loss, whitening
from neuronmm_fx.sequential import GramAccumulator, Job

FISHER_MICROBATCH_TOKENS = 512  # tokens per backward pass (longer rows are cut to this): bounds the
#   activations kept for autograd.  On SmolLM2, 512-token pieces cost 0.9 GiB more peak memory than
#   128-token pieces, but the Fisher of 128-token contexts allocated worse: 2.26×/2.54× dense
#   perplexity (WikiText/Python text) against 2.03×/2.15× at ratio 0.2.  Quality wins.


def _cut(batches: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """Rows longer than ``length`` cut into ``length``-token pieces (a shorter tail kept if ≥ 2 tokens)."""
    pieces = []
    for batch in batches:
        for start in range(0, batch.shape[1], length):
            piece = batch[:, start : start + length]
            if piece.shape[1] >= 2:
                pieces.append(piece)
    return pieces


def output_fisher(
    model: nn.Module, outputs: dict[Hashable, str], batches: list[torch.Tensor], max_tokens: int
) -> tuple[dict[Hashable, torch.Tensor] | None, str]:
    """Mean squared gradient of the next-token loss at every output channel of the given modules.

    ``outputs`` maps a key to the path of an ``nn.Linear``/``Conv1D``.  Gradients flow to the
    activations only: no parameter's ``.grad`` or ``requires_grad`` is touched.  Returns
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
            grad = grad.detach().reshape(-1, grad.shape[-1]).double()
            sums[key] = sums[key] + grad.square().sum(0) if key in sums else grad.square().sum(0)
            counts[key] = counts.get(key, 0) + grad.shape[0]

        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    handles = [embeddings.register_forward_hook(make_leaf)]
    handles += [model.get_submodule(path).register_forward_hook(watch(key)) for key, path in outputs.items()]
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for batch in layerwise.micro_batches(
                _cut(batches, FISHER_MICROBATCH_TOKENS), FISHER_MICROBATCH_TOKENS, max_tokens
            ):
                batch = batch.to(device)
                out = model(batch, use_cache=False)
                logits = getattr(out, "logits", None)
                if logits is None:
                    return None, "the model returns no logits to take a next-token loss of"
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                )
                torch.autograd.grad(loss, leaf["x"])
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}, ""


def loss_curve(
    s_t: torch.Tensor, weight_in_out: torch.Tensor, fisher: torch.Tensor | None
) -> Callable[[int], float]:
    """``loss(r)`` of truncating the weight whitened by ``Sᵀ`` (of the per-token Gram) to rank ``r``,
    Fisher-weighted where ``fisher`` is given."""
    # float32 is ample for a loss estimate, and three times faster than float64 here
    _, singular, right_t = svd_by_gram((s_t @ weight_in_out.double()).float())
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

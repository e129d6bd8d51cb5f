"""Error-compensating compression: factor each block's matrices on the inputs it will really see.

Independent whitening measures every Gram on the dense model, but a compressed model feeds each
layer the outputs of the *compressed* layers before it.  This walk (see :mod:`neuronmm_fx.layerwise`)
compresses block by block on cached calibration hidden states, so that

1. the first projections of an MLP (gate and up, or a plain MLP's ``in``) are whitened by the Gram
   of the inputs the compressed upstream blocks produce;
2. the last projection (down, or ``out``) is fitted against the intermediate that the *compressed*
   first projections produce, and aims at what the dense projections would have produced from the
   same input: with ``h_c`` the compressed intermediate, ``h_d`` the dense one and ``W`` the dense
   down weight, the rank-``r`` weight minimising ``‖h_c·Ŵ − h_d·W‖`` over the calibration tokens
   is the truncated SVD of ``S⁻¹·C·W`` mapped back by ``S⁻ᵀ`` (``G = h_cᵀh_c = S·Sᵀ``,
   ``C = h_cᵀh_d``): SVD-LLM's closed-form update of the second factor, generalised to a target that
   differs from the input.  It is kept only where it lowers the output error on held-out
   calibration batches; otherwise the plain whitened factors of ``h_c`` are used;
3. the block then runs with all its compressed matrices, and its outputs feed the next block.

Per block the walk holds one working copy of the block, the Grams of its inputs and the dense
intermediate of the calibration tokens; memory does not grow with depth.

Guarantees: the user's model is not modified; every job's factors have exactly the requested rank
and the original weight's dtype; the note per matrix says how it was fitted.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx import layerwise
from neuronmm_fx.passes.compress import split_factors, whitened_svd, whitening
from neuronmm_fx.passes.match import Projection

HOLDOUT_SHARE = 8  # one calibration batch in this many is held out to judge the least-squares refit
BATCH_TOKENS = 1024  # calibration tokens per block forward


@dataclass
class Job:
    """One matrix to factor: where it lives, which stage of its MLP, and at what rank."""

    projection: Projection
    module_path: str  # its nn.Linear / Conv1D in the model
    block: int
    path: str  # the same module, relative to the block
    first_stage: bool  # reads the MLP's input (gate, up, in) rather than its intermediate
    gram_key: Hashable  # jobs that read the same tensor share one Gram
    rank: int | None = None  # None: only observed (sensitivity), not compressed


def install_weight(block: nn.Module, job: Job, weight_in_out: torch.Tensor) -> None:
    """Overwrite ``job``'s (slice of a) weight in a working copy of its block."""
    module = block.get_submodule(job.path)
    info, out_slice = job.projection.dense, job.projection.out_slice
    columns = slice(*out_slice) if out_slice is not None else slice(None)
    with torch.no_grad():
        if info.layout == "out_in":
            module.weight[columns] = weight_in_out.t().to(module.weight.dtype)
        else:
            module.weight[:, columns] = weight_in_out.to(module.weight.dtype)


class GramAccumulator:
    """``Σ xᵀx`` per key over calibration batches: float32 products summed in float64."""

    def __init__(self) -> None:
        self.grams: dict[Hashable, torch.Tensor] = {}
        self.tokens: dict[Hashable, int] = {}

    def add(self, key: Hashable, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        gram = (x.t() @ x).double()
        if key in self.grams:
            self.grams[key] += gram
        else:
            self.grams[key] = gram
        self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

    def mean(self, key: Hashable) -> torch.Tensor:
        """The Gram averaged per token (the scale the sensitivity estimate needs)."""
        return self.grams[key] / max(self.tokens[key], 1)


def _holdout(batches: int) -> set[int]:
    """Indices of the held-out batches: every ``HOLDOUT_SHARE``-th from the end (none if < 2)."""
    if batches < 2:
        return set()
    return set(range(batches - 1, -1, -HOLDOUT_SHARE))


def _observe(work: nn.Module, inputs, observers: dict, stop_after: set[str] | None = None) -> list:
    """Run ``work`` over ``inputs`` with input observers; its outputs (None where cut short)."""
    handles = layerwise.observe_inputs(work, observers, stop_after=stop_after or frozenset())
    try:
        return list(layerwise.run(work, inputs))
    finally:
        for handle in handles:
            handle.remove()


class PairedStatistics:
    """Over calibration batches, for inputs ``x`` and the dense model's inputs ``x_d`` at the same
    place: ``G = Σ xᵀx`` and ``C = Σ xᵀx_d`` on training batches; the pairs themselves on held-out ones."""

    def __init__(self, holdout: set[int]) -> None:
        self.holdout = holdout
        self.grams = GramAccumulator()
        self.cross: dict[Hashable, torch.Tensor] = {}
        self.held: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: Hashable, batch: int, x: torch.Tensor, dense: torch.Tensor) -> None:
        x, dense = x.reshape(-1, x.shape[-1]), dense.reshape(-1, dense.shape[-1])
        if batch in self.holdout:
            self.held.setdefault(key, []).append((x, dense))
            return
        self.grams.add(key, x)
        product = (x.float().t() @ dense.float()).double()
        self.cross[key] = self.cross[key] + product if key in self.cross else product


def _output_error(pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, u, v) -> float:
    """``Σ ‖x·u·v − x_d·W‖²`` over held-out pairs (float32)."""
    return float(
        sum(
            ((x.float() @ u.float()) @ v.float() - d.float() @ weight.float()).square().sum()
            for x, d in pairs
        )
    )


def fit(
    job: Job, statistics: PairedStatistics, key: Hashable, whitened: dict
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Rank-``job.rank`` factors of ``job``'s weight for the observed inputs, and how they were chosen.

    Two candidates: SVD-LLM's whitened truncation (reproduce ``x·W``), and the least-squares fit of
    the dense model's output ``x_d·W`` from ``x`` (truncated SVD of ``S⁻¹·C·W``, mapped back by
    ``S⁻ᵀ``).  The one with the lower held-out output error wins; with no held-out batch, the fit.
    """
    weight = job.projection.weight_in_out()
    if key not in whitened:
        whitened[key] = whitening(statistics.grams.grams[key])
    s_t, s_inv_t = whitened[key]
    plain = split_factors(*whitened_svd(s_inv_t, s_t @ weight.double()), job.rank, weight.dtype)
    # S⁻¹·C·W is the whitened least-squares target (S⁻¹ = (S⁻ᵀ)ᵀ)
    target = s_inv_t.t() @ (statistics.cross[key] @ weight.double())
    refit = split_factors(*whitened_svd(s_inv_t, target), job.rank, weight.dtype)
    held = statistics.held.get(key, [])
    if not held:
        return *refit, "least-squares fit of the dense model's output (no held-out batch to check it on)"
    plain_error, refit_error = _output_error(held, weight, *plain), _output_error(held, weight, *refit)
    ratio = f"held-out error {refit_error / max(plain_error, 1e-30):.3f}× plain whitening's"
    if refit_error < plain_error:
        return *refit, f"least-squares fit of the dense model's output; {ratio}"
    return *plain, f"whitened by its compressed-model inputs (the least-squares fit did not help: {ratio})"


def compress_layerwise(
    model: nn.Module,
    stack: layerwise.LayerStack,
    jobs: list[Job],
    batches: list[torch.Tensor],
    dtype: torch.dtype,
    progress: bool = False,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, str]]:
    """Factors for every job with a rank, keyed by ``id(job.projection)``, and a note per matrix.

    Two streams of hidden states go through the blocks: the dense model's, and the compressed
    model's.  Per block: (1) the dense block runs on the dense stream, recording the dense inputs of
    every job's module; (2) the compressed stream's inputs to the first-stage modules are paired with
    them and the first stage is fitted and installed in the block's working copy; (3) likewise for
    the second stage, on the intermediate the compressed first stage produces; (4) the compressed
    block advances the compressed stream.
    """
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    notes: dict[int, str] = {}
    todo = [job for job in jobs if job.rank is not None]
    if not todo:
        return factors, notes
    last_block = max(job.block for job in todo)
    batches = layerwise.micro_batches(batches, BATCH_TOKENS, sum(b.numel() for b in batches))
    compressed_inputs = layerwise.capture_inputs(model, stack, batches, dtype)
    dense_inputs = list(compressed_inputs)
    holdout = _holdout(len(compressed_inputs))
    for index in tqdm(range(last_block + 1), desc="compress layers", unit="block", disable=not progress):
        block_jobs = [job for job in todo if job.block == index]
        work = layerwise.working_copy(stack.blocks[index], dtype)
        recorded: dict[str, list[torch.Tensor]] = {job.path: [] for job in block_jobs}
        observers = {path: (lambda i, x, out=out: out.append(x)) for path, out in recorded.items()}
        dense_out = _observe(work, dense_inputs, observers)  # (1)
        for stage in (True, False):  # (2), (3)
            stage_jobs = [job for job in block_jobs if job.first_stage is stage]
            if not stage_jobs:
                continue
            statistics = PairedStatistics(holdout)
            observers = {}
            for job in stage_jobs:
                observers.setdefault(
                    job.path,
                    lambda i, x, key=job.gram_key, dense=recorded[job.path], into=statistics: into.add(
                        key, i, x, dense[i]
                    ),
                )
            _observe(work, compressed_inputs, observers, stop_after=set(observers))
            whitened: dict = {}
            for job in stage_jobs:
                u, v, note = fit(job, statistics, job.gram_key, whitened)
                factors[id(job.projection)] = (u, v)
                notes[id(job.projection)] = note
                install_weight(work, job, u.double() @ v.double())
            del statistics, whitened
        del recorded
        if index < last_block:  # (4)
            outputs = _observe(work, compressed_inputs, {})
            compressed_inputs = [
                item.with_hidden(out) for item, out in zip(compressed_inputs, outputs, strict=True)
            ]
            dense_inputs = [item.with_hidden(out) for item, out in zip(dense_inputs, dense_out, strict=True)]
        del work, dense_out
    return factors, notes

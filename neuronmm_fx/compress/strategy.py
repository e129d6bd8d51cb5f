"""Strategy: for every dense matrix of the chosen sites, how it is factored and at what rank.

1. Calibration.  ``"svd"`` needs none.  ``"whiten"`` (and ``"auto"`` when calibration data is given
   or the model can write its own) takes calibration tokens (:mod:`neuronmm_fx.compress.calibration`).
2. Rank.  ``"uniform"`` applies the paper's per-matrix rule; ``"global"`` measures each matrix's
   loss curve (:mod:`neuronmm_fx.compress.sensitivity`: Fisher-weighted whitened truncation error; without
   calibration, the share of spectral energy dropped) and lets
   :func:`~neuronmm_fx.compress.factorize.allocate_global` spend the parameter budget where it hurts least.
3. Factors.  With calibration, block by block on the compressed model's own activations
   (:mod:`neuronmm_fx.compress.sequential`) when the model is a stack of blocks; otherwise whitened by Grams
   of the dense model collected in one pass.  A projection whose input no module hook can observe
   (a bare ``F.linear`` in a module's own code) falls back to plain SVD.  The report says which, and
   why, matrix by matrix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from neuronmm_fx.compress import calibration as calib
from neuronmm_fx.compress import layerwise, sensitivity
from neuronmm_fx.compress.factorize import Factorizer, Precomputed, TruncatedSVD, WhitenedSVD, whitening
from neuronmm_fx.compress.ranks import (
    MatrixShape,
    RankDecision,
    allocate_global,
    truncation_loss,
    uniform_rank,
)
from neuronmm_fx.compress.sequential import Job, compress_layerwise
from neuronmm_fx.config import CALIBRATION_DTYPES, OptimizeConfig
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.passes.canonicalize_linears import is_linear_module
from neuronmm_fx.passes.match import Projection, Site


@dataclass
class SitePlan:
    """Per-role rank decisions and factorizers of one site, and why each method was used."""

    decisions: dict[str, RankDecision] = field(default_factory=dict)
    factorizers: dict[str, Factorizer] = field(default_factory=dict)
    method_reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class Strategy:
    plans: list[SitePlan]
    calibration: calib.Calibration | None
    calibration_note: str
    timings: dict[str, float] = field(default_factory=dict)  # calibration_s, sensitivity_s, factorization_s


def _hookable_module(model: nn.Module, projection: Projection) -> str | None:
    """A module whose first input is the projection's input: the projection's own linear layer."""
    info = projection.dense
    try:
        module = model.get_submodule(info.module_path)
    except AttributeError:
        return None
    if is_linear_module(module) and info.weight.path == f"{info.module_path}.weight":
        return info.module_path
    return None


Dense = tuple[int, str, Projection]  # (site index, role, projection)


def _jobs(model: nn.Module, sites: list[Site], dense: list[Dense], stack) -> dict[int, Job]:
    """A :class:`Job` for every dense projection whose input a hook on its own module observes."""
    jobs = {}
    for i, _, projection in dense:
        path = _hookable_module(model, projection)
        if path is None:
            continue
        block = stack.block_of(path) if stack is not None else 0
        relative = stack.relative(block, path) if stack is not None else path
        first_stage = projection.input is sites[i].input
        jobs[id(projection)] = Job(projection, path, block, relative, first_stage, projection.input)
    return jobs


def _curves_one_pass(model, jobs: list[Job], data, fisher, progress) -> dict[int, object]:
    """Loss curves from Grams of the dense model collected in one pass (models without a block stack)."""
    hooks: dict[fx.Node, str] = {}
    for job in jobs:
        hooks.setdefault(job.gram_key, job.module_path)
    grams, rows = calib.collect_grams(model, hooks, data, progress=progress)
    whitened = {key: whitening(gram / max(rows, 1), inverse=False)[0] for key, gram in grams.items()}
    return {
        id(job.projection): sensitivity.loss_curve(
            whitened[job.gram_key],
            job.projection.weight_in_out(),
            sensitivity.fisher_of(job, fisher),
        )
        for job in jobs
    }


@dataclass
class Measured:
    """What the sensitivity pass measured for one matrix: its loss curve and its outputs' Fisher
    information (which the sequential factorization then weights its output channels by)."""

    curve: object  # rank -> estimated loss
    fisher: object  # torch.Tensor (out,) or None
    note: str


def _measure_curves(model, stack, jobs, data, config: OptimizeConfig) -> tuple[dict[int, Measured], str]:
    """What sensitivity measures for every job (cached on the Calibration for the next call), and
    how it was measured."""
    settings = (config.sensitivity_tokens, config.calibration_dtype, stack is not None)
    cache = data.curves.setdefault(settings, {})
    missing = [job for job in jobs if job.projection.name not in cache]
    note = "Fisher-weighted whitened truncation error"
    if missing:
        subset = layerwise.micro_batches(data.batches, 1 << 30, config.sensitivity_tokens)
        fisher, why = sensitivity.output_fisher(
            model,
            {job.module_path: job.module_path for job in missing},
            subset,
            config.sensitivity_tokens,
            stack,
            CALIBRATION_DTYPES[config.calibration_dtype],
        )
        if fisher is None:
            note = f"whitened truncation error, unweighted ({why})"
        dtype = CALIBRATION_DTYPES[config.calibration_dtype]
        if stack is not None:
            curves = sensitivity.loss_curves_layerwise(
                model, stack, missing, subset, fisher, dtype, config.progress
            )
        else:
            curves = _curves_one_pass(model, missing, calib.Calibration(subset, ""), fisher, config.progress)
        for job in missing:
            cache[job.projection.name] = Measured(
                curves[id(job.projection)], sensitivity.fisher_of(job, fisher), note
            )
    note = cache[jobs[0].projection.name].note if jobs else note
    return {id(job.projection): cache[job.projection.name] for job in jobs}, note


def plan(
    model: nn.Module, sites: list[Site], config: OptimizeConfig, calibration=None, tokenizer=None
) -> Strategy:
    dense: list[Dense] = [
        (i, role, p)
        for i, site in enumerate(sites)
        for role, p in site.projections.items()
        if not p.is_lowrank
    ]
    plans = [SitePlan() for _ in sites]
    for i, site in enumerate(sites):
        for role, projection in site.projections.items():
            if projection.is_lowrank:
                plans[i].factorizers[role] = TruncatedSVD()  # unused: existing factors are kept
                plans[i].method_reasons[role] = "existing low-rank factors reused"
    timings = {"calibration_s": 0.0, "sensitivity_s": 0.0, "factorization_s": 0.0}
    data: calib.Calibration | None = None
    note = "plain SVD requested (method='svd')"

    started = time.perf_counter()
    if config.method != "svd" and dense:
        data, missing = calib.prepare(
            model,
            calibration,
            tokenizer,
            config.calibration_seq_len,
            config.calibration_tokens,
            config.progress,
            CALIBRATION_DTYPES[config.calibration_dtype],
        )
        if data is None and config.method == "whiten":
            raise ConfigError(
                "method='whiten' needs calibration data: pass calibration= (token tensors, a DataLoader, "
                f"or texts with tokenizer=); {missing}"
            )
        if data is None:
            note = f"plain SVD: {missing}"
        else:
            note = f"whitened SVD calibrated on {data.source}, {data.tokens} tokens"
    timings["calibration_s"] = time.perf_counter() - started

    jobs: dict[int, Job] = {}
    stack, no_stack = None, ""
    if data is not None:
        paths = [p for p in (_hookable_module(model, proj) for _, _, proj in dense) if p is not None]
        stack, no_stack = layerwise.find_layer_stack(model, paths)
        jobs = _jobs(model, sites, dense, stack)

    # rank decisions
    started = time.perf_counter()
    measured: dict[int, Measured] = {}
    if config.allocation == "uniform":
        for i, role, p in dense:
            plans[i].decisions[role] = uniform_rank(p.in_features, p.out_features, config.ratio, config.block)
    else:
        curve_note = "share of spectral energy dropped (no calibration data)"
        if jobs:
            measured, curve_note = _measure_curves(model, stack, list(jobs.values()), data, config)
        shapes = []
        plain = TruncatedSVD()
        for i, role, p in dense:
            if measured and id(p) not in measured:
                reason = "its input is not observable through a module hook, so its sensitivity is unknown"
                plans[i].decisions[role] = RankDecision(None, reason)
                continue
            loss = (
                measured[id(p)].curve
                if id(p) in measured
                else truncation_loss(plain.spectrum(p, p.weight_in_out()))
            )
            shapes.append(MatrixShape((i, role), p.in_features, p.out_features, loss))
        for (i, role), decision in allocate_global(shapes, config.ratio, config.block).items():
            plans[i].decisions[role] = decision
        note += f"; ranks allocated by {curve_note}"
    timings["sensitivity_s"] = time.perf_counter() - started

    # factorizers
    started = time.perf_counter()
    plain = TruncatedSVD()
    chosen: dict[int, Factorizer] = {}
    reasons: dict[int, str] = {}
    for i, role, projection in dense:
        if id(projection) in jobs:
            jobs[id(projection)].rank = plans[i].decisions[role].rank
            if id(projection) in measured:
                jobs[id(projection)].output_fisher = measured[id(projection)].fisher
    ranked = [job for job in jobs.values() if job.rank is not None]
    if ranked and stack is not None and config.sequential:
        factors, notes = compress_layerwise(
            model, stack, ranked, data.batches, CALIBRATION_DTYPES[config.calibration_dtype], config.progress
        )
        sequential = Precomputed("whiten")
        for job in ranked:
            sequential.put(job.projection, *factors[id(job.projection)])
            chosen[id(job.projection)] = sequential
            reasons[id(job.projection)] = f"sequential: {notes[id(job.projection)]}"
        note += "; factored block by block on the compressed model's own activations"
    elif ranked:
        why = "sequential=False" if not config.sequential else no_stack
        hooks: dict[fx.Node, str] = {}
        for job in ranked:
            hooks.setdefault(job.gram_key, job.module_path)
        grams, rows = calib.collect_grams(model, hooks, data, progress=config.progress)
        whitened = WhitenedSVD(grams, lambda p: p.input)
        for job in ranked:
            chosen[id(job.projection)] = whitened
            reasons[id(job.projection)] = (
                f"whitened by the dense model's calibration inputs (one pass: {why})"
            )
        note += f"; {len(grams)} Gram matrices from one pass ({why})"
    for i, role, projection in dense:
        plans[i].factorizers[role] = chosen.get(id(projection), plain)
        if id(projection) in reasons:
            plans[i].method_reasons[role] = reasons[id(projection)]
        elif id(projection) in jobs:
            plans[i].method_reasons[role] = "kept dense"
        elif data is not None:
            plans[i].method_reasons[role] = "plain SVD: its input is not observable through a module hook"
        else:
            plans[i].method_reasons[role] = note
    timings["factorization_s"] = time.perf_counter() - started
    return Strategy(plans, data, note, timings)

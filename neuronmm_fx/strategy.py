"""Strategy: for every dense matrix of the chosen sites, how it is factored and at what rank.

1. Method.  ``"svd"`` factors weights as they are.  ``"whiten"`` (and ``"auto"`` when calibration data
   is given or the model can write its own) collects the Gram matrix of each distinct projection
   input on the calibration tokens and factors whitened weights; a projection whose input no module
   hook can observe (a bare ``F.linear`` in a module's own code) falls back to plain SVD, and the
   report says so, matrix by matrix.
2. Rank.  ``"uniform"`` applies the paper's per-matrix rule; ``"global"`` spreads aligned ranks over
   all matrices by their measured truncation loss (see :mod:`neuronmm_fx.passes.compress`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from neuronmm_fx import calibration as calib
from neuronmm_fx.config import OptimizeConfig
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.passes.canonicalize import is_linear_module
from neuronmm_fx.passes.compress import (
    Factorizer,
    MatrixShape,
    RankDecision,
    TruncatedSVD,
    WhitenedSVD,
    allocate_global,
    truncation_loss,
    uniform_rank,
)
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
    calibration_seconds: float = 0.0


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


def plan(
    model: nn.Module, sites: list[Site], config: OptimizeConfig, calibration=None, tokenizer=None
) -> Strategy:
    dense = [
        (i, role, p)
        for i, site in enumerate(sites)
        for role, p in site.projections.items()
        if not p.is_lowrank
    ]
    plans = [SitePlan() for _ in sites]
    plain = TruncatedSVD()
    data: calib.Calibration | None = None
    note = "plain SVD requested (method='svd')"
    whitened: WhitenedSVD | None = None

    started = time.perf_counter()
    if config.method != "svd" and dense:
        data, missing = calib.prepare(
            model, calibration, tokenizer, config.calibration_seq_len, config.calibration_tokens
        )
        if data is None and config.method == "whiten":
            raise ConfigError(
                "method='whiten' needs calibration data: pass calibration= (token tensors, a DataLoader, "
                f"or texts with tokenizer=); {missing}"
            )
        if data is None:
            note = f"plain SVD: {missing}"
        else:
            hooks: dict[fx.Node, str] = {}
            for _, _, projection in dense:
                path = _hookable_module(model, projection)
                if path is not None:
                    hooks.setdefault(projection.input, path)
            grams, rows = calib.collect_grams(model, hooks, data, progress=config.progress)
            whitened = WhitenedSVD(grams, lambda p: p.input)
            note = f"whitened SVD calibrated on {data.source}; {len(grams)} Gram matrices, {rows} tokens each"
    calibration_seconds = time.perf_counter() - started

    for i, role, projection in dense:
        if whitened is not None and whitened.covers(projection):
            plans[i].factorizers[role] = whitened
            plans[i].method_reasons[role] = "whitened by its calibration inputs"
        else:
            plans[i].factorizers[role] = plain
            if whitened is not None:
                plans[i].method_reasons[role] = "plain SVD: its input is not observable through a module hook"
            else:
                plans[i].method_reasons[role] = note
    for i, site in enumerate(sites):
        for role, projection in site.projections.items():
            if projection.is_lowrank:
                plans[i].factorizers[role] = plain  # unused: existing factors are kept
                plans[i].method_reasons[role] = "existing low-rank factors reused"

    if config.allocation == "uniform":
        for i, role, p in dense:
            plans[i].decisions[role] = uniform_rank(p.in_features, p.out_features, config.ratio, config.block)
    else:
        shapes = []
        for i, role, p in dense:
            spectrum = plans[i].factorizers[role].spectrum(p, p.weight_in_out())
            shapes.append(MatrixShape((i, role), p.in_features, p.out_features, truncation_loss(spectrum)))
        for (i, role), decision in allocate_global(shapes, config.ratio, config.block).items():
            plans[i].decisions[role] = decision
    return Strategy(plans, data, note, calibration_seconds)

"""Fuse: turn a matched, compressed site into the module that computes it with one ``neuronmm`` op.

* ``lowrank``   → :class:`~neuronmm_fx.modules.LowRankLinear`  (``neuronmm::xuv``)
* ``gated_mlp`` → :class:`~neuronmm_fx.modules.CompressedMLP`  gated (``neuronmm::svd_mlp``)
* ``plain_mlp`` → :class:`~neuronmm_fx.modules.CompressedMLP`  plain (``neuronmm::svd_mlp``)

Alongside each replacement it builds the *uncompressed twin*: the same module and op fed with the
original weights (dense projections, existing low-rank factors).  The twin computes exactly what the
matched nodes computed, so ``lower`` can prove a rewrite correct on real inputs before installing it.

Guarantees: the replacement's only op is the fused one; its graph (``fused_graph``) is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from neuronmm_fx.modules import CompressedMLP, Factors, LowRankLinear
from neuronmm_fx.passes.compress import CompressedProjection
from neuronmm_fx.passes.match import GATED, LOWRANK, Site


def build_module(site: Site, factors: dict[str, Factors]) -> nn.Module:
    """The module computing ``site`` from per-role factors."""
    if site.pattern == LOWRANK:
        return LowRankLinear(factors["lowrank"])
    if site.pattern == GATED:
        return CompressedMLP(site.activation, factors["gate"], factors["down"], up=factors["up"])
    return CompressedMLP(site.activation, factors["in"], factors["out"])


def uncompressed_factors(site: Site) -> dict[str, Factors]:
    """Per-role factors that reproduce the site exactly (dense weights, existing low-rank pairs)."""
    factors = {}
    for role, projection in site.projections.items():
        if projection.is_lowrank:
            u, v = projection.first.weight_in_out(), projection.second.weight_in_out()
            factors[role] = Factors(u, v, projection.bias)
        else:
            factors[role] = Factors(projection.weight_in_out(), None, projection.bias)
    return factors


@dataclass
class FusedSite:
    """A site with its replacement module, that module's graph, and the uncompressed twin."""

    site: Site
    compressed: dict[str, CompressedProjection]
    module: nn.Module
    twin: nn.Module

    def graph(self) -> fx.GraphModule:
        """The fused graph, traced from the replacement itself."""
        return fx.symbolic_trace(self.module)


def fuse_site(site: Site, compressed: dict[str, CompressedProjection]) -> FusedSite:
    module = build_module(site, {role: c.factors for role, c in compressed.items()})
    twin = build_module(site, uncompressed_factors(site))
    return FusedSite(site, compressed, module, twin)

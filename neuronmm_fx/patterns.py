"""The pattern kinds, each declared once: how it is found, what computes it, and how it is rebuilt.

A :class:`Pattern` pairs a matcher (a small function over the canonical graph, the way Inductor's
fx_passes pair a pattern with its replacement) with one handler for everything downstream of the
match: the roles of its projections, the ``neuronmm`` op and its argument order, the module that
replaces it in a live model, and the description a checkpoint stores to rebuild that module.
:data:`PATTERNS` lists them in matching priority: MLPs claim their low-rank chains first;
:func:`register` adds one.

=============  =======================================  ==================  ====================
pattern        computes                                 op                  module
=============  =======================================  ==================  ====================
``gated_mlp``  ``down(act(gate(x)) ⊙ up(x))``           ``svd_mlp``         ``CompressedMLP``
``plain_mlp``  ``out(act(in(x)))``                      ``svd_mlp``         ``CompressedMLP``
``lowrank``    ``x·U·V`` (an existing ``U·V`` chain)    ``xuv``             ``LowRankLinear``
=============  =======================================  ==================  ====================

To add a pattern: write its matcher (``(node, chains) -> Site | None``, anchored at the node it
recognises), its argument builder and module builder, and :func:`register` a :class:`Pattern`;
match, fuse, install and checkpoints pick it up (docs/architecture.md walks through an example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from neuronmm_fx import ops  # noqa: F401  (registers the neuronmm ops)
from neuronmm_fx.modules import CompressedMLP, Factors, LowRankLinear
from neuronmm_fx.passes.ir import is_activation, is_tensor_mul
from neuronmm_fx.passes.match import (
    GATED,
    LOWRANK,
    PLAIN,
    Projection,
    Site,
    consumer,
    half_projection,
    only_user,
    projection_at,
)

Operands = tuple  # (u, v, bias) of one projection: tensors, graph nodes or None
Chains = dict[fx.Node, Projection]


@dataclass(frozen=True)
class Pattern:
    """One pattern kind and everything the pipeline does with it."""

    name: str
    roles: tuple[str, ...]  # projections by role; ``roles[0]`` reads the site's input
    op: Callable  # the neuronmm op overload that computes the fused site
    anchor: Callable[[fx.Node, Chains], bool]  # nodes the matcher is tried at
    match: Callable[[fx.Node, Chains], Site | None]
    op_args: Callable[[object, dict[str, Operands], str | None], tuple]  # (x, operands, act) -> args
    build: Callable[[str | None, dict[str, Factors]], nn.Module]  # (activation, factors) -> module
    sequential: bool  # its steps run one after another (so each may be its own module in a chain)

    def uncompressed(self, site: Site) -> nn.Module:
        """The site's module fed with its original weights: computes exactly what the site did."""
        factors = {}
        for role, projection in site.projections.items():
            if projection.is_lowrank:
                u, v = projection.first.weight_in_out(), projection.second.weight_in_out()
                factors[role] = Factors(u, v, projection.bias)
            else:
                factors[role] = Factors(projection.weight_in_out(), None, projection.bias)
        return self.build(site.activation, factors)


# --- gated_mlp ------------------------------------------------------------------------------------


def match_gated(mul: fx.Node, chains: Chains) -> Site | None:
    """``down(act(gate(x)) ⊙ up(x))``, the product in either order, or Phi-3's fused ``gate_up``
    projection chunked in two along its outputs (gate half first)."""
    down = consumer(mul, chains, "down")
    if down is None or down.input is not mul:
        return None
    for act_node, up_node in (mul.args, reversed(mul.args)):
        if not is_activation(act_node) or only_user(act_node) is not mul or only_user(up_node) is not mul:
            continue
        gate_node = act_node.args[0]
        if not isinstance(gate_node, fx.Node) or only_user(gate_node) is not act_node:
            continue
        gate = projection_at(gate_node, chains, "gate")
        up = projection_at(up_node, chains, "up")
        if gate is None or up is None:  # Phi-3: gate and up are the two halves of one projection
            gate, up = half_projection(gate_node, "gate"), half_projection(up_node, "up")
            if gate is None or up is None or gate.nodes[0] is not up.nodes[0] or gate.out_slice[0] != 0:
                continue
            up.nodes = [up_node]  # the shared dense and chunk nodes are listed once, under gate
        if gate.input is not up.input:
            continue
        nodes = [*gate.nodes, *up.nodes, act_node, mul, *down.nodes]
        projections = {"gate": gate, "up": up, "down": down}
        return Site(GATED, gate.input, down.output, projections, act_node.args[1], nodes)
    return None


def _mlp_args(roles: tuple[str, ...]):
    """``svd_mlp``'s arguments: ``(x, first u/v/bias, up u/v/bias, last u/v/bias, activation)``."""
    first, up, last = (roles[0], roles[1], roles[2]) if len(roles) == 3 else (roles[0], None, roles[1])

    def op_args(x, operands: dict[str, Operands], activation: str | None) -> tuple:
        up_operands = operands[up] if up is not None else (None, None, None)
        return (x, *operands[first], *up_operands, *operands[last], activation)

    return op_args


def _build_gated(activation: str | None, factors: dict[str, Factors]) -> nn.Module:
    return CompressedMLP(activation, factors["gate"], factors["down"], up=factors["up"])


# --- plain_mlp ------------------------------------------------------------------------------------


def match_plain(act_node: fx.Node, chains: Chains) -> Site | None:
    """``out(act(in(x)))``, biases allowed."""
    first_node = act_node.args[0]
    if not isinstance(first_node, fx.Node) or only_user(first_node) is not act_node:
        return None
    first = projection_at(first_node, chains, "in")
    out = consumer(act_node, chains, "out")
    if first is None or out is None or out.input is not act_node:
        return None
    nodes = [*first.nodes, act_node, *out.nodes]
    return Site(PLAIN, first.input, out.output, {"in": first, "out": out}, act_node.args[1], nodes)


def _build_plain(activation: str | None, factors: dict[str, Factors]) -> nn.Module:
    return CompressedMLP(activation, factors["in"], factors["out"])


# --- lowrank --------------------------------------------------------------------------------------


def match_lowrank(output: fx.Node, chains: Chains) -> Site | None:
    """A ``U·V`` chain no MLP claimed (found by :func:`~neuronmm_fx.passes.match.lowrank_chains`)."""
    chain = chains[output]
    projection = projection_at(output, chains, "lowrank")
    return Site(LOWRANK, chain.input, output, {"lowrank": projection}, None, list(chain.nodes))


def _xuv_args(x, operands: dict[str, Operands], activation: str | None) -> tuple:
    return (x, *operands["lowrank"])


def _build_lowrank(activation: str | None, factors: dict[str, Factors]) -> nn.Module:
    return LowRankLinear(factors["lowrank"])


PATTERNS: list[Pattern] = [
    Pattern(
        GATED,
        CompressedMLP.GATED_ROLES,
        torch.ops.neuronmm.svd_mlp.default,
        lambda node, chains: is_tensor_mul(node),
        match_gated,
        _mlp_args(CompressedMLP.GATED_ROLES),
        _build_gated,
        sequential=False,
    ),
    Pattern(
        PLAIN,
        CompressedMLP.PLAIN_ROLES,
        torch.ops.neuronmm.svd_mlp.default,
        lambda node, chains: is_activation(node),
        match_plain,
        _mlp_args(CompressedMLP.PLAIN_ROLES),
        _build_plain,
        sequential=True,
    ),
    Pattern(
        LOWRANK,
        ("lowrank",),
        torch.ops.neuronmm.xuv.default,
        lambda node, chains: node in chains,
        match_lowrank,
        _xuv_args,
        _build_lowrank,
        sequential=True,
    ),
]

BY_NAME: dict[str, Pattern] = {pattern.name: pattern for pattern in PATTERNS}


def register(pattern: Pattern, *, before: str | None = None) -> Pattern:
    """Add a pattern to the registry every route matches with (ahead of pattern ``before``, which
    then cannot claim its nodes; at the end otherwise).  Returns the pattern."""
    if pattern.name in BY_NAME:
        raise ValueError(f"a pattern named {pattern.name!r} is already registered")
    index = len(PATTERNS) if before is None else PATTERNS.index(pattern_of(before))
    PATTERNS.insert(index, pattern)
    BY_NAME[pattern.name] = pattern
    return pattern


def unregister(name: str) -> None:
    """Remove pattern ``name`` from the registry."""
    PATTERNS.remove(pattern_of(name))
    del BY_NAME[name]


def pattern_of(name: str) -> Pattern:
    """The declaration of pattern ``name``; a ``KeyError`` names the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown pattern {name!r}; known: {', '.join(BY_NAME)}") from None


def pattern_of_module(module: nn.Module) -> Pattern | None:
    """The pattern a fused module computes (None for any other module)."""
    if isinstance(module, LowRankLinear):
        return BY_NAME[LOWRANK]
    if isinstance(module, CompressedMLP):
        return BY_NAME[GATED if module.gated else PLAIN]
    return None

"""Match: find compressible MLPs and existing low-rank chains in a canonical graph.

The patterns themselves are declared in :mod:`neuronmm_fx.patterns`; this module holds the shared
vocabulary (projections, sites, low-rank chains) and the pass that runs every declaration.

Patterns (``P(x)`` is a *projection*: a canonical ``dense`` node, or a low-rank chain below):

* ``lowrank``   ``dense_v(dense_u(x))`` where ``dense_u`` has no bias, its output feeds nothing else,
  and its width ``r`` is below the break-even rank ``K·N/(K+N)`` of the product (the shape SVD-LLM
  and the paper's checkpoints use).  Its factors are reused as they are; no SVD is computed.
* ``gated_mlp`` ``P_down(act(P_gate(x)) ⊙ P_up(x))``, the product in either order; also Phi-3's fused
  form where one projection's output is chunked in two along the features (gate half first).
* ``plain_mlp`` ``P_out(act(P_in(x)))`` (biases allowed; dropout in eval mode was already removed).

Every intermediate value of a match must feed only the next node of the match, so replacing the
match by one op cannot change anything else.  Low-rank chains that belong to an MLP become that
MLP's projections; the rest are sites of their own.  Anything else is left untouched.

Guarantees: the graph is not modified; each returned :class:`Site` owns its nodes exclusively.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import DENSE, DenseInfo, is_dense, module_path

aten = torch.ops.aten

GATED, PLAIN, LOWRANK = "gated_mlp", "plain_mlp", "lowrank"
_CHUNK_FUNCS = (
    aten.chunk.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    torch.chunk,
    torch.split,
)


def break_even_rank(in_features: int, out_features: int) -> float:
    """The rank at which ``r·(K+N)`` factor parameters equal the ``K·N`` of the dense matrix."""
    return in_features * out_features / (in_features + out_features)


@dataclass
class Projection:
    """One matrix product of a site: a dense weight (or a slice of its outputs) or a low-rank pair."""

    role: str
    output: fx.Node
    input: fx.Node
    nodes: list[fx.Node]
    dense: DenseInfo | None = None  # set for dense projections
    out_slice: tuple[int, int] | None = None  # (start, stop) of the dense output features used
    first: DenseInfo | None = None  # set for low-rank pairs: x·Wuᵀ ...
    second: DenseInfo | None = None  # ... then ·Wvᵀ

    @property
    def is_lowrank(self) -> bool:
        return self.first is not None

    @property
    def name(self) -> str:
        if self.is_lowrank:
            return f"{self.first.module_path}+{self.second.module_path}"
        if self.out_slice is not None:
            return f"{self.dense.module_path}[{self.out_slice[0]}:{self.out_slice[1]}]"
        return self.dense.module_path

    @property
    def in_features(self) -> int:
        return (self.first or self.dense).in_features

    @property
    def out_features(self) -> int:
        if self.is_lowrank:
            return self.second.out_features
        if self.out_slice is not None:
            return self.out_slice[1] - self.out_slice[0]
        return self.dense.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        info = self.second if self.is_lowrank else self.dense
        if info.bias is None:
            return None
        bias = info.bias.tensor.detach()
        return bias[slice(*self.out_slice)] if self.out_slice is not None else bias

    def weight_in_out(self) -> torch.Tensor:
        """The dense weight as (in, out), sliced for fused projections.  Dense projections only."""
        weight = self.dense.weight_in_out()
        return weight[:, slice(*self.out_slice)] if self.out_slice is not None else weight

    def parameter_count(self) -> int:
        """Parameters this projection holds in the original model (its share of a fused weight)."""
        bias = 0 if self.bias is None else self.bias.numel()
        if self.is_lowrank:
            return self.first.weight.tensor.numel() + self.second.weight.tensor.numel() + bias
        return self.in_features * self.out_features + bias


@dataclass
class Site:
    """A matched pattern: its projections by role, its activation, and the nodes it replaces."""

    pattern: str
    input: fx.Node
    output: fx.Node
    projections: dict[str, Projection]
    activation: str | None = None
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def path(self) -> str:
        """Innermost module containing every node of the site ("" for the root)."""
        return common_module_path(module_path(n) for n in self.nodes)

    @property
    def linear_paths(self) -> list[str]:
        paths = []
        for projection in self.projections.values():
            for info in (projection.dense, projection.first, projection.second):
                if info is not None and info.module_path not in paths:
                    paths.append(info.module_path)
        return paths


def common_module_path(paths) -> str:
    """Longest common dotted prefix of module paths."""
    split = [p.split(".") if p else [] for p in paths]
    if not split:
        return ""
    common = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


class MatchResult(NamedTuple):
    """Same fields as ``torch.fx``'s ``PassResult`` (the graph is unchanged), plus the sites found
    and how many of each pattern."""

    graph_module: fx.GraphModule
    modified: bool
    sites: list[Site]
    counts: Counter


class Match(CheckedPass):
    """Find every site of a canonical graph, for each declared pattern (:mod:`neuronmm_fx.patterns`)."""

    def __init__(self, patterns=None) -> None:
        self.patterns = patterns

    def call(self, graph_module: fx.GraphModule) -> MatchResult:
        sites = find_sites(graph_module.graph, self.patterns)
        return MatchResult(graph_module, False, sites, Counter(site.pattern for site in sites))

    def check(self, graph_module: fx.GraphModule) -> None:
        """Every site owns its nodes exclusively, and each intermediate feeds only the site."""
        sites = find_sites(graph_module.graph, self.patterns)
        owner: dict[fx.Node, Site] = {}
        for site in sites:
            for node in site.nodes:
                if node in owner:
                    raise PassCheckError(f"{node.name} is in two sites ({site.pattern})")
                owner[node] = site
            members = set(site.nodes)
            for node in site.nodes:
                if node is not site.output and not set(node.users) <= members:
                    raise PassCheckError(f"{site.pattern} at {site.path}: {node.name} is read outside it")


# --- helpers ---------------------------------------------------------------------------------------


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _dense_projection(node: fx.Node, role: str = "") -> Projection:
    return Projection(role, node, node.args[0], [node], dense=node.meta[DENSE])


def lowrank_chains(graph: fx.Graph) -> dict[fx.Node, Projection]:
    """Every ``dense_v(dense_u(x))`` chain, keyed by its output node."""
    chains: dict[fx.Node, Projection] = {}
    for node in graph.nodes:
        if not is_dense(node) or not is_dense(node.args[0]):
            continue
        first_node = node.args[0]
        first, second = first_node.meta[DENSE], node.meta[DENSE]
        if first.bias is not None or only_user(first_node) is not node:
            continue
        rank = first.out_features
        if rank >= break_even_rank(first.in_features, second.out_features):
            continue
        chains[node] = Projection(
            "", node, first_node.args[0], [first_node, node], first=first, second=second
        )
    return chains


def projection_at(node: object, chains: dict[fx.Node, Projection], role: str) -> Projection | None:
    if not isinstance(node, fx.Node):
        return None
    if node in chains:
        chain = chains[node]
        return Projection(
            role, chain.output, chain.input, list(chain.nodes), first=chain.first, second=chain.second
        )
    if is_dense(node):
        return _dense_projection(node, role)
    return None


def consumer(node: fx.Node, chains: dict[fx.Node, Projection], role: str) -> Projection | None:
    """The projection that is the only consumer of ``node`` (a chain is entered at its first node)."""
    user = only_user(node)
    if user is None:
        return None
    for chain in chains.values():
        if chain.nodes[0] is user:
            return projection_at(chain.output, chains, role)
    return projection_at(user, chains, role)


def _chunk_half(node: fx.Node) -> tuple[fx.Node, int] | None:
    """If ``node`` is half ``i`` of a two-way split of a dense output along its features: (dense, i)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    parent, index = node.args
    if not isinstance(parent, fx.Node) or not isinstance(index, int):
        return None
    is_chunk = (parent.op == "call_function" and parent.target in _CHUNK_FUNCS) or (
        parent.op == "call_method" and parent.target in ("chunk", "split")
    )
    if not is_chunk or not is_dense(parent.args[0]) or len(parent.args[0].users) != 1:
        return None
    source = parent.args[0]
    features = source.meta[DENSE].out_features
    pieces = (
        parent.args[1]
        if len(parent.args) > 1
        else parent.kwargs.get("chunks", parent.kwargs.get("split_size"))
    )
    dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0)
    val = source.meta.get("val")
    last_dim = -1 if val is None else val.dim() - 1
    if dim not in (-1, last_dim) or features % 2:
        return None
    chunk_like = parent.target in (aten.chunk.default, torch.chunk, "chunk")
    if chunk_like:
        even = pieces == 2
    else:
        even = pieces == features // 2 or (
            isinstance(pieces, (list, tuple)) and list(pieces) == [features // 2] * 2
        )
    if not even:
        return None
    return source, index


def half_projection(node: fx.Node, role: str) -> Projection | None:
    half = _chunk_half(node)
    if half is None:
        return None
    source, index = half
    width = source.meta[DENSE].out_features // 2
    projection = _dense_projection(source, role)
    projection.output = node
    projection.out_slice = (index * width, (index + 1) * width)
    projection.nodes = [source, node.args[0], node]
    return projection


# --- the matcher ---------------------------------------------------------------------------------


def find_sites(graph: fx.Graph, patterns=None) -> list[Site]:
    """All sites of a canonical graph, in graph order.

    Each pattern of ``patterns`` (default :data:`neuronmm_fx.patterns.PATTERNS`, in priority order)
    is tried at every node its anchor accepts; a site whose nodes another already claimed is dropped,
    so MLPs take their low-rank chains before the chains are matched alone.
    """
    if patterns is None:
        from neuronmm_fx.patterns import PATTERNS as patterns  # the declarations import this module
    chains = lowrank_chains(graph)
    sites: list[Site] = []
    claimed: set[fx.Node] = set()
    for pattern in patterns:
        for node in list(graph.nodes):
            if node in claimed or not pattern.anchor(node, chains):
                continue
            site = pattern.match(node, chains)
            if site is not None and not claimed.intersection(site.nodes):
                claimed.update(site.nodes)
                sites.append(site)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    return sites

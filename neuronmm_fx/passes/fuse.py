"""Fuse: replace each compressed site of a canonical graph by one call of its ``neuronmm`` op.

* ``gated_mlp`` / ``plain_mlp`` → ``neuronmm::svd_mlp(x, first, up, last, activation)``
* ``lowrank``                   → ``neuronmm::xuv(x, u, v, bias)``

(argument order and op per pattern: :mod:`neuronmm_fx.patterns`).  Both routes run this pass; the
one thing they do differently is where an operand comes from, which an :class:`OperandSource`
decides:

* ``optimize()`` (this base class): every factor of the compression result becomes an attribute of
  the graph module (``get_attr``), the very tensors that the installed module will hold;
* the compile backend (:class:`~neuronmm_fx.backend.DynamoOperands`): existing weights are read
  from the placeholders Dynamo passes in (a transpose or slice where needed) and factors computed at
  compile time arrive as extra placeholders.

Guarantees: every user of a site's output reads the op's output instead; the site's other nodes are
erased once nothing reads them; nothing outside the sites changes; one op call is added per site.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from neuronmm_fx.compress.factorize import CompressedProjection
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import MODULE_PATH, neuronmm_op, neuronmm_ops
from neuronmm_fx.passes.match import Site
from neuronmm_fx.patterns import Operands, pattern_of

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", MODULE_PATH)


class OperandSource:
    """Brings a site's operands into the graph: here, each factor tensor as a graph-module attribute."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.graph = graph_module.graph

    def call(self, target: Callable, args: tuple, like: fx.Node) -> fx.Node:
        """A new ``call_function`` node with ``like``'s provenance metadata."""
        node = self.graph.call_function(target, args)
        node.meta.update({key: like.meta[key] for key in _META_KEYS if key in like.meta})
        return node

    def tensor(self, tensor: torch.Tensor | None, name: str, like: fx.Node) -> fx.Node | None:
        if tensor is None:
            return None
        stem = "neuronmm_" + re.sub(r"\W", "_", name)
        attribute, index = stem, 0
        while hasattr(self.graph_module, attribute):
            index += 1
            attribute = f"{stem}_{index}"
        self.graph_module.register_buffer(attribute, tensor.detach(), persistent=False)
        return self.graph.get_attr(attribute)

    def operands(self, site: Site, compressed: dict[str, CompressedProjection], like: fx.Node):
        """``{role: (u, v, bias)}`` graph values, or a string saying why the site cannot be fused."""
        operands = {}
        for role, result in compressed.items():
            factors = result.factors
            parts = {"u": factors.u, "v": factors.v, "bias": factors.bias}
            name = result.name
            operands[role] = tuple(self.tensor(t, f"{name}_{label}", like) for label, t in parts.items())
        return operands


class FuseResult(NamedTuple):
    """Same fields as ``torch.fx``'s ``PassResult``, plus the op node of each fused site and why any
    site was left as it was (both keyed by the site's index in the pass's list)."""

    graph_module: fx.GraphModule
    modified: bool
    fused: dict[int, fx.Node]
    left_alone: dict[int, str]
    counts: Counter


class Fuse(CheckedPass):
    """Replace ``sites`` (with their compression results) by ``neuronmm`` op calls."""

    def __init__(
        self,
        sites: list[tuple[Site, dict[str, CompressedProjection]]],
        source: OperandSource | None = None,
    ) -> None:
        """``source`` brings the operands into the graph; by default an :class:`OperandSource` of the
        graph module the pass runs on."""
        self.sites = sites
        self.source = source
        self._expected: Counter = Counter()

    def call(self, graph_module: fx.GraphModule) -> FuseResult:
        source = self.source or OperandSource(graph_module)
        graph = graph_module.graph
        before = neuronmm_ops(graph)
        fused: dict[int, fx.Node] = {}
        left_alone: dict[int, str] = {}
        for index, (site, compressed) in enumerate(self.sites):
            pattern = pattern_of(site.pattern)
            output = site.output
            # ``site.input`` may be the output of a site fused just before: read the live argument
            x = site.projections[pattern.roles[0]].nodes[0].args[0]
            with graph.inserting_before(output):
                operands: dict[str, Operands] | str = source.operands(site, compressed, output)
                if isinstance(operands, str):
                    left_alone[index] = operands
                    continue
                new = source.call(pattern.op, pattern.op_args(x, operands, site.activation), output)
            output.replace_all_uses_with(new)
            order = {n: i for i, n in enumerate(graph.nodes)}
            for node in sorted(site.nodes, key=order.__getitem__, reverse=True):
                if not node.users:
                    graph.erase_node(node)
            fused[index] = new
        graph.lint()
        graph_module.recompile()
        self._expected = before + Counter(neuronmm_op(node) for node in fused.values())
        counts = Counter(self.sites[index][0].pattern for index in fused)
        return FuseResult(graph_module, bool(fused), fused, left_alone, counts)

    def check(self, graph_module: fx.GraphModule) -> None:
        """One op call per fused site was added, and no other ``neuronmm`` op appeared or vanished."""
        after = neuronmm_ops(graph_module.graph)
        if after != self._expected:
            raise PassCheckError(f"neuronmm ops after fusing: {dict(after)}, expected {dict(self._expected)}")

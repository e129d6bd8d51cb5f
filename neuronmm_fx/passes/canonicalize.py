"""Canonicalize: rewrite the many spellings of a linear layer and an activation into one form.

Matches (at ATen, torch-function and module level alike):

* linear layers: ``nn.Linear`` modules, ``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``,
  ``addmm``/``mm``/``matmul`` against a weight or its transpose (GPT-2's ``Conv1D``, including the
  ``view`` to 2-D and back that it wraps around ``addmm``), ``Conv1D`` modules;
* activations: any single-input elementwise region (``aten.silu``, ``F.gelu``, ``nn.SiLU``, or
  GELU-tanh spelled out as ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, ``x·sigmoid(x)``, ...)
  that computes one of the canonical activations.  The region is recognised by evaluating it in
  float64 on probe values and comparing with each activation, so any spelling of the same function
  is found and nothing else is;
* identities: dropout in eval mode or with ``p = 0``, ``clone``, ``alias``, ``contiguous``, ``nn.Identity``.

The pass runs three parts: identities (this module), linear layers
(:mod:`.canonicalize_linears`), activations (:mod:`.canonicalize_activations`).

Guarantees: the graph computes the same values as before (every canonical function is executable);
each ``dense`` node carries a :class:`~neuronmm_fx.passes.ir.DenseInfo` naming the model parameter it
reads; a form it does not recognise is left as it was.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neuronmm_fx.activations import ACTIVATION_NAMES
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.canonicalize_activations import canonicalize_activations
from neuronmm_fx.passes.canonicalize_linears import canonicalize_linears
from neuronmm_fx.passes.ir import (
    DENSE,
    DenseInfo,
    ParamResolver,
    argument,
    is_activation,
    is_dense,
)

aten = torch.ops.aten


class CanonicalizeResult(NamedTuple):
    """Same fields as ``torch.fx``'s ``PassResult``, plus how many nodes of each kind were rewritten."""

    graph_module: fx.GraphModule
    modified: bool
    counts: Counter


class Canonicalize(CheckedPass):
    """Rewrite linear layers, activations and identities into the canonical IR of :mod:`.ir`."""

    def __init__(self, resolve_param: ParamResolver, *, functional: bool = True) -> None:
        super().__init__()
        self.resolve_param = resolve_param
        # ATen graphs from torch.export are functional.  Dynamo graphs may hold in-place ops: with
        # ``functional=False``, ``clone``/``contiguous`` are kept (a later in-place op may write into the
        # copy) and dead-code elimination keeps every node that may mutate an input.
        self.functional = functional

    def call(self, graph_module: fx.GraphModule) -> CanonicalizeResult:
        counts: Counter = Counter()
        graph = graph_module.graph
        counts["identity"] = _drop_identities(graph_module, drop_copies=self.functional)
        counts["dense"] = canonicalize_linears(graph_module, self.resolve_param)
        counts["activation"] = canonicalize_activations(graph_module)
        if self.functional:
            graph.eliminate_dead_code()
        else:
            graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or may_mutate(n))
        graph.lint()
        graph_module.recompile()
        return CanonicalizeResult(graph_module, sum(counts.values()) > 0, counts)

    def check(self, graph_module: fx.GraphModule) -> None:
        """Every ``dense`` node names the parameter it reads, with matching shapes; every
        ``activation`` node names a canonical activation."""
        for node in graph_module.graph.nodes:
            if is_dense(node):
                info = node.meta.get(DENSE)
                if not isinstance(info, DenseInfo):
                    raise PassCheckError(f"dense node {node.name} carries no DenseInfo")
                if info.weight.tensor.dim() != 2 or node.args[3] != info.layout:
                    raise PassCheckError(f"dense node {node.name}: {info.weight.path} is not in its layout")
            elif is_activation(node) and node.args[1] not in ACTIVATION_NAMES:
                raise PassCheckError(f"activation node {node.name} has unknown kind {node.args[1]!r}")


def may_mutate(node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place method or op, ``setitem``, ``out=``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    if node.target in (operator.setitem, operator.iadd, operator.imul, operator.isub, operator.itruediv):
        return True
    if "out" in node.kwargs or node.kwargs.get("inplace") is True:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


# --- identities ------------------------------------------------------------------------------------


def _identity_input(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input a node passes through unchanged, or None."""
    if node.op == "call_function":
        if node.target in (aten.dropout.default, F.dropout, torch.dropout):
            p, train = (
                argument(node, 1, "p", 0.5),
                argument(node, 2, "train" if node.target is not F.dropout else "training"),
            )
            if train is None and node.target is F.dropout:
                train = True
            if not isinstance(p, (int, float)) or not isinstance(train, bool):
                return None
            return node.args[0] if (not train or p == 0) else None
        if node.target in (aten.clone.default, aten.alias.default, torch.clone):
            return node.args[0]
    elif node.op == "call_method" and node.target in ("contiguous", "clone"):
        return node.args[0]
    elif node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, nn.Identity):
            return node.args[0]
        if isinstance(module, nn.Dropout) and (not module.training or module.p == 0):
            return node.args[0]
    return None


_COPY_FUNCS = (aten.clone.default, torch.clone)
_COPY_METHODS = ("contiguous", "clone")


def _is_copy(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _COPY_FUNCS) or (
        node.op == "call_method" and node.target in _COPY_METHODS
    )


def _drop_identities(graph_module: fx.GraphModule, drop_copies: bool = True) -> int:
    dropped = 0
    for node in list(graph_module.graph.nodes):
        if not drop_copies and _is_copy(node):
            continue
        source = _identity_input(graph_module, node)
        if isinstance(source, fx.Node):
            node.replace_all_uses_with(source)
            graph_module.graph.erase_node(node)
            dropped += 1
    return dropped

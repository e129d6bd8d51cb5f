"""Dynamo front end: read a graph that ``torch.compile`` hands to the backend as canonical input.

Dynamo passes weights in as placeholders whose example inputs are the ``nn.Parameter`` objects (or,
with ``inline_inbuilt_nn_modules=False``, as ``get_attr`` nodes), names them after their source
(``l_self_modules_mlp_modules_up_proj_parameters_weight_``) and spells module paths as sources
(``L['self'].mlp``).  This module normalises those spellings, resolves weights to parameters, and
copies the graph so that the backend never edits the one Dynamo keeps reading.

Guarantees: after :func:`prepare`, every node's ``nn_module_stack`` reads as in ``named_modules``;
the resolver maps exactly the nodes that carry a real parameter; Dynamo's own graph is untouched.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence

import torch.fx as fx
from torch import nn

from neuronmm_fx.passes.ir import ParamRef, clean_module_path

_NAME_SPLIT = re.compile(r"_(?:modules|parameters|buffers)_")


def parameter_path(placeholder_name: str) -> str:
    """A readable parameter path from a Dynamo placeholder name (for reports only)."""
    name = re.sub(r"^[lg]_", "", placeholder_name).rstrip("_")
    parts = _NAME_SPLIT.split(name)
    return ".".join(parts[1:]) if len(parts) > 1 else name


def normalize_module_paths(graph: fx.Graph) -> None:
    """Strip Dynamo's source prefixes from ``nn_module_stack`` so paths read as in ``named_modules``."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (clean_module_path(entry[0]), *entry[1:]) for key, entry in stack.items()
            }


def resolver(gm: fx.GraphModule, example_inputs: Sequence) -> Callable[[fx.Node], ParamRef | None]:
    """The parameter a node carries: a placeholder whose example input is an ``nn.Parameter``, or a
    ``get_attr`` of one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    table: dict[fx.Node, ParamRef] = {}
    for node, value in zip(placeholders, example_inputs, strict=False):
        if isinstance(value, nn.Parameter):
            table[node] = ParamRef(parameter_path(node.name), value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = operator.attrgetter(node.target)(gm)
            except AttributeError:
                continue
            if isinstance(value, nn.Parameter):
                table[node] = ParamRef(node.target, value)
    return table.get


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` over a copy of ``gm``'s graph (node metadata copied shallowly)."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, values)
    graph.output(output)
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def prepare(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph with module paths normalised, ready for canonicalize."""
    copied = copy_graph_module(gm)
    normalize_module_paths(copied.graph)
    return copied

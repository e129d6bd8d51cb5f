"""Canonicalize, part 3: any single-input elementwise region computing a canonical activation
becomes one ``activation(x, kind)`` node.

``aten.silu``, ``F.gelu``, ``nn.SiLU``, GELU-tanh spelled out as
``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, ``x·sigmoid(x)``, ...: the region is recognised by
evaluating it in float64 on probe values and comparing with each activation of
:mod:`neuronmm_fx.activations`, so any spelling of the same function is found and nothing else is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neuronmm_fx.activations import ACTIVATION_NAMES, apply_activation
from neuronmm_fx.passes.ir import MODULE_PATH, activation, module_path

aten = torch.ops.aten

_ELEMENTWISE_FUNCS: set[object] = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    torch.neg,
    torch.pow,
    torch.tanh,
    torch.sigmoid,
    torch.erf,
    torch.exp,
    torch.relu,
    F.silu,
    F.gelu,
    F.relu,
    F.sigmoid,
    F.tanh,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.pow.Tensor_Scalar,
    aten.neg.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    aten.exp.default,
    aten.reciprocal.default,
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
}
_ELEMENTWISE_METHODS = {"add", "mul", "sub", "div", "pow", "neg", "tanh", "sigmoid", "relu", "erf", "exp"}
_ELEMENTWISE_MODULES = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid)

_MAX_REGION = 64  # nodes; an activation spelled out takes about ten
_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
_PROBE_TOLERANCE = 1e-6  # GELU and its tanh approximation differ by ~3e-4 on the probe


def _elementwise(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _ELEMENTWISE_MODULES)
    return False


def _single_input_region(
    graph_module: fx.GraphModule, output: fx.Node
) -> tuple[list[fx.Node], fx.Node] | None:
    """The elementwise nodes feeding ``output`` if they read exactly one outside tensor."""
    members: set[fx.Node] = set()
    external: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in members or node in external:
            continue
        if _elementwise(graph_module, node):
            members.add(node)
            if len(members) > _MAX_REGION:
                return None
            stack.extend(node.all_input_nodes)
        else:
            external.add(node)
            if len(external) > 1:
                return None
    if len(external) != 1:
        return None
    order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    return sorted(members, key=order.__getitem__), external.pop()


def _evaluate(graph_module: fx.GraphModule, members: list[fx.Node], source: fx.Node) -> torch.Tensor | None:
    values: dict[fx.Node, torch.Tensor] = {source: _PROBE}

    def load(arg):
        return fx.node.map_arg(arg, lambda n: values[n])

    try:
        for node in members:
            args, kwargs = load(node.args), load(node.kwargs)
            if node.op == "call_function":
                values[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                values[node] = graph_module.get_submodule(node.target)(*args, **kwargs)
    except Exception:  # an op that does not run on the probe is no activation we know
        return None
    result = values[members[-1]]
    return result if isinstance(result, torch.Tensor) and result.shape == _PROBE.shape else None


def _identify(values: torch.Tensor) -> str | None:
    values = values.to(torch.float64)
    for name in ACTIVATION_NAMES:
        reference = apply_activation(name, _PROBE)
        if torch.allclose(values, reference, rtol=_PROBE_TOLERANCE, atol=_PROBE_TOLERANCE):
            return name
    return None


def canonicalize_activations(graph_module: fx.GraphModule) -> int:
    graph = graph_module.graph
    consumed: set[fx.Node] = set()
    rewritten = 0
    for node in reversed(list(graph.nodes)):
        if node in consumed or not _elementwise(graph_module, node):
            continue
        region = _single_input_region(graph_module, node)
        if region is None:
            continue
        members, source = region
        values = _evaluate(graph_module, members, source)
        kind = _identify(values) if values is not None else None
        if kind is None:
            continue
        with graph.inserting_after(node):
            new = graph.call_function(activation, (source, kind))
        new.meta.update(node.meta)
        new.meta[MODULE_PATH] = module_path(node)
        node.replace_all_uses_with(new)
        consumed.update(members)
        rewritten += 1
    return rewritten

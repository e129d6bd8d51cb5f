"""Canonicalize, part 2: every spelling of a linear layer becomes one ``dense(x, W, b, layout)`` node.

Recognised: ``nn.Linear`` modules, ``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``,
``addmm``/``mm``/``matmul`` against a weight or its transpose (GPT-2's ``Conv1D``, including the
``view`` to 2-D and back that it wraps around ``addmm``), ``Conv1D`` modules.  A form whose weight
does not resolve to a model parameter is left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neuronmm_fx.passes.ir import (
    DENSE,
    MODULE_PATH,
    DenseInfo,
    ParamRef,
    ParamResolver,
    argument,
    dense,
    module_path,
)

aten = torch.ops.aten

_TRANSPOSE_FUNCS = {aten.t.default, torch.t}
_VIEW_FUNCS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape"}


def is_linear_module(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (recognised by its API, without importing transformers)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_layout(module: nn.Module) -> str:
    return "out_in" if isinstance(module, nn.Linear) else "in_out"


def _is_transpose(node: object) -> fx.Node | None:
    """If ``node`` is a 2-D transpose, the node it transposes."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _TRANSPOSE_FUNCS:
        return node.args[0]
    if node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose):
        dims = {d % 2 if isinstance(d, int) else d for d in node.args[1:3]}
        return node.args[0] if dims == {0, 1} else None
    if node.op == "call_function" and node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return node.args[0]
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if node.op == "call_method" and node.target == "transpose":
        dims = {d % 2 for d in node.args[1:3] if isinstance(d, int)}
        return node.args[0] if dims == {0, 1} else None
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def _weight(node: object, resolve: ParamResolver) -> tuple[fx.Node, ParamRef, bool] | None:
    """``(node holding the parameter, the parameter, transposed?)`` for a 2-D weight operand."""
    if not isinstance(node, fx.Node):
        return None
    ref = resolve(node)
    if ref is not None:
        return (node, ref, False) if ref.tensor.dim() == 2 else None
    inner = _is_transpose(node)
    if inner is not None:
        ref = resolve(inner)
        if ref is not None and ref.tensor.dim() == 2:
            return inner, ref, True
    return None


def _bias(node: object, resolve: ParamResolver) -> tuple[fx.Node | None, ParamRef | None] | None:
    """``(node, parameter)`` of a bias operand; ``(None, None)`` for no bias; None if not a parameter."""
    if node is None:
        return None, None
    if not isinstance(node, fx.Node):
        return None
    ref = resolve(node)
    return (node, ref) if ref is not None and ref.tensor.dim() == 1 else None


def _flatten_source(node: fx.Node) -> fx.Node:
    """If ``node`` flattens a tensor to 2-D (``x.view(-1, K)``), the tensor it flattens."""
    is_view = (node.op == "call_function" and node.target in _VIEW_FUNCS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS
    )
    if is_view and len(node.users) == 1:
        shape = node.args[1] if len(node.args) == 2 else node.args[1:]
        if isinstance(shape, (list, tuple)) and len(shape) == 2 and isinstance(node.args[0], fx.Node):
            return node.args[0]
    return node


def _unflatten_user(node: fx.Node) -> fx.Node | None:
    """The single ``view``/``reshape`` that restores leading dimensions after a 2-D product, if any."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    is_view = (user.op == "call_function" and user.target in _VIEW_FUNCS) or (
        user.op == "call_method" and user.target in _VIEW_METHODS
    )
    return user if is_view and user.args[0] is node else None


def _linear_form(graph_module: fx.GraphModule, node: fx.Node, resolve: ParamResolver):
    """Recognise ``node`` as a linear layer: ``(x, weight node, ref, layout, bias node, bias ref, replaced)``.

    ``replaced`` is the node whose uses the canonical ``dense`` takes over (the ``view`` after a
    flattened ``addmm``, or ``node`` itself).
    """
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if not is_linear_module(module) or len(node.args) != 1 or node.kwargs:
            return None
        weight = ParamRef(f"{node.target}.weight", module.weight)
        bias = ParamRef(f"{node.target}.bias", module.bias) if module.bias is not None else None
        return node.args[0], None, weight, linear_layout(module), None, bias, node

    if node.op != "call_function":
        return None
    target = node.target
    if target in (aten.linear.default, F.linear, torch._C._nn.linear):
        x, weight_arg, bias_arg = (
            argument(node, 0, "input"),
            argument(node, 1, "weight"),
            argument(node, 2, "bias"),
        )
        weight, bias = _weight(weight_arg, resolve), _bias(bias_arg, resolve)
        if weight is None or bias is None:
            return None
        weight_node, ref, transposed = weight
        return x, weight_node, ref, "in_out" if transposed else "out_in", bias[0], bias[1], node

    if target in (
        aten.addmm.default,
        aten.mm.default,
        torch.addmm,
        torch.mm,
        aten.matmul.default,
        torch.matmul,
        operator.matmul,
    ):
        has_bias = target in (aten.addmm.default, torch.addmm)
        if has_bias and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            return None
        bias_arg, x, weight_arg = (
            (node.args[0], node.args[1], node.args[2]) if has_bias else (None, *node.args[:2])
        )
        weight, bias = _weight(weight_arg, resolve), _bias(bias_arg, resolve)
        if weight is None or bias is None or not isinstance(x, fx.Node):
            return None
        weight_node, ref, transposed = weight
        replaced = node
        source = (
            _flatten_source(x) if target not in (aten.matmul.default, torch.matmul, operator.matmul) else x
        )
        if source is not x:
            restore = _unflatten_user(node)
            if restore is None:
                source = x  # keep the 2-D input; the product is still a projection
            else:
                replaced = restore
        return source, weight_node, ref, "out_in" if transposed else "in_out", bias[0], bias[1], replaced
    return None


def canonicalize_linears(graph_module: fx.GraphModule, resolve: ParamResolver) -> int:
    graph = graph_module.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.graph is not graph:  # erased by an earlier rewrite
            continue
        form = _linear_form(graph_module, node, resolve)
        if form is None:
            continue
        x, weight_node, weight, layout, bias_node, bias, replaced = form
        with graph.inserting_after(replaced):
            if weight_node is None:  # module form: read the parameters as attributes
                weight_node = graph.get_attr(weight.path)
                bias_node = graph.get_attr(bias.path) if bias is not None else None
            new = graph.call_function(dense, (x, weight_node, bias_node, layout))
        new.meta.update(replaced.meta)
        owner = node.target if node.op == "call_module" else module_path(node)
        new.meta[MODULE_PATH] = owner
        new.meta[DENSE] = DenseInfo(weight, bias, layout, owner)
        replaced.replace_all_uses_with(new)
        for dead in dict.fromkeys((replaced, node)):
            if dead.graph is graph and not dead.users:
                graph.erase_node(dead)
        rewritten += 1
    return rewritten

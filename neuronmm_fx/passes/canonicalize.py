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

Guarantees: the graph computes the same values as before (every canonical function is executable);
each ``dense`` node carries a :class:`~neuronmm_fx.passes.ir.DenseInfo` naming the model parameter it
reads; a form it does not recognise is left as it was.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase

from neuronmm_fx.activations import ACTIVATION_NAMES, apply_activation
from neuronmm_fx.passes.ir import (
    DENSE,
    MODULE_PATH,
    DenseInfo,
    ParamRef,
    ParamResolver,
    activation,
    dense,
    module_path,
)

aten = torch.ops.aten

# --- what counts as what ---------------------------------------------------------------------------

_TRANSPOSE_FUNCS = {aten.t.default, torch.t}
_VIEW_FUNCS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape"}

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


def is_linear_module(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (recognised by its API, without importing transformers)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_layout(module: nn.Module) -> str:
    return "out_in" if isinstance(module, nn.Linear) else "in_out"


class CanonicalizeResult(NamedTuple):
    """Same fields as ``torch.fx``'s ``PassResult``, plus how many nodes of each kind were rewritten."""

    graph_module: fx.GraphModule
    modified: bool
    counts: Counter


class Canonicalize(PassBase):
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
        counts["dense"] = _canonicalize_linears(graph_module, self.resolve_param)
        counts["activation"] = _canonicalize_activations(graph_module)
        if self.functional:
            graph.eliminate_dead_code()
        else:
            graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or may_mutate(n))
        graph.lint()
        graph_module.recompile()
        return CanonicalizeResult(graph_module, sum(counts.values()) > 0, counts)


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


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _identity_input(graph_module: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input a node passes through unchanged, or None."""
    if node.op == "call_function":
        if node.target in (aten.dropout.default, F.dropout, torch.dropout):
            p, train = (
                _arg(node, 1, "p", 0.5),
                _arg(node, 2, "train" if node.target is not F.dropout else "training"),
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


# --- linear layers ---------------------------------------------------------------------------------


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
        x, weight_arg, bias_arg = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
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


def _canonicalize_linears(graph_module: fx.GraphModule, resolve: ParamResolver) -> int:
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


# --- activations -----------------------------------------------------------------------------------


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


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The canonical name of the activation ``fn`` computes, judged on float64 probe values."""
    try:
        values = fn(_PROBE)
    except Exception:
        return None
    return _identify(values)


def _identify(values: torch.Tensor) -> str | None:
    values = values.to(torch.float64)
    for name in ACTIVATION_NAMES:
        reference = apply_activation(name, _PROBE)
        if torch.allclose(values, reference, rtol=_PROBE_TOLERANCE, atol=_PROBE_TOLERANCE):
            return name
    return None


def _canonicalize_activations(graph_module: fx.GraphModule) -> int:
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

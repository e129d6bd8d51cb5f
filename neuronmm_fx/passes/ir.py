"""The canonical IR that every pass after ``canonicalize`` works on.

Front ends produce graphs at different levels (ATen graphs from ``torch.export``, torch-level
graphs from ``torch.fx`` or Dynamo).  ``canonicalize`` rewrites the forms the matcher cares about
into two executable canonical functions, so that one matcher serves every route:

``dense(x, weight, bias, layout)``
    a linear projection; ``layout`` is ``"out_in"`` (``nn.Linear``: ``x·Wᵀ``) or ``"in_out"``
    (GPT-2's ``Conv1D``: ``x·W``).  ``node.meta[DENSE]`` holds a :class:`DenseInfo`.
``activation(x, kind)``
    one of the canonical activations of :mod:`neuronmm_fx.activations`.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from neuronmm_fx.activations import apply_activation

DENSE = "neuronmm.dense"
MODULE_PATH = "neuronmm.module_path"


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> torch.Tensor:
    """Canonical linear projection (executable, so canonical graphs still run)."""
    if layout == "in_out":
        weight = weight.t()
    return F.linear(x, weight, bias)


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Canonical activation (executable)."""
    return apply_activation(kind, x)


@dataclass(frozen=True)
class ParamRef:
    """A parameter of the user's model: its qualified name and the live tensor."""

    path: str
    tensor: torch.Tensor


ParamResolver = Callable[[fx.Node], "ParamRef | None"]


@dataclass(frozen=True)
class DenseInfo:
    """What a canonical ``dense`` node computes, in terms of the model's parameters."""

    weight: ParamRef
    bias: ParamRef | None
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D)
    module_path: str  # innermost module the projection ran in

    @property
    def in_features(self) -> int:
        return self.weight.tensor.shape[1 if self.layout == "out_in" else 0]

    @property
    def out_features(self) -> int:
        return self.weight.tensor.shape[0 if self.layout == "out_in" else 1]

    def weight_in_out(self) -> torch.Tensor:
        """The weight as (in, out), so that ``y = x·W_io + b``."""
        w = self.weight.tensor.detach()
        return w.t() if self.layout == "out_in" else w


def argument(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """A call's argument, given positionally (``index``) or by keyword (``name``)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_dense(node: object) -> bool:
    return is_call(node, dense)


def is_activation(node: object) -> bool:
    return is_call(node, activation)


_MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def is_tensor_mul(node: object) -> bool:
    """``a * b`` of two graph values, at any IR level."""
    if not isinstance(node, fx.Node):
        return False
    is_mul = (node.op == "call_function" and node.target in _MUL_TARGETS) or (
        node.op == "call_method" and node.target == "mul"
    )
    return is_mul and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)


def module_path(node: fx.Node) -> str:
    """The innermost module a node ran in ("" for the root), from capture metadata."""
    if MODULE_PATH in node.meta:
        return node.meta[MODULE_PATH]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return clean_module_path(path)


_SOURCE_PREFIX = re.compile(r"^[LG]\['[^']*'\](\[\d+\])*\.?")


def clean_module_path(path: str) -> str:
    """A module path as ``named_modules`` spells it, from any capture's spelling: Dynamo's
    ``L['self'].model.layers[0].mlp`` or ``L['args'][0].mlp``, export's ``model.layers.0.mlp``."""
    path = _SOURCE_PREFIX.sub("", path)
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def module_paths(node: fx.Node) -> list[str]:
    """Every module a node ran in, outermost first."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return [module_path(node)] if MODULE_PATH in node.meta else []
    return [clean_module_path(entry[0]) for entry in stack.values()]


def neuronmm_op(node: fx.Node) -> str | None:
    """``neuronmm::xuv``/``neuronmm::svd_mlp`` if ``node`` calls that op, else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    return name if name.startswith("neuronmm::") else None


def neuronmm_ops(graph: fx.Graph) -> Counter:
    """How many calls of each ``neuronmm`` op the graph holds, by qualified name."""
    return Counter(op for op in map(neuronmm_op, graph.nodes) if op is not None)

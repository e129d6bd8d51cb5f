"""Lower: write each ``neuronmm`` op out as the ATen computation it stands for.

Matches every call of ``neuronmm::xuv`` and ``neuronmm::svd_mlp`` and replaces it, in place, by its
PyTorch reference (:func:`neuronmm_fx.ops.xuv_reference`, :func:`~neuronmm_fx.ops.svd_mlp_reference`)
traced into the graph: casts to float32, matmuls, the activation, the gate ⊙ up product, the bias
additions and the cast back.  A downstream compiler that cannot call a kernel for the ops (Inductor
on a CPU or a GPU) then sees through them: it fuses activation, product, biases and casts into the
matmuls' epilogues and plans the matmuls with the rest of the graph, instead of calling an opaque
function around which nothing fuses.

The compile backend runs this pass only where no kernel implements the ops; where one does (the NKI
stand-in, the Neuron device) the ops must stay whole, and the backend's record says which form the
graph was handed on in and why.

A gated ``svd_mlp`` whose gate and up first factors are the two column blocks of one matrix split
along its columns (as :class:`~neuronmm_fx.modules.CompressedMLP` passes them) is written with one
GEMM against that matrix, ``x·[U_gate | U_up]``, whose result is split in two; the split that fed
the op goes away with it.

With ``panels`` > 1 (the compile backend passes the CPU's thread count), each product by a factor
``left (tokens, K) · w (K, N)`` whose N splits into ``panels`` column panels of at least
:data:`MIN_PANEL_WIDTH` columns is written as one batched GEMM, ``bmm(left, w`` viewed as
``(panels, K, N / panels))``, so that each thread runs one whole GEMM on its own panel instead of
MKL splitting one small GEMM between threads.  On the 2-core CPU this project measures on, the panel
form ran every product it is picked for at 0.99–1.6× one ``mm``'s rate (``benchmarks/gemm_panels.py``)
and took the 0.5-ratio SmolLM2's compiled prefill from 0.84 to 0.88–0.93 of its FLOP ideal
(``docs/compile.md``).  The panels are views of the factor (no copy); each output column is still one
float32 dot product over K, only MKL's blocking of it may differ.  Narrower products stay one ``mm``,
and so does every product of an op whose ``x`` has fewer than two known dimensions.

Guarantees: no ``neuronmm`` op is left; the graph computes the op's reference, operation for
operation (float32 accumulation whatever the input dtype), up to the panel form of its matmuls;
nothing else in the graph changes.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from neuronmm_fx.config import is_positive_int
from neuronmm_fx.ops import float32_matmul, svd_mlp_reference, xuv_reference
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import neuronmm_op

REFERENCES = {"neuronmm::xuv": xuv_reference, "neuronmm::svd_mlp": svd_mlp_reference}
SPLIT_FUNCTIONS = (torch.split, torch.functional.split, torch.Tensor.split)
ACT_U, UP_U = 1, 4  # positions of the gate and up first factors in svd_mlp's arguments
MIN_PANEL_WIDTH = 128  # narrower panels measured slower than one mm (a rank-128 factor on 2 panels)
FLAT_INPUT = "x has fewer than two known dimensions"


def _example_value(node):
    """The example value a traced node carries (AOT's ``val`` or Dynamo's ``example_value``), or None."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def static_width(weight: torch.Tensor | fx.Proxy | fx.Node) -> int | None:
    """A factor's column count N: a tensor's own, a traced one's from its node's example value;
    None if unknown."""
    if isinstance(weight, torch.Tensor):
        value = weight
    else:
        value = _example_value(weight.node if isinstance(weight, fx.Proxy) else weight)
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        return None
    return shape[1]


class PanelMatmul:
    """A :data:`~neuronmm_fx.ops.Matmul` for traced references: ``left·weight`` in float32, as one
    batched GEMM over ``panels`` column panels of ``weight`` where each panel has at least
    ``min_width`` columns, else as one ``mm``.  Counts the products in each form, and why one stayed
    whole."""

    def __init__(self, panels: int, min_width: int = MIN_PANEL_WIDTH) -> None:
        self.panels, self.min_width = panels, min_width
        self.paneled = 0
        self.whole: Counter = Counter()  # reason -> products left one mm

    def whole_reason(self, width: int | None) -> str | None:
        """Why a product with ``width`` output columns stays one mm; None if it takes the panels."""
        if self.panels == 1:
            return "one panel asked"
        if width is None:
            return "factor width unknown"
        if width % self.panels or width // self.panels < self.min_width:
            return f"{width} columns do not make {self.panels} panels of at least {self.min_width}"
        return None

    def __call__(self, left: torch.Tensor | fx.Proxy, weight: torch.Tensor | fx.Proxy):
        reason = self.whole_reason(static_width(weight))
        if reason is not None:
            return self._one_mm(reason, left, weight)
        self.paneled += 1
        return panel_matmul(left, weight, self.panels)

    def whole_for(self, reason: str) -> Callable:
        """A matmul that writes one ``mm`` and counts it under ``reason``."""
        return functools.partial(self._one_mm, reason)

    def _one_mm(self, reason: str, left, weight):
        self.whole[reason] += 1
        return float32_matmul(left, weight)


def panel_matmul(left, weight, panels: int):
    """``left (..., K) · weight (K, N)`` in float32 as one batched GEMM over ``panels`` column panels
    of ``weight`` (N divisible by ``panels``); the panels are views of ``weight``."""
    tokens = left.flatten(0, -2)  # (tokens, K)
    blocks = weight.float().unflatten(1, (panels, -1)).transpose(0, 1)  # (panels, K, N/panels)
    out = torch.bmm(tokens.expand(panels, -1, -1), blocks)  # (panels, tokens, N/panels)
    return out.transpose(0, 1).flatten(1).unflatten(0, left.shape[:-1])  # (..., N)


def _split_part(node) -> tuple[fx.Node, int] | None:
    """``(split node, index)`` if ``node`` is ``split(...)[index]``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    is_split = isinstance(split, fx.Node) and (
        (split.op == "call_method" and split.target == "split")
        or (split.op == "call_function" and split.target in SPLIT_FUNCTIONS)
    )
    return (split, index) if is_split and isinstance(index, int) else None


def _split_of(split: fx.Node) -> tuple[fx.Node, tuple, int]:
    """``(tensor, sizes, dim)`` of a split node, whichever way it was called."""
    sizes = split.kwargs.get("split_size", split.kwargs.get("split_size_or_sections"))
    tensor, sizes = split.args[0], split.args[1] if len(split.args) > 1 else sizes
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    return tensor, sizes, dim


def joint_first(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(matrix, r_gate)`` when the svd_mlp ``node``'s gate and up first factors are blocks 0 and 1
    of one two-way column split of ``matrix`` (K, r_gate + r_up); None otherwise."""
    if len(node.args) <= UP_U:
        return None
    parts = _split_part(node.args[ACT_U]), _split_part(node.args[UP_U])
    if parts[0] is None or parts[1] is None or (parts[0][1], parts[1][1]) != (0, 1):
        return None
    (gate_tensor, gate_sizes, gate_dim), (up_tensor, up_sizes, up_dim) = map(_split_of, (p[0] for p in parts))
    same = gate_tensor is up_tensor and list(gate_sizes or ()) == list(up_sizes or ()) and gate_dim == up_dim
    two_blocks = isinstance(gate_sizes, (list, tuple)) and len(gate_sizes) == 2
    if not (same and two_blocks and gate_dim in (1, -1) and isinstance(gate_tensor, fx.Node)):
        return None
    return gate_tensor, int(gate_sizes[0])


def _rank(node) -> int:
    """Dimensions of ``node``'s example value; 0 where unknown."""
    return len(getattr(_example_value(node), "shape", ()))


def _erase_if_unused(graph: fx.Graph, nodes: list) -> None:
    for node in nodes:
        if isinstance(node, fx.Node) and not node.users:
            graph.erase_node(node)


class LowerResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    lowered: Counter  # op name -> calls written out
    joint: int  # gated MLPs written with one GEMM for their gate and up first factors
    paneled: int  # products by a factor written as a batched GEMM over column panels
    whole: Counter  # reason -> products by a factor left one mm


class Lower(CheckedPass):
    """Write every ``neuronmm`` op out as ATen; ``panels`` column panels per product where they fit
    (1: plain ``mm`` everywhere)."""

    def __init__(self, panels: int = 1) -> None:
        if not is_positive_int(panels):
            raise ValueError(f"Lower: panels must be a positive int, got {panels!r}")
        self.panels = panels

    def call(self, graph_module: fx.GraphModule) -> LowerResult:
        graph = graph_module.graph
        lowered: Counter = Counter()
        tracer = fx.proxy.GraphAppendingTracer(graph)
        matmul = PanelMatmul(self.panels)

        def as_proxy(value: fx.Node) -> fx.Proxy:
            return fx.Proxy(value, tracer)

        joint_count = 0
        for node in list(graph.nodes):
            name = neuronmm_op(node)
            if name is None:
                continue
            joint = joint_first(node) if name == "neuronmm::svd_mlp" else None
            with graph.inserting_before(node):
                args = fx.node.map_arg(node.args, as_proxy)
                kwargs = dict(fx.node.map_arg(node.kwargs, as_proxy))
                if joint is not None:
                    kwargs["joint_first"] = (as_proxy(joint[0]), joint[1])
                # the panel form flattens x's leading dimensions
                kwargs["matmul"] = matmul if _rank(node.args[0]) >= 2 else matmul.whole_for(FLAT_INPUT)
                result = REFERENCES[name](*args, **kwargs).node
            result.meta.update(node.meta)  # shape and dtype, for the downstream compiler
            node.replace_all_uses_with(result)
            first_factors = [node.args[ACT_U], node.args[UP_U]] if joint is not None else []
            splits = list(dict.fromkeys(part.args[0] for part in first_factors))
            graph.erase_node(node)
            _erase_if_unused(graph, first_factors + splits)  # the blocks, then their splits, if unread
            lowered[name] += 1
            joint_count += joint is not None
        if lowered:
            graph_module.recompile()
        return LowerResult(graph_module, bool(lowered), lowered, joint_count, matmul.paneled, matmul.whole)

    def check(self, graph_module: fx.GraphModule) -> None:
        left = [node.name for node in graph_module.graph.nodes if neuronmm_op(node) is not None]
        if left:
            raise PassCheckError(f"neuronmm ops left after lowering: {', '.join(left)}")

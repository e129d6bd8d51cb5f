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

Guarantees: no ``neuronmm`` op is left; the graph computes the op's reference, operation for
operation (float32 accumulation whatever the input dtype); nothing else in the graph changes.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import NamedTuple

import torch
import torch.fx as fx

from neuronmm_fx.ops import svd_mlp_reference, xuv_reference
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import neuronmm_op

REFERENCES = {"neuronmm::xuv": xuv_reference, "neuronmm::svd_mlp": svd_mlp_reference}
SPLIT_FUNCTIONS = (torch.split, torch.functional.split, torch.Tensor.split)
ACT_U, UP_U = 1, 4  # positions of the gate and up first factors in svd_mlp's arguments


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


def _erase_if_unused(graph: fx.Graph, nodes: list) -> None:
    for node in nodes:
        if isinstance(node, fx.Node) and not node.users:
            graph.erase_node(node)


class LowerResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    lowered: Counter  # op name -> calls written out
    joint: int  # gated MLPs written with one GEMM for their gate and up first factors


class Lower(CheckedPass):
    def call(self, graph_module: fx.GraphModule) -> LowerResult:
        graph = graph_module.graph
        lowered: Counter = Counter()
        tracer = fx.proxy.GraphAppendingTracer(graph)

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
        return LowerResult(graph_module, bool(lowered), lowered, joint_count)

    def check(self, graph_module: fx.GraphModule) -> None:
        left = [node.name for node in graph_module.graph.nodes if neuronmm_op(node) is not None]
        if left:
            raise PassCheckError(f"neuronmm ops left after lowering: {', '.join(left)}")

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

Guarantees: no ``neuronmm`` op is left; the graph computes the op's reference, operation for
operation (float32 accumulation whatever the input dtype); nothing else in the graph changes.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch.fx as fx

from neuronmm_fx.ops import svd_mlp_reference, xuv_reference
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import neuronmm_op

REFERENCES = {"neuronmm::xuv": xuv_reference, "neuronmm::svd_mlp": svd_mlp_reference}


class LowerResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    lowered: Counter  # op name -> calls written out


class Lower(CheckedPass):
    def call(self, graph_module: fx.GraphModule) -> LowerResult:
        graph = graph_module.graph
        lowered: Counter = Counter()
        tracer = fx.proxy.GraphAppendingTracer(graph)

        def as_proxy(value: fx.Node) -> fx.Proxy:
            return fx.Proxy(value, tracer)

        for node in list(graph.nodes):
            name = neuronmm_op(node)
            if name is None:
                continue
            with graph.inserting_before(node):
                args = fx.node.map_arg(node.args, as_proxy)
                kwargs = fx.node.map_arg(node.kwargs, as_proxy)
                result = REFERENCES[name](*args, **kwargs).node
            result.meta.update(node.meta)  # shape and dtype, for the downstream compiler
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            lowered[name] += 1
        if lowered:
            graph_module.recompile()
        return LowerResult(graph_module, bool(lowered), lowered)

    def check(self, graph_module: fx.GraphModule) -> None:
        left = [node.name for node in graph_module.graph.nodes if neuronmm_op(node) is not None]
        if left:
            raise PassCheckError(f"neuronmm ops left after lowering: {', '.join(left)}")

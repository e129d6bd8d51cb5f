"""Decanonicalize: turn the canonical nodes that no site used back into plain torch calls.

On the compile route the graph goes on to another compiler, which knows ``torch._C._nn.linear`` and
``F.silu`` but not this project's canonical ``dense`` and ``activation`` functions.  Every ``dense``
node left after fusing becomes ``linear`` (with a transpose for the ``in_out`` layout of GPT-2's
``Conv1D``), every ``activation`` node the torch function it names.

Guarantees: the graph computes the same values; no canonical node remains; the result lists the
module path of every linear layer left dense.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx

from neuronmm_fx.activations import ACTIVATION_CALLS
from neuronmm_fx.passes import CheckedPass, PassCheckError
from neuronmm_fx.passes.ir import is_activation, is_dense, module_path


class DecanonicalizeResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    dense_paths: list[str]  # module paths of the linear layers left as they were


class Decanonicalize(CheckedPass):
    def call(self, graph_module: fx.GraphModule) -> DecanonicalizeResult:
        graph = graph_module.graph
        dense_paths = []
        for node in list(graph.nodes):
            if is_dense(node):
                x, weight, bias, layout = node.args
                dense_paths.append(module_path(node))
                with graph.inserting_before(node):
                    if layout == "in_out":
                        weight = graph.call_function(torch.t, (weight,))
                        weight.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
                    new = graph.call_function(torch._C._nn.linear, (x, weight, bias))
            elif is_activation(node):
                function, kwargs = ACTIVATION_CALLS[node.args[1]]
                with graph.inserting_before(node):
                    new = graph.call_function(function, (node.args[0],), dict(kwargs))
            else:
                continue
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        graph_module.recompile()
        return DecanonicalizeResult(graph_module, bool(dense_paths), dense_paths)

    def check(self, graph_module: fx.GraphModule) -> None:
        """No canonical node remains."""
        left = [n.name for n in graph_module.graph.nodes if is_dense(n) or is_activation(n)]
        if left:
            raise PassCheckError(f"canonical nodes left after decanonicalize: {left}")

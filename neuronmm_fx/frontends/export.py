"""Capture: turn a live model into one graph whose nodes know their module paths.

Strategy.  ``torch.fx.symbolic_trace`` fails on whole Hugging Face models of transformers 5.x
(decoder layers are wrapped in a ``*args, **kwargs`` checkpointing ``__call__``), and tracing
submodules one at a time cannot see patterns that span modules (OPT's ``fc1 → act → fc2`` lives in
the decoder layer's own code; BERT's MLP is split across two sibling modules).  We therefore capture
the **whole model** with ``torch.export.export(..., strict=False)`` on example inputs: the result is
an ATen graph in which every parameter is a named placeholder and every node carries the
``nn_module_stack`` it ran in.  Matching on that graph finds every pattern with the module paths of
its parts; the rewrite is then *installed on the live module tree* (:mod:`neuronmm_fx.install`),
so the user's model keeps its class, its ``generate`` and its ``state_dict`` layout for everything
that was not rewritten.  The exported graph itself is only an analysis artefact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from neuronmm_fx.errors import CaptureError
from neuronmm_fx.passes.canonicalize_linears import is_linear_module
from neuronmm_fx.passes.ir import ParamRef

DEFAULT_TOKENS = 8  # length of the default example sequence: long enough for every code path of a decoder


@dataclass
class Capture:
    """An exported graph of the model and the way back from its placeholders to the model's parameters."""

    graph_module: fx.GraphModule
    parameter_names: dict[str, str]  # placeholder name -> qualified parameter name
    parameters: dict[str, torch.Tensor]
    example_args: tuple
    example_kwargs: dict

    def resolve_param(self, node: fx.Node) -> ParamRef | None:
        if node.op == "placeholder" and node.name in self.parameter_names:
            path = self.parameter_names[node.name]
            return ParamRef(path, self.parameters[path])
        if node.op == "get_attr" and node.target in self.parameters:
            return ParamRef(node.target, self.parameters[node.target])
        return None


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear``/``Conv1D`` of the model with its path."""
    return [(path, module) for path, module in model.named_modules() if is_linear_module(module)]


def default_example_inputs(model: nn.Module) -> tuple[tuple, dict]:
    """Example inputs good enough to capture the model's dataflow.

    A model with a ``config.vocab_size`` (Hugging Face) gets a batch of ``DEFAULT_TOKENS`` token ids
    (and ``use_cache=False`` where its forward takes it, so no cache object is built); anything else
    gets a random (2, K) tensor for its first linear layer's K.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        ids = (torch.arange(DEFAULT_TOKENS, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
        accepts = inspect.signature(model.forward).parameters
        kwargs = {"use_cache": False} if "use_cache" in accepts else {}
        return (ids,), kwargs
    linears = linear_modules(model)
    if not linears:
        raise CaptureError(
            "cannot make example inputs for a model without linear layers; pass example_inputs"
        )
    first = linears[0][1]
    in_features = first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_features, generator=generator).to(device=device, dtype=first.weight.dtype)
    return (x,), {}


def capture(model: nn.Module, example_args: tuple, example_kwargs: dict) -> Capture:
    """Export ``model`` non-strictly on the example inputs (no weights are changed)."""
    try:
        with torch.no_grad():
            program = torch.export.export(model, example_args, kwargs=example_kwargs, strict=False)
    except Exception as error:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with the example inputs "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "pass example_inputs=(...) / example_kwargs={...} that the model's forward accepts"
        ) from error
    names = dict(program.graph_signature.inputs_to_parameters)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    return Capture(program.graph_module, names, parameters, example_args, example_kwargs)

"""``torch.export`` of optimized models.

The ``neuronmm`` custom ops have fake implementations, so an optimized model exports with
``torch.export.export`` and the ops stay in the exported graph as ``torch.ops.neuronmm.*`` calls.
``torch.export.save``/``load`` round-trip once the ops are registered, which importing
``neuronmm_fx`` does (:func:`load` makes sure of it).

>>> program = export_causal_lm(neuronmm_fx.optimize(model, ratio=0.2), input_ids)
>>> save(program, "model.pt2")
>>> logits = load("model.pt2").module()(input_ids)
"""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from neuronmm_fx import ops  # noqa: F401  (registers the neuronmm custom ops before any load)
from neuronmm_fx.errors import CaptureError
from neuronmm_fx.passes.ir import neuronmm_ops as graph_neuronmm_ops


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM seen as ``forward(input_ids, attention_mask=None) -> logits``.

    It calls the model with ``use_cache=False`` and returns the logits tensor only, so no cache object
    or ``ModelOutput`` reaches the exported program's outputs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        accepts = inspect.signature(model.forward).parameters
        self._kwargs = {"use_cache": False} if "use_cache" in accepts else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


def export(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    dynamic_shapes=None,
    strict: bool = False,
) -> ExportedProgram:
    """``torch.export.export`` (non-strict by default, as HF models need) with a readable error."""
    try:
        return torch.export.export(
            model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict
        )
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} ({type(error).__name__}: {first})"
        ) from error


def export_causal_lm(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dynamic_sequence: bool = False,
    max_sequence: int | None = None,
) -> ExportedProgram:
    """Export a Hugging Face causal LM (optimized or not) as ``(input_ids[, attention_mask]) -> logits``.

    ``dynamic_sequence`` makes the sequence length symbolic (from 2 up to ``max_sequence``, by default
    the model's ``max_position_embeddings``); the batch size stays that of ``input_ids``.
    """
    wrapper = CausalLMLogits(model).eval()
    args = (input_ids,) if attention_mask is None else (input_ids, attention_mask)
    dynamic_shapes = None
    if dynamic_sequence:
        limit = max_sequence or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        sequence = Dim("sequence", min=2, max=limit) if limit else Dim("sequence", min=2)
        dynamic_shapes = tuple({1: sequence} for _ in args)
    return export(wrapper, args, dynamic_shapes=dynamic_shapes)


def neuronmm_ops(program: ExportedProgram | torch.fx.GraphModule) -> Counter:
    """How many calls of each ``neuronmm`` op an exported program (or graph module) contains."""
    return graph_neuronmm_ops(program.graph)


def save(program: ExportedProgram, path: str | Path) -> Path:
    """``torch.export.save`` to ``path`` (a ``.pt2`` archive)."""
    path = Path(path)
    torch.export.save(program, path)
    return path


def load(path: str | Path) -> ExportedProgram:
    """``torch.export.load``, with the ``neuronmm`` ops registered first (importing this module did)."""
    return torch.export.load(Path(path))

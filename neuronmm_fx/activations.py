"""The activations a compressed MLP may use, by canonical name.

Every pass and kernel in the project speaks of activations by these names only:

=============  ==========================================================
``silu``       ``x · sigmoid(x)`` (LLaMA, Qwen, Mistral, Phi-3)
``gelu``       exact GELU, ``x · Φ(x)`` (BERT, OPT variants, ``nn.GELU()``)
``gelu_tanh``  tanh approximation of GELU (GPT-2, Gemma)
``relu``       ``max(x, 0)`` (OPT)
=============  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# name -> (torch function, keyword arguments): the one table of what each name computes
ACTIVATION_CALLS: dict[str, tuple[Callable[..., torch.Tensor], dict]] = {
    "silu": (F.silu, {}),
    "gelu": (F.gelu, {}),
    "gelu_tanh": (F.gelu, {"approximate": "tanh"}),
    "relu": (F.relu, {}),
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATION_CALLS)


def check_activation(name: str) -> str:
    """Return ``name`` if it is a supported activation, else raise a ``ValueError`` naming the choices."""
    if name not in ACTIVATION_CALLS:
        raise ValueError(
            f"unknown activation {name!r}: neuronmm supports {', '.join(repr(a) for a in ACTIVATION_NAMES)}"
        )
    return name


def apply_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the activation called ``name`` to ``x``."""
    function, kwargs = ACTIVATION_CALLS[check_activation(name)]
    return function(x, **kwargs)

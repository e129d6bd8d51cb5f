"""The hand-off to NxD Inference (``neuronx-distributed``): which of its parallel layers holds each
factor of a sharded MLP, and which NKI kernel each rank launches.

NxD's ``ColumnParallelLinear`` splits a weight's output features over the TP ranks
(``gather_output=True`` all-gathers the result); ``RowParallelLinear`` splits the input features and
all-reduces the output (``input_is_parallel=True``: the input arrives already split).  A factor on
every rank is an ordinary replicated weight.  The mapping below is what an NxD model definition
declares; :func:`nxd_plan` fills it in for every site of a model sharded by
:func:`neuronmm_fx.parallel.shard`, with the local shapes.

``neuronx-distributed`` is part of the Neuron SDK and cannot be installed where there is no Neuron
SDK; :func:`nxd_status` says whether it imports here, and the plan is the same either way.
"""

from __future__ import annotations

import importlib

from torch import nn

from neuronmm_fx.parallel.modules import ShardedMLP

# (scheme, factor) → (NxD layer, its arguments and what they mean)
LAYERS = {
    ("replicated", "first U"): ("replicated weight", "the same (H, r) on every rank"),
    ("replicated", "first V"): ("ColumnParallelLinear", "gather_output=False: the rank keeps I/t columns"),
    ("r_sharded", "first U"): (
        "ColumnParallelLinear",
        "gather_output=True: its all-gather is the one over r",
    ),
    ("r_sharded", "first V"): ("ColumnParallelLinear", "gather_output=False, input (tokens, r) whole"),
    ("dense", "first W"): ("ColumnParallelLinear", "gather_output=False"),
    ("any", "down U"): ("RowParallelLinear", "input_is_parallel=True: its all-reduce is over r_down"),
    ("any", "down V"): ("replicated weight", "the same (r_down, H) on every rank, after the all-reduce"),
    ("dense", "down W"): ("RowParallelLinear", "input_is_parallel=True: its all-reduce is over H"),
}

KERNELS = {
    "replicated": (
        "svd_mlp (fused) on x (tokens, H) with gate/up U (H, r), V (r, I/t) and down given as the dense "
        "(I/t, r_down) block → (tokens, r_down); all-reduce; dense kernel ·V_down (r_down, H)"
    ),
    "r_sharded": (
        "dense kernel x·[U_gate,p | U_up,p] (H, (r_gate + r_up)/t); all-gather over r; dense kernels "
        "·V_gate,p and ·V_up,p (r, I/t), activation and product on the Vector/Scalar engines, "
        "·U_down,p (I/t, r_down); all-reduce; dense kernel ·V_down (r_down, H).  No fused kernel "
        "covers the part after the all-gather yet"
    ),
}


def nxd_status() -> str:
    """Whether ``neuronx_distributed`` imports here, in one line."""
    try:
        module = importlib.import_module("neuronx_distributed")
    except Exception as error:  # ImportError, or a broken install raising something else
        return (
            f"neuronx_distributed does not import here ({type(error).__name__}); it ships with the Neuron "
            "SDK: the plan below is what an NxD model declares, not built or run here"
        )
    return f"neuronx_distributed {getattr(module, '__version__', '(version unknown)')} imports here"


def _factor_rows(module: ShardedMLP) -> list[dict]:
    rows = []
    for role in module.first_roles:
        u, v = getattr(module, f"{role}_u"), getattr(module, f"{role}_v")
        if v is None:
            rows.append(_row(role, "W", u, ("dense", "first W")))
        else:
            rows.append(_row(role, "U", u, (module.scheme, "first U")))
            rows.append(_row(role, "V", v, (module.scheme, "first V")))
    last = module.last_role
    u, v = getattr(module, f"{last}_u"), getattr(module, f"{last}_v")
    if v is None:
        rows.append(_row(last, "W", u, ("dense", "down W")))
    else:
        rows.append(_row(last, "U", u, ("any", "down U")))
        rows.append(_row(last, "V", v, ("any", "down V")))
    return rows


def _row(role: str, factor: str, tensor, key) -> dict:
    layer, arguments = LAYERS[key]
    return {
        "factor": f"{role}.{factor}",
        "local_shape": list(tensor.shape),
        "layer": layer,
        "arguments": arguments,
    }


def nxd_plan(model: nn.Module) -> list[dict]:
    """Per sharded MLP of ``model`` (this rank): its scheme, each factor's local shape and NxD layer,
    and the kernels the rank launches."""
    return [
        {
            "path": path,
            "scheme": module.scheme,
            "factors": _factor_rows(module),
            "kernels": KERNELS[module.scheme],
        }
        for path, module in model.named_modules()
        if isinstance(module, ShardedMLP)
    ]

"""``nki.language`` of the stand-in: allocation, memory handles, dtypes, tile sizes, operators.

``nl.ndarray`` allocates through :mod:`.memory` (and so is checked against the partition and
capacity rules); the operators and activation functions are :class:`~.isa.Operator` objects that
only instructions may apply.  GELU uses ``erf`` (scipy's when present, else torch's).
"""

from __future__ import annotations

import itertools
import math
import types

import numpy as np

from ..targets import MOVING_FMAX, PARTITIONS, STATIONARY_FMAX
from .isa import Operator, memset
from .memory import BF16, BUFFERS, Buffer, NkiTensor, allocate
from .rules import NkiRuleError

_names = itertools.count()
_BUFFER = {b.name: b for b in BUFFERS}


def ndarray(shape, dtype, buffer=_BUFFER["sbuf"], name: str = "", address=None) -> NkiTensor:
    """``nl.ndarray``: a new tensor in ``nl.sbuf`` (default), ``nl.psum`` or ``nl.shared_hbm``."""
    if not isinstance(buffer, Buffer):
        raise NkiRuleError("dma-buffer", f"unknown buffer {buffer!r}")
    return allocate(shape, dtype, buffer.kind, name or f"t{next(_names)}")


def zeros(shape, dtype, buffer=_BUFFER["sbuf"], name: str = "") -> NkiTensor:
    """``nl.zeros``: :func:`ndarray` filled with zeros (a Vector-engine memset)."""
    t = ndarray(shape, dtype, buffer=buffer, name=name)
    memset(t, 0.0)
    return t


class tile_size:  # lower case, as NKI spells it
    """``nl.tile_size``: the instruction tile limits."""

    pmax = PARTITIONS
    gemm_stationary_fmax = STATIONARY_FMAX
    gemm_moving_fmax = MOVING_FMAX
    psum_fmax = MOVING_FMAX


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # type: ignore[import-not-found]

        return erf(x)
    except ImportError:  # pragma: no cover - torch is a project dependency
        import torch

        return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _gelu(x):
    x64 = x.astype(np.float64)
    return 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))


def _gelu_tanh(x):
    x64 = x.astype(np.float64)
    return 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _silu(x):
    x64 = x.astype(np.float64)
    return x64 / (1.0 + np.exp(-x64))


OPERATORS = tuple(
    Operator(name, fn, "activation")
    for name, fn in (
        ("copy", lambda x: x),
        ("silu", _silu),
        ("gelu", _gelu),
        ("gelu_apprx_tanh", _gelu_tanh),
        ("relu", lambda x: np.maximum(x, 0)),
        ("sigmoid", _sigmoid),
        ("tanh", np.tanh),
        ("exp", np.exp),
    )
) + tuple(
    Operator(name, fn, "alu")
    for name, fn in (
        ("add", np.add),
        ("subtract", np.subtract),
        ("multiply", np.multiply),
        ("maximum", np.maximum),
        ("minimum", np.minimum),
    )
)

DTYPES = {
    "bfloat16": BF16,
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
}

nl = types.SimpleNamespace(
    ndarray=ndarray,
    zeros=zeros,
    tile_size=tile_size,
    **_BUFFER,
    **DTYPES,
    **{o.name: o for o in OPERATORS},
    __name__="nki.language (neuronmm_fx CPU stand-in)",
)

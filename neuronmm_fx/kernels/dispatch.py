"""Which implementation the ``neuronmm`` custom ops run, and the kernel launchers.

The CPU implementations of the ops (``neuronmm_fx.ops``) ask :func:`active_mode` on every
call.  ``None`` means the PyTorch reference path; ``"standin"`` means the NKI kernels executed
on the project's CPU stand-in for the NKI API (slow, for verification); ``"nki"`` means the real
kernels on a Neuron device.

Launchers (:func:`xuv`, :func:`svd_mlp`) take and return torch tensors.  In ``"standin"`` mode
they convert to numpy (bfloat16 through ``ml_dtypes``, float16 and float32 natively), plan the
blocks for :data:`standin_target` (see :func:`set_standin_target`), run the kernel and convert
back; the stand-in's counters of the last launch are available from :func:`last_stats`.  Where the
real ``nki`` is importable, "standin" mode runs the same kernels through the SDK's own CPU
simulator (``nki.simulate``) instead, since the project's stand-in is never used alongside the real
NKI; in ``"nki"`` mode the launchers call the ``nki.jit`` kernels on device tensors.  Neither of
those two paths can be exercised without the Neuron SDK.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuronmm_kernel_mode", default=None)
_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("neuronmm_standin_target", default="trn2")
_LAST_STATS: contextvars.ContextVar[Any] = contextvars.ContextVar("neuronmm_last_stats", default=None)

LNC = 1
"""Launch grid of every kernel: one physical NeuronCore per launch (the planner's figures are per
physical core).  On Trn2/Trn3 the compiler's default logical core pairs two (LNC = 2); the kernels
do not split their work across the pair."""

MAX_TOKENS_PER_LAUNCH = 8192
"""Token rows per X.U.V launch: the kernels unroll their loops at trace time, so one launch of a
32K-token prefill would be four times the instructions of this bound; the launcher splits instead
(each launch re-reads the factors once per token block, as one long launch would)."""


def active_mode() -> str | None:
    """The kernel mode in force for this thread/task, or ``None`` for the PyTorch path."""
    return _MODE.get()


@contextlib.contextmanager
def use_standin_kernels() -> Iterator[None]:
    """Run every ``neuronmm`` op inside the block through the NKI kernels on the CPU stand-in."""
    token = _MODE.set("standin")
    try:
        yield
    finally:
        _MODE.reset(token)


def nki_available() -> bool:
    """True when the real Neuron Kernel Interface imports (and so the kernels use it)."""
    from ._nki import USING_STANDIN

    return not USING_STANDIN


def neuron_device_available() -> bool:
    """True when the real ``nki`` imports and ``torch_neuronx`` finds a Neuron device."""
    if not nki_available():
        return False
    try:  # pragma: no cover - needs the Neuron SDK
        import torch_neuronx  # type: ignore[import-not-found]  # noqa: F401
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

        return bool(xm.get_xla_supported_devices("NEURON") or xm.get_xla_supported_devices())
    except Exception:
        return False


@contextlib.contextmanager
def use_nki_kernels() -> Iterator[None]:
    """Run the ops through the real NKI kernels on a Neuron device (needs the Neuron SDK)."""
    if not neuron_device_available():
        raise RuntimeError("use_nki_kernels() needs the Neuron SDK (import nki) and a Neuron device")
    token = _MODE.set("nki")  # pragma: no cover
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        _MODE.reset(token)


def set_standin_target(target: str) -> None:
    """Target (``"trn1"`` or ``"trn2"``) whose SBUF/PSUM the stand-in enforces and the planner uses."""
    from .targets import get_target

    _TARGET.set(get_target(target).name)


def standin_target() -> str:
    return _TARGET.get()


def last_stats():
    """:class:`~neuronmm_fx.kernels.standin.KernelStats` of the last stand-in launch in this
    context (``None`` before any)."""
    return _LAST_STATS.get()


# ----------------------------------------------------------------------------------------------
# torch <-> numpy


_DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(t) -> str:
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise TypeError(f"neuronmm kernels take float32, bfloat16 or float16 tensors, got {t.dtype}")
    return name


def _to_numpy(t, dtype):
    import ml_dtypes
    import torch

    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_numpy(a, dtype, device):
    import numpy as np
    import torch

    if dtype == torch.bfloat16:
        out = torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(torch.bfloat16)
    else:
        out = torch.from_numpy(np.array(a, copy=True))
    return out.to(device)


def _run(kernel, plan, x, args, **const):
    """Run ``kernel`` on ``args`` (x's flattened rows first, then weights already in x's dtype) in the
    active mode; returns a torch tensor in x's dtype and device, shaped (*x.shape[:-1], out)."""
    if active_mode() == "nki":  # pragma: no cover - needs a Neuron device
        out = kernel[LNC](*args, **plan.kernel_kwargs(), **const)
    else:
        from ._nki import USING_STANDIN, nki

        arrays = [None if a is None else _to_numpy(a, x.dtype) for a in args]
        if USING_STANDIN:
            from .standin import run_kernel

            res = run_kernel(kernel, *arrays, target=standin_target(), **plan.kernel_kwargs(), **const)
            _LAST_STATS.set(res.stats)
            y = res.outputs
        else:  # pragma: no cover - the SDK's own simulator, where the real nki imports
            y = nki.simulate(kernel)(*arrays, **plan.kernel_kwargs(), **const)
        out = _from_numpy(y, x.dtype, x.device)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _check_bias(what: str, bias, n: int) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {tuple(bias.shape)}")


def _cast(t, dtype, shape=None):
    """``t`` in ``dtype``, dense row-major (the kernels address HBM operands so; the joint gate/up
    first factor arrives as two column views), reshaped to ``shape`` if given; None stays None."""
    if t is None:
        return None
    t = t.to(dtype).contiguous()
    return t if shape is None else t.reshape(shape)


# ----------------------------------------------------------------------------------------------
# launchers


def xuv(x, u, v, bias=None):
    """``x @ u @ v + bias`` through the fused X.U.V kernel.

    x (..., K), u (K, r), v (r, N), bias (N,) or None -> (..., N) in x's dtype (float32,
    bfloat16 or float16; the factors are cast to it).  The bias is added in the kernel's epilogue
    (while evacuating PSUM), not on the host.  The form (fused, K-blocked fused or the unfused
    two-kernel chain) is the planner's choice for the shape (:func:`~neuronmm_fx.kernels.planner.
    choose_xuv`: the fewest HBM bytes).  Tokens go in launches of at most
    :data:`MAX_TOKENS_PER_LAUNCH`, which bounds the unrolled kernel of a long prefill."""
    from . import planner
    from .xuv import xuv_fused, xuv_kblocked, xuv_unfused

    dname = _check_dtype(x)
    K = x.shape[-1]
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != K or v.shape[0] != u.shape[1]:
        raise ValueError(
            f"xuv: shapes x {tuple(x.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)} do not chain"
        )
    r, N = v.shape
    _check_bias("xuv: bias", bias, N)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    dt = x.dtype
    weights = (_cast(u, dt), _cast(v, dt), _cast(bias, dt, (1, N)))
    kernels = {"fused": xuv_fused, "kblocked": xuv_kblocked, "unfused": xuv_unfused}
    outputs = []
    for rows in x2.split(MAX_TOKENS_PER_LAUNCH):  # bounds the unrolled kernel of a long prefill
        choice = planner.choose_xuv(rows.shape[0], K, r, N, dname, standin_target(), bias=bias is not None)
        outputs.append(_run(kernels[choice.form], choice.plan, rows, (rows, *weights)))
    return torch.cat(outputs).reshape(*x.shape[:-1], N)


def dense(x, w, bias=None):
    """``x @ w + bias`` through the dense baseline kernel (x (..., K), w (K, N), bias (N,) or None)."""
    from .planner import plan_dense
    from .xuv import matmul_dense

    dname = _check_dtype(x)
    K = x.shape[-1]
    if w.dim() != 2 or w.shape[0] != K:
        raise ValueError(f"dense: shapes x {tuple(x.shape)} and w {tuple(w.shape)} do not chain")
    N = w.shape[1]
    _check_bias("dense: bias", bias, N)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    plan = plan_dense(M, K, N, dname, standin_target(), bias=bias is not None)
    return _run(matmul_dense, plan, x, (x2, _cast(w, x.dtype), _cast(bias, x.dtype, (1, N))))


def svd_mlp(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation):
    """A whole (compressed) MLP through one of the MLP kernels, or projection by projection.

    ``h = act(x.act_u.act_v + act_bias)``; if ``up_u`` is given, ``h = h * (x.up_u.up_v +
    up_bias)``; ``y = h.down_u.down_v + down_bias``.  Any ``*_v`` may be None: that projection is
    dense and its ``*_u`` is the full (K_in, K_out) matrix (``y = x @ u``).  Biases may be None.
    ``activation`` is a name of :mod:`neuronmm_fx.activations` (``"silu"``, ``"gelu"`` (exact
    erf), ``"gelu_tanh"``, ``"relu"``).  Returns (..., H) in x's dtype; all biases are applied in
    the kernel.  :func:`~neuronmm_fx.kernels.planner.choose_svd_mlp` picks the form that moves the
    fewest HBM bytes: :func:`~neuronmm_fx.kernels.mlp.svd_mlp_fused`,
    :func:`~neuronmm_fx.kernels.mlp.svd_mlp_kblocked`, or each projection as its own X.U.V / X.W
    kernel with the activation and product applied on the host between them (h then goes through
    memory: long prefills of large ranks, float16, or an MLP no kernel can block)."""
    from ..activations import check_activation
    from . import planner
    from .costs import MlpShape
    from .mlp import check_mlp_kblocked_launch, check_mlp_launch, svd_mlp_fused, svd_mlp_kblocked

    check_activation(activation)
    dname = _check_dtype(x)
    K = x.shape[-1]
    gated = up_u is not None
    if not gated and (up_v is not None or up_bias is not None):
        raise ValueError("svd_mlp: up_v/up_bias given without up_u")

    def out_dim(name, u, v, k_in):
        if u.dim() != 2 or u.shape[0] != k_in:
            raise ValueError(f"svd_mlp: {name}_u has shape {tuple(u.shape)}, expected ({k_in}, ...)")
        if v is None:
            return u.shape[1], None
        if v.dim() != 2 or v.shape[0] != u.shape[1]:
            raise ValueError(
                f"svd_mlp: {name}_v {tuple(v.shape)} does not chain with {name}_u {tuple(u.shape)}"
            )
        return v.shape[1], u.shape[1]

    I, r_act = out_dim("act", act_u, act_v, K)  # noqa: E741 - the intermediate size (docs/kernels.md)
    r_up = None
    if gated:
        I_up, r_up = out_dim("up", up_u, up_v, K)
        if I_up != I:
            raise ValueError(f"svd_mlp: gate produces {I} features but up produces {I_up}")
    H, r_down = out_dim("down", down_u, down_v, I)
    for name, b, n in (("act", act_bias, I), ("up", up_bias, I), ("down", down_bias, H)):
        _check_bias(f"svd_mlp: {name}_bias", b, n)

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*x.shape[:-1], H)
    has_bias = (act_bias is not None, gated and up_bias is not None, down_bias is not None)
    shape = MlpShape(K, I, H, r_act, r_up, r_down, gated, *has_bias)
    choice = planner.choose_svd_mlp(M, shape, dname, standin_target())
    if choice.form == "split":
        return _svd_mlp_split(
            x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation
        )
    plan = choice.plan
    if choice.form == "kblocked":
        lowrank = (act_v is not None, not gated or up_v is not None, down_v is not None)
        check_mlp_kblocked_launch(activation, dname, lowrank)
        kernel = svd_mlp_kblocked
    else:
        dense_in = act_v is None or (gated and up_v is None)
        check_mlp_launch(activation, I, dense_in, down_v is None, plan.kernel_kwargs())
        kernel = svd_mlp_fused
    dt = x.dtype
    args = (x2, _cast(act_u, dt), _cast(act_v, dt), _cast(act_bias, dt, (I, 1)))
    args += (_cast(up_u, dt), _cast(up_v, dt), _cast(up_bias, dt, (I, 1)))
    args += (_cast(down_u, dt), _cast(down_v, dt), _cast(down_bias, dt, (1, H)))
    return _run(kernel, plan, x, args, activation=activation)


def _svd_mlp_split(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation):
    """Fallback: three projection kernels, activation and product on the host in between."""
    from ..activations import apply_activation

    def proj(z, u, v, b):
        return xuv(z, u, v, b) if v is not None else dense(z, u, b)

    h = apply_activation(activation, proj(x, act_u, act_v, act_bias))
    if up_u is not None:
        h = h * proj(x, up_u, up_v, up_bias)
    return proj(h, down_u, down_v, down_bias)

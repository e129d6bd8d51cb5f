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

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuronmm_kernel_mode", default=None)
_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("neuronmm_standin_target", default="trn2")
_LAST_STATS: contextvars.ContextVar[Any] = contextvars.ContextVar("neuronmm_last_stats", default=None)


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


def _launch(kernel, plan, *args, **const):
    """Run one kernel in the active mode; returns a numpy array."""
    from ._nki import USING_STANDIN, nki

    mode = active_mode()
    if mode == "nki":  # pragma: no cover - needs a Neuron device
        raise RuntimeError("launch NKI kernels on device tensors through _launch_device")
    if USING_STANDIN:
        from .standin import run_kernel

        res = run_kernel(kernel, *args, target=standin_target(), **plan.kernel_kwargs(), **const)
        _LAST_STATS.set(res.stats)
        return res.outputs
    return nki.simulate(kernel)(*args, **plan.kernel_kwargs(), **const)  # pragma: no cover


def _launch_device(kernel, plan, *args, **const):  # pragma: no cover - needs a Neuron device
    return kernel(*args, **plan.kernel_kwargs(), **const)


def _run(kernel, plan, device_args, np_args, **const):
    if active_mode() == "nki":  # pragma: no cover - needs a Neuron device
        return _launch_device(kernel, plan, *device_args, **const), True
    return _launch(kernel, plan, *np_args, **const), False


# ----------------------------------------------------------------------------------------------
# launchers


def xuv(x, u, v, bias=None):
    """``x @ u @ v + bias`` through the fused X.U.V kernel.

    x (..., K), u (K, r), v (r, N), bias (N,) or None -> (..., N) in x's dtype (float32,
    bfloat16 or float16; the factors are cast to it).  The bias is added in the kernel's epilogue
    (while evacuating PSUM), not on the host.  If the fused kernel cannot be blocked for the
    target's SBUF (:class:`~neuronmm_fx.kernels.planner.PlanError`), the unfused two-kernel chain
    is used instead."""
    from .planner import PlanError, plan_xuv, plan_xuv_unfused
    from .xuv import xuv_fused, xuv_unfused

    dname = _check_dtype(x)
    K = x.shape[-1]
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != K or v.shape[0] != u.shape[1]:
        raise ValueError(
            f"xuv: shapes x {tuple(x.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)} do not chain"
        )
    r, N = v.shape
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"xuv: bias must have shape ({N},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dt = x.dtype
    if M == 0:
        return x.new_zeros(*lead, N)
    tgt = standin_target()
    dev_args = (x2, u.to(dt), v.to(dt), None if bias is None else bias.to(dt).reshape(1, N))
    np_args = [None if a is None else _to_numpy(a, dt) for a in dev_args] if active_mode() != "nki" else []
    try:
        plan = plan_xuv(M, K, r, N, dname, tgt, bias=bias is not None)
        kernel = xuv_fused
    except PlanError:
        plan = plan_xuv_unfused(M, K, r, N, dname, tgt, bias=bias is not None)
        kernel = xuv_unfused
    out, on_device = _run(kernel, plan, dev_args, np_args)
    y = out if on_device else _from_numpy(out, dt, x.device)
    return y.reshape(*lead, N)


def dense(x, w, bias=None):
    """``x @ w + bias`` through the dense baseline kernel (x (..., K), w (K, N), bias (N,) or None)."""
    from .planner import plan_dense
    from .xuv import matmul_dense

    dname = _check_dtype(x)
    K = x.shape[-1]
    if w.dim() != 2 or w.shape[0] != K:
        raise ValueError(f"dense: shapes x {tuple(x.shape)} and w {tuple(w.shape)} do not chain")
    N = w.shape[1]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"dense: bias must have shape ({N},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dt = x.dtype
    if M == 0:
        return x.new_zeros(*lead, N)
    plan = plan_dense(M, K, N, dname, standin_target(), bias=bias is not None)
    dev_args = (x2, w.to(dt), None if bias is None else bias.to(dt).reshape(1, N))
    np_args = [None if a is None else _to_numpy(a, dt) for a in dev_args] if active_mode() != "nki" else []
    out, on_device = _run(matmul_dense, plan, dev_args, np_args)
    y = out if on_device else _from_numpy(out, dt, x.device)
    return y.reshape(*lead, N)


def svd_mlp(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation):
    """A whole (compressed) MLP through the fused MLP kernel.

    ``h = act(x.act_u.act_v + act_bias)``; if ``up_u`` is given, ``h = h * (x.up_u.up_v +
    up_bias)``; ``y = h.down_u.down_v + down_bias``.  Any ``*_v`` may be None: that projection is
    dense and its ``*_u`` is the full (K_in, K_out) matrix (``y = x @ u``).  Biases may be None.
    ``activation`` is one of ``"silu"``, ``"gelu"`` (exact erf), ``"gelu_tanh"``, ``"relu"``.
    Returns (..., H) in x's dtype; all biases are applied in the kernel.  If the fused kernel
    cannot be blocked for the target, each projection runs as its own X.U.V / X.W kernel and the
    activation and product are applied on the host between them (h then goes through memory)."""
    from .mlp import ACTIVATIONS, svd_mlp_fused
    from .planner import MlpShape, PlanError, plan_svd_mlp

    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    dname = _check_dtype(x)
    dt = x.dtype
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

    I, r_act = out_dim("act", act_u, act_v, K)  # noqa: E741 - the notes' intermediate size
    r_up = None
    if gated:
        I_up, r_up = out_dim("up", up_u, up_v, K)
        if I_up != I:
            raise ValueError(f"svd_mlp: gate produces {I} features but up produces {I_up}")
    H, r_down = out_dim("down", down_u, down_v, I)
    for name, b, n in (("act", act_bias, I), ("up", up_bias, I), ("down", down_bias, H)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"svd_mlp: {name}_bias must have shape ({n},), got {tuple(b.shape)}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*lead, H)
    shape = MlpShape(
        K=K,
        I=I,
        H=H,
        r_act=r_act,
        r_up=r_up,
        r_down=r_down,
        gated=gated,
        act_bias=act_bias is not None,
        up_bias=gated and up_bias is not None,
        down_bias=down_bias is not None,
    )
    try:
        plan = plan_svd_mlp(M, shape, dname, standin_target())
    except PlanError:
        return _svd_mlp_split(
            x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation
        )

    def c(t, shape_=None):
        if t is None:
            return None
        t = t.to(dt)
        return t if shape_ is None else t.reshape(shape_)

    dev_args = (
        x2,
        c(act_u),
        c(act_v),
        c(act_bias, (I, 1)),
        c(up_u),
        c(up_v),
        c(up_bias, (I, 1)),
        c(down_u),
        c(down_v),
        c(down_bias, (1, H)),
    )
    np_args = [None if a is None else _to_numpy(a, dt) for a in dev_args] if active_mode() != "nki" else []
    out, on_device = _run(svd_mlp_fused, plan, dev_args, np_args, activation=activation)
    y = out if on_device else _from_numpy(out, dt, x.device)
    return y.reshape(*lead, H)


def _svd_mlp_split(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation):
    """Fallback: three projection kernels, activation and product on the host in between."""
    import torch.nn.functional as F

    def proj(z, u, v, b):
        return xuv(z, u, v, b) if v is not None else dense(z, u, b)

    acts = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
    }
    h = acts[activation](proj(x, act_u, act_v, act_bias))
    if up_u is not None:
        h = h * proj(x, up_u, up_v, up_bias)
    return proj(h, down_u, down_v, down_bias)

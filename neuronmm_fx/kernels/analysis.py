"""Shape-only analysis: run the kernels on the stand-in without values and report what they move.

Each helper plans the kernel for the target, runs it in shape-only mode (the kernel code is
executed, every rule is checked, nothing is computed) and returns the plan with the
:class:`~neuronmm_fx.kernels.standin.KernelStats`.  Times and utilisations derived from the stats
are a roofline model, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .costs import MlpShape, dtype_name_size, mlp_macs
from .mlp import svd_mlp_fused, svd_mlp_kblocked
from .planner import (
    plan_dense,
    plan_svd_mlp,
    plan_svd_mlp_kblocked,
    plan_xuv,
    plan_xuv_kblocked,
    plan_xuv_unfused,
)
from .standin import KernelStats, TensorSpec, run_kernel
from .targets import Target, get_target
from .xuv import matmul_dense, xuv_fused, xuv_kblocked, xuv_unfused

VARIANTS = ("dense", "unfused", "fused", "kblocked")


@dataclass
class Analysis:
    """A plan, the stand-in's counted stats, and reference figures for comparison."""

    variant: str
    plan: Any
    stats: KernelStats
    compulsory_bytes: int
    """Each input read once, the output written once (for the factorised operation)."""
    useful_flops: float

    @property
    def traffic_over_compulsory(self) -> float:
        return self.stats.hbm_bytes / self.compulsory_bytes

    @property
    def utilisation(self) -> float:
        return self.stats.tensor_utilisation(self.useful_flops)


def run_shape_only(kernel, *args, target: str | Target = "trn2", **kwargs) -> KernelStats:
    """Run ``kernel`` on the stand-in in shape-only mode; arguments are :class:`TensorSpec` (or
    arrays, used for their shapes), compile-time constants passed through."""
    return run_kernel(kernel, *args, target=target, shape_only=True, **kwargs).stats


def compulsory_xuv_bytes(M: int, K: int, r: int, N: int, size: int, bias: bool = False) -> int:
    return size * (M * K + K * r + r * N + M * N + (N if bias else 0))


def analyse_xuv(
    M: int,
    K: int,
    r: int,
    N: int,
    dtype="bfloat16",
    target: str | Target = "trn2",
    variant: str = "fused",
    *,
    bias: bool = False,
) -> Analysis:
    """Plan and count one ``Y = X.U.V`` (``variant`` fused / kblocked / unfused) or ``Y = X.W``
    (dense, with W = U.V of the same shape) on ``target`` in shape-only mode."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    x = TensorSpec((M, K), dname)
    b = TensorSpec((1, N), dname) if bias else None
    if variant == "dense":
        plan = plan_dense(M, K, N, dname, tgt, bias=bias)
        stats = run_shape_only(
            matmul_dense, x, TensorSpec((K, N), dname), b, target=tgt, **plan.kernel_kwargs()
        )
        flops = 2.0 * M * K * N
        compulsory = s * (M * K + K * N + M * N + (N if bias else 0))
    else:
        u, v = TensorSpec((K, r), dname), TensorSpec((r, N), dname)
        if variant == "fused":
            plan = plan_xuv(M, K, r, N, dname, tgt, bias=bias)
            kern = xuv_fused
        elif variant == "kblocked":
            plan = plan_xuv_kblocked(M, K, r, N, dname, tgt, bias=bias)
            kern = xuv_kblocked
        else:
            plan = plan_xuv_unfused(M, K, r, N, dname, tgt, bias=bias)
            kern = xuv_unfused
        stats = run_shape_only(kern, x, u, v, b, target=tgt, **plan.kernel_kwargs())
        flops = 2.0 * M * r * (K + N)
        compulsory = compulsory_xuv_bytes(M, K, r, N, s, bias)
    stats.useful_flops = flops
    return Analysis(variant, plan, stats, compulsory, flops)


def analyse_svd_mlp(
    M: int,
    shape: MlpShape,
    dtype="bfloat16",
    target: str | Target = "trn2",
    activation: str = "silu",
    variant: str = "fused",
) -> Analysis:
    """Plan and count one of the MLP kernels in shape-only mode: ``variant`` ``"fused"``
    (:func:`svd_mlp_fused`) or ``"kblocked"`` (:func:`svd_mlp_kblocked`)."""
    tgt = get_target(target)
    dname, s = dtype_name_size(dtype)
    sh = shape
    if variant not in ("fused", "kblocked"):
        raise ValueError(f"unknown MLP kernel variant {variant!r}: 'fused' or 'kblocked'")
    planner = plan_svd_mlp if variant == "fused" else plan_svd_mlp_kblocked
    kernel = svd_mlp_fused if variant == "fused" else svd_mlp_kblocked
    plan = planner(M, sh, dname, tgt)

    def pair(k_in, k_out, r):
        if r is None:
            return TensorSpec((k_in, k_out), dname), None
        return TensorSpec((k_in, r), dname), TensorSpec((r, k_out), dname)

    au, av = pair(sh.K, sh.I, sh.r_act)
    uu, uv = pair(sh.K, sh.I, sh.r_up) if sh.gated else (None, None)
    du, dv = pair(sh.I, sh.H, sh.r_down)
    col = TensorSpec((sh.I, 1), dname)
    stats = run_shape_only(
        kernel,
        TensorSpec((M, sh.K), dname),
        au,
        av,
        col if sh.act_bias else None,
        uu,
        uv,
        col if sh.gated and sh.up_bias else None,
        du,
        dv,
        TensorSpec((1, sh.H), dname) if sh.down_bias else None,
        activation=activation,
        target=tgt,
        **plan.kernel_kwargs(),
    )
    flops = 2.0 * mlp_macs(sh, M)
    weights = sum(
        a.size + (0 if b is None else b.size) for a, b in ((au, av), (uu, uv), (du, dv)) if a is not None
    )
    biases = sh.I * sh.bias_columns + (sh.H if sh.down_bias else 0)
    compulsory = s * (M * sh.K + M * sh.H + weights + biases)
    stats.useful_flops = flops
    return Analysis(f"{variant}-mlp", plan, stats, compulsory, flops)

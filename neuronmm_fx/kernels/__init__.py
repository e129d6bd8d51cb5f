"""NKI kernels for SVD-compressed matmuls, their block planner, and a CPU stand-in for NKI.

* Kernels (current ``import nki`` dialect, NKI 0.3/0.4 = Neuron SDK 2.29-2.30):
  :func:`xuv_fused` (Y = X.U.V with X.U kept on chip), :func:`svd_mlp_fused` (gated or plain MLP,
  h kept on chip), :func:`svd_mlp_kblocked` (its K-blocked form), baselines :func:`matmul_dense`
  and :func:`xuv_unfused`; the K-blocked X.U.V lives in :mod:`neuronmm_fx.kernels.xuv`.
* Planner: :func:`plan_xuv`, :func:`plan_dense`, :func:`plan_xuv_unfused`, :func:`plan_svd_mlp`,
  :func:`plan_svd_mlp_kblocked`, over the cost model of :mod:`neuronmm_fx.kernels.costs`.
* Stand-in: ``nki``/``nl``/``nisa`` (the real ones when ``import nki`` works, else the stand-in
  package :mod:`neuronmm_fx.kernels.standin`), :func:`run_kernel`, :class:`KernelStats`,
  :class:`NkiRuleError`, :class:`TensorSpec`, and the shape-only helpers :func:`run_shape_only`,
  :func:`analyse_xuv`, :func:`analyse_svd_mlp`.
* Torch launchers and the mode switch live in :mod:`neuronmm_fx.kernels.dispatch` (not imported
  here).

See ``docs/kernels.md``.
"""

from ._nki import USING_STANDIN, nisa, nki, nki_handles, nl
from .analysis import Analysis, analyse_svd_mlp, analyse_xuv, compulsory_xuv_bytes, run_shape_only
from .costs import MlpShape
from .mlp import ACTIVATIONS, svd_mlp_fused, svd_mlp_kblocked
from .planner import (
    DensePlan,
    MlpKPlan,
    MlpPlan,
    PlanError,
    UnfusedPlan,
    XuvPlan,
    plan_dense,
    plan_svd_mlp,
    plan_svd_mlp_kblocked,
    plan_xuv,
    plan_xuv_unfused,
    rank_for_ratio,
)
from .standin import KernelRun, KernelStats, NkiRuleError, NkiTensor, TensorSpec, run_kernel
from .targets import TARGETS, TRN1, TRN2, Target, get_target
from .xuv import matmul_dense, xuv_fused, xuv_unfused

__all__ = [
    "ACTIVATIONS",
    "TARGETS",
    "TRN1",
    "TRN2",
    "USING_STANDIN",
    "Analysis",
    "DensePlan",
    "KernelRun",
    "KernelStats",
    "MlpKPlan",
    "MlpPlan",
    "MlpShape",
    "NkiRuleError",
    "NkiTensor",
    "PlanError",
    "Target",
    "TensorSpec",
    "UnfusedPlan",
    "XuvPlan",
    "analyse_svd_mlp",
    "analyse_xuv",
    "compulsory_xuv_bytes",
    "get_target",
    "matmul_dense",
    "nisa",
    "nki",
    "nki_handles",
    "nl",
    "plan_dense",
    "plan_svd_mlp",
    "plan_svd_mlp_kblocked",
    "plan_xuv",
    "plan_xuv_unfused",
    "rank_for_ratio",
    "run_kernel",
    "run_shape_only",
    "svd_mlp_fused",
    "svd_mlp_kblocked",
    "xuv_fused",
    "xuv_unfused",
]

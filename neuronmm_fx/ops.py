"""The ``neuronmm`` custom operators.

``neuronmm::xuv(x, u, v, bias=None)``
    ``x`` (..., K) · ``u`` (K, r) · ``v`` (r, N) [+ ``bias`` (N,)] → (..., N).  The product of a
    low-rank chain; the intermediate ``x·u`` (..., r) is what the fused kernel keeps on chip.

``neuronmm::svd_mlp(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation)``
    A whole compressed MLP.  Each projection is a ``(u, v, bias)`` triple; ``v is None`` means the
    projection was left dense and ``u`` is its full (in, out) matrix.

    * gated form (``up_u`` given):  ``(act(x·Ug·Vg + bg) ⊙ (x·Uu·Vu + bu)) · Ud·Vd + bd``
    * plain form (``up_u`` None):   ``act(x·U1·V1 + b1) · U2·V2 + b2``

    ``activation`` is one of :data:`neuronmm_fx.activations.ACTIVATION_NAMES`.

When ``act_u`` and ``up_u`` are adjacent column blocks of one matrix (as
:class:`~neuronmm_fx.modules.CompressedMLP` keeps them), the PyTorch implementation reads ``x``
against both in one GEMM, ``x·[Ug | Uu]``; the result is the same float32 products.

Both ops accept float32, bfloat16 and float16.  The PyTorch implementation accumulates in float32
whatever the input precision and casts the result back to ``x``'s dtype, as the NKI kernels do
(PSUM is fp32).  Each op has a fake (meta) implementation for ``torch.compile``/``torch.export``,
an autograd formula (by recomputation, so the factors can be fine-tuned), and dispatches to the NKI
kernels through :mod:`neuronmm_fx.kernels.dispatch` when they are selected
(:func:`~neuronmm_fx.kernels.dispatch.use_standin_kernels`: the NKI kernels run on the CPU stand-in).
The Neuron device implementation is registered by
:func:`neuronmm_fx.neuron.register_neuron_kernels`, only where the SDK imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch

from neuronmm_fx.activations import apply_activation, check_activation
from neuronmm_fx.kernels import dispatch

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"neuronmm: {name} has unsupported dtype {tensor.dtype}; use float32, bfloat16 or float16"
        )
    if tensor.dtype != dtype:
        raise ValueError(
            f"neuronmm: {name} is {tensor.dtype} but x is {dtype}; all operands must share one dtype"
        )


def _check_projection(
    name: str,
    in_features: int,
    dtype: torch.dtype,
    u: torch.Tensor,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> int:
    """Validate one ``(u, v, bias)`` projection that reads ``in_features``; return its output width."""
    _check_dtype(f"{name}_u", u, dtype)
    if u.dim() != 2 or u.shape[0] != in_features:
        raise ValueError(f"neuronmm: {name}_u must be ({in_features}, r), got {tuple(u.shape)}")
    out_features = u.shape[1]
    if v is not None:
        _check_dtype(f"{name}_v", v, dtype)
        if v.dim() != 2 or v.shape[0] != u.shape[1]:
            raise ValueError(
                f"neuronmm: {name}_v must be ({u.shape[1]}, N) to follow {name}_u, got {tuple(v.shape)}"
            )
        out_features = v.shape[1]
    if bias is not None:
        _check_dtype(f"{name}_bias", bias, dtype)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"neuronmm: {name}_bias must be ({out_features},), got {tuple(bias.shape)}")
    return out_features


Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def float32_matmul(left: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``left·weight`` in float32 (``left`` already float32): how the references multiply by a factor.
    :mod:`neuronmm_fx.passes.lower` may pass another :data:`Matmul` with the same products."""
    return left @ weight.float()


def _project(
    x32: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
    matmul: Matmul = float32_matmul,
) -> torch.Tensor:
    """``x32·u·v + bias`` in float32 (``x32`` already float32)."""
    return _finish(matmul(x32, u), v, bias, matmul)


def _finish(
    first: torch.Tensor,
    v: torch.Tensor | None,
    bias: torch.Tensor | None,
    matmul: Matmul = float32_matmul,
) -> torch.Tensor:
    """``first·v + bias`` in float32, ``first`` being ``x·u`` (float32)."""
    if v is not None:
        first = matmul(first, v)
    if bias is not None:
        first = first + bias.float()
    return first


def xuv_reference(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    matmul: Matmul = float32_matmul,
) -> torch.Tensor:
    """PyTorch semantics of ``neuronmm::xuv``: float32 accumulation, result in ``x.dtype``.

    Written with tensor methods only, so that it also traces on ``torch.fx`` proxies
    (:mod:`neuronmm_fx.passes.lower` inlines it into graphs).  ``matmul`` multiplies by one factor."""
    return _project(x.float(), u, v, bias, matmul).type_as(x)


def svd_mlp_reference(
    x: torch.Tensor,
    act_u: torch.Tensor,
    act_v: torch.Tensor | None,
    act_bias: torch.Tensor | None,
    up_u: torch.Tensor | None,
    up_v: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    down_u: torch.Tensor,
    down_v: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,
    joint_first: tuple[torch.Tensor, int] | None = None,
    matmul: Matmul = float32_matmul,
) -> torch.Tensor:
    """PyTorch semantics of ``neuronmm::svd_mlp``: float32 accumulation, result in ``x.dtype`` (traces
    on ``torch.fx`` proxies too, as :func:`xuv_reference`).

    ``joint_first``, for the gated form, is ``([act_u | up_u], r_act)``: the two first factors as the
    column blocks of one (K, r_act + r_up) matrix, read against ``x`` in one GEMM whose result is
    split in two.  Each output column is the same float32 dot product either way.  ``matmul``
    multiplies by one factor (:func:`float32_matmul` unless a lowering passes another)."""
    x32 = x.float()
    if joint_first is not None and up_u is not None:
        joint, act_rank = joint_first
        both = matmul(x32, joint)  # (..., r_act + r_up)
        act_first, up_first = both[..., :act_rank], both[..., act_rank:]
        hidden = apply_activation(activation, _finish(act_first, act_v, act_bias, matmul))  # (..., I)
        hidden = hidden * _finish(up_first, up_v, up_bias, matmul)
    else:
        hidden = apply_activation(activation, _project(x32, act_u, act_v, act_bias, matmul))  # (..., I)
        if up_u is not None:
            hidden = hidden * _project(x32, up_u, up_v, up_bias, matmul)
    return _project(hidden, down_u, down_v, down_bias, matmul).type_as(x)


def joint_columns(left: torch.Tensor | None, right: torch.Tensor | None) -> tuple[torch.Tensor, int] | None:
    """``([left | right], left's width)`` as a view when ``right``'s columns follow ``left``'s in one
    row-major storage (as :class:`~neuronmm_fx.modules.CompressedMLP` keeps the gate and up first
    factors); None otherwise.  No copy either way."""
    if left is None or right is None or left.dim() != 2 or right.dim() != 2:
        return None
    rows, width = left.shape[0], left.shape[1] + right.shape[1]
    adjacent = (
        right.shape[0] == rows
        and left.dtype == right.dtype
        and left.device == right.device
        and left.stride() == right.stride()
        and left.stride(1) == 1
        and (rows == 1 or left.stride(0) >= width)
        and left.untyped_storage().data_ptr() == right.untyped_storage().data_ptr()
        and right.storage_offset() == left.storage_offset() + left.shape[1]
    )
    if not adjacent:
        return None
    return left.as_strided((rows, width), left.stride(), left.storage_offset()), left.shape[1]


def _xuv_out_features(x, u, v, bias) -> int:
    _check_dtype("x", x, x.dtype)
    return _check_projection("xuv", x.shape[-1], x.dtype, u, v, bias)


def _svd_mlp_out_features(
    x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation
):
    _check_dtype("x", x, x.dtype)
    check_activation(activation)
    hidden = _check_projection("act", x.shape[-1], x.dtype, act_u, act_v, act_bias)
    if up_u is not None:
        up_out = _check_projection("up", x.shape[-1], x.dtype, up_u, up_v, up_bias)
        if up_out != hidden:
            raise ValueError(
                f"neuronmm: gated MLP branches disagree: act branch gives {hidden}, up gives {up_out}"
            )
    elif up_v is not None or up_bias is not None:
        raise ValueError("neuronmm: up_v/up_bias given without up_u")
    return _check_projection("down", hidden, x.dtype, down_u, down_v, down_bias)


@torch.library.custom_op("neuronmm::xuv", mutates_args=())
def xuv(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # noqa: UP045
    _xuv_out_features(x, u, v, bias)
    if dispatch.active_mode() == "standin":
        return dispatch.xuv(x, u, v, bias)
    return xuv_reference(x, u, v, bias)


@xuv.register_fake
def _xuv_fake(x, u, v, bias=None):
    out_features = _xuv_out_features(x, u, v, bias)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("neuronmm::svd_mlp", mutates_args=())
def svd_mlp(
    x: torch.Tensor,
    act_u: torch.Tensor,
    act_v: Optional[torch.Tensor],  # noqa: UP045 - torch.library parses typing.Optional
    act_bias: Optional[torch.Tensor],  # noqa: UP045
    up_u: Optional[torch.Tensor],  # noqa: UP045
    up_v: Optional[torch.Tensor],  # noqa: UP045
    up_bias: Optional[torch.Tensor],  # noqa: UP045
    down_u: torch.Tensor,
    down_v: Optional[torch.Tensor],  # noqa: UP045
    down_bias: Optional[torch.Tensor],  # noqa: UP045
    activation: str,
) -> torch.Tensor:
    args = (x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation)
    _svd_mlp_out_features(*args)
    if dispatch.active_mode() == "standin":
        return dispatch.svd_mlp(*args)
    return svd_mlp_reference(*args, joint_first=joint_columns(act_u, up_u))


@svd_mlp.register_fake
def _svd_mlp_fake(x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation):
    out_features = _svd_mlp_out_features(
        x, act_u, act_v, act_bias, up_u, up_v, up_bias, down_u, down_v, down_bias, activation
    )
    return x.new_empty((*x.shape[:-1], out_features))


# --- autograd: recompute the reference and differentiate it -------------------------------------------
#
# The forward keeps nothing but its inputs; the backward re-runs the float32 reference under autograd.
# This is what recovery fine-tuning needs (only the factors train) and it keeps one source of truth
# for the op's semantics.


def _recompute_backward(reference: Callable, ctx, grad_output: torch.Tensor) -> tuple:
    saved = list(ctx.saved_tensors)
    tensors = [saved[i] if i is not None else None for i in ctx.tensor_slots]
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(True) if t is not None and needs[i] else t
            for i, t in enumerate(tensors)
        ]
        out = reference(*leaves, *ctx.non_tensor_args)
        wanted = [(i, leaf) for i, leaf in enumerate(leaves) if leaf is not None and needs[i]]
        grads = torch.autograd.grad(out, [leaf for _, leaf in wanted], grad_output, allow_unused=True)
    result: list = [None] * (len(tensors) + len(ctx.non_tensor_args))
    for (i, _), grad in zip(wanted, grads, strict=True):
        result[i] = grad
    return tuple(result)


def _save_for_recompute(ctx, tensors: Sequence[torch.Tensor | None], non_tensor_args: tuple) -> None:
    present = [t for t in tensors if t is not None]
    slots, k = [], 0
    for t in tensors:
        slots.append(k if t is not None else None)
        k += t is not None
    ctx.save_for_backward(*present)
    ctx.tensor_slots = slots
    ctx.non_tensor_args = non_tensor_args


def _xuv_setup_context(ctx, inputs, output):
    _save_for_recompute(ctx, inputs, ())


def _xuv_backward(ctx, grad_output):
    return _recompute_backward(xuv_reference, ctx, grad_output)


def _svd_mlp_setup_context(ctx, inputs, output):
    _save_for_recompute(ctx, inputs[:-1], (inputs[-1],))


def _svd_mlp_backward(ctx, grad_output):
    return _recompute_backward(svd_mlp_reference, ctx, grad_output)


xuv.register_autograd(_xuv_backward, setup_context=_xuv_setup_context)
svd_mlp.register_autograd(_svd_mlp_backward, setup_context=_svd_mlp_setup_context)

"""``nki.isa`` of the stand-in: the instructions the kernels issue, checked and counted.

Signatures are the current destination-first ones (``nisa.nc_matmul(dst, stationary, moving,
accumulate=...)``).  Each instruction checks its operands against :mod:`.rules`, adds what it does
to the run's :class:`~.stats.KernelStats`, and, in numeric mode, computes with numpy (matmuls and
element-wise arithmetic in float32).  Only the instructions the project's kernels use are here.
"""

from __future__ import annotations

import types

import numpy as np

from ..costs import dma_efficiency
from ..targets import PARTITIONS, STATIONARY_FMAX
from . import rules
from .memory import NkiTensor
from .rules import NkiRuleError
from .stats import Run, current_run


class Operator:
    """An ``nl`` operator or activation function (``nl.add``, ``nl.silu``) passed to an instruction.

    ``kind`` is ``"alu"`` (binary, for ``tensor_tensor`` and friends) or ``"activation"`` (unary,
    for ``activation``); ``fn`` is its numpy implementation."""

    __slots__ = ("name", "fn", "kind")

    def __init__(self, name: str, fn, kind: str):
        self.name = name
        self.fn = fn
        self.kind = kind

    def __call__(self, *args, **kwargs):
        raise NkiRuleError(
            "no-kernel", f"nl.{self.name} is used as an instruction operator here (nisa.*(op=nl.{self.name}))"
        )

    def __repr__(self) -> str:
        return f"nl.{self.name}"


def _check_operator(opn: str, op, kind: str) -> None:
    if not isinstance(op, Operator) or op.kind != kind:
        what = "activation" if kind == "activation" else "operator"
        raise NkiRuleError("elementwise-shape", f"{opn}: unsupported {what} {op!r}")


def _tensor(x, what: str, op: str) -> NkiTensor:
    if not isinstance(x, NkiTensor):
        raise NkiRuleError("index", f"{op}: {what} must be an NKI tensor, got {type(x).__name__}")
    return x


def _engine_operands(op: str, **named) -> list[NkiTensor]:
    """Operands of a Vector/Scalar engine instruction, the first being ``dst``: all tensors, all on
    chip, and all laid out like ``dst``."""
    ts = [_tensor(t, what, op) for what, t in named.items()]
    for t, what in zip(ts, named, strict=True):
        rules.check_on_chip(t, what, op)
    names = list(named)
    for t, what in zip(ts[1:], names[1:], strict=True):
        rules.check_same_layout(op, ts[0], t, names[0], what)
    return ts


def _per_partition(x, op: str, like: NkiTensor, what: str, run: Run):
    """A scalar, or a per-partition ``(P, 1)`` tile broadcast along the free axis (None in shape-only
    mode)."""
    if not isinstance(x, NkiTensor):
        return np.float32(x)
    rules.check_on_chip(x, what, op)
    p, f = rules.partitions_and_free(x)
    if p != like.shape[0] or f != 1:
        raise NkiRuleError(
            "elementwise-shape",
            f"{op}: {what} must be a scalar or a ({like.shape[0]}, 1) vector, got {x.shape}",
        )
    if run.shape_only:
        return None
    return x.read_f32(op, (p,) + (1,) * (like.ndim - 1))


def _count(run: Run, engine: str, t: NkiTensor) -> None:
    f = rules.partitions_and_free(t)[1]
    if engine == "scalar":
        run.stats.scalar_elements += f
    else:
        run.stats.vector_elements += f


# -- DMA -----------------------------------------------------------------------------------------


def _count_dma(run: Run, dst: NkiTensor, src: NkiTensor, transpose: bool = False) -> None:
    st = run.stats
    st.dma_count += 1
    moved = 0
    if src._a.kind == "hbm":
        moved = src.size * src.itemsize
        st.hbm_read_bytes += moved
    if dst._a.kind == "hbm":
        moved = dst.size * dst.itemsize
        st.hbm_write_bytes += moved
    if moved:  # what the DMA queues spend on it: its bytes at the efficiency of its row size
        on_chip = src if dst._a.kind == "hbm" else dst
        row_bytes = rules.partitions_and_free(on_chip)[1] * on_chip.itemsize
        st.dma_queue_bytes += moved / dma_efficiency(row_bytes, transpose)


def dma_copy(dst, src, priority=None, oob_mode=None, dge_mode=None, engine=None, name=None):
    """``nisa.dma_copy(dst, src)``: HBM <-> SBUF (or SBUF -> SBUF) copy, converting dtype if needed."""
    run = current_run()
    op = "dma_copy"
    dst = _tensor(dst, "dst", op)
    src = _tensor(src, "src", op)
    rules.check_dma_ends(op, dst, src)
    rules.check_dma_cast(op, dst, src, dge_mode)
    if dst.size != src.size:
        raise NkiRuleError(
            "elementwise-shape", f"{op}: dst {dst.shape} and src {src.shape} differ in element count"
        )
    _count_dma(run, dst, src)
    if not run.shape_only:
        vals = src.read(op)
        dst.write(vals.astype(np.float32) if vals.dtype != dst.dtype else vals)
    return dst


DGE_TRANSPOSE_SHAPE = (16, PARTITIONS)
"""The one 2-D source shape the hardware DGE transposes in NKI 0.3 (2-byte dtypes)."""


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=None, oob_mode=None, name=None):
    """``nisa.dma_transpose(dst, src)``: a 2-D transpose performed by the DMA on the way in (only the
    hardware DGE's shape: 2-byte (16, 128) tiles)."""
    run = current_run()
    op = "dma_transpose"
    dst = _tensor(dst, "dst", op)
    src = _tensor(src, "src", op)
    if src.ndim != 2 or dst.ndim != 2 or axes not in (None, (1, 0), [1, 0]):
        raise NkiRuleError("elementwise-shape", f"{op}: this stand-in supports 2-D transposes only")
    if dst.shape != (src.shape[1], src.shape[0]):
        raise NkiRuleError(
            "elementwise-shape", f"{op}: dst {dst.shape} is not the transpose of src {src.shape}"
        )
    if src._a.kind == "psum" or dst._a.kind == "psum":
        raise NkiRuleError("dma-buffer", f"{op}: DMA endpoints are HBM or SBUF, not PSUM")
    if dst._a.kind != "sbuf":
        raise NkiRuleError("dma-buffer", f"{op}: the transposed tile must land in SBUF, got {dst._a.kind}")
    if src.dtype != dst.dtype:
        raise NkiRuleError(
            "elementwise-shape", f"{op}: dtype {src.dtype.name} -> {dst.dtype.name} not supported"
        )
    if src.itemsize != 2 or src.shape != DGE_TRANSPOSE_SHAPE:
        raise NkiRuleError(
            "dma-transpose-dge",
            f"{op}: the hardware DGE of NKI 0.3 transposes 2-byte tiles of shape {DGE_TRANSPOSE_SHAPE} "
            f"(16 rows of 128 columns), not {src.dtype.name} {src.shape}; transpose on TensorE "
            "(nisa.nc_transpose) instead",
        )
    _count_dma(run, dst, src, transpose=True)
    if not run.shape_only:
        dst.write(src.read(op).T)
    return dst


# -- TensorE -------------------------------------------------------------------------------------


def nc_matmul(
    dst,
    stationary,
    moving,
    is_stationary_onezero=False,
    is_moving_onezero=False,
    is_transpose=False,
    accumulate=None,
    tile_position=(),
    tile_size=(),
    perf_mode=None,
    name=None,
):
    """``nisa.nc_matmul(dst, stationary, moving, accumulate=...)``: ``dst (+)= stationary.T @ moving``.

    ``accumulate=True`` adds to ``dst`` (which must be written), ``False`` overwrites it, ``None``
    adds to the elements already written and overwrites the others."""
    run = current_run()
    op = "nc_matmul"
    if type(dst) is not NkiTensor or type(stationary) is not NkiTensor or type(moving) is not NkiTensor:
        dst = _tensor(dst, "dst", op)
        stationary = _tensor(stationary, "stationary", op)
        moving = _tensor(moving, "moving", op)
    kp, sf, mf, fp32 = rules.check_matmul(op, dst, stationary, moving)
    st = run.stats
    st.matmul_count += 1
    st.tensor_cycles += max(min(64, sf), mf) * (4 if fp32 else 1)
    st.macs += kp * sf * mf
    if not run.shape_only:
        res = stationary.read_f32(op).T @ moving.read_f32(op)
        if accumulate is True:
            res = dst.read(op + " (accumulate)") + res
        elif accumulate is None:
            a = dst._a
            ix = dst.np_index()
            was = a.written[ix].reshape(dst.shape)
            res = np.where(was, a.data[ix].reshape(dst.shape), 0.0) + res
        dst.write(res.astype(np.float32))
    return dst


def nc_transpose(dst, data, engine=None, name=None):
    """``nisa.nc_transpose(dst, data)`` on TensorE: ``dst = data^T``, a matmul of ``data`` (stationary)
    against an identity.  ``data``: SBUF, <= 128 partitions and <= 128 elements each; ``dst``: PSUM,
    the same dtype, shape (elements, partitions).  The Vector-engine form (<= 32 x 32) is not modelled."""
    run = current_run()
    op = "nc_transpose"
    if engine is not None:
        raise NkiRuleError(
            "transpose-engine", f"{op}: only the Tensor-engine transpose is modelled (engine=None)"
        )
    dst, data = _tensor(dst, "dst", op), _tensor(data, "data", op)
    if data._a.kind != "sbuf" or dst._a.kind != "psum":
        raise NkiRuleError(
            "transpose-buffers",
            f"{op}: TensorE reads the tile from SBUF and writes PSUM (got {data._a.kind} -> {dst._a.kind})",
        )
    parts, free = rules.partitions_and_free(data)
    if parts > PARTITIONS or free > STATIONARY_FMAX:
        raise NkiRuleError(
            "transpose-size", f"{op}: a TensorE transpose takes at most 128 x 128, got {data.shape}"
        )
    if dst.dtype != data.dtype:
        raise NkiRuleError(
            "transpose-dtype", f"{op}: dst is {dst.dtype.name}, data {data.dtype.name}; they must match"
        )
    if dst.shape != (free, parts):
        raise NkiRuleError("elementwise-shape", f"{op}: dst {dst.shape} should be {(free, parts)}")
    st = run.stats
    st.matmul_count += 1
    st.tensor_cycles += max(min(64, free), parts) * (4 if data.dtype == rules.F32 else 1)
    if not run.shape_only:
        dst.write(data.read_f32(op).reshape(parts, free).T)
    return dst


# -- Vector and Scalar engines -------------------------------------------------------------------


def tensor_copy(dst, src, engine=None, name=None):
    """``nisa.tensor_copy(dst, src)``: on-chip copy/cast (e.g. evacuating PSUM into SBUF)."""
    run = current_run()
    op = "tensor_copy"
    dst, src = _engine_operands(op, dst=dst, src=src)
    _count(run, "vector", dst)
    if not run.shape_only:
        dst.write(src.read_f32(op, dst.shape))
    return dst


def tensor_tensor(dst, data1, data2, op, engine=None, name=None):
    """``nisa.tensor_tensor(dst, data1, data2, op)``: element-wise binary op (computed in fp32)."""
    run = current_run()
    opn = "tensor_tensor"
    dst, data1, data2 = _engine_operands(opn, dst=dst, data1=data1, data2=data2)
    rules.check_one_psum_operand(opn, data1=data1, data2=data2)
    _check_operator(opn, op, "alu")
    _count(run, "vector", dst)
    if not run.shape_only:
        dst.write(op.fn(data1.read_f32(opn, dst.shape), data2.read_f32(opn, dst.shape)).astype(np.float32))
    return dst


def scalar_tensor_tensor(
    dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, engine=None, name=None
):
    """``nisa.scalar_tensor_tensor``: ``(data op0 operand0) op1 operand1``.

    ``operand0`` is a scalar or per-partition (P, 1) vector, ``operand1`` a tile like ``data``."""
    run = current_run()
    opn = "scalar_tensor_tensor"
    dst, data, operand1 = _engine_operands(opn, dst=dst, data=data, operand1=operand1)
    rules.check_one_psum_operand(opn, data=data, operand1=operand1)
    for o in (op0, op1):
        _check_operator(opn, o, "alu")
    v0 = _per_partition(operand0, opn, data, "operand0", run)
    _count(run, "vector", dst)
    if not run.shape_only:
        x = data.read_f32(opn, dst.shape)
        x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
        y = operand1.read_f32(opn, dst.shape)
        x = op1.fn(y, x) if reverse1 else op1.fn(x, y)
        dst.write(np.asarray(x, dtype=np.float32))
    return dst


def activation(
    dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=None, name=None
):
    """``nisa.activation(dst, op, data, bias=, scale=)``: ``op(data * scale + bias)`` on the Scalar engine.

    ``bias`` is ``None`` or a per-partition ``(P, 1)`` tile; ``scale`` a scalar or ``(P, 1)`` tile."""
    run = current_run()
    opn = "activation"
    dst, data = _engine_operands(opn, dst=dst, data=data)
    _check_operator(opn, op, "activation")
    if reduce_op is not None or reduce_res is not None:
        raise NkiRuleError("elementwise-shape", f"{opn}: reductions are not modelled by this stand-in")
    b = _per_partition(bias, opn, data, "bias", run) if bias is not None else None
    s = _per_partition(scale, opn, data, "scale", run)
    _count(run, "scalar", dst)
    if not run.shape_only:
        x = data.read_f32(opn) * s
        if b is not None:
            x = x + b
        dst.write(np.asarray(op.fn(x), dtype=np.float32).reshape(dst.shape))
    return dst


def memset(dst, value, engine=None, name=None):
    """``nisa.memset(dst, value)``: fill an on-chip tile with a constant."""
    run = current_run()
    (dst,) = _engine_operands("memset", dst=dst)
    _count(run, "vector", dst)
    if not run.shape_only:
        dst.write(np.full(dst.shape, value, dtype=np.float32))
    return dst


INSTRUCTIONS = (
    dma_copy,
    dma_transpose,
    nc_matmul,
    nc_transpose,
    tensor_copy,
    tensor_tensor,
    scalar_tensor_tensor,
    activation,
    memset,
)

nisa = types.SimpleNamespace(
    **{f.__name__: f for f in INSTRUCTIONS}, __name__="nki.isa (neuronmm_fx CPU stand-in)"
)

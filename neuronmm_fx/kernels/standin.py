"""A CPU stand-in for the NKI API (the ``import nki`` dialect of NKI >= 0.3, Neuron SDK >= 2.29).

The Neuron SDK cannot be installed on machines without a Neuron device, so the project's kernels
run here on this stand-in.  It exposes the handful of ``nki`` / ``nki.language`` / ``nki.isa``
names the kernels use, with the current destination-first signatures, and it is strict: every
call is checked against what the hardware (or the real compiler) enforces, and a violation raises
:class:`NkiRuleError` whose message starts with the rule's name in brackets, for example
``[matmul-moving-free]``.

Rules checked
    ``partition-dim``        a tile's first dimension is the partition dimension, at most 128
    ``sbuf-capacity``        SBUF bytes per partition live at once <= 192 KiB (trn1) / 224 KiB (trn2)
    ``psum-capacity``        PSUM banks live at once <= 8
    ``psum-bank``            a PSUM tile's innermost row must fit one 2 KiB bank per partition
    ``matmul-operands-sbuf`` ``nc_matmul`` reads both operands from SBUF
    ``matmul-dst-psum``      ``nc_matmul`` writes PSUM
    ``matmul-dst-fp32``      ... as float32 (NeuronCore-v2/v3)
    ``matmul-contraction``   contraction on partitions: stationary and moving have equal partitions
    ``matmul-stationary-free`` stationary free size <= 128
    ``matmul-moving-free``   moving free size <= 512 (one PSUM bank of fp32)
    ``matmul-shape`` / ``matmul-dtype``  result shape and operand dtypes
    ``dma-buffer``           DMA endpoints are HBM or SBUF (never PSUM)
    ``engine-buffer``        Vector/Scalar engine operands live in SBUF or PSUM (never HBM)
    ``elementwise-shape``    element-wise operands agree in partitions and elements per partition
    ``index``                out-of-bounds, empty or strided slices; indexing away the partition dim
    ``uninitialized-read``   reading on-chip or output memory that nothing wrote (numeric mode)
    ``output-unwritten``     a kernel returned an output with elements it never wrote (numeric mode)
    ``no-kernel``            an NKI call outside a kernel run

New SBUF and PSUM buffers (and new HBM outputs) are filled with NaN, and a written-mask is kept so
that an uninitialized read is an error rather than a silent NaN.

Counters (:class:`KernelStats`): HBM bytes read and written by DMA, peak SBUF bytes per partition
and peak PSUM banks, matmul instructions, TensorE cycles (per instruction
``max(min(64, stationary_free), moving_free)``, four times that for fp32 operands), DMA
instructions and Vector/Scalar engine elements.  :meth:`KernelStats.estimated_time_s` turns them
into a time with the target's TensorE clock and HBM bandwidth: a roofline model, not a measurement.

Liveness: an allocation is live from ``nl.ndarray`` until the last Python reference to it (or to a
view of it) disappears, which for the kernels here means until the kernel returns.  Buffers
allocated inside a loop body are therefore counted twice at the moment the loop variable is
rebound, which is how the real compiler double-buffers them as well.

Modes: *numeric* executes the instructions with numpy (bfloat16 through ``ml_dtypes``; matmuls
and element-wise arithmetic in float32); *shape-only* (``run_kernel(..., shape_only=True)`` with
:class:`TensorSpec` arguments) runs the same kernel code and checks the same shape, buffer and
capacity rules and counts the same figures, but stores and computes no values, so that prefill
shapes of real models are analysed in seconds.  Uninitialized reads are only detected in numeric
mode.

What is *not* modelled: instruction latencies and overlap between engines, DMA efficiency (queue
counts, descriptor sizes, the cost of transposing DMAs), SBUF bank conflicts, and the compiler's own
buffers.  The stand-in does not parse the kernel as the NKI compiler does; a kernel accepted here
can still be rejected by ``neuronx-cc`` for language features the stand-in does not police.
"""

from __future__ import annotations

import contextvars
import functools
import math
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from .targets import PARTITIONS, Target, get_target

__all__ = [
    "KernelRun",
    "KernelStats",
    "NkiRuleError",
    "NkiTensor",
    "TensorSpec",
    "nki",
    "nisa",
    "nl",
    "run_kernel",
]

STATIONARY_FMAX = 128
MOVING_FMAX = 512


class NkiRuleError(Exception):
    """A kernel broke a rule that the NKI compiler or the hardware enforces.

    ``rule`` is the rule's short name (also the bracketed prefix of the message)."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


# ----------------------------------------------------------------------------------------------
# statistics


@dataclass
class KernelStats:
    """What one kernel run did, as counted by the stand-in.

    Byte and cycle figures are exact counts of the instructions the kernel issued; the times are a
    roofline model (``max`` of TensorE time and HBM time, perfect overlap, no latencies)."""

    target: Target
    hbm_read_bytes: int = 0
    hbm_write_bytes: int = 0
    dma_count: int = 0
    peak_sbuf_bytes: int = 0
    """Peak SBUF bytes per partition live at once."""
    peak_psum_banks: int = 0
    matmul_count: int = 0
    tensor_cycles: int = 0
    macs: int = 0
    """Multiply-accumulates issued to TensorE (including those on padding-free partial tiles)."""
    vector_elements: int = 0
    """Elements per partition processed by the Vector engine (copies, adds, products)."""
    scalar_elements: int = 0
    """Elements per partition processed by the Scalar engine (activations)."""
    useful_flops: float = 0.0
    """The mathematical flop count of the operation (set by the analysis helpers); 0 if unknown."""

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def peak_sbuf_fraction(self) -> float:
        return self.peak_sbuf_bytes / self.target.sbuf_partition_bytes

    @property
    def tensor_time_s(self) -> float:
        return self.tensor_cycles / self.target.clock_hz

    @property
    def hbm_time_s(self) -> float:
        return self.hbm_bytes / self.target.hbm_bytes_per_s

    @property
    def estimated_time_s(self) -> float:
        """Roofline estimate ``max(TensorE time, HBM time)``: a model, not a measurement."""
        return max(self.tensor_time_s, self.hbm_time_s)

    @property
    def bound(self) -> str:
        return "compute" if self.tensor_time_s >= self.hbm_time_s else "memory"

    def tensor_utilisation(self, flops: float | None = None) -> float:
        """Estimated fraction of TensorE bf16 peak: ``flops / (estimated time * peak)``."""
        f = self.useful_flops if flops is None else flops
        t = self.estimated_time_s
        return 0.0 if t == 0 else f / (t * self.target.peak_flops_bf16)

    def summary(self) -> str:
        return (
            f"{self.target.name}: HBM read {self.hbm_read_bytes / 1e6:.2f} MB, written "
            f"{self.hbm_write_bytes / 1e6:.2f} MB; "
            f"peak SBUF {self.peak_sbuf_bytes / 1024:.1f} KiB/partition; "
            f"peak PSUM {self.peak_psum_banks} banks; {self.matmul_count} matmuls, "
            f"{self.tensor_cycles} TensorE cycles; estimated {self.estimated_time_s * 1e6:.1f} us "
            f"({self.bound}-bound; model, not a measurement)"
        )


# ----------------------------------------------------------------------------------------------
# run state


class _Run:
    __slots__ = ("stats", "shape_only", "live_sbuf", "live_psum", "active", "__weakref__")

    def __init__(self, target: Target, shape_only: bool):
        self.stats = KernelStats(target=target)
        self.shape_only = shape_only
        self.live_sbuf = 0
        self.live_psum = 0
        self.active = True


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("nki_standin_run", default=None)


def _run() -> _Run:
    r = _RUN.get()
    if r is None:
        raise NkiRuleError(
            "no-kernel", "NKI calls are only valid inside a kernel run (use run_kernel or nki.jit)"
        )
    return r


def _release(run_ref: weakref.ref, kind: str, amount: int) -> None:
    run = run_ref()
    if run is None:
        return
    if kind == "sbuf":
        run.live_sbuf -= amount
    else:
        run.live_psum -= amount


# ----------------------------------------------------------------------------------------------
# memory


class _Buffer:
    __slots__ = ("name", "kind")

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind

    def __repr__(self) -> str:
        return f"nl.{self.name}"


sbuf = _Buffer("sbuf", "sbuf")
psum = _Buffer("psum", "psum")
hbm = _Buffer("hbm", "hbm")
shared_hbm = _Buffer("shared_hbm", "hbm")
private_hbm = _Buffer("private_hbm", "hbm")


class _Alloc:
    __slots__ = ("kind", "dtype", "shape", "data", "written", "name", "__weakref__")

    def __init__(self, kind, dtype, shape, data, written, name):
        self.kind = kind
        self.dtype = dtype
        self.shape = shape
        self.data = data
        self.written = written
        self.name = name


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a kernel argument in shape-only mode (no values)."""

    shape: tuple[int, ...]
    dtype: Any

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16 reports kind 'V'
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


class NkiTensor:
    """A tensor in HBM, SBUF or PSUM, or a rectangular view of one (basic slicing only)."""

    __slots__ = ("_a", "_idx", "_dims", "shape")

    def __init__(self, alloc: _Alloc, idx: tuple, dims: tuple[int, ...], shape: tuple[int, ...]):
        self._a = alloc
        self._idx = idx  # per allocation dim: int, or (start, stop)
        self._dims = dims  # allocation dims that remain in the view
        self.shape = shape

    # -- introspection -------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self._a.dtype

    @property
    def buffer(self) -> str:
        return self._a.kind

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self._a.dtype.itemsize

    def __repr__(self) -> str:
        return f"<{self._a.kind} tensor {self.describe()}>"

    def describe(self) -> str:
        parts = []
        for it in self._idx:
            parts.append(str(it) if isinstance(it, int) else f"{it[0]}:{it[1]}")
        return f"{self._a.name}[{', '.join(parts)}] shape={self.shape} {self._a.dtype.name}"

    def _np_index(self) -> tuple:
        return tuple(it if isinstance(it, int) else slice(it[0], it[1]) for it in self._idx)

    # -- slicing -------------------------------------------------------------------------------
    def __getitem__(self, key) -> NkiTensor:
        # hot path of shape-only analysis: keep it lean
        if type(key) is not tuple:
            key = (key,)
        dims = self._dims
        nkey = len(key)
        if nkey > len(dims):
            raise NkiRuleError("index", f"{nkey} indices for a {len(dims)}-d tensor {self.describe()}")
        idx = list(self._idx)
        ndims = []
        nshape = []
        for d, bd in enumerate(dims):
            start, stop = idx[bd]
            length = stop - start
            if d >= nkey:
                ndims.append(bd)
                nshape.append(length)
                continue
            k = key[d]
            if type(k) is slice:
                s = k.start
                e = k.stop
                if s is None:
                    s = 0
                if e is None:
                    e = length
                if k.step not in (None, 1) or s < 0 or e > length or s >= e:
                    self._bad_slice(d, k, length)
                idx[bd] = (start + s, start + e)
                ndims.append(bd)
                nshape.append(e - s)
            elif isinstance(k, (int, np.integer)):
                k = int(k)
                if k < 0:
                    k += length
                if not 0 <= k < length:
                    raise NkiRuleError(
                        "index", f"index {key[d]} out of bounds for dim {d} of {self.describe()}"
                    )
                if bd == 0 and self._a.kind != "hbm":
                    raise NkiRuleError(
                        "index",
                        f"cannot index away the partition dimension of on-chip tile {self.describe()}",
                    )
                idx[bd] = start + k
            else:
                raise NkiRuleError("index", f"unsupported index {k!r} (use ints and unit-stride slices)")
        return NkiTensor(self._a, tuple(idx), tuple(ndims), tuple(nshape))

    def _bad_slice(self, d, k, length):
        if k.step not in (None, 1):
            raise NkiRuleError("index", f"strided slice {k} of {self.describe()} is not supported")
        raise NkiRuleError(
            "index",
            f"slice {k.start}:{k.stop} out of bounds or empty for dim {d} (size {length}) "
            f"of {self.describe()}",
        )

    def __setitem__(self, key, value):
        raise NkiRuleError("index", "assign to tiles through nisa instructions (destination-first), not []=")

    # -- numeric access (stand-in internal) ----------------------------------------------------
    def _read(self, op: str) -> np.ndarray:
        a = self._a
        ix = self._np_index()
        w = a.written[ix]
        if not w.all():
            missing = int(w.size - np.count_nonzero(w))
            raise NkiRuleError(
                "uninitialized-read",
                f"{op} reads {missing} of {w.size} elements of {self.describe()} that were never written",
            )
        return a.data[ix].reshape(self.shape)

    def _write(self, values: np.ndarray) -> None:
        a = self._a
        ix = self._np_index()
        a.data[ix] = np.asarray(values).reshape(a.data[ix].shape).astype(a.dtype)
        a.written[ix] = True


def _alloc(shape, dtype, kind: str, name: str) -> NkiTensor:
    run = _run()
    shape = tuple(int(s) for s in shape)
    dtype = _np_dtype(dtype)
    if not shape or any(s <= 0 for s in shape):
        raise NkiRuleError("index", f"invalid tensor shape {shape}")
    if kind != "hbm":
        if shape[0] > PARTITIONS:
            raise NkiRuleError(
                "partition-dim",
                f"{kind.upper()} tile of shape {shape} has {shape[0]} partitions; the partition dimension "
                f"(first) is at most {PARTITIONS}",
            )
        per_partition = math.prod(shape[1:]) * dtype.itemsize
        tgt = run.stats.target
        if kind == "sbuf":
            if run.live_sbuf + per_partition > tgt.sbuf_partition_bytes:
                raise NkiRuleError(
                    "sbuf-capacity",
                    f"allocating {name} {shape} {dtype.name} ({per_partition} B/partition) would make "
                    f"{run.live_sbuf + per_partition} B/partition of SBUF live, over the "
                    f"{tgt.sbuf_partition_bytes // 1024} KiB per partition of {tgt.name} ({tgt.core})",
                )
            run.live_sbuf += per_partition
            run.stats.peak_sbuf_bytes = max(run.stats.peak_sbuf_bytes, run.live_sbuf)
            amount = per_partition
        else:
            row = shape[-1] * dtype.itemsize if len(shape) > 1 else dtype.itemsize
            if row > tgt.psum_bank_bytes:
                raise NkiRuleError(
                    "psum-bank",
                    f"PSUM tile {shape} {dtype.name}: its innermost row needs {row} B per partition, more "
                    f"than one {tgt.psum_bank_bytes} B bank",
                )
            banks = math.prod(shape[1:-1]) if len(shape) > 2 else 1
            if run.live_psum + banks > tgt.psum_banks:
                raise NkiRuleError(
                    "psum-capacity",
                    f"allocating PSUM tile {name} {shape} ({banks} banks) would make {run.live_psum + banks} "
                    f"banks live; PSUM has {tgt.psum_banks} banks of {tgt.psum_bank_bytes} B per partition",
                )
            run.live_psum += banks
            run.stats.peak_psum_banks = max(run.stats.peak_psum_banks, run.live_psum)
            amount = banks
    if run.shape_only:
        data = written = None
    else:
        data = np.full(shape, np.nan, dtype=dtype) if _is_float(dtype) else np.zeros(shape, dtype=dtype)
        written = np.zeros(shape, dtype=bool)
    a = _Alloc(kind, dtype, shape, data, written, name)
    if kind != "hbm":
        weakref.finalize(a, _release, weakref.ref(run), kind, amount)
    return NkiTensor(a, tuple((0, s) for s in shape), tuple(range(len(shape))), shape)


_names = iter(range(1 << 62))


def ndarray(shape, dtype, buffer=sbuf, name: str = "", address=None) -> NkiTensor:
    """``nl.ndarray``: a new tensor in ``nl.sbuf`` (default), ``nl.psum`` or ``nl.shared_hbm``."""
    if not isinstance(buffer, _Buffer):
        raise NkiRuleError("dma-buffer", f"unknown buffer {buffer!r}")
    return _alloc(shape, dtype, buffer.kind, name or f"t{next(_names)}")


def zeros(shape, dtype, buffer=sbuf, name: str = "") -> NkiTensor:
    t = ndarray(shape, dtype, buffer=buffer, name=name)
    memset(t, 0.0)
    return t


def _wrap_input(value, name: str, shape_only: bool) -> NkiTensor:
    if isinstance(value, TensorSpec):
        shape, dtype, data = tuple(value.shape), _np_dtype(value.dtype), None
    else:
        arr = np.asarray(value)
        shape, dtype, data = arr.shape, arr.dtype, arr
    if shape_only:
        a = _Alloc("hbm", dtype, shape, None, None, name)
    else:
        if data is None:
            raise ValueError(f"argument {name} is a TensorSpec; numeric runs need arrays")
        a = _Alloc("hbm", dtype, shape, np.array(data, copy=True), np.ones(shape, dtype=bool), name)
    return NkiTensor(a, tuple((0, s) for s in shape), tuple(range(len(shape))), tuple(shape))


# ----------------------------------------------------------------------------------------------
# operators and activation functions


class _Op:
    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name = name
        self.fn = fn

    def __call__(self, *args, **kwargs):
        raise NkiRuleError(
            "no-kernel", f"nl.{self.name} is used as an instruction operator here (nisa.*(op=nl.{self.name}))"
        )

    def __repr__(self) -> str:
        return f"nl.{self.name}"


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


def _silu(x):
    x64 = x.astype(np.float64)
    return x64 / (1.0 + np.exp(-x64))


copy = _Op("copy", lambda x: x)
silu = _Op("silu", _silu)
gelu = _Op("gelu", _gelu)
gelu_apprx_tanh = _Op("gelu_apprx_tanh", _gelu_tanh)
relu = _Op("relu", lambda x: np.maximum(x, 0))
sigmoid = _Op("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64))))
tanh = _Op("tanh", np.tanh)
exp = _Op("exp", np.exp)
add = _Op("add", np.add)
subtract = _Op("subtract", np.subtract)
multiply = _Op("multiply", np.multiply)
maximum = _Op("maximum", np.maximum)
minimum = _Op("minimum", np.minimum)

_ACTIVATIONS = {copy, silu, gelu, gelu_apprx_tanh, relu, sigmoid, tanh, exp}
_ALU = {add, subtract, multiply, maximum, minimum}


# ----------------------------------------------------------------------------------------------
# instructions (nki.isa)


def _tensor(x, what: str, op: str) -> NkiTensor:
    if not isinstance(x, NkiTensor):
        raise NkiRuleError("index", f"{op}: {what} must be an NKI tensor, got {type(x).__name__}")
    return x


def _check_on_chip(t: NkiTensor, what: str, op: str) -> None:
    if t._a.kind == "hbm":
        raise NkiRuleError(
            "engine-buffer",
            f"{op}: {what} {t.describe()} is in HBM; compute engines read and write SBUF or PSUM only "
            f"(load it with nisa.dma_copy first)",
        )


def _pf(t: NkiTensor) -> tuple[int, int]:
    """(partitions, elements per partition) of an on-chip view."""
    if not t.shape:
        return 1, 1
    return t.shape[0], math.prod(t.shape[1:])


def _check_same_layout(op: str, a: NkiTensor, b: NkiTensor, an: str, bn: str) -> None:
    pa, fa = _pf(a)
    pb, fb = _pf(b)
    if pa != pb or fa != fb:
        raise NkiRuleError(
            "elementwise-shape",
            f"{op}: {an} {a.shape} and {bn} {b.shape} differ in partitions or elements per partition",
        )


def dma_copy(dst, src, priority=None, oob_mode=None, dge_mode=None, engine=None, name=None):
    """``nisa.dma_copy(dst, src)``: HBM <-> SBUF (or SBUF -> SBUF) copy, converting dtype if needed."""
    run = _run()
    op = "dma_copy"
    dst = _tensor(dst, "dst", op)
    src = _tensor(src, "src", op)
    for t, w in ((dst, "dst"), (src, "src")):
        if t._a.kind == "psum":
            raise NkiRuleError(
                "dma-buffer", f"{op}: {w} {t.describe()} is in PSUM; DMA moves data between HBM and SBUF"
            )
    if dst.size != src.size:
        raise NkiRuleError(
            "elementwise-shape", f"{op}: dst {dst.shape} and src {src.shape} differ in element count"
        )
    st = run.stats
    st.dma_count += 1
    if src._a.kind == "hbm":
        st.hbm_read_bytes += src.size * src.itemsize
    if dst._a.kind == "hbm":
        st.hbm_write_bytes += dst.size * dst.itemsize
    if not run.shape_only:
        vals = src._read(op)
        dst._write(vals.astype(np.float32) if vals.dtype != dst.dtype else vals)
    return dst


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=None, oob_mode=None, name=None):
    """``nisa.dma_transpose(dst, src)``: a 2-D transpose performed by the DMA on the way in."""
    run = _run()
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
    st = run.stats
    st.dma_count += 1
    if src._a.kind == "hbm":
        st.hbm_read_bytes += src.size * src.itemsize
    if not run.shape_only:
        dst._write(src._read(op).T)
    return dst


_F32 = np.dtype(np.float32)
_MATMUL_DTYPES = {_F32, np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


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
    """``nisa.nc_matmul(dst, stationary, moving, accumulate=...)``: ``dst (+)= stationary.T @ moving``."""
    run = _run()
    op = "nc_matmul"
    if type(dst) is not NkiTensor or type(stationary) is not NkiTensor or type(moving) is not NkiTensor:
        dst = _tensor(dst, "dst", op)
        stationary = _tensor(stationary, "stationary", op)
        moving = _tensor(moving, "moving", op)
    sa = stationary._a
    ma = moving._a
    da = dst._a
    for a, t, w in ((sa, stationary, "stationary"), (ma, moving, "moving")):
        if a.kind != "sbuf":
            raise NkiRuleError(
                "matmul-operands-sbuf",
                f"{op}: {w} operand {t.describe()} is in {a.kind.upper()}; both operands must be in SBUF",
            )
    if da.kind != "psum":
        raise NkiRuleError(
            "matmul-dst-psum", f"{op}: result {dst.describe()} is in {da.kind.upper()}; TensorE writes PSUM"
        )
    if da.dtype != _F32:
        raise NkiRuleError(
            "matmul-dst-fp32", f"{op}: result tile {dst.describe()} must be float32 on NeuronCore-v2/v3"
        )
    ss = stationary.shape
    ms = moving.shape
    if len(ss) != 2 or len(ms) != 2 or len(dst.shape) != 2:
        raise NkiRuleError("matmul-shape", f"{op}: operands must be 2-D tiles, got {ss}, {ms} -> {dst.shape}")
    kp, sf = ss
    kq, mf = ms
    if kp != kq:
        raise NkiRuleError(
            "matmul-contraction",
            f"{op}: the contraction runs over partitions; stationary has {kp} and moving {kq} partitions",
        )
    if kp > PARTITIONS:
        raise NkiRuleError("partition-dim", f"{op}: contraction of {kp} partitions exceeds {PARTITIONS}")
    if sf > STATIONARY_FMAX:
        raise NkiRuleError(
            "matmul-stationary-free", f"{op}: stationary free size {sf} exceeds {STATIONARY_FMAX}"
        )
    if mf > MOVING_FMAX:
        raise NkiRuleError(
            "matmul-moving-free",
            f"{op}: moving free size {mf} exceeds {MOVING_FMAX} (one 2 KiB PSUM bank of fp32)",
        )
    if dst.shape != (sf, mf):
        raise NkiRuleError("matmul-shape", f"{op}: result tile {dst.shape} should be {(sf, mf)}")
    sd = sa.dtype
    md = ma.dtype
    if sd not in _MATMUL_DTYPES or md not in _MATMUL_DTYPES:
        raise NkiRuleError("matmul-dtype", f"{op}: unsupported operand dtypes {sd.name}, {md.name}")
    fp32 = sd == _F32 or md == _F32
    if fp32 and sd != md:
        raise NkiRuleError(
            "matmul-dtype", f"{op}: a float32 operand requires the other to be float32 ({sd.name}, {md.name})"
        )
    st = run.stats
    st.matmul_count += 1
    st.tensor_cycles += max(min(64, sf), mf) * (4 if fp32 else 1)
    st.macs += kp * sf * mf
    if not run.shape_only:
        s = stationary._read(op).astype(np.float32)
        m = moving._read(op).astype(np.float32)
        res = s.T @ m
        if accumulate is True:
            res = dst._read(op + " (accumulate)") + res
        elif accumulate is None:
            a = dst._a
            ix = dst._np_index()
            was = a.written[ix].reshape(dst.shape)
            prev = np.where(was, a.data[ix].reshape(dst.shape), 0.0)
            res = prev + res
        dst._write(res.astype(np.float32))
    return dst


def nc_transpose(dst, data, engine=None, name=None):
    """``nisa.nc_transpose(dst, data)``: transpose a <=128x128 tile through TensorE into PSUM."""
    run = _run()
    op = "nc_transpose"
    dst = _tensor(dst, "dst", op)
    data = _tensor(data, "data", op)
    if data._a.kind != "sbuf" or dst._a.kind != "psum":
        raise NkiRuleError("matmul-operands-sbuf", f"{op}: reads SBUF and writes PSUM")
    if data.ndim != 2 or dst.shape != (data.shape[1], data.shape[0]) or data.shape[1] > PARTITIONS:
        raise NkiRuleError("matmul-shape", f"{op}: {data.shape} -> {dst.shape} is not a <=128x128 transpose")
    st = run.stats
    st.matmul_count += 1
    st.tensor_cycles += max(min(64, data.shape[1]), data.shape[0])
    if not run.shape_only:
        dst._write(data._read(op).T.astype(dst.dtype))
    return dst


def _operand_value(x, op: str, like: NkiTensor, what: str):
    """Scalar, or per-partition vector tile of shape (P, 1) broadcast along the free axis."""
    if isinstance(x, NkiTensor):
        _check_on_chip(x, what, op)
        p, f = _pf(x)
        if p != like.shape[0] or f != 1:
            raise NkiRuleError(
                "elementwise-shape",
                f"{op}: {what} must be a scalar or a ({like.shape[0]}, 1) vector, got {x.shape}",
            )
        if _RUN.get().shape_only:
            return None
        return x._read(op).astype(np.float32).reshape((p,) + (1,) * (like.ndim - 1))
    return np.float32(x)


def _count_engine(run: _Run, engine: str, t: NkiTensor) -> None:
    f = _pf(t)[1]
    if engine == "scalar":
        run.stats.scalar_elements += f
    else:
        run.stats.vector_elements += f


def tensor_copy(dst, src, engine=None, name=None):
    """``nisa.tensor_copy(dst, src)``: on-chip copy/cast (e.g. evacuating PSUM into SBUF)."""
    run = _run()
    op = "tensor_copy"
    dst = _tensor(dst, "dst", op)
    src = _tensor(src, "src", op)
    _check_on_chip(dst, "dst", op)
    _check_on_chip(src, "src", op)
    _check_same_layout(op, dst, src, "dst", "src")
    _count_engine(run, "vector", dst)
    if not run.shape_only:
        dst._write(src._read(op).astype(np.float32).reshape(dst.shape))
    return dst


def tensor_tensor(dst, data1, data2, op, engine=None, name=None):
    """``nisa.tensor_tensor(dst, data1, data2, op)``: element-wise binary op (computed in fp32)."""
    run = _run()
    opn = "tensor_tensor"
    dst = _tensor(dst, "dst", opn)
    data1 = _tensor(data1, "data1", opn)
    data2 = _tensor(data2, "data2", opn)
    for t, w in ((dst, "dst"), (data1, "data1"), (data2, "data2")):
        _check_on_chip(t, w, opn)
    _check_same_layout(opn, dst, data1, "dst", "data1")
    _check_same_layout(opn, dst, data2, "dst", "data2")
    if op not in _ALU:
        raise NkiRuleError("elementwise-shape", f"{opn}: unsupported operator {op!r}")
    _count_engine(run, "vector", dst)
    if not run.shape_only:
        a = data1._read(opn).astype(np.float32).reshape(dst.shape)
        b = data2._read(opn).astype(np.float32).reshape(dst.shape)
        dst._write(op.fn(a, b).astype(np.float32))
    return dst


def tensor_scalar(
    dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=None, name=None
):
    """``nisa.tensor_scalar``: ``(data op0 operand0) op1 operand1`` with scalar / per-partition operands."""
    run = _run()
    opn = "tensor_scalar"
    dst = _tensor(dst, "dst", opn)
    data = _tensor(data, "data", opn)
    _check_on_chip(dst, "dst", opn)
    _check_on_chip(data, "data", opn)
    _check_same_layout(opn, dst, data, "dst", "data")
    for o in (op0, op1):
        if o is not None and o not in _ALU:
            raise NkiRuleError("elementwise-shape", f"{opn}: unsupported operator {o!r}")
    v0 = _operand_value(operand0, opn, data, "operand0")
    v1 = _operand_value(operand1, opn, data, "operand1") if op1 is not None else None
    _count_engine(run, "vector", dst)
    if not run.shape_only:
        x = data._read(opn).astype(np.float32)
        x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
        if op1 is not None:
            x = op1.fn(v1, x) if reverse1 else op1.fn(x, v1)
        dst._write(np.asarray(x, dtype=np.float32).reshape(dst.shape))
    return dst


def scalar_tensor_tensor(
    dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, engine=None, name=None
):
    """``nisa.scalar_tensor_tensor``: ``(data op0 operand0) op1 operand1``.

    ``operand0`` is a scalar or per-partition (P, 1) vector, ``operand1`` a tile like ``data``."""
    run = _run()
    opn = "scalar_tensor_tensor"
    dst = _tensor(dst, "dst", opn)
    data = _tensor(data, "data", opn)
    operand1 = _tensor(operand1, "operand1", opn)
    for t, w in ((dst, "dst"), (data, "data"), (operand1, "operand1")):
        _check_on_chip(t, w, opn)
    _check_same_layout(opn, dst, data, "dst", "data")
    _check_same_layout(opn, dst, operand1, "dst", "operand1")
    for o in (op0, op1):
        if o not in _ALU:
            raise NkiRuleError("elementwise-shape", f"{opn}: unsupported operator {o!r}")
    v0 = _operand_value(operand0, opn, data, "operand0")
    _count_engine(run, "vector", dst)
    if not run.shape_only:
        x = data._read(opn).astype(np.float32).reshape(dst.shape)
        x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
        y = operand1._read(opn).astype(np.float32).reshape(dst.shape)
        x = op1.fn(y, x) if reverse1 else op1.fn(x, y)
        dst._write(np.asarray(x, dtype=np.float32))
    return dst


def activation(
    dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=None, name=None
):
    """``nisa.activation(dst, op, data, bias=, scale=)``: ``op(data * scale + bias)`` on the Scalar engine.

    ``bias`` is ``None`` or a per-partition ``(P, 1)`` tile; ``scale`` a scalar or ``(P, 1)`` tile."""
    run = _run()
    opn = "activation"
    dst = _tensor(dst, "dst", opn)
    data = _tensor(data, "data", opn)
    _check_on_chip(dst, "dst", opn)
    _check_on_chip(data, "data", opn)
    _check_same_layout(opn, dst, data, "dst", "data")
    if op not in _ACTIVATIONS:
        raise NkiRuleError("elementwise-shape", f"{opn}: unsupported activation {op!r}")
    if reduce_op is not None or reduce_res is not None:
        raise NkiRuleError("elementwise-shape", f"{opn}: reductions are not modelled by this stand-in")
    b = _operand_value(bias, opn, data, "bias") if bias is not None else None
    s = _operand_value(scale, opn, data, "scale")
    _count_engine(run, "scalar", dst)
    if not run.shape_only:
        x = data._read(opn).astype(np.float32) * s
        if b is not None:
            x = x + b
        dst._write(np.asarray(op.fn(x), dtype=np.float32).reshape(dst.shape))
    return dst


def memset(dst, value, engine=None, name=None):
    """``nisa.memset(dst, value)``: fill an on-chip tile with a constant."""
    run = _run()
    dst = _tensor(dst, "dst", "memset")
    _check_on_chip(dst, "dst", "memset")
    _count_engine(run, "vector", dst)
    if not run.shape_only:
        dst._write(np.full(dst.shape, value, dtype=np.float32))
    return dst


# ----------------------------------------------------------------------------------------------
# kernels: jit, runs


@dataclass
class KernelRun:
    """Result of :func:`run_kernel`: ``outputs`` (numpy arrays, or :class:`TensorSpec` in shape-only
    mode; a tuple when the kernel returns several) and the :class:`KernelStats`."""

    outputs: Any
    stats: KernelStats
    extra: dict = field(default_factory=dict)


class StandinKernel:
    """What the stand-in ``nki.jit`` returns: the kernel function plus a CPU launcher."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if _RUN.get() is not None:  # a kernel calling a kernel: inline it
            return self.fn(*args, **kwargs)
        return run_kernel(self, *args, **kwargs).outputs


def jit(fn=None, **_options):
    """``nki.jit``: on the stand-in, calling the kernel runs it numerically on the CPU."""
    if fn is None:
        return lambda f: StandinKernel(f)
    return StandinKernel(fn)


def simulate(kernel):
    """``nki.simulate(kernel)``: same as calling the stand-in kernel (numeric CPU execution)."""
    k = kernel if isinstance(kernel, StandinKernel) else StandinKernel(kernel)
    return lambda *a, **kw: run_kernel(k, *a, **kw).outputs


def _unwrap_output(t, run: _Run, check: bool):
    if t is None:
        return None
    if isinstance(t, (tuple, list)):
        return type(t)(_unwrap_output(x, run, check) for x in t)
    if not isinstance(t, NkiTensor) or t._a.kind != "hbm":
        raise NkiRuleError("dma-buffer", f"kernels return HBM tensors (nl.shared_hbm), got {t!r}")
    if run.shape_only:
        return TensorSpec(t.shape, t.dtype)
    if check:
        w = t._a.written[t._np_index()]
        if not w.all():
            raise NkiRuleError(
                "output-unwritten",
                f"the kernel returned {t.describe()} with {int(w.size - np.count_nonzero(w))} of {w.size} "
                "elements never written",
            )
    return np.array(t._a.data[t._np_index()]).reshape(t.shape)


def run_kernel(kernel, *args, target: str | Target = "trn2", shape_only: bool = False, **kwargs) -> KernelRun:
    """Run a kernel (an ``nki.jit`` function of this package, or a plain function written against the
    stand-in's ``nki``/``nl``/``nisa``) on the CPU stand-in.

    Positional and keyword arguments that are numpy arrays or :class:`TensorSpec` become HBM
    tensors; others (ints, strings, ``None``) are passed through as compile-time constants.
    ``shape_only=True`` counts without computing (arrays are then used for their shapes only)."""
    fn = kernel.fn if isinstance(kernel, StandinKernel) else kernel
    if _RUN.get() is not None:
        raise NkiRuleError("no-kernel", "run_kernel cannot be nested inside a kernel run")
    run = _Run(get_target(target), shape_only)

    def wrap(name, value):
        if isinstance(value, (np.ndarray, TensorSpec)):
            return _wrap_input(value, name, shape_only)
        return value

    token = _RUN.set(run)
    try:
        wargs = [wrap(f"arg{i}", a) for i, a in enumerate(args)]
        wkwargs = {k: wrap(k, v) for k, v in kwargs.items()}
        out = fn(*wargs, **wkwargs)
        outputs = _unwrap_output(out, run, check=True)
    finally:
        _RUN.reset(token)
        run.active = False
    return KernelRun(outputs=outputs, stats=run.stats)


# ----------------------------------------------------------------------------------------------
# the module-like handles


class _TileSize:
    pmax = PARTITIONS
    gemm_stationary_fmax = STATIONARY_FMAX
    gemm_moving_fmax = MOVING_FMAX
    psum_fmax = MOVING_FMAX


nl = types.SimpleNamespace(
    ndarray=ndarray,
    zeros=zeros,
    sbuf=sbuf,
    psum=psum,
    hbm=hbm,
    shared_hbm=shared_hbm,
    private_hbm=private_hbm,
    bfloat16=np.dtype(ml_dtypes.bfloat16),
    float16=np.dtype(np.float16),
    float32=np.dtype(np.float32),
    int32=np.dtype(np.int32),
    uint8=np.dtype(np.uint8),
    tile_size=_TileSize,
    copy=copy,
    silu=silu,
    gelu=gelu,
    gelu_apprx_tanh=gelu_apprx_tanh,
    relu=relu,
    sigmoid=sigmoid,
    tanh=tanh,
    exp=exp,
    add=add,
    subtract=subtract,
    multiply=multiply,
    maximum=maximum,
    minimum=minimum,
    __name__="nki.language (neuronmm_fx CPU stand-in)",
)

nisa = types.SimpleNamespace(
    dma_copy=dma_copy,
    dma_transpose=dma_transpose,
    nc_matmul=nc_matmul,
    nc_transpose=nc_transpose,
    tensor_copy=tensor_copy,
    tensor_tensor=tensor_tensor,
    tensor_scalar=tensor_scalar,
    scalar_tensor_tensor=scalar_tensor_tensor,
    activation=activation,
    memset=memset,
    __name__="nki.isa (neuronmm_fx CPU stand-in)",
)

nki = types.SimpleNamespace(
    jit=jit,
    simulate=simulate,
    language=nl,
    isa=nisa,
    __version__="0.3-standin",
    __name__="nki (neuronmm_fx CPU stand-in)",
    IS_STANDIN=True,
)

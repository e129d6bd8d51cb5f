"""Memory of the stand-in: the HBM/SBUF/PSUM buffers, their allocations and tensor views.

An allocation (:class:`Alloc`) is one ``nl.ndarray`` (or one kernel argument in HBM); a
:class:`NkiTensor` is a rectangular view of it made by basic slicing.  In numeric mode an
allocation holds its values and a written-mask: new SBUF and PSUM buffers (and new HBM outputs) are
filled with NaN, and reading an element nothing wrote is an ``uninitialized-read`` error rather
than a silent NaN.  In shape-only mode nothing is stored.

Liveness: an on-chip allocation counts against SBUF or PSUM from :func:`allocate` until the last
Python reference to it (or to a view of it) disappears, which for the kernels here means until
the kernel returns.  Buffers allocated inside a loop body are therefore counted twice at the
moment the loop variable is rebound, which is how the real compiler double-buffers them as well.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from . import rules
from .rules import NkiRuleError
from .stats import current_run, release

BF16 = np.dtype(ml_dtypes.bfloat16)


class Buffer:
    """A memory handle such as ``nl.sbuf``; ``kind`` is ``"hbm"``, ``"sbuf"`` or ``"psum"``."""

    __slots__ = ("name", "kind")

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind

    def __repr__(self) -> str:
        return f"nl.{self.name}"


BUFFERS = tuple(
    Buffer(name, kind)
    for name, kind in (
        ("sbuf", "sbuf"),
        ("psum", "psum"),
        ("hbm", "hbm"),
        ("shared_hbm", "hbm"),
        ("private_hbm", "hbm"),
    )
)


class Alloc:
    """One allocation: where it lives, dtype, shape, and (numeric mode) values and written-mask."""

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


def np_dtype(dtype: Any) -> np.dtype:
    """numpy dtype of a dtype or its name (``"bfloat16"`` through ``ml_dtypes``)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return BF16
    return np.dtype(dtype)


class NkiTensor:
    """A tensor in HBM, SBUF or PSUM, or a rectangular view of one (basic slicing only)."""

    __slots__ = ("_a", "_idx", "_dims", "shape")

    def __init__(self, alloc: Alloc, idx: tuple, dims: tuple[int, ...], shape: tuple[int, ...]):
        self._a = alloc
        self._idx = idx  # one entry per allocation dim: an int, or a (start, stop) pair
        self._dims = dims  # the allocation dims this view keeps
        self.shape = shape

    @classmethod
    def whole(cls, alloc: Alloc) -> NkiTensor:
        shape = tuple(alloc.shape)
        return cls(alloc, tuple((0, s) for s in shape), tuple(range(len(shape))), shape)

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
        parts = [str(it) if isinstance(it, int) else f"{it[0]}:{it[1]}" for it in self._idx]
        return f"{self._a.name}[{', '.join(parts)}] shape={self.shape} {self._a.dtype.name}"

    def np_index(self) -> tuple:
        """This view as a numpy index into its allocation."""
        return tuple(it if isinstance(it, int) else slice(it[0], it[1]) for it in self._idx)

    def __getitem__(self, key) -> NkiTensor:
        # shape-only analysis slices millions of times: keep this loop plain
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
                s = 0 if k.start is None else k.start
                e = length if k.stop is None else k.stop
                if k.step not in (None, 1) or s < 0 or e > length or s >= e:
                    self._bad_slice(d, k, length)
                idx[bd] = (start + s, start + e)
                ndims.append(bd)
                nshape.append(e - s)
            elif isinstance(k, (int, np.integer)):
                idx[bd] = start + self._checked_int(d, bd, int(k), length)
            else:
                raise NkiRuleError("index", f"unsupported index {k!r} (use ints and unit-stride slices)")
        return NkiTensor(self._a, tuple(idx), tuple(ndims), tuple(nshape))

    def _checked_int(self, d: int, bd: int, k: int, length: int) -> int:
        i = k + length if k < 0 else k
        if not 0 <= i < length:
            raise NkiRuleError("index", f"index {k} out of bounds for dim {d} of {self.describe()}")
        if bd == 0 and self._a.kind != "hbm":
            raise NkiRuleError(
                "index", f"cannot index away the partition dimension of on-chip tile {self.describe()}"
            )
        return i

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

    # -- values (numeric mode; used by the instructions) ---------------------------------------------
    def read(self, op: str) -> np.ndarray:
        """The view's values; every element must have been written."""
        a = self._a
        ix = self.np_index()
        w = a.written[ix]
        if not w.all():
            missing = int(w.size - np.count_nonzero(w))
            raise NkiRuleError(
                "uninitialized-read",
                f"{op} reads {missing} of {w.size} elements of {self.describe()} that were never written",
            )
        return a.data[ix].reshape(self.shape)

    def read_f32(self, op: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """:meth:`read` as float32, reshaped to ``shape`` if given (the engines compute in fp32)."""
        v = self.read(op).astype(np.float32)
        return v if shape is None else v.reshape(shape)

    def write(self, values) -> None:
        """Store ``values`` (cast to the view's dtype) and mark the elements written."""
        a = self._a
        ix = self.np_index()
        a.data[ix] = np.asarray(values).reshape(a.data[ix].shape).astype(a.dtype)
        a.written[ix] = True

    def unwritten(self) -> int:
        """How many elements of the view were never written."""
        w = self._a.written[self.np_index()]
        return int(w.size - np.count_nonzero(w))


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == BF16  # ml_dtypes' bfloat16 has kind 'V'


def allocate(shape, dtype, kind: str, name: str) -> NkiTensor:
    """A new tensor of the run in progress, counted against SBUF or PSUM when on chip."""
    run = current_run()
    shape = tuple(int(s) for s in shape)
    dtype = np_dtype(dtype)
    rules.check_shape(kind, shape)
    tgt = run.stats.target
    if kind == "sbuf":
        amount = math.prod(shape[1:]) * dtype.itemsize
        rules.check_sbuf_room(run.live_sbuf, amount, tgt, f"{name} {shape} {dtype.name}")
        run.live_sbuf += amount
        run.stats.peak_sbuf_bytes = max(run.stats.peak_sbuf_bytes, run.live_sbuf)
    elif kind == "psum":
        amount = rules.psum_banks_of(shape, dtype, tgt, run.live_psum, f"{name} {shape}")
        run.live_psum += amount
        run.stats.peak_psum_banks = max(run.stats.peak_psum_banks, run.live_psum)
    if run.shape_only:
        data = written = None
    else:
        data = np.full(shape, np.nan, dtype=dtype) if _is_float(dtype) else np.zeros(shape, dtype=dtype)
        written = np.zeros(shape, dtype=bool)
    a = Alloc(kind, dtype, shape, data, written, name)
    if kind != "hbm":
        weakref.finalize(a, release, weakref.ref(run), kind, amount)
    return NkiTensor.whole(a)


def wrap_input(value, name: str, shape_only: bool) -> NkiTensor:
    """A kernel argument (array or :class:`TensorSpec`) as an HBM tensor whose elements are written."""
    if isinstance(value, TensorSpec):
        shape, dtype, data = tuple(value.shape), np_dtype(value.dtype), None
    else:
        data = np.asarray(value)
        shape, dtype = data.shape, data.dtype
    if shape_only:
        return NkiTensor.whole(Alloc("hbm", dtype, shape, None, None, name))
    if data is None:
        raise ValueError(f"argument {name} is a TensorSpec; numeric runs need arrays")
    return NkiTensor.whole(Alloc("hbm", dtype, shape, np.array(data, copy=True), np.ones(shape, bool), name))

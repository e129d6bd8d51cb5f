"""The rules the stand-in enforces, and the checks that enforce them.

Every check raises :class:`NkiRuleError`, whose message starts with the rule's name in brackets
(``[matmul-moving-free] ...``), so that a test can tell which rule a kernel broke.

Rules
    ``partition-dim``        a tile's first dimension is the partition dimension, at most 128
    ``sbuf-capacity``        SBUF bytes per partition live at once <= the usable share: 192 / 224 /
                             256 KiB (trn1 / trn2 / trn3) less the compiler's 16.5 KiB
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
    ``dma-cast``             a DMA through the hardware DGE (``dge_mode="hwdge"``) does not convert dtypes
    ``dma-transpose-dge``    a DMA transpose is a 2-byte (16, 128) tile (the hardware DGE of NKI 0.3)
    ``transpose-*``          ``nc_transpose`` on TensorE: SBUF in, PSUM out, <= 128 x 128, one dtype
    ``psum-operands``        a Vector/Scalar instruction reads at most one tensor operand from PSUM
    ``engine-buffer``        Vector/Scalar engine operands live in SBUF or PSUM (never HBM)
    ``elementwise-shape``    element-wise operands agree in partitions and elements per partition
    ``index``                out-of-bounds, empty or strided slices; indexing away the partition dim
    ``uninitialized-read``   reading on-chip or output memory that nothing wrote (numeric mode)
    ``output-unwritten``     a kernel returned an output with elements it never wrote (numeric mode)
    ``no-kernel``            an NKI call outside a kernel run
    ``lnc``                  a launch grid other than one core (``kernel[1](...)``)
    ``subset-*``             the kernel's Python leaves the subset NKI 0.3 compiles (:mod:`.subset`)

The checks read tensors through two attributes only: ``t._a`` (the allocation, with ``kind``
``"hbm"``/``"sbuf"``/``"psum"`` and ``dtype``) and ``t.shape``; ``t.describe()`` names them in
messages.  The limits themselves come from :mod:`neuronmm_fx.kernels.targets`.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from ..targets import MOVING_FMAX, PARTITIONS, STATIONARY_FMAX, Target

F32 = np.dtype(np.float32)
MATMUL_DTYPES = frozenset({F32, np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)})


class NkiRuleError(Exception):
    """A kernel broke a rule that the NKI compiler or the hardware enforces.

    ``rule`` is the rule's short name (also the bracketed prefix of the message)."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"[{rule}] {message}")
        self.rule = rule


# -- allocation ----------------------------------------------------------------------------------


def check_shape(kind: str, shape: tuple[int, ...]) -> None:
    """A new tensor has a non-empty shape; an on-chip tile has at most 128 partitions."""
    if not shape or any(s <= 0 for s in shape):
        raise NkiRuleError("index", f"invalid tensor shape {shape}")
    if kind != "hbm" and shape[0] > PARTITIONS:
        raise NkiRuleError(
            "partition-dim",
            f"{kind.upper()} tile of shape {shape} has {shape[0]} partitions; the partition dimension "
            f"(first) is at most {PARTITIONS}",
        )


def check_sbuf_room(live: int, need: int, tgt: Target, what: str) -> None:
    """``need`` more bytes per partition fit next to the ``live`` ones."""
    if live + need > tgt.usable_sbuf_partition_bytes:
        raise NkiRuleError(
            "sbuf-capacity",
            f"allocating {what} ({need} B/partition) would make {live + need} B/partition of SBUF live, "
            f"over the {tgt.usable_sbuf_partition_bytes / 1024:.1f} KiB a kernel may use of the "
            f"{tgt.sbuf_partition_bytes // 1024} KiB per partition of {tgt.name} ({tgt.core})",
        )


def psum_banks_of(shape: tuple[int, ...], dtype: np.dtype, tgt: Target, live: int, what: str) -> int:
    """Banks a PSUM tile takes (one per row of its middle dims); its row must fit one bank and the
    banks must fit next to the ``live`` ones."""
    row = shape[-1] * dtype.itemsize if len(shape) > 1 else dtype.itemsize
    if row > tgt.psum_bank_bytes:
        raise NkiRuleError(
            "psum-bank",
            f"PSUM tile {shape} {dtype.name}: its innermost row needs {row} B per partition, more "
            f"than one {tgt.psum_bank_bytes} B bank",
        )
    banks = math.prod(shape[1:-1]) if len(shape) > 2 else 1
    if live + banks > tgt.psum_banks:
        raise NkiRuleError(
            "psum-capacity",
            f"allocating PSUM tile {what} ({banks} banks) would make {live + banks} "
            f"banks live; PSUM has {tgt.psum_banks} banks of {tgt.psum_bank_bytes} B per partition",
        )
    return banks


# -- instructions --------------------------------------------------------------------------------


def partitions_and_free(t) -> tuple[int, int]:
    """(partitions, elements per partition) of an on-chip view."""
    if not t.shape:
        return 1, 1
    return t.shape[0], math.prod(t.shape[1:])


def check_on_chip(t, what: str, op: str) -> None:
    if t._a.kind == "hbm":
        raise NkiRuleError(
            "engine-buffer",
            f"{op}: {what} {t.describe()} is in HBM; compute engines read and write SBUF or PSUM only "
            f"(load it with nisa.dma_copy first)",
        )


def check_same_layout(op: str, a, b, an: str, bn: str) -> None:
    if partitions_and_free(a) != partitions_and_free(b):
        raise NkiRuleError(
            "elementwise-shape",
            f"{op}: {an} {a.shape} and {bn} {b.shape} differ in partitions or elements per partition",
        )


def check_dma_ends(op: str, dst, src) -> None:
    """DMA endpoints are HBM or SBUF."""
    if dst._a.kind == "psum" or src._a.kind == "psum":
        what, t = ("dst", dst) if dst._a.kind == "psum" else ("src", src)
        raise NkiRuleError(
            "dma-buffer", f"{op}: {what} {t.describe()} is in PSUM; DMA moves data between HBM and SBUF"
        )


def check_one_psum_operand(op: str, **operands) -> None:
    """At most one of an engine instruction's tensor inputs is in PSUM (the ISA's rule for
    ``tensor_tensor`` and ``scalar_tensor_tensor``)."""
    in_psum = [name for name, t in operands.items() if t._a.kind == "psum"]
    if len(in_psum) > 1:
        raise NkiRuleError(
            "psum-operands",
            f"{op}: {' and '.join(in_psum)} are both in PSUM; at most one input may be (copy one to SBUF)",
        )


def check_dma_cast(op: str, dst, src, dge_mode) -> None:
    """A dtype-converting DMA is refused on the hardware DGE path (NKI 0.3: use swdge or none)."""
    if dst._a.dtype != src._a.dtype and dge_mode == "hwdge":
        raise NkiRuleError(
            "dma-cast",
            f"{op}: {src._a.dtype.name} -> {dst._a.dtype.name} with dge_mode='hwdge'; the hardware DGE "
            "does not convert dtypes (dge_mode='swdge' or 'none' casts)",
        )


def check_matmul(op: str, dst, stationary, moving) -> tuple[int, int, int, bool]:
    """Every TensorE rule of ``dst = stationary.T @ moving``; returns (contraction, stationary free,
    moving free, whether the operands are float32)."""
    sa, ma, da = stationary._a, moving._a, dst._a
    if sa.kind != "sbuf" or ma.kind != "sbuf":
        what, t = ("stationary", stationary) if sa.kind != "sbuf" else ("moving", moving)
        raise NkiRuleError(
            "matmul-operands-sbuf",
            f"{op}: {what} operand {t.describe()} is in {t._a.kind.upper()}; both operands must be in SBUF",
        )
    if da.kind != "psum":
        raise NkiRuleError(
            "matmul-dst-psum", f"{op}: result {dst.describe()} is in {da.kind.upper()}; TensorE writes PSUM"
        )
    if da.dtype != F32:
        raise NkiRuleError(
            "matmul-dst-fp32", f"{op}: result tile {dst.describe()} must be float32 on NeuronCore-v2/v3"
        )
    ss, ms = stationary.shape, moving.shape
    if len(ss) != 2 or len(ms) != 2 or len(dst.shape) != 2:
        raise NkiRuleError("matmul-shape", f"{op}: operands must be 2-D tiles, got {ss}, {ms} -> {dst.shape}")
    (kp, sf), (kq, mf) = ss, ms
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
    sd, md = sa.dtype, ma.dtype
    if sd not in MATMUL_DTYPES or md not in MATMUL_DTYPES:
        raise NkiRuleError("matmul-dtype", f"{op}: unsupported operand dtypes {sd.name}, {md.name}")
    fp32 = sd == F32 or md == F32
    if fp32 and sd != md:
        raise NkiRuleError(
            "matmul-dtype", f"{op}: a float32 operand requires the other to be float32 ({sd.name}, {md.name})"
        )
    return kp, sf, mf, fp32

"""What a kernel run counts, and the state of the run in progress.

:class:`KernelStats` holds the counters: HBM bytes read and written by DMA, peak SBUF bytes per
partition and peak PSUM banks, matmul instructions, TensorE cycles (per instruction
``max(min(64, stationary_free), moving_free)``, four times that for fp32 operands), DMA
instructions and Vector/Scalar engine elements.  :meth:`KernelStats.engine_times_s` turns them into
modelled seconds per engine and :attr:`KernelStats.estimated_time_s` into the kernel's modelled
time (the busiest engine): a model, not a measurement.

The engine model
    TensorE   counted cycles / clock.
    Vector, Scalar  elements per partition / clock (one element per partition per cycle; an
              assumption, not a documented figure).
    DMA       each transfer's HBM bytes divided by its efficiency, over the core's HBM bandwidth.
              Efficiency grows with the bytes one partition moves in one transfer and reaches 1 at
              2 KiB (the documented size for near-peak DMA): ``min(1, row bytes / 2048)``; a
              transposing DMA tops out at 0.9 (transposes run below plain copies).
    The kernels double-buffer PSUM banks, weight tiles and output rows, so the engines are taken to
    overlap: the kernel's time is the largest engine time.


The run in progress (:func:`current_run`) also tracks the SBUF bytes and PSUM banks live at the
moment; the memory module adds to them on allocation and :func:`release` takes a dead buffer's
share back off.
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass

from ..targets import Target
from .rules import NkiRuleError


@dataclass
class KernelStats:
    """What one kernel run did, as counted by the stand-in.

    Byte and cycle figures are exact counts of the instructions the kernel issued; the times are the
    engine model of this module (per engine, overlapped, no latencies)."""

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
    dma_queue_bytes: float = 0.0
    """HBM bytes each divided by its transfer's efficiency (:func:`dma_efficiency`)."""

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

    def engine_times_s(self) -> dict[str, float]:
        """Modelled seconds of each engine: ``tensor``, ``vector``, ``scalar`` and ``dma``."""
        clock = self.target.clock_hz
        return {
            "tensor": self.tensor_cycles / clock,
            "vector": self.vector_elements / clock,
            "scalar": self.scalar_elements / clock,
            "dma": self.dma_queue_bytes / self.target.hbm_bytes_per_s,
        }

    @property
    def estimated_time_s(self) -> float:
        """The busiest engine's modelled time (engines overlap): a model, not a measurement."""
        return max(self.engine_times_s().values())

    @property
    def bound(self) -> str:
        """The engine that sets :attr:`estimated_time_s`."""
        times = self.engine_times_s()
        return max(times, key=times.get)

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
            f"{self.tensor_cycles} TensorE cycles; modelled {self.estimated_time_s * 1e6:.1f} us "
            f"({self.bound}-bound; a model, not a measurement)"
        )


class Run:
    """One kernel run: its counters, its mode and the on-chip memory live right now."""

    __slots__ = ("stats", "shape_only", "live_sbuf", "live_psum", "__weakref__")

    def __init__(self, target: Target, shape_only: bool):
        self.stats = KernelStats(target=target)
        self.shape_only = shape_only
        self.live_sbuf = 0
        self.live_psum = 0


RUN: contextvars.ContextVar[Run | None] = contextvars.ContextVar("nki_standin_run", default=None)
"""The run in progress in this context, if any."""


def current_run() -> Run:
    """The run in progress; NKI calls outside one break the ``no-kernel`` rule."""
    r = RUN.get()
    if r is None:
        raise NkiRuleError(
            "no-kernel", "NKI calls are only valid inside a kernel run (use run_kernel or nki.jit)"
        )
    return r


def release(run_ref: weakref.ref, kind: str, amount: int) -> None:
    """Give back what a dead SBUF or PSUM buffer held (called when its allocation is collected)."""
    run = run_ref()
    if run is None:
        return
    if kind == "sbuf":
        run.live_sbuf -= amount
    else:
        run.live_psum -= amount

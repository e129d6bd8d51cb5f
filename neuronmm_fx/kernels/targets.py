"""NeuronCore targets and the tile limits of one instruction: the single source of both.

The kernels, the planner and the CPU stand-in all take the partition count and the matmul free
sizes from here.  The per-target figures are listed, with where they come from, in
``docs/kernels.md`` ("Targets").  HBM bandwidth per core is an estimate (a chip's bandwidth divided
by its cores), so every time derived from it is a model, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTITIONS = 128
"""SBUF/PSUM partitions; also the TensorE systolic array's side and the contraction tile."""
STATIONARY_FMAX = 128
"""Largest free size of a matmul's stationary operand."""
MOVING_FMAX = 512
"""Largest free size of a matmul's moving operand: one 2 KiB PSUM bank of fp32 per partition."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return (a + b - 1) // b


CURRENT_DIALECT = "nki"
LEGACY_DIALECT = "neuronxcc.nki"
COMPILER_RESERVED_SBUF = 16 * 1024 + 528
"""Bytes per partition the compiler keeps for itself.  Not documented as a figure; taken from the
budget AWS's own kernel library computes (``224 KiB - 16384 - 8 - 520`` on Trn2), so an estimate."""


@dataclass(frozen=True)
class Target:
    """One NeuronCore generation, as far as the kernels and the cost model care.

    Figures are per physical core; the kernels are launched with LNC = 1 (one physical core each,
    ``kernel[1](...)``), so a logical core of LNC = 2 runs two launches' worth of work."""

    name: str
    core: str
    sbuf_partition_bytes: int  # physical
    clock_hz: float
    hbm_bytes_per_s: float  # the device's bandwidth divided by its cores
    psum_banks: int = 8  # nl.tile_size.psum_num_banks (8; 7 when DMA transposes run on TensorE)
    psum_bank_bytes: int = 2048
    dialect: str = CURRENT_DIALECT  # the NKI namespace that compiles kernels for this target

    @property
    def usable_sbuf_partition_bytes(self) -> int:
        """What a kernel may allocate per partition: the physical SBUF less the compiler's share."""
        return self.sbuf_partition_bytes - COMPILER_RESERVED_SBUF

    @property
    def runs_current_nki(self) -> bool:
        """Whether the current ``import nki`` dialect (the project's kernels) compiles for it."""
        return self.dialect == CURRENT_DIALECT

    @property
    def sbuf_bytes(self) -> int:
        return self.sbuf_partition_bytes * PARTITIONS

    @property
    def peak_flops_bf16(self) -> float:
        """TensorE peak: 128x128 multiply-accumulates (2 flops) per cycle."""
        return 2.0 * PARTITIONS * PARTITIONS * self.clock_hz


# Trainium2 (NeuronCore-v3): 28 MiB SBUF per core (128 x 224 KiB), 79 BF16 TFLOPS per
# core (2.4 GHz x 128 x 128 x 2), 2.9 TB/s HBM per device of 8 cores.  Trainium3 (NeuronCore-v4):
# 32 MiB SBUF per core (128 x 256 KiB), the same TensorE peak, 4.9 TB/s HBM per device of 8 cores.
# Trainium1 (NeuronCore-v2): 24 MiB (128 x 192 KiB), 820 GB/s per device of 2 cores; a planning
# target only, since the current NKI compiles for Trainium2 and Trainium3 alone.
TRN1 = Target(
    "trn1",
    "NeuronCore-v2",
    sbuf_partition_bytes=192 * 1024,
    clock_hz=2.8e9,
    hbm_bytes_per_s=410e9,
    dialect=LEGACY_DIALECT,
)
TRN2 = Target("trn2", "NeuronCore-v3", sbuf_partition_bytes=224 * 1024, clock_hz=2.4e9, hbm_bytes_per_s=360e9)
TRN3 = Target(
    "trn3", "NeuronCore-v4", sbuf_partition_bytes=256 * 1024, clock_hz=2.4e9, hbm_bytes_per_s=4.9e12 / 8
)

TARGETS: dict[str, Target] = {t.name: t for t in (TRN1, TRN2, TRN3)}


def get_target(target: str | Target) -> Target:
    """``"trn1"``/``"trn2"``/``"trn3"`` (or a :class:`Target`) -> :class:`Target`."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; known targets: {sorted(TARGETS)}") from None

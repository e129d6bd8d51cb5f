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


@dataclass(frozen=True)
class Target:
    """One NeuronCore generation, as far as the kernels and the cost model care."""

    name: str
    core: str
    sbuf_partition_bytes: int
    clock_hz: float
    hbm_bytes_per_s: float
    psum_banks: int = 8
    psum_bank_bytes: int = 2048

    @property
    def sbuf_bytes(self) -> int:
        return self.sbuf_partition_bytes * PARTITIONS

    @property
    def peak_flops_bf16(self) -> float:
        """TensorE peak: 128x128 multiply-accumulates (2 flops) per cycle."""
        return 2.0 * PARTITIONS * PARTITIONS * self.clock_hz


TRN1 = Target("trn1", "NeuronCore-v2", sbuf_partition_bytes=192 * 1024, clock_hz=2.8e9, hbm_bytes_per_s=410e9)
TRN2 = Target("trn2", "NeuronCore-v3", sbuf_partition_bytes=224 * 1024, clock_hz=2.4e9, hbm_bytes_per_s=360e9)

TARGETS: dict[str, Target] = {t.name: t for t in (TRN1, TRN2)}


def get_target(target: str | Target) -> Target:
    """``"trn1"``/``"trn2"`` (or a :class:`Target`) -> :class:`Target`."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; known targets: {sorted(TARGETS)}") from None

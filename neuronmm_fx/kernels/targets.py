"""NeuronCore targets: the on-chip capacities and the rates the cost model uses.

The figures are those of the project notes (``NEURONMM_NOTES.md`` section 5).  HBM bandwidth per
core is an estimate (a chip's bandwidth divided by its cores), so every time derived from it is a
model, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTITIONS = 128
"""SBUF/PSUM partitions; also the TensorE systolic array's side."""


@dataclass(frozen=True)
class Target:
    """One NeuronCore generation, as far as the kernels and the cost model care."""

    name: str
    core: str
    sbuf_partition_bytes: int
    psum_banks: int
    psum_bank_bytes: int
    clock_hz: float
    hbm_bytes_per_s: float

    @property
    def sbuf_bytes(self) -> int:
        return self.sbuf_partition_bytes * PARTITIONS

    @property
    def peak_flops_bf16(self) -> float:
        """TensorE peak: 128x128 multiply-accumulates (2 flops) per cycle."""
        return 2.0 * PARTITIONS * PARTITIONS * self.clock_hz


TRN1 = Target(
    name="trn1",
    core="NeuronCore-v2",
    sbuf_partition_bytes=192 * 1024,
    psum_banks=8,
    psum_bank_bytes=2048,
    clock_hz=2.8e9,
    hbm_bytes_per_s=410e9,
)

TRN2 = Target(
    name="trn2",
    core="NeuronCore-v3",
    sbuf_partition_bytes=224 * 1024,
    psum_banks=8,
    psum_bank_bytes=2048,
    clock_hz=2.4e9,
    hbm_bytes_per_s=360e9,
)

TARGETS: dict[str, Target] = {"trn1": TRN1, "trn2": TRN2}


def get_target(target: str | Target) -> Target:
    """``"trn1"``/``"trn2"`` (or a :class:`Target`) -> :class:`Target`."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[target]
    except KeyError:
        raise ValueError(f"unknown target {target!r}; known targets: {sorted(TARGETS)}") from None

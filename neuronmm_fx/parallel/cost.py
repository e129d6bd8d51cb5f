"""A cost model of the tensor-parallel forms of one compressed gated MLP.

Notation: ``H`` hidden, ``I`` intermediate, ``t`` ranks (the TP degree); each projection is either
low-rank, ``U`` (in, r) · ``V`` (r, out), or dense, ``W`` (in, out).  The MLP's input and output are
replicated on every rank (as between the attention blocks of a Megatron-style TP model).  Schemes:

``dense``       the uncompressed MLP, Megatron style: gate/up column-split, down row-split, one
                all-reduce of ``H`` values per token.  The baseline.
``naive``       each factor sharded as the dense matrix it replaced: gate/up ``U`` replicated and
                ``V`` column-split (the column split of ``U·V`` is ``U·V[:, shard]``); down ``U``
                row-split and ``V`` replicated, the partial output ``(tokens, H)`` all-reduced.
``replicated``  as ``naive``, but down's partial product is all-reduced before ``V``: ``(tokens, r_down)``
                instead of ``(tokens, H)`` ("r-reduced down"); ``V`` then runs on every rank.
``r_sharded``   gate/up ``U`` column-split over ``r``, the ``(tokens, r_gate + r_up)`` product
                all-gathered, ``V`` column-split; down as in ``replicated``.  Compute sharded except
                down's ``V``; one more collective.

A projection left dense takes its dense TP form in every scheme (gate/up column-split; down
row-split, its partial ``(tokens, H)`` all-reduced).

Per rank and per token the model counts multiply-accumulates, weight bytes, and the collectives with
their payloads; :func:`step_time` turns them into modelled time: compute at TensorE peak, weights
read at the HBM bandwidth per rank, and each collective as a ring (``2(t−1)`` steps for an
all-reduce, ``t−1`` for an all-gather) over the NeuronLink bandwidth per rank, with a fixed cost per
step.  Collectives are not overlapped with compute (each one feeds the next matmul).  Every figure
is "modelled", never "measured"; the constants and their sources are in docs/parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neuronmm_fx.compress.ranks import uniform_rank

SCHEMES = ("dense", "naive", "replicated", "r_sharded")
IMPLEMENTED = ("replicated", "r_sharded")
"""The schemes :func:`neuronmm_fx.parallel.shard` builds (the two the model ranks best, see
docs/parallel.md); ``naive`` is never better than ``replicated`` (same compute, a larger all-reduce)."""

LLAMA_SHAPES = {  # name: (hidden H, intermediate I)
    "LLaMA-3.2-1B": (2048, 8192),
    "LLaMA-3.2-3B": (3072, 8192),
    "LLaMA-3.1-8B": (4096, 14336),
}


@dataclass(frozen=True)
class MLPShape:
    """One MLP: ``H``, ``I`` and each projection's rank (None: left dense).  A plain MLP
    (``gated=False``) has its first projection in the ``gate`` fields and no ``up``."""

    hidden: int
    intermediate: int
    gate_rank: int | None
    up_rank: int | None
    down_rank: int | None
    gated: bool = True

    @classmethod
    def uniform(cls, hidden: int, intermediate: int, ratio: float, block: int = 128) -> MLPShape:
        """The shape the paper's uniform rank rule gives at ``ratio``."""
        first = uniform_rank(hidden, intermediate, ratio, block).rank
        return cls(hidden, intermediate, first, first, uniform_rank(intermediate, hidden, ratio, block).rank)

    @classmethod
    def of(cls, mlp) -> MLPShape:
        """The shape of a :class:`~neuronmm_fx.modules.CompressedMLP`, gated or plain."""
        first, last = mlp.factors(mlp.roles[0]), mlp.factors(mlp.roles[-1])
        up_rank = mlp.factors("up").rank if mlp.gated else None
        return cls(first.in_features, first.out_features, first.rank, up_rank, last.rank, mlp.gated)

    @property
    def first_ranks(self) -> tuple[int | None, ...]:
        """The ranks of the projections that read the MLP's input: (gate, up), or (in,)."""
        return (self.gate_rank, self.up_rank) if self.gated else (self.gate_rank,)


@dataclass(frozen=True)
class Collective:
    """One collective of one MLP call: ``kind`` (all_reduce / all_gather) and the elements per token
    of its result (an all-gather's result is the whole gathered row)."""

    kind: str
    per_token: int
    purpose: str


@dataclass
class SchemeCost:
    """Per rank, per MLP call: multiply-accumulates and collectives per token, and weight elements."""

    scheme: str
    tp: int
    macs_per_token: float
    weight_elements: float
    collectives: list[Collective] = field(default_factory=list)

    def collective_elements_per_token(self) -> int:
        return sum(c.per_token for c in self.collectives)


@dataclass(frozen=True)
class Machine:
    """What one TP rank has: TensorE peak, HBM bandwidth, NeuronLink bandwidth, per-step latency."""

    name: str
    flops_per_s: float  # bf16 dense peak of one rank
    hbm_bytes_per_s: float
    link_bytes_per_s: float
    step_latency_s: float  # fixed cost of one ring step (an assumption, see docs/parallel.md)


# One rank = one logical NeuronCore at LNC=2 (two physical cores; four per device).  Device figures
# from the Trainium2 / Trainium3 architecture guides, divided by the four logical cores of a device.
TRN2 = Machine("trn2", 2 * 79e12, 2.9e12 / 4, 1.28e12 / 4, 2e-6)
TRN3 = Machine("trn3", 671e12 / 4, 4.9e12 / 4, 2.56e12 / 4, 2e-6)
MACHINES = {machine.name: machine for machine in (TRN2, TRN3)}


def _first_factors(shape: MLPShape, tp: int, scheme: str) -> tuple[float, float, list[Collective]]:
    """gate and up: (MACs per token, weight elements, collectives) per rank."""
    macs = weights = 0.0
    gathered = 0
    for rank in shape.first_ranks:
        if rank is None or scheme == "dense":  # dense column-parallel: W (H, I/t)
            macs += shape.hidden * shape.intermediate / tp
            weights += shape.hidden * shape.intermediate / tp
        elif scheme == "r_sharded":  # U (H, r/t), gathered (r), V (r, I/t)
            macs += shape.hidden * rank / tp + rank * shape.intermediate / tp
            weights += shape.hidden * rank / tp + rank * shape.intermediate / tp
            gathered += rank
        else:  # naive / replicated: U (H, r) on every rank, V (r, I/t)
            macs += shape.hidden * rank + rank * shape.intermediate / tp
            weights += shape.hidden * rank + rank * shape.intermediate / tp
    collectives = [Collective("all_gather", gathered, "x·[U_gate | U_up] over r")] if gathered else []
    return macs, weights, collectives


def _down(shape: MLPShape, tp: int, scheme: str) -> tuple[float, float, list[Collective]]:
    """down: (MACs per token, weight elements, collectives) per rank."""
    rank = shape.down_rank
    if rank is None or scheme == "dense":  # dense row-parallel: W (I/t, H), partial (H) all-reduced
        work = shape.intermediate * shape.hidden / tp
        return work, work, [Collective("all_reduce", shape.hidden, "partial output (H)")]
    work = shape.intermediate * rank / tp + rank * shape.hidden  # U (I/t, r), V (r, H) on every rank
    if scheme == "naive":
        return work, work, [Collective("all_reduce", shape.hidden, "partial output (H)")]
    return work, work, [Collective("all_reduce", rank, "partial h·U_down (r)")]


def scheme_cost(shape: MLPShape, tp: int, scheme: str) -> SchemeCost:
    """What one rank computes, holds and exchanges for one call of the MLP under ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; the schemes are {', '.join(SCHEMES)}")
    if tp < 1:
        raise ValueError(f"the TP degree must be at least 1, got {tp}")
    first_macs, first_weights, first_collectives = _first_factors(shape, tp, scheme)
    down_macs, down_weights, down_collectives = _down(shape, tp, scheme)
    collectives = first_collectives + down_collectives if tp > 1 else []
    return SchemeCost(scheme, tp, first_macs + down_macs, first_weights + down_weights, collectives)


@dataclass(frozen=True)
class StepTime:
    """Modelled seconds of one MLP call on one rank, by part."""

    compute_s: float
    weights_s: float
    collectives_s: float

    @property
    def total_s(self) -> float:
        """The matmuls are bound by TensorE or by reading the weights, whichever is slower; the
        collectives come on top (each one feeds the next matmul)."""
        return max(self.compute_s, self.weights_s) + self.collectives_s


def step_time(cost: SchemeCost, tokens: int, machine: Machine = TRN2, dtype_bytes: int = 2) -> StepTime:
    """Modelled time of one call on ``tokens`` tokens (ring collectives, no overlap)."""
    tp = cost.tp
    collectives = 0.0
    for collective in cost.collectives:
        steps = 2 * (tp - 1) if collective.kind == "all_reduce" else tp - 1
        payload = collective.per_token * tokens * dtype_bytes
        collectives += steps * machine.step_latency_s + steps / tp * payload / machine.link_bytes_per_s
    return StepTime(
        2 * cost.macs_per_token * tokens / machine.flops_per_s,
        cost.weight_elements * dtype_bytes / machine.hbm_bytes_per_s,
        collectives,
    )


@dataclass(frozen=True)
class Workload:
    """What a pick is judged on: one request of ``prompt_tokens`` prefilled, then ``new_tokens``
    decode steps of one token each."""

    prompt_tokens: int = 2048
    new_tokens: int = 256

    def time_s(self, cost: SchemeCost, machine: Machine = TRN2) -> float:
        prefill = step_time(cost, self.prompt_tokens, machine).total_s
        return prefill + self.new_tokens * step_time(cost, 1, machine).total_s


def choose_scheme(
    shape: MLPShape,
    tp: int,
    machine: Machine = TRN2,
    workload: Workload | None = None,
    schemes: tuple[str, ...] = IMPLEMENTED,
) -> str:
    """The scheme among ``schemes`` with the least modelled time for ``workload`` (default
    :class:`Workload`)."""
    workload = workload or Workload()
    return min(schemes, key=lambda scheme: workload.time_s(scheme_cost(shape, tp, scheme), machine))


def split_sizes(shape: MLPShape, scheme: str) -> dict[str, int]:
    """The dimensions ``scheme`` splits over the ranks, by name, and their whole sizes."""
    sizes = {"I (intermediate)": shape.intermediate}
    if scheme == "r_sharded":
        names = ("the gate rank", "the up rank") if shape.gated else ("the first rank",)
        sizes.update({name: rank for name, rank in zip(names, shape.first_ranks, strict=True) if rank})
    return sizes


def table(
    ratios: tuple[float, ...] = (0.2, 0.5),
    tps: tuple[int, ...] = (2, 4, 8),
    machine: Machine = TRN2,
    workload: Workload | None = None,
) -> list[dict]:
    """One row per (LLaMA shape, ratio, TP degree, scheme): the figures of docs/parallel.md, and
    whether :func:`choose_scheme` picks the scheme for that shape."""
    workload = workload or Workload()
    rows = []
    for name, (hidden, intermediate) in LLAMA_SHAPES.items():
        for ratio in ratios:
            shape = MLPShape.uniform(hidden, intermediate, ratio)
            for tp in tps:
                picked = choose_scheme(shape, tp, machine, workload)
                for scheme in SCHEMES:
                    scheme_figures = scheme_cost(shape, tp, scheme)
                    decode = step_time(scheme_figures, 1, machine)
                    prefill = step_time(scheme_figures, workload.prompt_tokens, machine)
                    rows.append(
                        {
                            "model": name,
                            "ratio": ratio,
                            "ranks": [shape.gate_rank, shape.up_rank, shape.down_rank],
                            "tp": tp,
                            "scheme": scheme,
                            "macs_per_token": scheme_figures.macs_per_token,
                            "weight_bytes": 2 * scheme_figures.weight_elements,
                            "collective_bytes_per_token": 2 * scheme_figures.collective_elements_per_token(),
                            "collectives": [c.kind for c in scheme_figures.collectives],
                            "decode_us": 1e6 * decode.total_s,
                            "decode_collectives_us": 1e6 * decode.collectives_s,
                            "prefill_ms": 1e3 * prefill.total_s,
                            "prefill_collectives_ms": 1e3 * prefill.collectives_s,
                            "request_ms": 1e3 * workload.time_s(scheme_figures, machine),
                            "picked": scheme == picked,
                        }
                    )
    return rows

"""What the pipeline did, as data: one family of report types for both routes.

:class:`OptimizeReport` is what ``optimize()`` did to a model (``to_dict``, ``to_json``, a readable
table as ``str``); :class:`GraphRecord` is what the compile backend did to one graph Dynamo handed
over.  Both are made of the same parts: a :class:`SiteReport` per rewritten site (with a
:class:`MatrixReport` per projection) and a :class:`SkippedSite` per site left alone, with why.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class MatrixReport:
    """One matrix of a rewritten site."""

    name: str  # module path of the weight (with [start:stop] for half of a fused gate_up weight)
    role: str  # gate / up / down, in / out, or lowrank
    in_features: int
    out_features: int
    rank: int | None  # None: left dense
    method: str  # svd / whiten (factored now), existing (a low-rank chain reused) or dense
    params_before: int
    params_after: int
    reason: str = ""  # why it stayed dense
    method_note: str = ""  # why this factorization method was used


def matrix_report(result, method_note: str = "") -> MatrixReport:
    """The report of one :class:`~neuronmm_fx.compress.factorize.CompressedProjection`."""
    return MatrixReport(
        result.name,
        result.role,
        result.in_features,
        result.out_features,
        result.rank,
        result.method,
        result.params_before,
        result.params_after,
        result.reason,
        method_note,
    )


@dataclass
class SiteReport:
    """One rewritten site."""

    path: str
    pattern: str  # gated_mlp / plain_mlp / lowrank
    activation: str | None
    installed: str  # optimize(): module / chain / per_matrix; compile: the op, e.g. neuronmm::svd_mlp
    replaced: list[str]  # optimize(): module paths swapped in the model; compile: the op's node
    matrices: list[MatrixReport]
    note: str = ""

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.matrices)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)

    def describe(self) -> str:
        """One line: pattern, where, what it became, and each matrix's method and rank."""
        parts = ", ".join(f"{m.role}: {m.method}" + (f" r={m.rank}" if m.rank else "") for m in self.matrices)
        return f"{self.pattern} at {self.path or '<root>'} -> {self.installed} ({parts})"


@dataclass
class SkippedSite:
    """A site that was found (or a candidate) but not rewritten, and why."""

    path: str
    pattern: str
    reason: str


@dataclass
class OptimizeReport:
    """Every rewritten and skipped site of one ``optimize()`` call."""

    ratio: float
    block: int
    method: str
    allocation: str = "uniform"
    calibration: str = ""
    sites: list[SiteReport] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    finetune: dict = field(default_factory=dict)  # steps and first/last distillation loss, if fine-tuned

    @property
    def params_removed(self) -> int:
        return sum(s.params_before - s.params_after for s in self.sites)

    def count(self, pattern: str | None = None) -> int:
        return sum(1 for s in self.sites if pattern is None or s.pattern == pattern)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["params_removed"] = self.params_removed
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [
            f"neuronmm_fx: {len(self.sites)} site(s) rewritten, {len(self.skipped)} skipped "
            f"(ratio {self.ratio}, block {self.block}, method {self.method}, allocation {self.allocation})",
        ]
        if self.calibration:
            lines.append(f"  factorization: {self.calibration}")
        header = (
            f"  {'site':<40} {'pattern':<10} {'act':<9} {'install':<10} {'matrix':<44} "
            f"{'K×N':>11} {'rank':>6} {'params':>19}"
        )
        if self.sites:
            lines += [header, "  " + "-" * (len(header) - 2)]
        for site in self.sites:
            for i, m in enumerate(site.matrices):
                first = i == 0
                rank = "dense" if m.rank is None else str(m.rank)
                shape = f"{m.in_features}×{m.out_features}"
                params = f"{m.params_before:>8} → {m.params_after:<8}"
                lines.append(
                    f"  {(site.path or '<root>') if first else '':<40} {site.pattern if first else '':<10} "
                    f"{(site.activation or '-') if first else '':<9} {site.installed if first else '':<10} "
                    f"{_tail(m.name, 44):<44} {shape:>11} {rank:>6} {params:>19}"
                )
                if m.method == "svd" and m.method_note.startswith("plain SVD: its input"):
                    lines.append(f"  {'':<40} {'':<10} {'':<9} {'':<10}   method: {m.method_note}")
                if m.reason:
                    lines.append(f"  {'':<40} {'':<10} {'':<9} {'':<10}   left dense: {m.reason}")
            if site.note:
                lines.append(f"  {'':<40} note: {site.note}")
        lines += _skipped_lines(self.skipped)
        if self.finetune:
            lines.append(
                f"  fine-tuned {self.finetune['steps']} steps: distillation KL "
                f"{self.finetune['first_loss']:.4f} → {self.finetune['last_loss']:.4f}"
            )
            held = self.finetune.get("held_out") or []
            if held:
                curve = ", ".join(f"{step}: {loss:.4f}" for step, loss in held)
                stopped = ", stopped early" if self.finetune.get("stopped_early") else ""
                lines.append(
                    f"    held-out KL by step {curve}; kept step {self.finetune.get('best_step')}{stopped}"
                )
        if self.timings:
            lines.append(
                "  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in self.timings.items())
            )
        before, after = self.model_params_before, self.model_params_after
        if before:
            lines.append(
                f"  parameters: {before:,} → {after:,} ({self.params_removed:,} removed, "
                f"{100.0 * self.params_removed / before:.1f}% of the model)"
            )
        return "\n".join(lines)


@dataclass
class SurveyedMatrix:
    """One matrix of a site found in a dense model."""

    name: str
    role: str
    in_features: int
    out_features: int
    params: int
    rank: int | None  # an existing low-rank chain's rank; None: a dense matrix
    break_even_rank: int  # the largest rank whose factors hold fewer parameters than the matrix


@dataclass
class SurveyedSite:
    path: str
    pattern: str
    activation: str | None
    matrices: list[SurveyedMatrix]

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matrices)


@dataclass
class Survey:
    """The sites ``optimize()`` would rewrite in a model it has not touched (:func:`neuronmm_fx.survey`)."""

    model_class: str
    model_params: int
    sites: list[SurveyedSite] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)

    @property
    def site_params(self) -> int:
        return sum(site.params for site in self.sites)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["site_params"] = self.site_params
        return data

    def __str__(self) -> str:
        lines = [
            f"neuronmm_fx survey of {self.model_class}: {len(self.sites)} site(s) to compress, "
            f"{len(self.skipped)} skipped; not compressed"
        ]
        header = (
            f"  {'site':<40} {'pattern':<10} {'act':<9} {'matrix':<44} {'K×N':>11} {'rank':>6} "
            f"{'break-even':>10} {'params':>10}"
        )
        if self.sites:
            lines += [header, "  " + "-" * (len(header) - 2)]
        for site in self.sites:
            for index, m in enumerate(site.matrices):
                first = index == 0
                lines.append(
                    f"  {(site.path or '<root>') if first else '':<40} {site.pattern if first else '':<10} "
                    f"{(site.activation or '-') if first else '':<9} {_tail(m.name, 44):<44} "
                    f"{f'{m.in_features}×{m.out_features}':>11} {'full' if m.rank is None else m.rank:>6} "
                    f"{m.break_even_rank:>10} {m.params:>10}"
                )
        lines += _skipped_lines(self.skipped)
        if self.model_params:
            lines.append(
                f"  parameters at the sites: {self.site_params:,} of {self.model_params:,} "
                f"({100.0 * self.site_params / self.model_params:.1f}% of the model)"
            )
        return "\n".join(lines)


def _skipped_lines(skipped: list[SkippedSite]) -> list[str]:
    """The ``skipped:`` block of a report table (nothing when no site was skipped)."""
    if not skipped:
        return []
    return ["  skipped:"] + [f"    {s.path or '<root>'} ({s.pattern}): {s.reason}" for s in skipped]


def _tail(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


@dataclass
class GraphRecord:
    """What the compile backend found and did in one graph Dynamo compiled."""

    index: int
    compile_id: str
    compiler: str
    sites: list[SiteReport] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    existing: Counter = field(default_factory=Counter)  # neuronmm ops already in the graph
    dense_linears: list[str] = field(default_factory=list)  # linear layers left as they were
    op_counts: Counter = field(default_factory=Counter)  # neuronmm ops in the graph after the rewrite
    form: str = "opaque"  # how they were handed downstream: "opaque" (whole ops) or "decomposed" (ATen)
    form_reason: str = ""
    joint_first: int = 0  # decomposed gated MLPs reading x against [U_gate | U_up] in one GEMM
    gemm_panels: int = 1  # column panels asked of each decomposed product by a factor
    paneled: int = 0  # decomposed products written as one batched GEMM over those panels
    whole: Counter = field(default_factory=Counter)  # reason -> decomposed products left one mm
    frozen_inputs: int = 0  # factors computed at compile time and passed as extra inputs (ratio=)
    factorization: str = ""  # how dense matrices were factored (said once per graph)
    before: str = ""
    after: str = ""  # the graph after the rewrite, neuronmm ops whole
    handed: str = ""  # the graph handed downstream (``after``, or with the ops written out as ATen)

    def count(self, op: str) -> int:
        """``neuronmm`` ops of kind ``op`` ("xuv", "svd_mlp" or the qualified name) after the rewrite."""
        return self.op_counts[op if "::" in op else f"neuronmm::{op}"]

    def summary(self) -> str:
        head = f"graph {self.index:03d} [{self.compile_id}] -> {self.compiler}: "
        ops_after = ", ".join(f"{n} x{c}" for n, c in sorted(self.op_counts.items())) or "no neuronmm op"
        lines = [head + ops_after]
        if self.op_counts:
            lines.append(f"  handed on {self.form}: {self.form_reason}")
        if self.joint_first:
            lines.append(f"  {self.joint_first} gated MLP(s): gate and up first factors in one GEMM")
        if self.paneled or self.whole:
            total = self.paneled + sum(self.whole.values())
            lines.append(
                f"  {self.paneled} of {total} product(s) by a factor on {self.gemm_panels} column "
                "panels, one GEMM per thread"
            )
            lines += [f"    {count} one mm: {reason}" for reason, count in sorted(self.whole.items())]
        if self.existing:
            found = ", ".join(f"{n} x{c}" for n, c in sorted(self.existing.items()))
            lines.append(f"  already in the graph: {found}")
        lines += [f"  rewrote {site.describe()}" for site in self.sites]
        lines += [f"  left alone: {s.pattern} at {s.path or '<root>'}: {s.reason}" for s in self.skipped]
        if self.frozen_inputs:
            lines.append(f"  {self.frozen_inputs} factor tensor(s) computed at compile time (freezing)")
        if self.factorization:
            lines.append(f"  factorization: {self.factorization}")
        if self.dense_linears:
            lines.append(f"  {len(self.dense_linears)} other linear layer(s) unchanged")
        return "\n".join(lines)

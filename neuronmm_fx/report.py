"""What ``optimize()`` did, as data (``to_dict``) and as a readable table (``str``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class MatrixReport:
    """One matrix of a rewritten site."""

    name: str  # module path of the weight (with [start:stop] for half of a fused gate_up weight)
    role: str  # gate / up / down, in / out, or lowrank
    in_features: int
    out_features: int
    rank: int | None  # None: left dense
    method: str  # svd / existing / dense
    params_before: int
    params_after: int
    reason: str = ""  # why it stayed dense
    method_note: str = ""  # why this factorization method was used


@dataclass
class SiteReport:
    """One rewritten site."""

    path: str
    pattern: str  # gated_mlp / plain_mlp / lowrank
    activation: str | None
    installed: str  # module / chain / per_matrix
    replaced: list[str]  # module paths swapped in the model
    matrices: list[MatrixReport]
    note: str = ""

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.matrices)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)


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
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {s.path or '<root>'} ({s.pattern}): {s.reason}" for s in self.skipped]
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


def _tail(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]

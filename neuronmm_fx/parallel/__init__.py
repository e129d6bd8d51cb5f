"""Tensor parallelism for compressed models: shard each compressed MLP over a process group.

>>> torch.distributed.init_process_group("gloo")          # torchrun --nproc-per-node 4 ...
>>> model = neuronmm_fx.optimize(model, ratio=0.2)        # the same on every rank
>>> neuronmm_fx.parallel.shard(model)                     # scheme="auto": the cost model picks per site
>>> print(neuronmm_fx.parallel.parallel_report(model))

:func:`shard` replaces every :class:`~neuronmm_fx.modules.CompressedMLP` with this rank's
:class:`~neuronmm_fx.parallel.modules.ShardedMLP` under one of the schemes of
:mod:`~neuronmm_fx.parallel.cost`; inputs and outputs of each MLP stay replicated, so the rest of the
model (attention, embeddings, a :class:`~neuronmm_fx.modules.LowRankLinear` of a low-rank chain) is
left as it is: replicated, or sharded by the user's own tensor-parallel plan.  The report lists each
site's scheme and collectives, and every part left unsharded with why.

Every check runs before the first module is replaced: a refused call leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from neuronmm_fx.api import REPORT_ATTRIBUTE as OPTIMIZE_REPORT
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.modules import CompressedMLP, LowRankLinear
from neuronmm_fx.parallel.cost import (
    IMPLEMENTED,
    MACHINES,
    Collective,
    MLPShape,
    Workload,
    choose_scheme,
    scheme_cost,
    split_sizes,
)
from neuronmm_fx.parallel.modules import ShardedMLP

REPORT_ATTRIBUTE = "neuronmm_parallel_report"

__all__ = ["ParallelReport", "ShardedMLP", "ShardedSite", "parallel_report", "shard"]


@dataclass
class ShardedSite:
    path: str
    scheme: str
    shape: MLPShape
    collectives: list[Collective]
    weight_elements_per_rank: int
    weight_elements_whole: int
    note: str = ""  # why ``auto`` did not take the scheme it models fastest


@dataclass
class ParallelReport:
    """What :func:`shard` did on this rank."""

    tp: int
    rank: int
    sites: list[ShardedSite] = field(default_factory=list)
    unsharded: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __str__(self) -> str:
        lines = [
            f"neuronmm_fx.parallel: {len(self.sites)} MLP(s) sharded over {self.tp} ranks "
            f"(this is rank {self.rank})"
        ]
        for site in self.sites:
            exchanged = ", ".join(f"{c.kind} of {c.per_token}/token ({c.purpose})" for c in site.collectives)
            share = site.weight_elements_per_rank / site.weight_elements_whole
            lines.append(
                f"  {site.path or '<root>'}: {site.scheme}; {exchanged}; weights per rank "
                f"{site.weight_elements_per_rank:,} ({share:.0%} of the site)"
            )
            if site.note:
                lines.append(f"    note: {site.note}")
        lines += [f"  left replicated: {path}: {why}" for path, why in self.unsharded]
        return "\n".join(lines)


def parallel_report(model: nn.Module) -> ParallelReport:
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None:
        raise ConfigError("this model was not sharded by neuronmm_fx.parallel.shard")
    return report


def _kernel_block(model: nn.Module, block: int | None) -> int:
    """The kernels' block size: ``block``, or the one the model was optimized with."""
    if block is not None:
        return block
    report = getattr(model, OPTIMIZE_REPORT, None)
    if report is None:
        raise ConfigError("the model carries no neuronmm_fx report to read its block from: pass block=")
    return report.block


def _misfit(shape: MLPShape, scheme: str, tp: int, block: int) -> tuple[str, int] | None:
    """The first dimension ``scheme`` cannot split over ``tp`` ranks in whole ``block``-blocks, as
    ``(name, size)``, or None."""
    for what, size in split_sizes(shape, scheme).items():
        if size % (tp * block):
            return what, size
    return None


def _split_problem(misfit: tuple[str, int], tp: int, block: int) -> str:
    what, size = misfit
    return f"{what} = {size} does not split into {tp} shards of whole {block}-blocks ({size / tp:g} per rank)"


def _refusal(path: str, misfit: tuple[str, int], scheme: str, tp: int, block: int) -> ConfigError:
    advice = ", or the 'replicated' scheme (it splits only I)" if scheme == "r_sharded" else ""
    return ConfigError(
        f"{path or '<root>'}: {_split_problem(misfit, tp, block)} under the {scheme!r} scheme; choose a TP "
        f"degree for which {misfit[1]} / TP is a multiple of {block}{advice}"
    )


def _pick(path: str, shape: MLPShape, tp: int, block: int, scheme: str, machine, workload) -> tuple[str, str]:
    """The site's scheme, and a note when ``auto`` ruled out the one it models fastest."""
    if scheme != "auto":
        misfit = _misfit(shape, scheme, tp, block)
        if misfit:
            raise _refusal(path, misfit, scheme, tp, block)
        return scheme, ""
    fitting = tuple(s for s in IMPLEMENTED if _misfit(shape, s, tp, block) is None)
    if not fitting:
        raise _refusal(path, _misfit(shape, IMPLEMENTED[0], tp, block), IMPLEMENTED[0], tp, block)
    fastest = choose_scheme(shape, tp, machine, workload)
    chosen = choose_scheme(shape, tp, machine, workload, schemes=fitting)
    if chosen == fastest:
        return chosen, ""
    return (
        chosen,
        f"{fastest} is modelled faster, but {_split_problem(_misfit(shape, fastest, tp, block), tp, block)}",
    )


def shard(
    model: nn.Module,
    group=None,
    *,
    scheme: str = "auto",
    machine: str = "trn2",
    workload: Workload | None = None,
    block: int | None = None,
) -> nn.Module:
    """Shard every compressed MLP of ``model`` over ``group`` (default: the whole world) in place.

    ``scheme`` is ``"replicated"``, ``"r_sharded"`` or ``"auto"``: per site, among the schemes whose
    splits are whole blocks, the one with the least modelled time for ``workload`` on ``machine``
    (default :class:`~neuronmm_fx.parallel.cost.Workload`: a 2,048-token prompt, 256 new tokens).
    Every split dimension must be a whole number of ``block``-blocks per rank (the kernels' tile;
    read from the model's report when not given); otherwise nothing is changed and the error names
    the site and the size.  Every rank must call this on the same model.
    """
    if scheme != "auto" and scheme not in IMPLEMENTED:
        raise ConfigError(f"unknown scheme {scheme!r}; choose 'auto' or one of {', '.join(IMPLEMENTED)}")
    if machine not in MACHINES:
        raise ConfigError(f"unknown machine {machine!r}; the cost model knows {', '.join(MACHINES)}")
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("shard() needs an initialised torch.distributed process group (init_process_group)")
    group = group if group is not None else dist.group.WORLD
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    block = _kernel_block(model, block)
    sites = [(path, module) for path, module in model.named_modules() if isinstance(module, CompressedMLP)]
    if not sites:
        raise ConfigError(
            f"{type(model).__name__} has no compressed MLP to shard: run neuronmm_fx.optimize first"
        )
    plan = []
    for path, mlp in sites:  # every check before the first change
        shape = MLPShape.of(mlp)
        chosen, note = _pick(path, shape, tp, block, scheme, MACHINES[machine], workload or Workload())
        plan.append((path, mlp, shape, chosen, note))
    report = ParallelReport(tp, rank)
    report.unsharded = [
        (path, "a low-rank chain outside a compressed MLP: its input and output layout is the user's")
        for path, module in model.named_modules()
        if isinstance(module, LowRankLinear)
    ]
    for path, mlp, shape, chosen, note in plan:
        sharded = ShardedMLP(mlp, chosen, group, rank, tp)
        collectives = scheme_cost(shape, tp, chosen).collectives
        local, whole = (sum(p.numel() for p in m.parameters()) for m in (sharded, mlp))
        report.sites.append(ShardedSite(path, chosen, shape, collectives, local, whole, note))
        if not path:  # the model is one MLP: its sharded form is what the caller keeps
            model = sharded
            break
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, sharded)
    setattr(model, REPORT_ATTRIBUTE, report)
    return model

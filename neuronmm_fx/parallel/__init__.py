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
        lines += [f"  left replicated: {path}: {why}" for path, why in self.unsharded]
        return "\n".join(lines)


def parallel_report(model: nn.Module) -> ParallelReport:
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None:
        raise ConfigError("this model was not sharded by neuronmm_fx.parallel.shard")
    return report


def _block_of(model: nn.Module, block: int | None) -> int:
    if block is not None:
        return block
    report = getattr(model, OPTIMIZE_REPORT, None)
    if report is None:
        raise ConfigError("the model carries no neuronmm_fx report to read its block from: pass block=")
    return report.block


def _check_split(path: str, what: str, size: int, tp: int, block: int, scheme: str) -> None:
    if size % (tp * block):
        raise ConfigError(
            f"{path}: {what} = {size} does not split into {tp} shards of whole {block}-blocks "
            f"({size / tp:g} per rank) under the {scheme!r} scheme; choose a TP degree for which "
            f"{size} / TP is a multiple of {block}"
            + (", or the 'replicated' scheme (it splits only I)" if scheme == "r_sharded" else "")
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

    ``scheme`` is ``"replicated"``, ``"r_sharded"`` or ``"auto"`` (per site, the scheme with the least
    modelled time for ``workload`` (default: :class:`~neuronmm_fx.parallel.cost.Workload`, a
    2,048-token prompt and 256 new tokens) on ``machine``).  Every split dimension must be a whole number of
    ``block``-blocks per rank (the kernels' tile; read from the model's report when not given);
    otherwise nothing is changed and the error names the site and the size.  Every rank must call
    this on the same model.
    """
    if scheme != "auto" and scheme not in IMPLEMENTED:
        raise ConfigError(f"unknown scheme {scheme!r}; choose 'auto' or one of {', '.join(IMPLEMENTED)}")
    if machine not in MACHINES:
        raise ConfigError(f"unknown machine {machine!r}; the cost model knows {', '.join(MACHINES)}")
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("shard() needs an initialised torch.distributed process group (init_process_group)")
    group = group if group is not None else dist.group.WORLD
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    block = _block_of(model, block)
    sites = [(path, module) for path, module in model.named_modules() if isinstance(module, CompressedMLP)]
    if not sites:
        raise ConfigError(
            f"{type(model).__name__} has no compressed MLP to shard: run neuronmm_fx.optimize first"
        )
    report = ParallelReport(tp, rank)
    plan = []
    for path, mlp in sites:  # every check before the first change
        shape = MLPShape.of(mlp)
        chosen = (
            choose_scheme(shape, tp, MACHINES[machine], workload or Workload())
            if scheme == "auto"
            else scheme
        )
        for what, size in split_sizes(shape, chosen).items():
            _check_split(path or "<root>", what, size, tp, block, chosen)
        cost = scheme_cost(shape, tp, chosen)
        whole = sum(p.numel() for p in mlp.parameters())
        plan.append((path, mlp, chosen, cost, shape, whole))
    for path, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            report.unsharded.append(
                (path, "a low-rank chain outside a compressed MLP: its input and output layout is the user's")
            )
    for path, mlp, chosen, cost, shape, whole in plan:
        sharded = ShardedMLP(mlp, chosen, group, rank, tp)
        local = sum(p.numel() for p in sharded.parameters())
        report.sites.append(ShardedSite(path, chosen, shape, cost.collectives, local, whole))
        if not path:  # the model is one MLP: its sharded form is what the caller keeps
            model = sharded
            break
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, sharded)
    setattr(model, REPORT_ATTRIBUTE, report)
    return model

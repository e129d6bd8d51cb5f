"""Install: put fused sites into the live module tree, after proving each one on real inputs.

A site was found in the exported graph; its nodes ran inside modules of the user's model.  Three ways
to install it, tried in this order:

``module``      the innermost module containing the whole site computes nothing but the site
                (``LlamaMLP``, ``GPT2MLP``, a user's MLP module): that module is replaced.
``chain``       a plain MLP or low-rank chain whose every step is its own module (OPT's ``fc1``,
                ``activation_fn``, ``fc2``; BERT's ``intermediate.dense`` → ``output.dense``): the first
                step becomes the fused module and the later steps become ``nn.Identity``.
``per_matrix``  anything else (a gated product written inline in a bigger module): every compressed
                ``nn.Linear``/``Conv1D`` becomes a :class:`LowRankLinear` on its own (``neuronmm::xuv``);
                the MLP is then compressed but not fused, and the report says so.

Before anything is installed, the model runs once on the example inputs with hooks on the modules
concerned.  A ``module``/``chain`` install needs each module it touches to be called exactly once,
with one positional tensor, and the site's uncompressed twin must reproduce the recorded output from
the recorded input; otherwise the site falls back to ``per_matrix`` with the reason.

Guarantees: :func:`commit` either installs every replacement or, on any error, restores the model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from neuronmm_fx.compress.factorize import CompressedProjection
from neuronmm_fx.modules import CompressedMLP, LowRankLinear
from neuronmm_fx.passes.canonicalize_linears import is_linear_module
from neuronmm_fx.passes.ir import module_paths
from neuronmm_fx.passes.match import Site
from neuronmm_fx.patterns import pattern_of

MODULE, CHAIN, PER_MATRIX = "module", "chain", "per_matrix"


@dataclass
class FusedSite:
    """A compressed site with the module that computes it and its uncompressed twin (the same
    module fed with the original weights, which must reproduce the site exactly)."""

    site: Site
    compressed: dict[str, CompressedProjection]
    module: nn.Module
    twin: nn.Module

    @classmethod
    def build(cls, site: Site, compressed: dict[str, CompressedProjection]) -> FusedSite:
        pattern = pattern_of(site.pattern)
        module = pattern.build(site.activation, {role: c.factors for role, c in compressed.items()})
        if isinstance(module, CompressedMLP) and module.shares_first:
            # the module copied the gate and up first factors into its joint parameter: the results
            # now read that copy, so that the factors are held once
            for role in ("gate", "up"):
                compressed[role].factors.u = module.factors(role).u.detach()
        return cls(site, compressed, module, pattern.uncompressed(site))


@dataclass
class Installation:
    """Where and how one fused site goes into the model."""

    fused: FusedSite
    kind: str
    target: str  # module replaced by the fused module ("module"/"chain")
    identities: list[str] = field(default_factory=list)  # later chain steps, replaced by nn.Identity
    per_matrix: dict[str, nn.Module] = field(default_factory=dict)  # path -> replacement ("per_matrix")
    note: str = ""

    def replacements(self) -> dict[str, nn.Module]:
        if self.kind == PER_MATRIX:
            return dict(self.per_matrix)
        plan = {self.target: self.fused.module}
        plan.update({path: nn.Identity() for path in self.identities})
        return plan


def attributed_nodes(graph: fx.Graph) -> dict[str, set[fx.Node]]:
    """Module path -> the computing nodes that ran inside it (at any depth)."""
    table: dict[str, set[fx.Node]] = defaultdict(set)
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or not node.users:
            continue
        table[""].add(node)
        for path in module_paths(node):
            if path:
                table[path].add(node)
    return table


def _chain_units(site: Site, attributed: dict[str, set[fx.Node]]) -> list[str] | None:
    """The modules that each run one step of a sequential site, in order, or None."""
    if not pattern_of(site.pattern).sequential:
        return None
    order = {n: i for i, n in enumerate(site.output.graph.nodes)}
    units: list[str] = []
    for node in sorted(site.nodes, key=order.__getitem__):
        paths = module_paths(node)
        unit = paths[-1] if paths else ""
        if not unit or unit == site.path:
            return None
        if unit not in units:
            units.append(unit)
    members = set(site.nodes)
    if len(units) < 2 or any(not attributed[u] <= members for u in units):
        return None
    if any(a != b and b.startswith(a + ".") for a in units for b in units):
        return None
    return units


def _per_matrix_plan(fused: FusedSite, model: nn.Module, attributed) -> dict[str, nn.Module]:
    plan: dict[str, nn.Module] = {}
    for role, projection in fused.site.projections.items():
        result = fused.compressed[role]
        if result.method == "dense" or projection.out_slice is not None:
            continue
        infos = [projection.first, projection.second] if projection.is_lowrank else [projection.dense]
        paths = [info.module_path for info in infos]
        if not all(
            _is_plain_linear(model, path, info, attributed, projection)
            for path, info in zip(paths, infos, strict=True)
        ):
            continue
        plan[paths[0]] = LowRankLinear(result.factors)
        plan.update({path: nn.Identity() for path in paths[1:]})
    return plan


def _is_plain_linear(model, path, info, attributed, projection) -> bool:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return (
        is_linear_module(module)
        and info.weight.path == f"{path}.weight"
        and attributed[path] <= set(projection.nodes)
    )


def plan_installation(
    fused: FusedSite, model: nn.Module, attributed: dict[str, set[fx.Node]]
) -> Installation:
    site = fused.site
    if attributed[site.path] == set(site.nodes):
        return Installation(fused, MODULE, site.path)
    units = _chain_units(site, attributed)
    if units is not None:
        return Installation(fused, CHAIN, units[0], identities=units[1:])
    return _fallback(fused, model, attributed, f"{site.path or 'the model'} computes more than the site")


def _fallback(fused: FusedSite, model: nn.Module, attributed, why: str) -> Installation:
    plan = _per_matrix_plan(fused, model, attributed)
    return Installation(fused, PER_MATRIX, "", per_matrix=plan, note=f"not fused: {why}")


# --- proving installations on real inputs ----------------------------------------------------------


@dataclass
class _Calls:
    count: int = 0
    positional_only: bool = True
    first_input: torch.Tensor | None = None
    last_output: torch.Tensor | None = None


def _record(
    model: nn.Module, paths: set[str], example_args: tuple, example_kwargs: dict
) -> dict[str, _Calls]:
    calls = {path: _Calls() for path in paths}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def pre_hook(module, args, kwargs, record=calls[path]):
            record.count += 1
            record.positional_only &= len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            if record.first_input is None and args and isinstance(args[0], torch.Tensor):
                record.first_input = args[0].detach().clone()

        def hook(module, args, output, record=calls[path]):
            if isinstance(output, torch.Tensor):
                record.last_output = output.detach().clone()

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*example_args, **example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def _why_not(installation: Installation, calls: dict[str, _Calls]) -> str | None:
    """Why a module/chain installation is unsafe, or None if the recorded run proves it."""
    steps = [installation.target, *installation.identities]
    for path in steps:
        record = calls[path]
        if record.count != 1:
            return f"module {path!r} runs {record.count} times per forward"
        if not record.positional_only:
            return f"module {path!r} is called with more than one positional tensor"
    x = calls[installation.target].first_input
    expected = calls[steps[-1]].last_output
    if x is None or expected is None:
        return "the site's input or output was not seen when the model ran"
    with torch.no_grad():
        produced = installation.fused.twin(x)
    if produced.shape != expected.shape:
        return f"the fused form gives shape {tuple(produced.shape)}, the model {tuple(expected.shape)}"
    error = (produced.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-12
    if not error <= _tolerance(expected.dtype) * scale:
        return f"the fused form differs from the model by {error:.3g} (relative {error / scale:.3g})"
    return None


def verify(installations: list[Installation], model: nn.Module, example_args, example_kwargs, attributed):
    """Check module/chain installations on a real run; unsafe ones fall back to per-matrix."""
    paths = {p for inst in installations if inst.kind != PER_MATRIX for p in (inst.target, *inst.identities)}
    if not paths:
        return installations
    calls = _record(model, paths, example_args, example_kwargs)
    checked = []
    for installation in installations:
        reason = _why_not(installation, calls) if installation.kind != PER_MATRIX else None
        checked.append(
            installation if reason is None else _fallback(installation.fused, model, attributed, reason)
        )
    return checked


# --- committing --------------------------------------------------------------------------------------


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``model``; return the module that was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _has_hooks(module: nn.Module) -> bool:
    """Whether the user registered a forward hook or pre-hook on ``module`` (the other dictionaries
    only hold flags about those)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _carry_over(old: nn.Module, new: nn.Module) -> list[str]:
    """Give ``new`` what the user set on ``old``: mode, frozen parameters, forward hooks; say what
    could not be carried (hooks on modules inside ``old``, or on a step that became an identity)."""
    notes = []
    new.train(old.training)
    if not any(p.requires_grad for p in old.parameters()):
        for parameter in new.parameters():
            parameter.requires_grad_(False)
    if isinstance(new, nn.Identity):
        if _has_hooks(old):
            notes.append("forward hooks on a fused-away step were dropped")
        return notes
    for name in _HOOK_DICTS:
        getattr(new, name).update(getattr(old, name))
    inner = [path for path, module in old.named_modules() if path and _has_hooks(module)]
    if inner:
        notes.append(f"forward hooks inside the replaced module were dropped ({', '.join(inner)})")
    return notes


def commit(model: nn.Module, installations: list[Installation]) -> tuple[nn.Module, Callable[[], None]]:
    """Install every replacement; on failure restore the model and re-raise.

    Each replacement takes over the replaced module's training mode, frozen parameters and forward
    hooks (what cannot be carried is added to the installation's note).  Returns the new root and a
    function that undoes the whole install (for a later step that fails).
    """
    replacements: dict[str, nn.Module] = {}
    owner: dict[str, Installation] = {}
    for installation in installations:
        planned = installation.replacements()  # builds the Identity modules: once
        replacements.update(planned)
        owner.update(dict.fromkeys(planned, installation))
    for path, module in replacements.items():
        notes = _carry_over(model.get_submodule(path), module)
        if notes:
            installation = owner[path]
            installation.note = "; ".join(filter(None, [installation.note, *notes]))
    if "" in replacements:  # the whole model is one site: the fused module becomes the model
        if len(replacements) != 1:
            raise RuntimeError("neuronmm_fx: a root replacement cannot be combined with other rewrites")
        return replacements[""], lambda: None
    undo: list[tuple[str, nn.Module]] = []

    def restore() -> None:
        for path, old in reversed(undo):
            set_submodule(model, path, old)

    try:
        for path in sorted(replacements, key=lambda p: p.count("."), reverse=True):
            undo.append((path, set_submodule(model, path, replacements[path])))
    except BaseException:
        restore()
        raise
    return model, restore

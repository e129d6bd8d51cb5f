"""``optimize()``: the eager route through the pass pipeline.

capture (:mod:`~neuronmm_fx.frontends.export`) → canonicalize → match → plan and compress
(:mod:`~neuronmm_fx.compress`) → fuse → install (:mod:`~neuronmm_fx.install`: module swap, proven on
a real run) → dump.  The compile backend runs the same passes from canonicalize to fuse; only the
capture and the installation differ.  Nothing in the user's model changes until every site has been
compressed, fused and checked; the install itself is transactional.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx.compress.calibration import can_generate, vocabulary_size
from neuronmm_fx.compress.calibration import prepare as prepare_calibration
from neuronmm_fx.compress.factorize import all_dense, compress_site
from neuronmm_fx.compress.finetune import FinetuneConfig
from neuronmm_fx.compress.finetune import finetune as run_finetune
from neuronmm_fx.compress.strategy import plan
from neuronmm_fx.config import OptimizeConfig
from neuronmm_fx.debug import dump
from neuronmm_fx.errors import ConfigError, NothingToCompressError, UnsupportedModelError
from neuronmm_fx.frontends.export import capture, default_example_inputs, linear_modules
from neuronmm_fx.install import (
    PER_MATRIX,
    FusedSite,
    Installation,
    attributed_nodes,
    commit,
    plan_installation,
    verify,
)
from neuronmm_fx.ops import SUPPORTED_DTYPES
from neuronmm_fx.passes.canonicalize import Canonicalize
from neuronmm_fx.passes.fuse import Fuse
from neuronmm_fx.passes.match import Match, Site
from neuronmm_fx.report import (
    MatrixReport,
    OptimizeReport,
    SiteReport,
    SkippedSite,
    Survey,
    SurveyedMatrix,
    SurveyedSite,
    matrix_report,
)

log = logging.getLogger("neuronmm_fx")

REPORT_ATTRIBUTE = "neuronmm_report"


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _module_places(model: nn.Module) -> dict[int, list[str]]:
    """Every path under which each module (by ``id``) is reachable."""
    places: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(path)
    return places


def check_model(model: nn.Module) -> None:
    """Refuse models ``optimize`` cannot work on, naming the first offending layer."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    linears = linear_modules(model)
    if not linears:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layers: there is nothing to compress"
        )
    places = _module_places(model)
    for module in model.modules():
        if len(places[id(module)]) > 1 and linear_modules(module):
            raise UnsupportedModelError(
                f"{' and '.join(places[id(module)])} are one module (shared): compressing it for one place "
                "would change the others; untie the copies (copy.deepcopy) to compress them"
            )
    for path, module in linears:
        if module.weight.is_meta:
            raise UnsupportedModelError(
                f"{path}.weight is on the meta device and has no values to compress; load the weights first"
            )
        dtype = module.weight.dtype
        if not dtype.is_floating_point:
            raise UnsupportedModelError(
                f"{path}.weight has dtype {dtype}: neuronmm_fx factors floating-point weights only; an "
                "integer-quantized model cannot be factored (compress first, quantize afterwards)"
            )
        if dtype not in SUPPORTED_DTYPES:
            raise UnsupportedModelError(
                f"{path}.weight has unsupported dtype {dtype}: use float32, bfloat16 or float16"
            )
        if not bool(torch.isfinite(module.weight).all()):
            raise UnsupportedModelError(f"{path}.weight holds NaN or infinite values: no SVD of it exists")


def _selected(path: str, config: OptimizeConfig) -> str | None:
    """None if the site may be rewritten, else why not."""
    shown = path or "<root>"
    if config.include and not any(fnmatch.fnmatchcase(shown, p) for p in config.include):
        return f"not matched by include={list(config.include)}"
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(shown, pattern):
            return f"excluded by pattern {pattern!r}"
    return None


_NOT_REPLACEABLE = "not fused, and its weight is not a whole nn.Linear/Conv1D that could be replaced alone"


def _matrix_reports(installation: Installation, method_reasons: dict[str, str]) -> list[MatrixReport]:
    fused = installation.fused
    reports = []
    for role, result in fused.compressed.items():
        report = matrix_report(result, method_reasons.get(role, ""))
        projection = fused.site.projections[role]
        module = (projection.first or projection.dense).module_path
        if (
            installation.kind == PER_MATRIX
            and report.method != "dense"
            and module not in installation.per_matrix
        ):
            report = dataclasses.replace(
                report,
                rank=None,
                method="dense",
                params_after=result.params_before,
                reason=_NOT_REPLACEABLE,
            )
        reports.append(report)
    return reports


def _site_report(installation: Installation, method_reasons: dict[str, str]) -> SiteReport:
    site = installation.fused.site
    return SiteReport(
        site.path,
        site.pattern,
        site.activation,
        installation.kind,
        sorted(installation.replacements()),
        _matrix_reports(installation, method_reasons),
        installation.note,
    )


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizeConfig))


def optimize(
    model: nn.Module,
    ratio: float | OptimizeConfig | None = None,
    *,
    calibration=None,
    tokenizer=None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    finetune: FinetuneConfig | None = None,
    **options,
) -> nn.Module:
    """Compress and fuse every MLP and low-rank chain of ``model``; return the model to keep using.

    ``ratio`` is the share of the MLP parameters removed (default 0.2), or a whole
    :class:`~neuronmm_fx.config.OptimizeConfig`; keyword ``options`` are its fields (``block``,
    ``method``, ``allocation``, ``dump_dir``, ...) and override it: ``optimize(model, 0.2)``,
    ``optimize(model, ratio=0.1, block=64)`` and ``optimize(model, config, progress=True)`` all work.
    ``calibration`` takes token tensors, a DataLoader, texts (with ``tokenizer``) or a
    :class:`~neuronmm_fx.compress.calibration.Calibration`; left out, a causal LM writes its own.

    The model is changed in place (and returned); its class, ``forward`` and ``generate`` stay.  If
    the whole model is one site (a bare MLP module), the fused module itself is returned instead.
    The report is attached as ``model.neuronmm_report`` (see :func:`report_of`).  On any error the
    model is left exactly as it was.
    """
    config = _config(ratio, options)
    check_model(model)
    if finetune is not None and not can_generate(model):
        raise ConfigError(
            "finetune= distils a causal language model's next-token distribution; this model has none"
        )
    example_args, example_kwargs = _example_inputs(model, example_inputs, example_kwargs)
    report = OptimizeReport(
        config.ratio,
        config.block,
        config.method,
        allocation=config.allocation,
        model_params_before=count_parameters(model),
    )
    graph_module, raw, sites = _capture_and_match(model, example_args, example_kwargs, config, report)
    chosen = _select(sites, config, report)
    # fine-tuning writes the dense weights it trains: they must not share the replaced layers' storage,
    # which an undo after fine-tuning puts back
    strategy, fused_sites, method_reasons = _compress_and_fuse(
        model, chosen, config, calibration, tokenizer, report, copy_dense=finetune is not None
    )
    installations = _plan_installations(
        model, graph_module, fused_sites, config, example_args, example_kwargs, report
    )
    canonical = dump.snapshot(graph_module.graph) if config.dump_dir else None
    Fuse([(inst.fused.site, inst.fused.compressed) for inst in installations])(graph_module)

    teacher, tuning_data = None, None
    if finetune is not None:  # everything fine-tuning needs is ready before the model changes
        tuning_data = strategy.calibration or _finetune_data(model, calibration, tokenizer, config)
        teacher = copy.deepcopy(model)
    result, undo = commit(model, installations)
    try:  # whatever fails after the commit (fine-tuning, a dump folder) puts the model back
        if finetune is not None:
            report.finetune = _finetune(result, teacher, tuning_data, finetune, report)
            del teacher
        report.sites = [_site_report(inst, method_reasons[id(inst.fused.site)]) for inst in installations]
        report.model_params_after = count_parameters(result)
        if config.dump_dir:
            dump.write_optimize(config.dump_dir, raw, canonical, graph_module, installations, report)
    except BaseException:
        undo()
        raise
    setattr(result, REPORT_ATTRIBUTE, report)
    return result


def survey(
    model: nn.Module,
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> Survey:
    """The sites :func:`optimize` would rewrite, with every matrix's shape, parameters and break-even
    rank: capture → canonicalize → match, and nothing after.  The model is not changed.

    ``include`` / ``exclude`` select sites as they do for ``optimize``; a model with nothing to
    compress raises the same error ``optimize`` would.
    """
    config = _config(None, {"include": tuple(include), "exclude": tuple(exclude)})
    check_model(model)
    example_args, example_kwargs = _example_inputs(model, example_inputs, example_kwargs)
    scratch = OptimizeReport(config.ratio, config.block, config.method)
    _, _, sites = _capture_and_match(model, example_args, example_kwargs, config, scratch)
    chosen = _select(sites, config, scratch)
    if not chosen:
        _nothing_to_compress(model, scratch)
    return Survey(
        type(model).__name__,
        count_parameters(model),
        [_surveyed(site) for site in chosen],
        scratch.skipped,
    )


def _surveyed(site: Site) -> SurveyedSite:
    matrices = []
    for role, projection in site.projections.items():
        in_features, out_features = projection.in_features, projection.out_features
        matrices.append(
            SurveyedMatrix(
                projection.name,
                role,
                in_features,
                out_features,
                projection.parameter_count(),
                projection.first.out_features if projection.is_lowrank else None,
                (in_features * out_features - 1) // (in_features + out_features),
            )
        )
    return SurveyedSite(site.path, site.pattern, site.activation, matrices)


def _not_installable(model: nn.Module, installation: Installation) -> str:
    """Why the installation cannot go into ``model`` as planned ("" if it can): a path that does not
    resolve.  (Modules shared by several places were refused by :func:`check_model`.)"""
    for path in installation.replacements():
        try:
            model.get_submodule(path)
        except AttributeError:
            return f"its module path {path!r} does not resolve in the model (a module used under two names?)"
    return ""


def _finetune(result, teacher, tuning_data, finetune: FinetuneConfig, report: OptimizeReport) -> dict:
    tuned = run_finetune(result, teacher, tuning_data.batches, finetune)
    report.timings["finetune_s"] = tuned.seconds
    return {
        "steps": tuned.steps,
        "first_loss": tuned.losses[0],
        "last_loss": tuned.losses[-1],
        "losses": tuned.losses,
        "learning_rates": tuned.learning_rates,
        "held_out": tuned.held_out,
        "best_step": tuned.best_step,
        "stopped_early": tuned.stopped_early,
    }


def _config(ratio, options: dict) -> OptimizeConfig:
    """The call's config: ``ratio`` (a number or a whole config) with ``options`` applied over it."""
    unknown = sorted(set(options) - set(_CONFIG_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for optimize(); it takes {', '.join(_CONFIG_FIELDS)}"
        )
    if isinstance(ratio, OptimizeConfig):
        return dataclasses.replace(ratio, **options)
    if ratio is not None:
        options["ratio"] = ratio
    return OptimizeConfig(**options)


def _example_inputs(model: nn.Module, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    """The capture's inputs: the caller's, with the default keyword arguments (``use_cache=False``
    for a model that takes it) unless the caller gave their own; token ids checked against the
    vocabulary."""
    default_args, default_kwargs = default_example_inputs(model)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ConfigError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    kwargs = default_kwargs if example_kwargs is None else example_kwargs
    if example_inputs is None:
        return default_args, kwargs
    example_args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    vocab = vocabulary_size(model)
    for index, value in enumerate(example_args):
        if vocab is not None and isinstance(value, torch.Tensor) and not value.dtype.is_floating_point:
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= vocab):
                raise ConfigError(
                    f"example_inputs[{index}] holds token ids outside [0, {vocab}) (the model's vocabulary): "
                    f"{int(value.min())}..{int(value.max())}"
                )
    return example_args, kwargs


def _capture_and_match(model, example_args, example_kwargs, config: OptimizeConfig, report: OptimizeReport):
    """capture → canonicalize → match; also the raw graph's snapshot when dumps are asked for."""
    started = time.perf_counter()
    captured = capture(model, example_args, example_kwargs)
    graph_module = captured.graph_module
    raw = dump.snapshot(graph_module.graph) if config.dump_dir else None
    canonical = Canonicalize(captured.resolve_param)(graph_module)
    sites = Match()(graph_module).sites
    report.timings["capture_and_match_s"] = time.perf_counter() - started
    log.info("canonicalized %s; matched %d site(s)", dict(canonical.counts), len(sites))
    return graph_module, raw, sites


def _select(sites: list[Site], config: OptimizeConfig, report: OptimizeReport) -> list[Site]:
    chosen = []
    for site in sites:
        reason = _selected(site.path, config)
        if reason is None:
            chosen.append(site)
        else:
            report.skipped.append(SkippedSite(site.path, site.pattern, reason))
    return chosen


def _compress_and_fuse(model, sites, config, calibration, tokenizer, report, copy_dense: bool):
    """strategy (method, calibration, ranks) → compress → fuse, for every chosen site.  A projection
    kept dense shares its layer's weight unless ``copy_dense``."""
    strategy = plan(model, sites, config, calibration, tokenizer)
    report.calibration = strategy.calibration_note
    fused_sites: list[FusedSite] = []
    method_reasons: dict[int, dict[str, str]] = {}
    started = time.perf_counter()
    progress = tqdm(
        list(zip(sites, strategy.plans, strict=True)),
        desc="compress",
        unit="site",
        disable=not config.progress,
    )
    for site, site_plan in progress:
        compressed = compress_site(site, site_plan.decisions, site_plan.factorizers, materialize=copy_dense)
        why = all_dense(compressed)
        if why is not None:
            report.skipped.append(SkippedSite(site.path, site.pattern, why))
            continue
        method_reasons[id(site)] = site_plan.method_reasons
        fused_sites.append(FusedSite.build(site, compressed))
    report.timings.update(strategy.timings)
    report.timings["factorization_s"] += time.perf_counter() - started
    return strategy, fused_sites, method_reasons


def _plan_installations(model, graph_module, fused_sites, config, example_args, example_kwargs, report):
    """Where each fused site goes (read from the captured graph, which the fuse pass then rewrites),
    proven on a real run; refuse a model with nothing left."""
    attributed = attributed_nodes(graph_module.graph)
    installations = []
    for fused in fused_sites:
        installation = plan_installation(fused, model, attributed)
        why = _not_installable(model, installation)
        if why:
            report.skipped.append(SkippedSite(fused.site.path, fused.site.pattern, why))
        else:
            installations.append(installation)
    if config.verify:
        installations = verify(installations, model, example_args, example_kwargs, attributed)
    kept = []
    for installation in installations:
        if installation.kind == PER_MATRIX and not installation.per_matrix:
            site = installation.fused.site
            why = f"{installation.note}; no matrix could be replaced on its own"
            report.skipped.append(SkippedSite(site.path, site.pattern, why))
        else:
            kept.append(installation)
    if not kept:
        _nothing_to_compress(model, report)
    return kept


def _nothing_to_compress(model: nn.Module, report: OptimizeReport):
    details = (
        "; ".join(f"{s.path or '<root>'}: {s.reason}" for s in report.skipped) or "no MLP or low-rank chain"
    )
    raise NothingToCompressError(f"nothing to compress in {type(model).__name__}: {details}")


def _finetune_data(model, calibration, tokenizer, config: OptimizeConfig):
    data, missing = prepare_calibration(
        model, calibration, tokenizer, config.calibration_seq_len, config.calibration_tokens
    )
    if data is None:
        raise ConfigError(f"finetune= needs calibration tokens: {missing}")
    return data


def report_of(model: nn.Module) -> OptimizeReport:
    """The report of the ``optimize()`` call that produced ``model``."""
    report = getattr(model, REPORT_ATTRIBUTE, None)
    if report is None:
        raise ValueError("this model was not produced by neuronmm_fx.optimize()")
    return report

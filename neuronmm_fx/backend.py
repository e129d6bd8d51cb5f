"""The ``neuronmm`` backend of ``torch.compile``.

>>> compiled = torch.compile(model, backend="neuronmm")                        # Inductor afterwards
>>> compiled = torch.compile(model, backend="neuronmm", options={"compiler": "eager", "dump_dir": "d"})

The backend is registered through the ``torch_dynamo_backends`` entry-point group, so the string
``"neuronmm"`` works after ``pip install`` without importing ``neuronmm_fx`` first.

On every graph Dynamo hands over, it runs the same passes as :func:`neuronmm_fx.optimize`
(:mod:`~neuronmm_fx.frontends.dynamo` capture → canonicalize → match → plan and compress → fuse) and
then, instead of installing modules, decanonicalizes what stayed dense, writes the ``neuronmm`` ops
out as ATen where no kernel implements them (:mod:`~neuronmm_fx.passes.lower`: CPU and GPU, so
that Inductor fuses around them; on Neuron and under the NKI stand-in they stay whole) and hands
the graph to the downstream compiler:

* ``neuronmm`` ops already in the graph (a model from ``optimize()``) are counted and kept;
* low-rank chains, ``Linear(K→r, no bias) → Linear(r→N)`` with ``r`` below break-even (SVD-LLM's
  ``u_proj``/``v_proj``, the paper's checkpoints) become ``neuronmm::xuv``, and MLPs whose projections
  include such chains become ``neuronmm::svd_mlp``, built from the weight placeholders that Dynamo
  passes in (``u = W_firstᵀ`` is a transpose node): no tensor is created and nothing is added to the
  graph module's parameters;
* dense MLPs stay dense unless ``ratio`` is given (below).

Options (``torch.compile(..., options={...})``):

``compiler``       ``"inductor"`` (default), ``"eager"`` (run the rewritten graph as is, for debugging) or
                   ``"neuron"`` (the TorchNeuron backend, where the Neuron SDK registers it).
``dump_dir``       write every compiled graph before and after the rewrite (text and DOT) and append a
                   line per graph to ``summary.txt``: which graph got which rewrites.
``ratio``/``block``/``allocation`` compress dense MLPs on the fly (``optimize(method="svd")``'s
                   ranks and factors: whitening needs calibration data, which a backend does not
                   have; the record says so) under *freezing* semantics: the factors are computed
                   once, at compile time, from the weights' values then, and passed to the compiled
                   graph as extra inputs.  Inference
                   only (grad mode off or weights without ``requires_grad``); a call after a weight
                   changed in place raises.  ``optimize()`` is the route for trainable factors.
``config_patches`` Inductor config patches (``compiler="inductor"`` only).
``gemm_panels``    where the ops are written out on a CPU, how many column panels each product by a
                   factor is split into, one GEMM per thread (:mod:`~neuronmm_fx.passes.lower`):
                   ``"auto"`` (default: ``torch.get_num_threads()`` on a CPU, 1 elsewhere) or a
                   positive int; 1 writes plain ``mm``.

Every compiled graph leaves a :class:`~neuronmm_fx.report.GraphRecord` in :func:`records` (what was
found, rewritten and left alone, the graph before and after), so graph breaks cannot lose matches silently.
"""

from __future__ import annotations

import itertools
import logging
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import networkx as nx
import torch
import torch.fx as fx

from neuronmm_fx import ops  # noqa: F401  (registers the neuronmm custom ops)
from neuronmm_fx.compress.factorize import CompressedProjection, all_dense, compress_site
from neuronmm_fx.compress.strategy import plan
from neuronmm_fx.config import OptimizeConfig, is_positive_int
from neuronmm_fx.debug import dump
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.frontends import dynamo
from neuronmm_fx.kernels import dispatch
from neuronmm_fx.passes.canonicalize import Canonicalize, may_mutate
from neuronmm_fx.passes.decanonicalize import Decanonicalize
from neuronmm_fx.passes.fuse import Fuse, OperandSource
from neuronmm_fx.passes.ir import neuronmm_op, neuronmm_ops
from neuronmm_fx.passes.lower import Lower
from neuronmm_fx.passes.match import GATED, Match, Projection, Site
from neuronmm_fx.report import GraphRecord, SiteReport, SkippedSite, matrix_report

log = logging.getLogger("neuronmm_fx.backend")

COMPILERS = ("inductor", "eager", "neuron")
OPTION_KEYS = ("compiler", "dump_dir", "ratio", "block", "allocation", "config_patches", "gemm_panels")
MAX_RECORDS = 512
NO_CALIBRATION = (
    "plain truncated SVD: whitening and measured sensitivity need calibration data, which a compile "
    "backend does not have (compress with neuronmm_fx.optimize() before torch.compile for those)"
)


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendOptions:
    """The validated ``options`` of ``torch.compile(..., backend="neuronmm", options=...)``.

    ``ratio``, ``block`` and ``allocation`` are validated by :class:`~neuronmm_fx.config.OptimizeConfig`
    (the same rules and messages as ``optimize()``); ``allocation`` defaults to the paper's uniform
    rule, since without calibration the global one has no measured sensitivity to spend by."""

    compiler: str = "inductor"
    dump_dir: Path | None = None
    ratio: float | None = None
    compression: OptimizeConfig = OptimizeConfig(method="svd", allocation="uniform", verify=False)
    config_patches: dict | None = None
    gemm_panels: int | str = "auto"

    @property
    def block(self) -> int:
        return self.compression.block

    @classmethod
    def from_dict(cls, options: dict | None) -> BackendOptions:
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for backend 'neuronmm'; it takes {', '.join(OPTION_KEYS)}"
            )
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ConfigError(f"options['compiler'] must be one of {', '.join(COMPILERS)}, got {compiler!r}")
        ratio = options.get("ratio")
        fields = {key: options[key] for key in ("block", "allocation") if key in options}
        if ratio is not None:
            fields["ratio"] = ratio
        try:
            compression = replace(cls.compression, **fields)
        except ConfigError as error:
            raise ConfigError(f"options: {error}") from None
        patches = options.get("config_patches")
        if patches is not None and (not isinstance(patches, dict) or compiler != "inductor"):
            raise ConfigError("options['config_patches'] must be a dict and needs compiler='inductor'")
        dump_dir = options.get("dump_dir")
        panels = options.get("gemm_panels", "auto")
        if panels != "auto" and not is_positive_int(panels):
            raise ConfigError(f"options['gemm_panels'] must be 'auto' or a positive int, got {panels!r}")
        return cls(
            compiler,
            Path(dump_dir) if dump_dir is not None else None,
            None if ratio is None else compression.ratio,
            compression,
            patches,
            panels,
        )

    def panels_for(self, example_inputs: Sequence) -> int:
        """Column panels per product by a factor: ``gemm_panels``, with "auto" resolved to the
        intra-op thread count when every example tensor is on the CPU, else 1."""
        if self.gemm_panels != "auto":
            return self.gemm_panels
        return torch.get_num_threads() if devices(example_inputs) == {"cpu"} else 1


# --- records ---------------------------------------------------------------------------------------

_RECORDS: list[GraphRecord] = []
_INDEX = itertools.count()


def records() -> list[GraphRecord]:
    """Records of the graphs compiled by the backend, oldest first (the last ``MAX_RECORDS``)."""
    return list(_RECORDS)


def clear_records() -> None:
    _RECORDS.clear()


# --- operands from Dynamo's placeholders ------------------------------------------------------------


class DynamoOperands(OperandSource):
    """The fuse pass's operands on a Dynamo graph: existing weights from their placeholders (``u =
    W_firstᵀ`` is a transpose node, no tensor is created), factors computed at compile time as extra
    placeholders after the graph's own inputs (freezing)."""

    def __init__(self, graph_module: fx.GraphModule, example_inputs: Sequence) -> None:
        super().__init__(graph_module)
        self.fake_mode = torch._guards.detect_fake_mode(example_inputs)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.position = {n: i for i, n in enumerate(placeholders)}
        self.last_placeholder = placeholders[-1] if placeholders else None
        self.extra: list[torch.Tensor] = []  # frozen factors, passed after the graph's own inputs
        self.watched: dict[int, tuple[str, torch.Tensor, int]] = {}  # input index -> weight compressed

    def call(self, target: Callable, args: tuple, like: fx.Node) -> fx.Node:
        node = super().call(target, args, like)
        if self.fake_mode is not None:
            values = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value"))
            try:
                with self.fake_mode:
                    node.meta["example_value"] = node.target(*values[0], **values[1])
            except Exception:  # metadata only; Inductor re-derives shapes from the example inputs
                pass
        return node

    def tensor(self, tensor: torch.Tensor | None, name: str, like: fx.Node) -> fx.Node | None:
        if tensor is None:
            return None
        with self.graph.inserting_after(self.last_placeholder):
            node = self.graph.placeholder("neuronmm_frozen_" + re.sub(r"\W", "_", name))
        if self.fake_mode is not None:
            node.meta["example_value"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        self.last_placeholder = node
        self.extra.append(tensor)
        return node

    def operands(self, site: Site, compressed: dict[str, CompressedProjection], like: fx.Node):
        first = self._joint_first(site, compressed, like)
        return {
            role: self._operands(p, compressed[role], like, first.get(role))
            for role, p in site.projections.items()
        }

    def _joint_first(self, site: Site, compressed: dict[str, CompressedProjection], like: fx.Node):
        """``{"gate": node, "up": node}``: the gate and up first factors as the column blocks of one
        frozen (K, r_gate + r_up) placeholder, split in the graph (the layout of
        :class:`~neuronmm_fx.modules.CompressedMLP`, which the lower pass reads with one GEMM), when
        both are factored here; ``{}`` otherwise."""
        roles = ("gate", "up")
        if site.pattern != GATED or any(
            site.projections[role].is_lowrank or compressed[role].method == "dense" for role in roles
        ):
            return {}
        firsts = [compressed[role].factors.u for role in roles]
        joint = self.tensor(torch.cat(firsts, dim=1), f"{site.path}_gate_up_u", like)
        split = self.call(torch.split, (joint, [u.shape[1] for u in firsts], 1), like)
        return {role: self.call(operator.getitem, (split, index), like) for index, role in enumerate(roles)}

    def _in_out(self, weight: fx.Node, layout: str, like: fx.Node) -> fx.Node:
        return self.call(torch.t, (weight,), like) if layout == "out_in" else weight

    def _operands(
        self, projection: Projection, result: CompressedProjection, like: fx.Node, u: fx.Node | None = None
    ):
        """``(u, v, bias)`` graph values of one projection; ``u`` when given is its first factor's node."""
        if projection.is_lowrank:
            first, second = projection.nodes[0], projection.nodes[1]
            u = self._in_out(first.args[1], first.args[3], like)
            v = self._in_out(second.args[1], second.args[3], like)
            return u, v, second.args[2]
        source = projection.nodes[0]
        weight, bias, layout = source.args[1], source.args[2], source.args[3]
        span = projection.out_slice
        if span is not None and bias is not None:
            bias = self.call(torch.narrow, (bias, 0, span[0], span[1] - span[0]), like)
        if result.method != "dense":
            self._watch(weight, projection)
            factors = result.factors
            return (
                u if u is not None else self.tensor(factors.u, f"{projection.name}_u", like),
                self.tensor(factors.v, f"{projection.name}_v", like),
                bias,
            )
        u = self._in_out(weight, layout, like)
        if span is not None:
            u = self.call(torch.narrow, (u, 1, span[0], span[1] - span[0]), like)
        return u, None, bias

    def _watch(self, weight: fx.Node, projection: Projection) -> None:
        tensor = projection.dense.weight.tensor
        if weight in self.position:
            self.watched[self.position[weight]] = (projection.dense.weight.path, tensor, tensor._version)


# --- the rewrite -------------------------------------------------------------------------------------


def devices(example_inputs: Sequence) -> set[str]:
    """The device types of a graph's example tensors ({"cpu"} for a graph without any)."""
    return {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)} or {"cpu"}


def op_form(compiler: str, example_inputs: Sequence) -> tuple[str, str]:
    """Whether the ``neuronmm`` ops go downstream whole ("opaque") or written out as ATen
    ("decomposed", :mod:`~neuronmm_fx.passes.lower`), and why: whole only where a kernel implements
    them."""
    if compiler == "neuron":
        return "opaque", "the Neuron compiler receives the ops whole: the NKI kernels implement them"
    if dispatch.active_mode() == "standin":
        return "opaque", "the NKI stand-in kernels are active: the ops stay whole so that they call them"
    return "decomposed", (
        f"no kernel implements the neuronmm ops on {'/'.join(sorted(devices(example_inputs)))}: "
        f"written out as ATen so that {compiler} fuses activation, product, biases and casts around "
        "the matmuls"
    )


def _check_freezable(site: Site, compressed: dict[str, CompressedProjection]) -> None:
    for role, result in compressed.items():
        if result.method in ("dense", "existing"):
            continue
        weight = site.projections[role].dense.weight.tensor
        if torch.is_grad_enabled() and weight.requires_grad:
            raise ConfigError(
                f"options['ratio'] compresses {result.name} under freezing semantics "
                "(inference only), but grad mode is on and its weight requires grad: run under "
                "torch.no_grad()/torch.inference_mode(), or compress with neuronmm_fx.optimize(model, "
                "ratio=...) before torch.compile to get trainable factors"
            )


def _real_weights(site: Site) -> None:
    for projection in site.projections.values():
        if not projection.is_lowrank and isinstance(
            projection.dense.weight.tensor, torch._subclasses.FakeTensor
        ):
            raise ConfigError(
                "options['ratio'] needs real weights at compile time and Dynamo passed fake ones; "
                "compress before compiling with neuronmm_fx.optimize(model, ratio=...)"
            )


def _compress(sites: list[Site], options: BackendOptions, record: GraphRecord):
    """``optimize()``'s plan and compression for the sites worth fusing; the rest are skipped."""
    chosen: list[Site] = []
    for site in sites:
        has_chain = any(p.is_lowrank for p in site.projections.values())
        if has_chain or options.ratio is not None:
            chosen.append(site)
        else:
            record.skipped.append(SkippedSite(site.path, site.pattern, "dense, no ratio given (stays dense)"))
    if options.ratio is not None:
        for site in chosen:
            _real_weights(site)
        strategy = plan(None, chosen, options.compression)
        plans = strategy.plans
        record.factorization = NO_CALIBRATION
    else:
        plans = [None] * len(chosen)
    to_fuse = []
    for site, site_plan in zip(chosen, plans, strict=True):
        if site_plan is None:  # reuse the chains as they are; dense projections stay dense
            compressed = compress_site(site, {}, {role: None for role in site.projections}, materialize=False)
        else:
            with torch.no_grad():
                compressed = compress_site(
                    site, site_plan.decisions, site_plan.factorizers, materialize=False
                )
        why = all_dense(compressed)
        if why is not None:
            record.skipped.append(SkippedSite(site.path, site.pattern, why))
            continue
        _check_freezable(site, compressed)
        to_fuse.append((site, compressed))
    return to_fuse


class Rewrite(NamedTuple):
    """What :func:`rewrite_graph` did to one graph."""

    record: GraphRecord
    extra: list[torch.Tensor]  # frozen factors the graph now takes after its own inputs (``ratio``)
    watched: dict[int, tuple[str, torch.Tensor, int]]  # graph inputs (by index) they were computed from
    before: nx.DiGraph  # snapshots of the graph as Dynamo captured it and after the rewrite (for dumps)
    after: nx.DiGraph


def rewrite_graph(
    gm: fx.GraphModule, example_inputs: Sequence, options: BackendOptions | None = None
) -> Rewrite:
    """Run canonicalize → match → compress → fuse → decanonicalize in place on a Dynamo graph
    prepared by :func:`neuronmm_fx.frontends.dynamo.prepare` (a copy, module paths normalised)."""
    options = options or BackendOptions()
    compile_id = torch._guards.CompileContext.current_compile_id()
    record = GraphRecord(next(_INDEX), str(compile_id) if compile_id is not None else "-", options.compiler)
    graph = gm.graph
    before = dump.snapshot(graph)
    record.before = dump.to_text(before, f"graph {record.index:03d}: as Dynamo captured it")
    record.existing = neuronmm_ops(graph)
    functional = not any(may_mutate(n) for n in graph.nodes)
    Canonicalize(dynamo.resolver(gm, example_inputs), functional=functional)(gm)
    to_fuse = _compress(Match()(gm).sites, options, record)
    operands = DynamoOperands(gm, example_inputs)
    fused = Fuse(to_fuse, operands)(gm)
    for index, (site, compressed) in enumerate(to_fuse):
        node = fused.fused[index]
        matrices = [matrix_report(result) for result in compressed.values()]
        record.sites.append(
            SiteReport(site.path, site.pattern, site.activation, neuronmm_op(node), [node.name], matrices)
        )
    record.dense_linears = Decanonicalize()(gm).dense_paths
    graph.lint()
    record.op_counts = neuronmm_ops(graph)
    record.frozen_inputs = len(operands.extra)
    after = dump.snapshot(graph)
    record.after = dump.to_text(after, f"graph {record.index:03d}: after the rewrite")
    return Rewrite(record, operands.extra, operands.watched, before, after)


# --- the backend ---------------------------------------------------------------------------------------


def _downstream(options: BackendOptions, mode: str | None) -> Callable:
    if options.compiler == "eager":
        return lambda gm, example_inputs: gm.forward
    if options.compiler == "neuron":
        from torch._dynamo import list_backends
        from torch._dynamo.backends.registry import lookup_backend

        if "neuron" not in list_backends(exclude_tags=()):
            raise ConfigError(
                "options['compiler']='neuron' needs the TorchNeuron backend of the AWS Neuron SDK "
                "(torch.compile(backend='neuron'), Neuron SDK 2.33 or later on Trn2/Trn3), which is not "
                "installed here; see neuronmm_fx.neuron.sdk_status()"
            )
        return lookup_backend("neuron")
    from torch._inductor.compile_fx import compile_fx

    patches = dict(options.config_patches or {})
    if mode and mode != "default":
        patches = {**torch._inductor.list_mode_options(mode), **patches}
    return lambda gm, example_inputs: compile_fx(gm, example_inputs, config_patches=patches or None)


def _frozen(compiled: Callable, extra: list[torch.Tensor], watched: dict) -> Callable:
    """Call ``compiled`` with the frozen factors after the graph's inputs; refuse stale factors."""

    def run(*args):
        for index, (path, tensor, version) in watched.items():
            arg = args[index]
            if arg is not tensor or arg._version != version:
                raise RuntimeError(
                    f"neuronmm: weight {path} changed after it was compressed at compile time "
                    "(options['ratio'] freezes weights); call torch._dynamo.reset() and compile again, "
                    "or compress once with neuronmm_fx.optimize(model, ratio=...)"
                )
        return compiled(*args, *extra)

    return run


def neuronmm_backend(
    gm: fx.GraphModule, example_inputs: Sequence, *, options: dict | None = None, mode: str | None = None
) -> Callable:
    """The ``torch.compile`` backend: fuse ``neuronmm`` patterns, then hand off downstream."""
    opts = BackendOptions.from_dict(options)
    gm = dynamo.prepare(gm)  # a copy: Dynamo keeps reading its own graph after the backend returns
    rewrite = rewrite_graph(gm, example_inputs, opts)
    record = rewrite.record
    record.form, record.form_reason = op_form(opts.compiler, example_inputs)
    record.handed, lowered = record.after, None
    if record.op_counts and record.form == "decomposed":
        record.gemm_panels = opts.panels_for(example_inputs)
        result = Lower(record.gemm_panels)(gm)
        record.joint_first, record.paneled, record.whole = result.joint, result.paneled, result.whole
        lowered = dump.snapshot(gm.graph)
        record.handed = dump.to_text(
            lowered, f"graph {record.index:03d}: handed to {opts.compiler}, ops written out"
        )
    _RECORDS.append(record)
    del _RECORDS[:-MAX_RECORDS]
    log.info("%s", record.summary())
    if opts.dump_dir is not None:
        opts.dump_dir.mkdir(parents=True, exist_ok=True)
        dump.write_compiled(opts.dump_dir, record, rewrite.before, rewrite.after, lowered)
    compiled = _downstream(opts, mode)(gm, [*example_inputs, *rewrite.extra])
    return _frozen(compiled, rewrite.extra, rewrite.watched) if rewrite.extra else compiled

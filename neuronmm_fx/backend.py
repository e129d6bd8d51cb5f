"""The ``neuronmm`` backend of ``torch.compile``.

>>> compiled = torch.compile(model, backend="neuronmm")                        # Inductor afterwards
>>> compiled = torch.compile(model, backend="neuronmm", options={"compiler": "eager", "dump_dir": "d"})

The backend is registered through the ``torch_dynamo_backends`` entry-point group, so the string
``"neuronmm"`` works after ``pip install`` without importing ``neuronmm_fx`` first.

On every graph Dynamo hands over, it runs the same passes as :func:`neuronmm_fx.optimize`
(canonicalize → match → fuse) and then hands the graph to the downstream compiler:

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
``ratio``/``block`` compress dense MLPs on the fly (truncated SVD, the rank rule of ``optimize()``)
                   under *freezing* semantics: the factors are computed once, at compile time, from the
                   weights' values then, and passed to the compiled graph as extra inputs.  Inference
                   only (grad mode off or weights without ``requires_grad``); a call after a weight
                   changed in place raises.  ``optimize()`` is the route for trainable factors.
``config_patches`` Inductor config patches (``compiler="inductor"`` only).

Every compiled graph leaves a :class:`GraphRecord` in :func:`records` (what was found, rewritten and
left alone, the graph before and after), so graph breaks cannot lose matches silently.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neuronmm_fx import ops  # noqa: F401  (registers the neuronmm custom ops)
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.passes import dump
from neuronmm_fx.passes.canonicalize import Canonicalize, may_mutate
from neuronmm_fx.passes.compress import TruncatedSVD, uniform_rank
from neuronmm_fx.passes.ir import MODULE_PATH, ParamRef, is_activation, is_dense, module_path
from neuronmm_fx.passes.match import GATED, LOWRANK, PLAIN, Match, Projection, Site

log = logging.getLogger("neuronmm_fx.backend")

COMPILERS = ("inductor", "eager", "neuron")
OPTION_KEYS = ("compiler", "dump_dir", "ratio", "block", "config_patches")
XUV, SVD_MLP = "neuronmm::xuv", "neuronmm::svd_mlp"
MAX_RECORDS = 512


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendOptions:
    """The validated ``options`` of ``torch.compile(..., backend="neuronmm", options=...)``."""

    compiler: str = "inductor"
    dump_dir: Path | None = None
    ratio: float | None = None
    block: int = 128
    config_patches: dict | None = None

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
        if ratio is not None and (
            isinstance(ratio, bool)
            or not isinstance(ratio, numbers.Real)
            or not math.isfinite(ratio)
            or not 0.0 < float(ratio) < 1.0
        ):
            raise ConfigError(
                "options['ratio'] must satisfy 0 < ratio < 1 (the fraction of parameters removed), "
                f"got {ratio!r}"
            )
        block = options.get("block", 128)
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block <= 0:
            raise ConfigError(f"options['block'] must be a positive integer (rank alignment), got {block!r}")
        patches = options.get("config_patches")
        if patches is not None and (not isinstance(patches, dict) or compiler != "inductor"):
            raise ConfigError("options['config_patches'] must be a dict and needs compiler='inductor'")
        dump_dir = options.get("dump_dir")
        return cls(
            compiler,
            Path(dump_dir) if dump_dir is not None else None,
            None if ratio is None else float(ratio),
            int(block),
            patches,
        )


# --- what the backend did ----------------------------------------------------------------------------


@dataclass
class Rewrite:
    """One site of a graph replaced by a ``neuronmm`` op."""

    pattern: str  # gated_mlp / plain_mlp / lowrank
    path: str  # module path of the site ("" for the root)
    op: str  # neuronmm::xuv or neuronmm::svd_mlp
    node: str  # name of the new node in the graph handed downstream
    methods: dict[str, str]  # role -> existing (a low-rank chain reused) / svd (compressed now) / dense
    ranks: dict[str, int | None]

    def describe(self) -> str:
        parts = ", ".join(
            f"{role}: {m}" + (f" r={self.ranks[role]}" if self.ranks[role] else "")
            for role, m in self.methods.items()
        )
        return f"{self.pattern} at {self.path or '<root>'} -> {self.op} ({parts})"


@dataclass
class GraphRecord:
    """What the backend found and did in one graph Dynamo compiled."""

    index: int
    compile_id: str
    compiler: str
    rewrites: list[Rewrite] = field(default_factory=list)
    existing: Counter = field(default_factory=Counter)  # neuronmm ops already in the graph
    left_alone: list[str] = field(default_factory=list)  # matched sites not rewritten, with why
    dense_linears: list[str] = field(default_factory=list)  # linear layers left as they were
    op_counts: Counter = field(default_factory=Counter)  # neuronmm ops in the graph handed downstream
    frozen_inputs: int = 0  # factors computed at compile time and passed as extra inputs (ratio=)
    before: str = ""
    after: str = ""

    def count(self, op: str) -> int:
        """``neuronmm`` ops of kind ``op`` ("xuv", "svd_mlp" or the qualified name) after the rewrite."""
        return self.op_counts[op if "::" in op else f"neuronmm::{op}"]

    def summary(self) -> str:
        head = f"graph {self.index:03d} [{self.compile_id}] -> {self.compiler}: "
        ops_after = ", ".join(f"{n} x{c}" for n, c in sorted(self.op_counts.items())) or "no neuronmm op"
        lines = [head + ops_after]
        if self.existing:
            found = ", ".join(f"{n} x{c}" for n, c in sorted(self.existing.items()))
            lines.append(f"  already in the graph: {found}")
        lines += [f"  rewrote {r.describe()}" for r in self.rewrites]
        lines += [f"  left alone: {why}" for why in self.left_alone]
        if self.frozen_inputs:
            lines.append(f"  {self.frozen_inputs} factor tensor(s) computed at compile time (freezing)")
        if self.dense_linears:
            lines.append(f"  {len(self.dense_linears)} other linear layer(s) unchanged")
        return "\n".join(lines)


_RECORDS: list[GraphRecord] = []
_INDEX = itertools.count()


def records() -> list[GraphRecord]:
    """Records of the graphs compiled by the backend, oldest first (the last ``MAX_RECORDS``)."""
    return list(_RECORDS)


def clear_records() -> None:
    _RECORDS.clear()


# --- reading Dynamo graphs -----------------------------------------------------------------------------

_SOURCE_PREFIX = re.compile(r"^[LG]\['[^']*'\](\[\d+\])*\.?")
_NAME_SPLIT = re.compile(r"_(?:modules|parameters|buffers)_")


def clean_source_path(path: str) -> str:
    """``L['args'][0].model.layers[0].mlp`` / ``L['self'].mlp`` → ``model.layers.0.mlp`` / ``mlp``."""
    path = _SOURCE_PREFIX.sub("", path)
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def parameter_path(placeholder_name: str) -> str:
    """A readable parameter path from a Dynamo placeholder name (for reports only)."""
    name = re.sub(r"^[lg]_", "", placeholder_name).rstrip("_")
    parts = _NAME_SPLIT.split(name)
    return ".".join(parts[1:]) if len(parts) > 1 else name


def _normalize_module_paths(graph: fx.Graph) -> None:
    """Strip Dynamo's source prefixes from ``nn_module_stack`` so paths read as in ``named_modules``."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (clean_source_path(entry[0]), *entry[1:]) for key, entry in stack.items()
            }


def _resolver(gm: fx.GraphModule, example_inputs: Sequence) -> Callable[[fx.Node], ParamRef | None]:
    """Parameters arrive as placeholders (example input = ``nn.Parameter``) or, with
    ``inline_inbuilt_nn_modules=False``, as ``get_attr`` nodes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    table: dict[fx.Node, ParamRef] = {}
    for node, value in zip(placeholders, example_inputs, strict=False):
        if isinstance(value, nn.Parameter):
            table[node] = ParamRef(parameter_path(node.name), value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = operator.attrgetter(node.target)(gm)
            except AttributeError:
                continue
            if isinstance(value, nn.Parameter):
                table[node] = ParamRef(node.target, value)
    return table.get


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` over a copy of ``gm``'s graph (node metadata copied shallowly)."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, values)
    graph.output(output)
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def neuronmm_op(node: fx.Node) -> str | None:
    """``neuronmm::xuv``/``neuronmm::svd_mlp`` if ``node`` calls that op, else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    return name if name.startswith("neuronmm::") else None


def _neuronmm_ops(graph: fx.Graph) -> Counter:
    return Counter(op for op in map(neuronmm_op, graph.nodes) if op is not None)


# --- the rewrite -------------------------------------------------------------------------------------


@dataclass
class _Compressed:
    """A dense projection's fate under ``ratio``: factored now (``u``, ``v``) or kept dense (``reason``)."""

    name: str
    rank: int | None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    reason: str = ""

    @property
    def method(self) -> str:
        return "dense" if self.rank is None else "svd"


def _compress(projection: Projection, ratio: float, block: int, factorize: TruncatedSVD) -> _Compressed:
    """The uniform block-aligned rank rule and truncated SVD (``optimize(method="svd")``'s rule)."""
    decision = uniform_rank(projection.in_features, projection.out_features, ratio, block)
    if decision.rank is None:
        return _Compressed(projection.name, None, reason=decision.reason)
    with torch.no_grad():
        u, v = factorize(projection, projection.weight_in_out(), decision.rank)
    return _Compressed(projection.name, decision.rank, u.detach().contiguous(), v.detach().contiguous())


_FIRST = {GATED: "gate", PLAIN: "in", LOWRANK: "lowrank"}  # role whose first node reads x


class _Rewriter:
    """Replaces matched sites of one canonical Dynamo graph by ``neuronmm`` op calls."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, options: BackendOptions) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.options = options
        self.fake_mode = torch._guards.detect_fake_mode(example_inputs)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.position = {n: i for i, n in enumerate(placeholders)}
        self.last_placeholder = placeholders[-1] if placeholders else None
        self.extra: list[torch.Tensor] = []  # frozen factors, passed after the graph's own inputs
        self.watched: dict[int, tuple[str, torch.Tensor, int]] = {}  # input index -> weight compressed

    # -- node helpers

    def _meta(self, node: fx.Node, like: fx.Node) -> fx.Node:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", MODULE_PATH):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        if self.fake_mode is not None:
            args = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value"))
            try:
                with self.fake_mode:
                    node.meta["example_value"] = node.target(*args[0], **args[1])
            except Exception:  # metadata only; Inductor re-derives shapes from the example inputs
                pass
        return node

    def _call(self, target, args: tuple, like: fx.Node) -> fx.Node:
        return self._meta(self.graph.call_function(target, args), like)

    def _in_out(self, weight: fx.Node, layout: str, like: fx.Node) -> fx.Node:
        return self._call(torch.t, (weight,), like) if layout == "out_in" else weight

    def _frozen_input(self, tensor: torch.Tensor, name: str) -> fx.Node:
        with self.graph.inserting_after(self.last_placeholder):
            node = self.graph.placeholder(name)
        if self.fake_mode is not None:
            node.meta["example_value"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        self.last_placeholder = node
        self.extra.append(tensor)
        return node

    # -- operands

    def _operands(self, projection: Projection, result: _Compressed | None, like: fx.Node):
        """``(u, v, bias)`` graph values of one projection, from the weight placeholders it reads."""
        if projection.is_lowrank:
            first, second = projection.nodes[0], projection.nodes[1]
            u = self._in_out(first.args[1], first.args[3], like)
            v = self._in_out(second.args[1], second.args[3], like)
            return u, v, second.args[2]
        source = projection.nodes[0]
        weight, bias, layout = source.args[1], source.args[2], source.args[3]
        span = projection.out_slice
        if span is not None and bias is not None:
            bias = self._call(torch.narrow, (bias, 0, span[0], span[1] - span[0]), like)
        if result is not None and result.method != "dense":
            self._watch(weight, projection)
            stem = re.sub(r"\W", "_", projection.name)
            u = self._frozen_input(result.u, f"neuronmm_frozen_{stem}_u")
            v = self._frozen_input(result.v, f"neuronmm_frozen_{stem}_v")
            return u, v, bias
        u = self._in_out(weight, layout, like)
        if span is not None:
            u = self._call(torch.narrow, (u, 1, span[0], span[1] - span[0]), like)
        return u, None, bias

    def _watch(self, weight: fx.Node, projection: Projection) -> None:
        tensor = projection.dense.weight.tensor
        if weight in self.position:
            self.watched[self.position[weight]] = (projection.dense.weight.path, tensor, tensor._version)

    # -- sites

    def _plan(self, site: Site) -> tuple[dict[str, _Compressed | None], str | None]:
        """Per role, the compression result (None: reuse the graph's weights); or why to leave the site."""
        plan: dict[str, _Compressed | None] = {}
        for role, projection in site.projections.items():
            if projection.is_lowrank or self.options.ratio is None:
                plan[role] = None
                continue
            plan[role] = _compress(projection, self.options.ratio, self.options.block, TruncatedSVD())
        lowrank = any(p.is_lowrank for p in site.projections.values())
        compressed = any(r is not None and r.method != "dense" for r in plan.values())
        if lowrank or compressed:
            return plan, None
        if self.options.ratio is None:
            return plan, f"{site.pattern} at {site.path or '<root>'}: dense, no ratio given (stays dense)"
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in plan.values() if r is not None)
        return plan, f"{site.pattern} at {site.path or '<root>'}: every matrix stays dense ({reasons})"

    def _check_freezable(self, site: Site, plan) -> None:
        for role, result in plan.items():
            if result is None or result.method == "dense":
                continue
            weight = site.projections[role].dense.weight.tensor
            if isinstance(weight, torch._subclasses.FakeTensor):
                raise ConfigError(
                    "options['ratio'] needs real weights at compile time and Dynamo passed fake ones; "
                    "compress before compiling with neuronmm_fx.optimize(model, ratio=...)"
                )
            if torch.is_grad_enabled() and weight.requires_grad:
                raise ConfigError(
                    f"options['ratio'] compresses {site.projections[role].name} under freezing semantics "
                    "(inference only), but grad mode is on and its weight requires grad: run under "
                    "torch.no_grad()/torch.inference_mode(), or compress with neuronmm_fx.optimize(model, "
                    "ratio=...) before torch.compile to get trainable factors"
                )

    def rewrite(self, site: Site) -> Rewrite | str:
        plan, why_not = self._plan(site)
        if why_not is not None:
            return why_not
        self._check_freezable(site, plan)
        output = site.output
        # ``site.input`` may be the output of a site rewritten just before: read the live argument instead
        x = site.projections[_FIRST[site.pattern]].nodes[0].args[0]
        with self.graph.inserting_before(output):
            operands = {
                role: self._operands(projection, plan[role], output)
                for role, projection in site.projections.items()
            }
            if site.pattern == LOWRANK:
                u, v, bias = operands["lowrank"]
                if v is None:  # cannot happen for a chain; kept as a guard
                    return f"lowrank at {site.path}: no second factor"
                new = self._call(torch.ops.neuronmm.xuv.default, (x, u, v, bias), output)
                op = XUV
            else:
                roles = ("gate", "up", "down") if "gate" in operands else ("in", None, "out")
                head = operands[roles[0]]
                up = operands[roles[1]] if roles[1] else (None, None, None)
                last = operands[roles[2]]
                args = (x, *head, *up, *last, site.activation)
                new = self._call(torch.ops.neuronmm.svd_mlp.default, args, output)
                op = SVD_MLP
        output.replace_all_uses_with(new)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in sorted(site.nodes, key=order.__getitem__, reverse=True):
            if not node.users:
                self.graph.erase_node(node)
        methods, ranks = {}, {}
        for role, projection in site.projections.items():
            result = plan[role]
            if projection.is_lowrank:
                methods[role], ranks[role] = "existing", projection.first.out_features
            elif result is not None:
                methods[role], ranks[role] = result.method, result.rank
            else:
                methods[role], ranks[role] = "dense", None
        return Rewrite(site.pattern, site.path, op, new.name, methods, ranks)


_ACTIVATION_CALLS: dict[str, tuple[Callable, dict]] = {
    "silu": (F.silu, {}),
    "gelu": (F.gelu, {}),
    "gelu_tanh": (F.gelu, {"approximate": "tanh"}),
    "relu": (F.relu, {}),
}


def _decanonicalize(graph: fx.Graph) -> list[str]:
    """Turn the canonical ``dense``/``activation`` nodes no site used back into torch calls.

    Returns the module paths of those linear layers."""
    dense_paths = []
    for node in list(graph.nodes):
        if is_dense(node):
            x, weight, bias, layout = node.args
            dense_paths.append(module_path(node))
            with graph.inserting_before(node):
                if layout == "in_out":
                    weight = graph.call_function(torch.t, (weight,))
                    weight.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
                new = graph.call_function(torch._C._nn.linear, (x, weight, bias))
        elif is_activation(node) and node.args[1] in _ACTIVATION_CALLS:
            fn, kwargs = _ACTIVATION_CALLS[node.args[1]]
            with graph.inserting_before(node):
                new = graph.call_function(fn, (node.args[0],), dict(kwargs))
        else:
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return dense_paths


def rewrite_graph(
    gm: fx.GraphModule, example_inputs: Sequence, options: BackendOptions | None = None
) -> tuple[GraphRecord, list[torch.Tensor], dict[int, tuple[str, torch.Tensor, int]]]:
    """Run canonicalize → match → fuse on a Dynamo graph in place.

    Returns the record, the frozen factor tensors the graph now takes after its own inputs (only with
    ``ratio``), and the graph inputs (by index) that those factors were computed from.
    """
    options = options or BackendOptions()
    compile_id = torch._guards.CompileContext.current_compile_id()
    record = GraphRecord(next(_INDEX), str(compile_id) if compile_id is not None else "-", options.compiler)
    graph = gm.graph
    _normalize_module_paths(graph)
    record.before = dump.to_text(dump.snapshot(graph), f"graph {record.index:03d}: as Dynamo captured it")
    record.existing = _neuronmm_ops(graph)
    functional = not any(may_mutate(n) for n in graph.nodes)
    Canonicalize(_resolver(gm, example_inputs), functional=functional)(gm)
    rewriter = _Rewriter(gm, example_inputs, options)
    for site in Match()(gm).sites:
        outcome = rewriter.rewrite(site)
        if isinstance(outcome, Rewrite):
            record.rewrites.append(outcome)
        else:
            record.left_alone.append(outcome)
    record.dense_linears = _decanonicalize(graph)
    graph.lint()
    gm.recompile()
    record.op_counts = _neuronmm_ops(graph)
    record.frozen_inputs = len(rewriter.extra)
    record.after = dump.to_text(
        dump.snapshot(graph), f"graph {record.index:03d}: handed to {options.compiler}"
    )
    return record, rewriter.extra, rewriter.watched


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


def _write_dump(dump_dir: Path, record: GraphRecord, gm: fx.GraphModule, before) -> None:
    folder = dump_dir / f"graph_{record.index:03d}"
    dump.write(folder, "0_dynamo", before, f"graph {record.index:03d} [{record.compile_id}]: from Dynamo")
    highlight = {r.node for r in record.rewrites}
    title = f"graph {record.index:03d} [{record.compile_id}]: handed to {record.compiler}"
    dump.write(folder, "1_neuronmm", dump.snapshot(gm.graph), title, highlight)
    (folder / "summary.txt").write_text(record.summary() + "\n")
    with (dump_dir / "summary.txt").open("a") as handle:
        handle.write(record.summary() + "\n")


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
    gm = copy_graph_module(gm)  # Dynamo keeps reading its own graph after the backend returns
    _normalize_module_paths(gm.graph)
    before = dump.snapshot(gm.graph) if opts.dump_dir is not None else None
    record, extra, watched = rewrite_graph(gm, example_inputs, opts)
    _RECORDS.append(record)
    del _RECORDS[:-MAX_RECORDS]
    log.info("%s", record.summary())
    if opts.dump_dir is not None:
        opts.dump_dir.mkdir(parents=True, exist_ok=True)
        _write_dump(opts.dump_dir, record, gm, before)
    compiled = _downstream(opts, mode)(gm, [*example_inputs, *extra])
    return _frozen(compiled, extra, watched) if extra else compiled

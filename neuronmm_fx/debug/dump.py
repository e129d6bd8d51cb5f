"""Dump: readable text and DOT files of the graphs each pass saw.

Graphs are first turned into ``networkx`` digraphs (:func:`snapshot`), which keeps a copy of just the
structure and labels: the big exported graph can be snapshotted before ``canonicalize`` rewrites it
and sliced later to the region of each site.  DOT files are written through ``pydot``.

Both routes write here.  ``optimize()``: ``<dump_dir>/discovery.txt`` (every site found and what
became of it), then one folder per site, ``<dump_dir>/<NN>_<module path>/``, with ``0_capture``,
``1_canonicalize``, ``2_match`` (site nodes highlighted), ``3_fuse`` (the site's region after the fuse
pass, op node highlighted) as ``.txt`` and ``.dot``, and ``4_install.txt`` (what was installed where).
The compile backend: ``<dump_dir>/graph_<NNN>/`` with ``0_dynamo`` and ``1_neuronmm`` per graph and
one line per graph in ``<dump_dir>/summary.txt``.
"""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from neuronmm_fx.passes.ir import DENSE, module_paths, neuronmm_op


def _describe_target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else str(target)


def _format_arg(arg) -> str:
    return str(fx.node.map_arg(arg, lambda n: f"%{n.name}"))


def node_label(node: fx.Node) -> str:
    text = f"%{node.name} = {node.op}[{_describe_target(node)}]"
    if node.op not in ("placeholder", "output") or node.args:
        text += f"({', '.join(_format_arg(a) for a in node.args)}"
        if node.kwargs:
            text += ", " + ", ".join(f"{k}={_format_arg(v)}" for k, v in node.kwargs.items())
        text += ")"
    info = node.meta.get(DENSE)
    if info is not None:
        text += f"  # weight {info.weight.path} [{info.layout}] {info.in_features}→{info.out_features}"
    return text


def snapshot(graph: fx.Graph) -> nx.DiGraph:
    """The graph's structure: one digraph node per fx node with its label and module paths."""
    digraph = nx.DiGraph()
    for node in graph.nodes:
        paths = module_paths(node)
        digraph.add_node(node.name, label=node_label(node), module=paths[-1] if paths else "", paths=paths)
        for source in node.all_input_nodes:
            digraph.add_edge(source.name, node.name)
    return digraph


def region(digraph: nx.DiGraph, module: str) -> nx.DiGraph:
    """The nodes that ran inside ``module`` plus their direct inputs ("" keeps everything)."""
    if not module:
        return digraph
    inside = {n for n, data in digraph.nodes(data=True) if module in data["paths"]}
    keep = inside | {p for n in inside for p in digraph.predecessors(n)}
    sliced = nx.DiGraph()
    sliced.add_nodes_from((n, digraph.nodes[n]) for n in digraph.nodes if n in keep)  # keep graph order
    sliced.add_edges_from((a, b) for a, b in digraph.edges if a in keep and b in keep)
    return sliced


def to_text(digraph: nx.DiGraph, title: str, highlight: set[str] = frozenset()) -> str:
    lines = [f"# {title}", f"# {digraph.number_of_nodes()} nodes; * marks nodes of the site", ""]
    for name in digraph.nodes:  # insertion order is the graph's order
        data = digraph.nodes[name]
        mark = "*" if name in highlight else " "
        where = f"  @ {data['module']}" if data.get("module") else ""
        lines.append(f"{mark} {data['label']}{where}")
    return "\n".join(lines) + "\n"


def write(
    folder: Path, stem: str, digraph: nx.DiGraph, title: str, highlight: set[str] = frozenset()
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.txt").write_text(to_text(digraph, title, highlight))
    dot = nx.DiGraph()
    dot.graph["graph"] = {"rankdir": "TB", "label": title}
    for name, data in digraph.nodes(data=True):
        attrs = {"label": data["label"].replace('"', "'"), "shape": "box"}
        if name in highlight:
            attrs.update(style="filled", fillcolor="lightblue")
        dot.add_node(name, **attrs)
    dot.add_edges_from(digraph.edges)
    nx.nx_pydot.write_dot(dot, folder / f"{stem}.dot")


def site_folder(dump_dir: Path, index: int, path: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", path) or "root"
    return dump_dir / f"{index:02d}_{safe}"


def write_optimize(
    dump_dir: Path, raw, canonical, fused_graph: fx.GraphModule, installations, report
) -> None:
    """The dumps of one ``optimize()`` call: snapshots before canonicalize (``raw``) and before fuse
    (``canonical``), the fused graph itself, and what was installed where."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / "discovery.txt").write_text(str(report) + "\n")
    fused = snapshot(fused_graph.graph)
    op_nodes = {n.name for n in fused_graph.graph.nodes if neuronmm_op(n) is not None}
    for index, installation in enumerate(installations):
        site = installation.fused.site
        folder = site_folder(dump_dir, index, site.path)
        title = f"{site.pattern} at {site.path or '<root>'}"
        names = {n.name for n in site.nodes}
        write(folder, "0_capture", region(raw, site.path), f"{title}: captured by torch.export")
        write(folder, "1_canonicalize", region(canonical, site.path), f"{title}: after canonicalize")
        write(folder, "2_match", region(canonical, site.path), f"{title}: matched nodes", names)
        write(folder, "3_fuse", region(fused, site.path), f"{title}: after fuse", op_nodes)
        plan = "\n".join(
            f"{path or '<root>'} := {type(module).__name__}"
            for path, module in installation.replacements().items()
        )
        (folder / "4_install.txt").write_text(
            f"# {title}: installed as {installation.kind}\n{installation.note}\n{plan}\n"
        )


def write_compiled(
    dump_dir: Path, record, before: nx.DiGraph, rewritten: nx.DiGraph, lowered: nx.DiGraph | None
) -> None:
    """The dumps of one graph the compile backend rewrote (from Dynamo, after the rewrite, and, where
    the ops were written out as ATen, as handed downstream), and its line in ``summary.txt``."""
    folder = dump_dir / f"graph_{record.index:03d}"
    heading = f"graph {record.index:03d} [{record.compile_id}]"
    write(folder, "0_dynamo", before, f"{heading}: from Dynamo")
    highlight = {site.replaced[0] for site in record.sites if site.replaced}
    write(folder, "1_neuronmm", rewritten, f"{heading}: after the rewrite", highlight)
    if lowered is not None:
        write(
            folder,
            "2_lowered",
            lowered,
            f"{heading}: handed to {record.compiler}, neuronmm ops written out as ATen",
        )
    (folder / "summary.txt").write_text(record.summary() + "\n")
    with (dump_dir / "summary.txt").open("a") as handle:
        handle.write(record.summary() + "\n")

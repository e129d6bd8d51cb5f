"""Charts of what the tools measure, as PNG files (matplotlib, the optional extra ``plots``).

* :func:`plot_ranks`: per compressed site, the rank of each matrix (a matrix left dense is drawn at
  its full rank, hatched) and the share of the site's parameters kept;
* :func:`plot_survey`: per site of a dense model, each matrix's full and break-even rank and its
  parameters (``neuronmm-fx inspect MODEL``);
* :func:`plot_latency`: per variant, prefill and decode latency (medians, with the range over the
  rounds as error bars);
* :func:`plot_traffic`: HBM traffic and modelled time of the kernels against the token count (the
  kernel benchmark);
* :func:`plot_quality`: perplexity against the MLP parameters removed, per method (the quality
  benchmark);
* :func:`plot_parallel`: modelled time of the tensor-parallel schemes against the TP degree (the
  parallel cost benchmark).

Each function writes the file and returns the matplotlib ``Figure`` (built without pyplot, so no
display or global state is involved); every chart has a title and labelled axes.
"""

from __future__ import annotations

from pathlib import Path

from neuronmm_fx.errors import ConfigError


def _figure(rows: int, width: float, height: float, columns: int = 1):
    """A matplotlib ``Figure`` (no pyplot) and its ``rows × columns`` axes, flattened."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'neuronmm_fx[plots]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, list(figure.subplots(rows, columns, squeeze=False).flat)


def _site_bars(axes, sites, value, **style) -> list[str]:
    """Bars grouped per site, one colour per matrix role: ``value(matrix)`` gives each bar's height
    and ``style(matrix)`` (optional keyword) its extra bar keywords.  Labels the x axis; returns the
    roles in colour order."""
    styled = style.pop("style", lambda matrix: {})
    roles = list(dict.fromkeys(m.role for site in sites for m in site.matrices))
    width = 0.8 / len(roles)
    for index, role in enumerate(roles):
        for position, site in enumerate(sites):
            matrix = next((m for m in site.matrices if m.role == role), None)
            if matrix is not None:
                offset = (index - (len(roles) - 1) / 2) * width
                bar_style = {"color": f"C{index}", **style, **styled(matrix)}
                axes.bar(position + offset, value(matrix), width, **bar_style)
    labels = [site.path.removeprefix("model.") or "<root>" for site in sites]
    axes.set_xlabel("site")
    axes.set_xticks(range(len(sites)), labels, rotation=90, fontsize=7)
    return roles


def _role_handles(roles: list[str]) -> list:
    from matplotlib.patches import Patch

    return [Patch(color=f"C{index}", label=role) for index, role in enumerate(roles)]


def plot_ranks(report, path: str | Path, title: str = "Ranks per compressed site"):
    """Bar chart of an :class:`~neuronmm_fx.report.OptimizeReport`'s ranks and kept parameters."""
    sites = report.sites
    if not sites:
        raise ConfigError("the report has no compressed site to plot")
    figure, (ranks, kept) = _figure(2, max(6.0, 0.35 * len(sites) * 3), 6.5)

    def left_dense(matrix) -> dict:
        return {"hatch": "//", "alpha": 0.45} if matrix.rank is None else {}

    roles = _site_bars(
        ranks,
        sites,
        lambda m: min(m.in_features, m.out_features) if m.rank is None else m.rank,
        style=left_dense,
    )
    ranks.set_title(f"{title} (ratio {report.ratio}, block {report.block}; hatched: left dense)")
    ranks.set_ylabel("rank")
    from matplotlib.patches import Patch

    handles = _role_handles(roles)
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="left dense (full rank)"))
    ranks.legend(handles=handles, title="matrix", fontsize=8)
    shares = [100 * site.params_after / site.params_before for site in sites]
    kept.bar(range(len(sites)), shares, color="C7")
    kept.axhline(
        100 * (1 - report.ratio), color="C3", linestyle="--", label=f"1 − ratio = {1 - report.ratio:.0%}"
    )
    kept.set_title("Parameters kept per site")
    kept.set_ylabel("kept (%)")
    kept.set_xlabel("site")
    kept.set_xticks(
        range(len(sites)),
        [site.path.removeprefix("model.") or "<root>" for site in sites],
        rotation=90,
        fontsize=7,
    )
    kept.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return figure


def plot_survey(survey, path: str | Path, title: str = "Sites to compress"):
    """Bar chart of a :class:`~neuronmm_fx.report.Survey`: per site and matrix, the full rank
    (light) with the break-even rank inside it (solid), and the parameters per matrix."""
    sites = survey.sites
    figure, (ranks, params) = _figure(2, max(6.0, 0.35 * len(sites) * 3), 6.5)
    _site_bars(ranks, sites, lambda m: min(m.in_features, m.out_features), alpha=0.3)
    roles = _site_bars(ranks, sites, lambda m: m.break_even_rank)
    ranks.set_title(f"{title}: full rank (light) and break-even rank (solid) per matrix")
    ranks.set_ylabel("rank")
    ranks.legend(handles=_role_handles(roles), title="matrix", fontsize=8)
    _site_bars(params, sites, lambda m: m.params / 1e6)
    params.set_title("Dense parameters per matrix")
    params.set_ylabel("parameters (millions)")
    figure.savefig(path, dpi=120)
    return figure


def plot_latency(summary: dict, path: str | Path, title: str = "Latency"):
    """Bars of prefill and decode latency per variant (``{name: Latency}`` of
    :func:`neuronmm_fx.bench.summarize`), the range over the rounds as error bars."""
    if not summary:
        raise ConfigError("no variant to plot")
    figure, (prefill, decode) = _figure(2, max(6.0, 1.2 * len(summary)), 6.0)
    names = list(summary)
    for axes, field, label in ((prefill, "prefill", "prefill (ms)"), (decode, "decode", "decode (ms/token)")):
        medians = [getattr(summary[name], f"{field}_ms") for name in names]
        ranges = [getattr(summary[name], f"{field}_range_ms") for name in names]
        errors = [
            [m - low for m, (low, _) in zip(medians, ranges, strict=True)],
            [high - m for m, (_, high) in zip(medians, ranges, strict=True)],
        ]
        axes.bar(names, medians, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        axes.set_ylabel(label)
        axes.set_xlabel("variant")
    prefill.set_title(f"{title}: prefill (median, range over rounds)")
    decode.set_title(f"{title}: decode per token (median, range over rounds)")
    figure.savefig(path, dpi=120)
    return figure


def plot_traffic(rows: list[dict], path: str | Path, title: str = "X·U·V and MLP kernels"):
    """Per shape (``key``) on one target, two panels against the token count: HBM traffic of each
    kernel variant with the reference line (``bound``: the capacity bound, or the compulsory
    traffic), and each variant's modelled time.  ``rows`` are ``benchmarks/kernel_traffic.py``'s:
    keys ``key``, ``target``, ``M``, ``bound`` and ``variants`` ``{name: {"hbm": bytes, "time": s}
    or None}``; the first target found is drawn."""
    if not rows:
        raise ConfigError("no traffic row to plot")
    target = rows[0]["target"]
    rows = [row for row in rows if row["target"] == target]
    shapes = list(dict.fromkeys(row["key"] for row in rows))
    figure, grid = _figure(len(shapes), 11.0, 3.2 * len(shapes), columns=2)
    for index, key in enumerate(shapes):
        chosen = sorted((row for row in rows if row["key"] == key), key=lambda r: r["M"])
        tokens = [row["M"] for row in chosen]
        traffic, time = grid[2 * index], grid[2 * index + 1]
        names = list(dict.fromkeys(name for row in chosen for name in row["variants"]))
        for name in names:
            points = [(row["M"], row["variants"].get(name)) for row in chosen]
            points = [(m, figures) for m, figures in points if figures]
            xs = [m for m, _ in points]
            traffic.plot(xs, [f["hbm"] / 1e6 for _, f in points], marker="o", label=name)
            time.plot(xs, [f["time"] * 1e6 for _, f in points], marker="o", label=name)
        reference = chosen[0].get("reference", "bound")
        traffic.plot(tokens, [row["bound"] / 1e6 for row in chosen], ":", color="black", label=reference)
        for axes, label in ((traffic, "HBM traffic (MB)"), (time, "modelled time (µs)")):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.set_title(f"{key} on {target}: {label.split(' (')[0]}")
            axes.set_xlabel("tokens M")
            axes.set_ylabel(label)
            axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=80)
    return figure


def plot_quality(rows: list[dict], path: str | Path, title: str = "Perplexity against parameters removed"):
    """Lines of perplexity (× dense, log scale) against the share of MLP parameters a method really
    removed (not the ratio asked for: a rank rule that floors removes what it removes), one per
    method, one panel per evaluation text.  ``rows`` are ``benchmarks/compression_quality.py``'s: the
    first is dense (``ratio`` "-"), each has ``name``, ``ratio``, ``mlp_kept`` and per text
    ``(perplexity, kl, top1, tokens)``."""
    dense, compressed = rows[0], [row for row in rows[1:] if row["ratio"] != "-"]
    texts = [key for key, value in dense.items() if isinstance(value, (tuple, list))]
    if not compressed or not texts:
        raise ConfigError("no compressed row to plot")
    figure, panels = _figure(1, 5.5 * len(texts), 4.2, columns=len(texts))
    methods = list(dict.fromkeys(row["name"] for row in compressed))
    for axes, text in zip(panels, texts, strict=True):
        for index, method in enumerate(methods):
            chosen = sorted((row for row in compressed if row["name"] == method), key=lambda r: r["ratio"])
            axes.plot(
                [1 - row["mlp_kept"] for row in chosen],
                [row[text][0] / dense[text][0] for row in chosen],
                marker="o",
                color=f"C{index}",
                label=method,
            )
        axes.axhline(1.0, color="black", linestyle=":", label="dense")
        axes.set_yscale("log")
        axes.set_title(f"{text} (dense perplexity {dense[text][0]:.2f})")
        axes.set_xlabel("share of MLP parameters removed")
        axes.set_ylabel("perplexity × dense")
        axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return figure


def plot_parallel(rows: list[dict], path: str | Path, title: str = "Tensor-parallel MLP"):
    """Modelled time per rank against the TP degree, one line per scheme, one column per model and
    two rows (a decode step; a 2,048-token prefill).  ``rows`` are
    :func:`neuronmm_fx.parallel.cost.table`'s for one ratio (the first ratio found is drawn)."""
    if not rows:
        raise ConfigError("no cost row to plot")
    ratio = rows[0]["ratio"]
    rows = [row for row in rows if row["ratio"] == ratio]
    models = list(dict.fromkeys(row["model"] for row in rows))
    schemes = list(dict.fromkeys(row["scheme"] for row in rows))
    figure, grid = _figure(2, 4.5 * len(models), 7.0, columns=len(models))
    for column, model in enumerate(models):
        for line, (field, label) in enumerate(
            (("decode_us", "decode step (µs)"), ("prefill_ms", "prefill 2K (ms)"))
        ):
            axes = grid[line * len(models) + column]
            for scheme in schemes:
                chosen = sorted(
                    (r for r in rows if r["model"] == model and r["scheme"] == scheme), key=lambda r: r["tp"]
                )
                axes.plot([r["tp"] for r in chosen], [r[field] for r in chosen], marker="o", label=scheme)
                picked = [r for r in chosen if r["picked"]]
                axes.scatter(
                    [r["tp"] for r in picked],
                    [r[field] for r in picked],
                    s=120,
                    facecolors="none",
                    edgecolors="black",
                )
            axes.set_xscale("log", base=2)
            axes.set_xticks(
                sorted({r["tp"] for r in rows}), [str(tp) for tp in sorted({r["tp"] for r in rows})]
            )
            axes.set_title(f"{model}, ratio {ratio}")
            axes.set_xlabel("TP degree")
            axes.set_ylabel(f"modelled {label}")
            axes.legend(fontsize=7, title="circled: picked", title_fontsize=7)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return figure

"""HBM traffic and modelled time of the X.U.V and MLP kernels on every LLaMA MLP shape.

For LLaMA-3.2-1B, 3.2-3B and 3.1-8B at ratio 0.2 (rank = (1 - 0.2)·K·N/(K + N) floored to 128), bf16:

* the up projection (K = hidden -> N = intermediate) and the down projection (K = intermediate ->
  N = hidden): dense X.W, the unfused chain, the fused kernel and the K-blocked fused kernel, the
  capacity bound ``X + Y + ceil(M/BM*)·(U + V)`` (BM*: the largest token block whose fp32 strip fits
  80 % of a partition's physical SBUF), fused / bound, and the form the planner picks;
* the whole gated MLP: dense (three X.W and the element-wise pass), projection by projection (each
  projection's chosen form, h through HBM), the fused MLP kernel and the K-blocked MLP kernel, and
  the planner's pick;

at 1 to 32K tokens on trn2 and trn3.  Every figure is counted by running the kernels on the CPU
stand-in for NKI in shape-only mode (kernel code executed, hardware and compiler rules checked, no
values computed).  Times are the stand-in's engine model (TensorE, Vector, Scalar, DMA queues with
an efficiency per transfer size; the busiest engine sets the time): modelled, not measured.

Run: python benchmarks/kernel_traffic.py [--models 1B,3B,8B] [--tokens 1,128,...] [--targets trn2,trn3]
     [--jobs 2] [--plot docs/img/kernel_traffic.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neuronmm_fx.kernels import analyse_svd_mlp, analyse_xuv, get_target, rank_for_ratio  # noqa: E402
from neuronmm_fx.kernels.costs import MlpShape, capacity_bound_bytes  # noqa: E402
from neuronmm_fx.kernels.planner import PlanError, choose_svd_mlp, choose_xuv  # noqa: E402

MODELS = {  # key: (name, hidden H, intermediate I)
    "1B": ("LLaMA-3.2-1B", 2048, 8192),
    "3B": ("LLaMA-3.2-3B", 3072, 8192),
    "8B": ("LLaMA-3.1-8B", 4096, 14336),
}
TOKENS = (1, 128, 512, 2048, 8192, 32768)
TARGETS = ("trn2", "trn3")
RATIO = 0.2
DTYPE = "bfloat16"
XUV_VARIANTS = ("dense", "unfused", "fused", "kblocked")
MLP_KERNELS = ("fused", "kblocked")
ENGINES = ("tensor", "vector", "scalar", "dma")


def _figures(analysis) -> dict:
    stats = analysis.stats
    return {
        "hbm": stats.hbm_bytes,
        "planned_hbm": analysis.plan.hbm_bytes,
        "time": stats.estimated_time_s,
        "engines": stats.engine_times_s(),
        "bound_by": stats.bound,
        "sbuf": stats.peak_sbuf_bytes,
        "blocks": analysis.plan.describe(),
    }


def _xuv_row(job) -> dict:
    key, projection, M, K, N, r, target = job
    variants = {}
    for variant in XUV_VARIANTS:
        try:
            variants[variant] = _figures(analyse_xuv(M, K, r, N, DTYPE, target, variant))
        except PlanError:
            variants[variant] = None  # does not fit the target
    return {
        "key": f"{MODELS[key][0]} {projection}",
        "projection": projection,
        "M": M,
        "K": K,
        "N": N,
        "r": r,
        "target": target,
        "variants": variants,
        "bound": capacity_bound_bytes(M, K, r, N, 2, get_target(target).sbuf_partition_bytes),
        "choice": choose_xuv(M, K, r, N, DTYPE, target).form,
    }


def _mlp_row(job) -> dict:
    key, M, H, I, r, target = job  # noqa: E741 - the intermediate size
    shape = MlpShape(H, I, H, r, r, r)
    kernels = {}
    for variant in MLP_KERNELS:
        try:
            kernels[variant] = _figures(analyse_svd_mlp(M, shape, DTYPE, target, variant=variant))
        except PlanError:
            kernels[variant] = None  # does not fit the target
    choice = choose_svd_mlp(M, shape, DTYPE, target)
    return {
        "key": f"{MODELS[key][0]} MLP",
        "projection": "mlp",
        "M": M,
        "target": target,
        "kernels": kernels,
        "split_bytes": choice.split_bytes,
        "choice": choice.form,
        "compulsory": 2 * (M * H * 2 + 3 * r * (H + I)),
    }


def _run(job):
    return _mlp_row(job[1:]) if job[0] == "mlp" else _xuv_row(job[1:])


def _mb(value) -> str:
    return f"{value / 1e6:,.1f}" if value is not None else "—"


def _assemble_mlp(row: dict, xuv: dict) -> None:
    """The MLP's dense and split figures from its projections' rows (same shapes, same run)."""
    up, down = (
        xuv[(row["key"].replace(" MLP", " up"), row["M"], row["target"])],
        xuv[(row["key"].replace(" MLP", " down"), row["M"], row["target"])],
    )
    H, I = up["K"], up["N"]  # noqa: E741 - the intermediate size
    elementwise = 2 * row["M"] * I * 3  # read both branches, write h (bf16)
    dma_rate = get_target(row["target"]).hbm_bytes_per_s
    dense_time = 2 * up["variants"]["dense"]["time"] + down["variants"]["dense"]["time"]
    split_time = 2 * up["variants"][up["choice"]]["time"] + down["variants"][down["choice"]]["time"]
    row["dense"] = {
        "hbm": 2 * up["variants"]["dense"]["hbm"] + down["variants"]["dense"]["hbm"] + elementwise,
        "time": dense_time + elementwise / dma_rate,
    }
    picks = (up["variants"][up["choice"]], up["variants"][up["choice"]], down["variants"][down["choice"]])
    engines = {e: sum(p["engines"][e] for p in picks) for e in ENGINES}  # launches one after another
    engines["dma"] += elementwise / dma_rate
    row["split"] = {
        "hbm": row["split_bytes"],
        "time": split_time + elementwise / dma_rate,
        "engines": engines,
        "bound_by": "3 launches",
    }
    row["H"], row["I"] = H, I


def _print_xuv(results: list[dict]) -> list[str]:
    misses = []
    print(
        "| shape | M | target | dense MB | unfused | fused | K-blocked | bound | fused/bound | pick | "
        "pick's engines T/V/S/DMA µs | pick vs dense (modelled) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for row in results:
        v = row["variants"]
        fused = min((v[n]["hbm"] for n in ("fused", "kblocked") if v[n]), default=None)
        ratio = fused / row["bound"]
        pick = v[row["choice"]]
        engines = "/".join(f"{pick['engines'][e] * 1e6:.0f}" for e in ENGINES)
        speedup = v["dense"]["time"] / pick["time"]
        if row["M"] >= 512 and ratio > 1.10:
            misses.append(f"{row['key']} M={row['M']} {row['target']}: fused/bound {ratio:.2f}")
        print(
            f"| {row['key']} | {row['M']} | {row['target']} | {_mb(v['dense']['hbm'])} | "
            f"{_mb(v['unfused']['hbm'])} | {_mb(v['fused'] and v['fused']['hbm'])} | "
            f"{_mb(v['kblocked'] and v['kblocked']['hbm'])} | {_mb(row['bound'])} | {ratio:.2f} | "
            f"{row['choice']} | {engines} ({pick['bound_by']}) | {speedup:.2f}× |"
        )
    return misses


def _mlp_forms(row: dict) -> dict:
    """The MLP row's figures per form the planner compares (None: does not fit)."""
    return {"split": row["split"], **row["kernels"]}


def _print_mlp(results: list[dict]) -> None:
    print(
        "| MLP | M | target | dense MB | projection by projection | fused MLP kernel | "
        "K-blocked MLP kernel | compulsory | pick | pick's engines T/V/S/DMA µs | pick vs dense (modelled) | "
        "pick vs fastest form (modelled) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for row in results:
        forms = _mlp_forms(row)
        pick = forms[row["choice"]]
        fastest = min(f["time"] for f in forms.values() if f)
        engines = "/".join(f"{pick['engines'][e] * 1e6:.0f}" for e in ENGINES)
        print(
            f"| {row['key']} | {row['M']} | {row['target']} | {_mb(row['dense']['hbm'])} | "
            f"{_mb(row['split']['hbm'])} | {_mb(forms['fused'] and forms['fused']['hbm'])} | "
            f"{_mb(forms['kblocked'] and forms['kblocked']['hbm'])} | {_mb(row['compulsory'])} | "
            f"{row['choice']} | {engines} ({pick['bound_by']}) | "
            f"{row['dense']['time'] / pick['time']:.2f}× | {pick['time'] / fastest:.2f}× |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw traffic and time (matplotlib)"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tokens = [int(t) for t in args.tokens.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]

    jobs = []
    for key in models:
        _, H, I = MODELS[key]  # noqa: E741
        r = rank_for_ratio(H, I, RATIO)
        for M in tokens:
            for target in targets:
                jobs.append(("xuv", key, "up", M, H, I, r, target))
                jobs.append(("xuv", key, "down", M, I, H, r, target))
                jobs.append(("mlp", key, M, H, I, r, target))
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][3 if jobs[i][0] == "xuv" else 2])
    started = time.perf_counter()
    results: list = [None] * len(jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for index, result in zip(order, pool.map(_run, [jobs[i] for i in order]), strict=True):
                results[index] = result
    else:
        for index in order:
            results[index] = _run(jobs[index])
    elapsed = time.perf_counter() - started
    xuv_rows = [row for row in results if row["projection"] != "mlp"]
    mlp_rows = [row for row in results if row["projection"] == "mlp"]
    by_key = {(row["key"], row["M"], row["target"]): row for row in xuv_rows}
    for row in mlp_rows:
        _assemble_mlp(row, by_key)

    print(
        f"Kernels on the NKI CPU stand-in (shape-only), {DTYPE}, ratio {RATIO}: traffic counted, "
        "times modelled."
    )
    print()
    misses = _print_xuv(xuv_rows)
    print()
    _print_mlp(mlp_rows)
    counted = [
        (figures["hbm"], figures["planned_hbm"])
        for row in xuv_rows
        for figures in row["variants"].values()
        if figures
    ] + [
        (figures["hbm"], figures["planned_hbm"])
        for row in mlp_rows
        for figures in row["kernels"].values()
        if figures
    ]
    mismatched = sum(1 for hbm, planned in counted if hbm != planned)
    never_more = all(
        row["variants"][row["choice"]]["hbm"]
        <= min(row["variants"][v]["hbm"] for v in ("fused", "kblocked", "unfused") if row["variants"][v])
        for row in xuv_rows
    ) and all(
        _mlp_forms(row)[row["choice"]]["hbm"] <= min(f["hbm"] for f in _mlp_forms(row).values() if f)
        for row in mlp_rows
    )
    print()
    print(
        f"fused traffic within 1.10x the bound for every shape with M >= 512: {'yes' if not misses else 'NO'}"
    )
    for miss in misses:
        print(f"  miss: {miss}")
    print(f"the pick never moves more than the cheaper of fused and unfused: {'yes' if never_more else 'NO'}")
    print(f"planner's traffic equals the stand-in's count in {len(counted) - mismatched}/{len(counted)} runs")
    print(f"({len(jobs)} shapes analysed in {elapsed:.0f} s with {args.jobs} worker(s))")
    if args.plot:
        from neuronmm_fx.plots import plot_traffic

        drawn = [row for row in xuv_rows] + [
            {
                **row,
                "bound": row["compulsory"],
                "reference": "compulsory",
                "variants": {
                    "dense": row["dense"],
                    "split": row["split"],
                    "fused MLP": row["kernels"]["fused"],
                    "K-blocked MLP": row["kernels"]["kblocked"],
                },
            }
            for row in mlp_rows
        ]
        plot_traffic(
            drawn, args.plot, title=f"Kernels at ratio {RATIO}, {DTYPE} (stand-in count, modelled time)"
        )
        args.plot.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
        print(f"plot written to {args.plot}")
    return 0 if not mismatched and never_more else 1


if __name__ == "__main__":
    raise SystemExit(main())

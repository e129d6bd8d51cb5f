"""HBM traffic, SBUF use and modelled time of dense X.W, unfused X.U.V and fused X.U.V.

For the up-projection shape (hidden K -> intermediate N) of three LLaMA MLPs at compression ratio
0.2 (rank = (1 - 0.2) * K * N / (K + N) floored to a multiple of 128), at several token counts M,
on trn1 (NeuronCore-v2) and trn2 (NeuronCore-v3).  Every figure is counted by running the project's
kernels on the CPU stand-in for NKI in shape-only mode (kernel code executed, hardware rules checked,
no values computed).  Times and utilisations are a roofline model -- max(TensorE cycles / clock,
HBM bytes / bandwidth) with the per-instruction cycle estimate of docs/kernels.md -- not measurements.

Run: python benchmarks/kernel_traffic.py [--models 1B,3B,8B] [--tokens 1,128,...] [--jobs 2] [--plot F.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from neuronmm_fx.kernels import analyse_xuv, rank_for_ratio  # noqa: E402

MODELS = {  # name: (hidden K, intermediate N)
    "1B": ("LLaMA-3.2-1B", 2048, 8192),
    "3B": ("LLaMA-3.2-3B", 3072, 8192),
    "8B": ("LLaMA-3.1-8B", 4096, 14336),
}
TOKENS = (1, 128, 512, 2048, 8192, 32768)
TARGETS = ("trn1", "trn2")
RATIO = 0.2
DTYPE = "bfloat16"


def _row(job):
    key, M, K, N, r, target = job
    out = {"key": key, "M": M, "target": target, "K": K, "N": N, "r": r}
    for variant in ("dense", "unfused", "fused"):
        a = analyse_xuv(M, K, r, N, DTYPE, target, variant)
        out[variant] = {
            "hbm": a.stats.hbm_bytes,
            "sbuf": a.stats.peak_sbuf_bytes,
            "psum": a.stats.peak_psum_banks,
            "time": a.stats.estimated_time_s,
            "util": a.utilisation,
            "bound": a.stats.bound,
            "blocks": a.plan.describe(),
            "planned_hbm": a.plan.hbm_bytes,
        }
        out["compulsory"] = a.compulsory_bytes
    return out


def _fmt_mb(b: float) -> str:
    return f"{b / 1e6:9.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--plot", metavar="FILE.png", help="also draw traffic against tokens (matplotlib)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tokens = [int(t) for t in args.tokens.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]

    jobs = []
    for key in models:
        _, K, N = MODELS[key]
        r = rank_for_ratio(K, N, RATIO)
        for M in tokens:
            for tgt in targets:
                jobs.append((key, M, K, N, r, tgt))
    # largest first so the two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1] * jobs[i][2] * jobs[i][3])
    t0 = time.perf_counter()
    results = [None] * len(jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            for i, res in zip(order, ex.map(_row, [jobs[i] for i in order]), strict=True):
                results[i] = res
    else:
        for i in order:
            results[i] = _row(jobs[i])
    elapsed = time.perf_counter() - t0

    print("Kernel HBM traffic on the NKI CPU stand-in (shape-only mode), bfloat16, ratio 0.2.")
    print("Traffic and SBUF are counted from the kernels' instructions; time and TensorE utilisation")
    print("are a roofline MODEL (TensorE cycles from the per-instruction estimate vs HBM bandwidth),")
    print("not measurements.  min = compulsory traffic of X.U.V: X, U, V read once, Y written once.")
    print("SBUF = peak KiB per partition (d/u/f = dense / unfused / fused).")
    hdr = (
        f"{'model':<13}{'M':>6} {'tgt':<5}|{'dense MB':>9}{'unfused':>9}{'fused':>9}{'min':>9}"
        f"{'f/min':>6} |{'SBUF d/u/f KiB':>17} | {'fused blocks':<24}| {'est. time us d/u/f':>26} | "
        f"{'TensorE util d/u/f':>18}"
    )
    last_model = None
    for res in results:
        name = MODELS[res["key"]][0]
        if name != last_model:
            print()
            _, K, N = MODELS[res["key"]]
            print(
                f"{name}: up_proj K={K} -> N={N}, rank r={res['r']} (dense W {K * N / 1e6:.1f} M params, "
                f"U+V {res['r'] * (K + N) / 1e6:.1f} M)"
            )
            print(hdr)
            print("-" * len(hdr))
            last_model = name
        d, u, f = res["dense"], res["unfused"], res["fused"]
        comp = res["compulsory"]
        times = "/".join(f"{x['time'] * 1e6:.1f}" for x in (d, u, f))
        utils = "/".join(f"{x['util'] * 100:.0f}%" for x in (d, u, f))
        sb = "/".join(f"{x['sbuf'] / 1024:.0f}" for x in (d, u, f))
        print(
            f"{name:<13}{res['M']:>6} {res['target']:<5}|{_fmt_mb(d['hbm'])}{_fmt_mb(u['hbm'])}"
            f"{_fmt_mb(f['hbm'])}{_fmt_mb(comp)}{f['hbm'] / comp:6.2f} |{sb:>17} | {f['blocks']:<24}| "
            f"{times:>26} | {utils:>18}"
        )
    mism = [r for r in results for v in ("dense", "unfused", "fused") if r[v]["hbm"] != r[v]["planned_hbm"]]
    ratios = [r["fused"]["hbm"] / r["compulsory"] for r in results]
    print()
    print(
        f"fused / compulsory traffic: min {min(ratios):.3f}, max {max(ratios):.3f}; exactly 1.000 "
        f"whenever one token block holds all M tokens and U fits one X sub-block."
    )
    print(
        f"planner's traffic prediction {'matches' if not mism else 'DIFFERS from'} the stand-in's count "
        f"in {len(results) * 3 - len(mism)}/{len(results) * 3} runs."
    )
    print(f"({len(jobs)} shapes x 3 kernels analysed in {elapsed:.1f} s with {args.jobs} worker(s))")
    if args.plot:
        from neuronmm_fx.plots import plot_traffic

        named = [{**res, "key": MODELS[res["key"]][0]} for res in results]
        plot_traffic(named, args.plot, title="HBM traffic of X·U·V kernels, bf16, ratio 0.2 (stand-in count)")
        print(f"plot written to {args.plot}")
    return 0 if not mism else 1


if __name__ == "__main__":
    raise SystemExit(main())

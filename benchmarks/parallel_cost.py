"""Modelled cost of tensor-parallel compressed MLPs: LLaMA-3.2-1B / 3.2-3B / 3.1-8B at TP 2, 4, 8.

Per rank and per MLP call, for each scheme of :mod:`neuronmm_fx.parallel.cost` (dense TP, naive factor
sharding, replicated first factors + r-reduced down, r-sharded first factors + r-reduced down):
multiply-accumulates per token, weight bytes (bf16), collective bytes per token, and modelled time
of one decode step (1 token), of a 2,048-token prefill, and of a request (prefill + 256 decode
steps), with the scheme ``neuronmm_fx.parallel.shard(scheme="auto")`` picks.  Every time is
modelled (constants in docs/parallel.md), none is measured.

    python benchmarks/parallel_cost.py [--ratios 0.2 0.5] [--machine trn2] [--plot docs/img/parallel_cost.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronmm_fx.parallel.cost import MACHINES, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--tps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--machine", choices=list(MACHINES), default="trn2")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the modelled times")
    args = parser.parse_args(argv)
    rows = table(tuple(args.ratios), tuple(args.tps), MACHINES[args.machine])
    print(f"modelled on {args.machine}, per rank and per MLP call (bf16)")
    print(
        "| model | ratio | TP | scheme | MACs/token/rank | weights/rank (MB) | collective B/token | "
        "decode (µs) | prefill 2K (ms) | request (ms) | picked |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['ratio']} | {row['tp']} | {row['scheme']} | "
            f"{row['macs_per_token'] / 1e6:.1f} M | {row['weight_bytes'] / 1e6:.1f} | "
            f"{row['collective_bytes_per_token']:,} | {row['decode_us']:.1f} | {row['prefill_ms']:.3f} | "
            f"{row['request_ms']:.2f} | {'**yes**' if row['picked'] else ''} |"
        )
    print(
        "\nper request (2,048-token prompt + 256 decode steps), modelled ms per MLP; "
        "picked = shard(scheme='auto')"
    )
    schemes = list(dict.fromkeys(row["scheme"] for row in rows))
    print("| model | ratio | TP | " + " | ".join(schemes) + " | picked | picked vs dense TP |")
    print("|---|---|---|" + "---:|" * len(schemes) + "---|---:|")
    for key in dict.fromkeys((row["model"], row["ratio"], row["tp"]) for row in rows):
        group = {row["scheme"]: row for row in rows if (row["model"], row["ratio"], row["tp"]) == key}
        picked = next(row for row in group.values() if row["picked"])
        times = " | ".join(f"{group[scheme]['request_ms']:.2f}" for scheme in schemes)
        speedup = group["dense"]["request_ms"] / picked["request_ms"]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {times} | {picked['scheme']} | {speedup:.2f}× |")
    if args.plot:
        from neuronmm_fx.plots import plot_parallel

        plot_parallel(rows, args.plot, title=f"Tensor-parallel MLP, modelled on {args.machine}")
        args.plot.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of ``optimize()`` over the loaded model, and how it grows with depth.

Each configuration runs in a fresh process: load the model, reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``), run the default ``optimize(model, ratio=0.2)``, read the peak (``VmHWM``).
The overhead is that peak minus the RSS before the call.  Part of it is the result itself: the
factors exist beside the dense weights until the rewrite is committed (then the dense MLP weights
are freed).  The rest is the working set, which should grow with one layer, not with depth.

Rows: the bundled SmolLM2-135M (30 layers), and random LLaMA models of SmolLM2's shape at 2× and
4× its depth (60 and 120 layers).  Linux only.

    python benchmarks/compression_memory.py               # all rows (about 10 minutes on 2 cores)
    python benchmarks/compression_memory.py --rows smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure(row: str, calibration_tokens: int) -> dict:
    import torch

    import neuronmm_fx

    torch.manual_seed(0)
    if row == "smollm2":
        from neuronmm_fx.models import load_smollm2

        model, _ = load_smollm2()
    else:
        import transformers as T

        layers = {"llama-2x": 60, "llama-4x": 120}[row]
        config = T.LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=layers,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            bos_token_id=1,
        )
        model = T.LlamaForCausalLM(config).eval()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    started = time.perf_counter()
    optimized = neuronmm_fx.optimize(model, ratio=0.2, calibration_tokens=calibration_tokens)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    report = neuronmm_fx.report_of(optimized)
    factor_bytes = sum(m.params_after * 4 for s in report.sites for m in s.matrices if m.rank is not None)
    return {
        "row": row,
        "layers": len(report.sites),
        "parameter_mib": parameter_bytes / MIB,
        "overhead_mib": (peak - before) / MIB,
        "factors_mib": factor_bytes / MIB,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rows = ("smollm2", "llama-2x", "llama-4x")
    parser.add_argument("--rows", nargs="+", choices=rows, default=list(rows))
    parser.add_argument(
        "--calibration-tokens", type=int, default=8192, help="as optimize()'s default (%(default)s)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.calibration_tokens)))
        return
    results = []
    for row in args.rows:
        command = [
            sys.executable,
            __file__,
            "--child",
            row,
            "--calibration-tokens",
            str(args.calibration_tokens),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {row}: {results[-1]}", flush=True)
    print()
    print(f"optimize(model, ratio=0.2), {args.calibration_tokens} self-generated calibration tokens")
    print(
        "| model | layers | parameters MiB | peak overhead MiB | × parameters | of which factors MiB "
        "| working set MiB | time s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        working = r["overhead_mib"] - r["factors_mib"]
        print(
            f"| {r['row']} | {r['layers']} | {r['parameter_mib']:.0f} | {r['overhead_mib']:.0f} "
            f"| {r['overhead_mib'] / r['parameter_mib']:.2f} | {r['factors_mib']:.0f} | {working:.0f} "
            f"| {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()

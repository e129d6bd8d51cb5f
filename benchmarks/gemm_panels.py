"""One ``mm`` against the column-panel form, for every product by a factor a compressed SmolLM2 MLP has.

The compile backend writes each product ``left (tokens, K) · w (K, N)`` of the ``neuronmm`` ops as a
batched GEMM over ``panels`` column panels of ``w`` (one per thread) when each panel keeps at least
128 columns (:class:`neuronmm_fx.passes.lower.PanelMatmul`, option ``gemm_panels``).  This table is
the evidence for that rule: per shape class, the rate of each form compiled by Inductor with a SiLU
after it (as the ops' products are followed by an activation, a product or a residual add, into
which Inductor folds the panels' re-layout), at one decoded token, a 64-token and a 256-token
prompt, and which form the rule picks.  The last lines give the worst case of the picked form
against one ``mm``, and the best case of the panel form where the rule declines it.

Shapes (SmolLM2-135M: hidden 576, intermediate 1536; ranks are multiples of 128 below break-even):

* first factors ``x·U``: 576 → r, and the joint ``x·[U_gate | U_up]``: 576 → r_gate + r_up;
* gate and up second factors: r → 1536; down's first factor 1536 → r and second r → 576;
* projections the allocator left dense inside the op: 576 → 1536 and 1536 → 576.

    python benchmarks/gemm_panels.py [--threads N] [--tokens 1 64 256]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuronmm_fx.passes.lower import PanelMatmul, float32_matmul, panel_matmul  # noqa: E402

HIDDEN, INTERMEDIATE = 576, 1536
RANKS = (128, 256, 384)


def shape_classes() -> list[tuple[str, int, int]]:
    """``(name, K, N)`` of every product by a factor in a compressed SmolLM2 MLP."""
    shapes = [(f"x·U, r={r}", HIDDEN, r) for r in RANKS]
    shapes += [(f"x·[Ug|Uu], r+r'={w}", HIDDEN, w) for w in (512, 640, 768)]
    shapes += [(f"h·V gate/up, r={r}", r, INTERMEDIATE) for r in RANKS]
    shapes += [(f"h·U down, r={r}", INTERMEDIATE, r) for r in RANKS]
    shapes += [(f"h·V down, r={r}", r, HIDDEN) for r in RANKS]
    return shapes + [("dense gate/up", HIDDEN, INTERMEDIATE), ("dense down", INTERMEDIATE, HIDDEN)]


def compiled(matmul):
    """``silu(matmul(left, weight))`` compiled by Inductor for static shapes (one graph per shape)."""

    def product(left: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(matmul(left, weight))

    return torch.compile(product, dynamic=False)


def best_seconds(functions: list, calls: int, *args, rounds: int = 7) -> list[float]:
    """Per call, the best of ``rounds`` timings of ``calls`` calls of each of ``functions`` on
    ``args``, the functions timed alternately within each round so that drift hits all alike."""
    for function in functions:
        for _ in range(10):
            function(*args)
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                function(*args)
            best[index] = min(best[index], (time.perf_counter() - start) / calls)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256])
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 1024  # one graph per shape and form
    if args.threads:
        torch.set_num_threads(args.threads)
    panels = torch.get_num_threads()
    rule = PanelMatmul(panels)
    print(f"{panels} threads, so {panels} panels; GFLOP/s, best of 7 alternate timings, compiled, SiLU after")
    print("\n| product | K → N | tokens | one mm | panels | panels / mm | rule picks |")
    print("|---|---|---|---|---|---|---|")
    picked, declined = [], []
    generator = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        for name, inner, width in shape_classes():
            left = torch.randn(tokens, inner, generator=generator)
            weight = torch.randn(inner, width, generator=generator)
            flop = 2 * tokens * inner * width
            calls = max(50, int(4e9 / flop))  # about 0.05 s a timing at 100 GFLOP/s
            forms = [compiled(float32_matmul), compiled(functools.partial(panel_matmul, panels=panels))]
            one_mm, paneled = (flop / seconds / 1e9 for seconds in best_seconds(forms, calls, left, weight))
            takes_panels = rule.whole_reason(width) is None
            (picked if takes_panels else declined).append((paneled / one_mm, name, tokens))
            print(
                f"| {name} | {inner} → {width} | {tokens} | {one_mm:.1f} | {paneled:.1f} "
                f"| {paneled / one_mm:.2f} | {'panels' if takes_panels else 'mm'} |"
            )
    if picked:
        worst = min(picked)
        print(f"\nworst picked panel form: {worst[0]:.2f}× one mm's rate ({worst[1]}, {worst[2]} tokens)")
    if declined:
        best = max(declined)
        print(f"best declined panel form: {best[0]:.2f}× one mm's rate ({best[1]}, {best[2]} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

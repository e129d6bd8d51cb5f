"""Compression quality of SmolLM2-135M: perplexity, fidelity, parameters and time per method.

Rows: dense; then at each ratio plain SVD (uniform ranks), whitened (uniform), whitened with global
allocation at the parameter count the uniform rule reached, whitened with global allocation at the
ratio, and whitened + global + recovery fine-tuning.  Every row is scored on the same slice of
the WikiText-2 *test* text; calibration and fine-tuning use the *validation* text only.

    python benchmarks/compression_quality.py                # full table (about 30 min on 2 cores)
    python benchmarks/compression_quality.py --ratios 0.2 --eval-tokens 8192

Times are wall-clock seconds on this machine, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import neuronmm_fx
from neuronmm_fx.calibration import split_tokens
from neuronmm_fx.evaluate import quality, reference_log_probs
from neuronmm_fx.finetune import FinetuneConfig, finetune
from neuronmm_fx.models import load_smollm2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with valid.txt and test.txt")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--finetune-lr", type=float, default=1e-5)
    rows = ("svd", "uniform", "global", "finetuned")
    parser.add_argument("--rows", nargs="+", choices=rows, default=list(rows), help="which rows to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    dense, tokenizer = load_smollm2()
    test_ids = tokenizer(args.data.joinpath("test.txt").read_text(), return_tensors="pt").input_ids[0]
    test_ids = test_ids[: args.eval_tokens]
    valid_ids = tokenizer(
        args.data.joinpath("valid.txt").read_text()[:2_000_000], return_tensors="pt"
    ).input_ids[0]
    calibration = split_tokens(valid_ids, args.calibration_seq_len, args.calibration_tokens)
    mlp_params = sum(p.numel() for layer in dense.model.layers for p in layer.mlp.parameters())
    total_params = sum(p.numel() for p in dense.parameters())

    rows = []
    dense_log_probs = reference_log_probs(dense, test_ids, seq_len=args.seq_len)  # the dense model runs once

    def score(name, model, ratio="-", timings=None):
        started = time.perf_counter()
        ppl, fid = quality(model, dense_log_probs, test_ids, seq_len=args.seq_len)
        kept_mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
        rows.append(
            dict(
                name=name,
                ratio=ratio,
                ppl=ppl.perplexity,
                tokens=ppl.tokens,
                kl=fid.kl,
                top1=fid.top1_agreement,
                mlp_kept=kept_mlp / mlp_params,
                model_kept=sum(p.numel() for p in model.parameters()) / total_params,
                **(timings or {}),
            )
        )
        print(
            f"  scored {name} at ratio {ratio} in {time.perf_counter() - started:.0f} s: "
            f"ppl {ppl.perplexity:.2f}",
            flush=True,
        )
        return rows[-1]

    def run(name, ratio, tune=False, **options):
        model = neuronmm_fx.optimize(
            copy.deepcopy(dense),
            ratio=ratio,
            block=args.block,
            calibration=calibration,
            calibration_tokens=args.calibration_tokens,
            **options,
        )
        timings = {
            k: v
            for k, v in neuronmm_fx.report_of(model).timings.items()
            if k in ("calibration_s", "factorization_s")
        }
        if tune:
            result = finetune(
                model,
                dense,
                calibration,
                FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, progress=False),
            )
            timings["finetune_s"] = result.seconds
            print(f"  fine-tune KL {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.steps} steps")
        return score(name, model, ratio, timings)

    score("dense", dense)
    wanted = set(args.rows)
    for ratio in args.ratios:
        if "svd" in wanted:
            run("plain SVD, uniform", ratio, method="svd", allocation="uniform")
        if "uniform" in wanted:
            uniform = run("whitened, uniform", ratio, method="whiten", allocation="uniform")
            # uniform ranks overshoot the ratio on 576×1536 matrices: compare global at the same size too
            same_size = round(1.0 - uniform["mlp_kept"], 9)
            run("whitened, global, uniform's size", same_size, method="whiten", allocation="global")
        if "global" in wanted:
            run("whitened, global", ratio, method="whiten", allocation="global")
        if "finetuned" in wanted:
            run("whitened, global, fine-tuned", ratio, method="whiten", allocation="global", tune=True)

    print()
    print(
        f"SmolLM2-135M, WikiText-2 test, {rows[0]['tokens']} scored tokens (windows of {args.seq_len}), "
        f"block {args.block}, calibration {args.calibration_tokens} validation tokens"
    )
    header = (
        f"| {'method':<30} | ratio | MLP params kept | model params kept | perplexity | × dense | "
        f"KL (nats) | top-1 agree | calib s | factor s | finetune s |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    dense_ppl = rows[0]["ppl"]
    for r in rows:
        print(
            f"| {r['name']:<30} | {r['ratio']!s:>5} | {100 * r['mlp_kept']:>14.1f}% "
            f"| {100 * r['model_kept']:>16.1f}% | {r['ppl']:>10.2f} | {r['ppl'] / dense_ppl:>7.2f} "
            f"| {r['kl']:>9.4f} | {100 * r['top1']:>10.1f}% "
            f"| {r.get('calibration_s', 0):>7.1f} | {r.get('factorization_s', 0):>8.1f} "
            f"| {r.get('finetune_s', 0):>10.1f} |"
        )


if __name__ == "__main__":
    main()

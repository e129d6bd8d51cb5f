"""Compression quality of SmolLM2-135M: perplexity, fidelity, parameters and time per method.

Rows, at each ratio (the MLP parameters removed):

* ``default``: the one-line call ``optimize(model, ratio)`` with no calibration argument (the model
  writes its own calibration text; global allocation by measured sensitivity; sequential).
* ``default + WikiText``: the same with WikiText-2 *validation* tokens as calibration.
* each technique alone, on WikiText calibration: ``plain SVD, uniform`` and ``whitened, uniform``
  (SVD-LLM with the paper's rank rule, the previous baselines), ``+ global allocation``,
  ``+ sequential``;
* ``default + WikiText + fine-tuning``: recovery fine-tuning with the default schedule.

Every row is scored on the first ``--eval-tokens`` tokens of the WikiText-2 *test* text and on the
Python Language Reference excerpt that ships with the package (another domain); calibration and
fine-tuning never see either.  Times are wall-clock seconds on this machine, in the same run.

    python benchmarks/compression_quality.py                       # the whole table (~35 min, 2 cores)
    python benchmarks/compression_quality.py --ratios 0.2 --rows default default+wikitext
    python benchmarks/compression_quality.py --ratios 0.1 0.2 0.3 --rows default plain-svd --plot q.png
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import neuronmm_fx
from neuronmm_fx.compress.calibration import split_tokens
from neuronmm_fx.compress.finetune import FinetuneConfig
from neuronmm_fx.evaluate import quality, reference_log_probs
from neuronmm_fx.models import demo_text, load_smollm2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"

ROWS = {  # name: (calibration, optimize() options, fine-tune)
    "default": (None, {}, False),
    "default+wikitext": ("wikitext", {}, False),
    "plain-svd": (None, {"method": "svd", "allocation": "uniform"}, False),
    "whitened-uniform": ("wikitext", {"allocation": "uniform", "sequential": False}, False),
    "+global": ("wikitext", {"sequential": False}, False),
    "+sequential": ("wikitext", {"allocation": "uniform"}, False),
    "default+wikitext+finetune": ("wikitext", {}, True),
}
LABELS = {
    "default": "default call, no calibration argument",
    "default+wikitext": "default call, WikiText calibration",
    "plain-svd": "plain SVD, uniform (before)",
    "whitened-uniform": "whitened, uniform, independent (before)",
    "+global": "whitened + global (Fisher), independent",
    "+sequential": "whitened + sequential, uniform",
    "default+wikitext+finetune": "default, WikiText, + fine-tuning",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with valid.txt and test.txt")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--calibration-tokens", type=int, default=neuronmm_fx.OptimizeConfig.calibration_tokens
    )
    parser.add_argument("--finetune-steps", type=int, default=FinetuneConfig.steps)
    parser.add_argument("--plot", metavar="FILE.png", help="also draw perplexity against ratio per method")
    args = parser.parse_args()
    torch.manual_seed(0)

    dense, tokenizer = load_smollm2()
    texts = {
        "wikitext": tokenizer(
            args.data.joinpath("test.txt").read_text()[:400_000], return_tensors="pt"
        ).input_ids[0],
        "python": tokenizer(demo_text()[0], return_tensors="pt").input_ids[0],
    }
    texts = {name: ids[: args.eval_tokens] for name, ids in texts.items()}
    valid = tokenizer(args.data.joinpath("valid.txt").read_text()[:600_000], return_tensors="pt").input_ids[0]
    wikitext = split_tokens(valid, 512, args.calibration_tokens)
    mlp_params = sum(p.numel() for layer in dense.model.layers for p in layer.mlp.parameters())
    references = {name: reference_log_probs(dense, ids, seq_len=args.seq_len) for name, ids in texts.items()}

    rows = []

    def score(name: str, model, ratio="-", timings=None) -> None:
        row = {"name": name, "ratio": ratio, **(timings or {})}
        for text, ids in texts.items():
            ppl, fid = quality(model, references[text], ids, seq_len=args.seq_len)
            row[text] = (ppl.perplexity, fid.kl, fid.top1_agreement, ppl.tokens)
        row["mlp_kept"] = (
            sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters()) / mlp_params
        )
        rows.append(row)
        print(
            f"  {name} at ratio {ratio}: wikitext ppl {row['wikitext'][0]:.2f}, "
            f"python ppl {row['python'][0]:.2f}",
            flush=True,
        )

    score("dense", dense)
    for ratio in args.ratios:
        for key in args.rows:
            calibration, options, tune = ROWS[key]
            finetune = FinetuneConfig(steps=args.finetune_steps, progress=False) if tune else None
            started = time.perf_counter()
            model = neuronmm_fx.optimize(
                copy.deepcopy(dense),
                ratio=ratio,
                calibration=wikitext if calibration == "wikitext" else None,
                calibration_tokens=args.calibration_tokens,
                finetune=finetune,
                **options,
            )
            report = neuronmm_fx.report_of(model)
            timings = {k: v for k, v in report.timings.items() if k != "capture_and_match_s"}
            timings["total_s"] = time.perf_counter() - started
            if tune:
                print(
                    f"    fine-tune: {report.finetune['steps']} steps, "
                    f"held-out KL {report.finetune['held_out']}"
                )
            score(LABELS[key], model, ratio, timings)
            del model

    dense_ppl = {text: rows[0][text][0] for text in texts}
    print()
    print(
        f"SmolLM2-135M; WikiText-2 test ({rows[0]['wikitext'][3]} scored tokens) and the shipped Python "
        "reference "
        f"excerpt ({rows[0]['python'][3]} scored tokens), windows of {args.seq_len}; calibration "
        f"{args.calibration_tokens} tokens (self-generated, or WikiText-2 validation)"
    )
    print(
        "| method | ratio | MLP params kept | WikiText ppl | × dense | KL | top-1 | Python ppl | × dense "
        "| KL "
        "| calib s | sensitivity s | factor s | finetune s | total s |"
    )
    print("|" + "---|" * 15)
    for r in rows:
        wiki, py = r["wikitext"], r["python"]
        print(
            f"| {r['name']} | {r['ratio']} | {100 * r['mlp_kept']:.1f}% | {wiki[0]:.2f} | "
            f"{wiki[0] / dense_ppl['wikitext']:.2f} | {wiki[1]:.3f} | {100 * wiki[2]:.1f}% | {py[0]:.2f} | "
            f"{py[0] / dense_ppl['python']:.2f} | {py[1]:.3f} | {r.get('calibration_s', 0):.1f} | "
            f"{r.get('sensitivity_s', 0):.1f} | {r.get('factorization_s', 0):.1f} | "
            f"{r.get('finetune_s', 0):.1f} | {r.get('total_s', 0):.1f} |"
        )
    if args.plot:
        import json

        from neuronmm_fx.plots import plot_quality

        # the rows beside the chart, to redraw it without a rerun
        Path(args.plot).with_suffix(".json").write_text(json.dumps(rows, indent=1))

        plot_quality(
            rows,
            args.plot,
            title=f"SmolLM2-135M: perplexity against MLP parameters removed ({args.eval_tokens} tokens)",
        )
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()

"""Command line: ``neuronmm-fx demo`` (the bundled SmolLM2-135M end to end) and ``neuronmm-fx optimize``.

Exit codes: 0 success, 1 a refused model or input (the message says why), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import neuronmm_fx
from neuronmm_fx.errors import NeuronMMError


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ratio", type=float, default=0.2, help="fraction of each matrix's parameters removed"
    )
    parser.add_argument("--block", type=int, default=128, help="rank alignment (128 = Trainium partitions)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only sites matching")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip sites matching")
    parser.add_argument("--dump-dir", type=Path, help="write every site's graphs before/after each pass here")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronmm-fx",
        description="Compress LLM MLPs with block-aligned SVD and fuse them into NeuronMM custom ops.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {neuronmm_fx.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="optimize the bundled SmolLM2-135M and generate text before/after"
    )
    _common_options(demo)
    demo.add_argument("--prompt", default="The capital of France is", help="prompt for the generation check")
    demo.add_argument("--max-new-tokens", type=int, default=16)

    optimize = commands.add_parser(
        "optimize", help="optimize a local Hugging Face causal LM and print the report"
    )
    optimize.add_argument(
        "model", type=Path, help="folder of a saved model (config.json + weights) or a .gguf file"
    )
    _common_options(optimize)
    return parser


def _load_local(path: Path):
    from transformers import AutoModelForCausalLM

    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _optimize(model, args) -> torch.nn.Module:
    start = time.perf_counter()
    optimized = neuronmm_fx.optimize(
        model,
        ratio=args.ratio,
        block=args.block,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        dump_dir=args.dump_dir,
        progress=not args.quiet,
    )
    report = neuronmm_fx.report_of(optimized)
    print(report)
    print(f"optimize() took {time.perf_counter() - start:.1f} s")
    if args.report_json:
        args.report_json.write_text(json.dumps(report.to_dict(), indent=2))
    if args.dump_dir:
        print(f"graph dumps written to {args.dump_dir}")
    return optimized


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def run_demo(args) -> None:
    from neuronmm_fx.models import load_smollm2

    print("loading the bundled SmolLM2-135M-Instruct (4-bit GGUF, dequantized to float32)...", flush=True)
    model, tokenizer = load_smollm2()
    before = _generate(model, tokenizer, args.prompt, args.max_new_tokens)
    optimized = _optimize(model, args)
    after = _generate(optimized, tokenizer, args.prompt, args.max_new_tokens)
    print(f"\nprompt: {args.prompt!r}\n  dense:      {before!r}\n  compressed: {after!r}")
    print("(plain truncated SVD: output quality at this ratio needs calibrated whitening, see the README)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        neuronmm_fx.OptimizeConfig(ratio=args.ratio, block=args.block)  # refuse bad options before loading
        if args.command == "demo":
            run_demo(args)
        else:
            _optimize(_load_local(args.model), args)
    except (NeuronMMError, FileNotFoundError) as error:
        print(f"neuronmm-fx: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``neuronmm-fx demo`` (the bundled SmolLM2-135M end to end) and ``neuronmm-fx optimize``.

Exit codes: 0 success, 1 a refused model or input (the message says why), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import neuronmm_fx
from neuronmm_fx.config import ALLOCATIONS, METHODS, OptimizeConfig
from neuronmm_fx.errors import ConfigError, NeuronMMError, UnsupportedModelError

DEFAULTS = OptimizeConfig()  # the command line's defaults are the library's


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ratio", type=float, default=DEFAULTS.ratio, help="fraction of the MLP parameters removed"
    )
    parser.add_argument(
        "--block", type=int, default=DEFAULTS.block, help="rank alignment (128 = Trainium partitions)"
    )
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only sites matching")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip sites matching")
    parser.add_argument(
        "--method", choices=METHODS, default=DEFAULTS.method, help="factorization (default: %(default)s)"
    )
    parser.add_argument(
        "--allocation", choices=ALLOCATIONS, default=DEFAULTS.allocation, help="rank allocation rule"
    )
    parser.add_argument(
        "--no-sequential", dest="sequential", action="store_false", help="whiten every layer on dense inputs"
    )
    parser.add_argument("--calibration-text", type=Path, metavar="FILE", help="calibrate on this text file")
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=DEFAULTS.calibration_tokens,
        help="at most this many tokens (default: %(default)s)",
    )
    parser.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tuning steps (0: none)")
    parser.add_argument(
        "--save", type=Path, metavar="DIR", help="save the compressed model (safetensors + recipe)"
    )
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
    demo.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="tokens of the shipped text to score (default: %(default)s)",
    )

    optimize = commands.add_parser(
        "optimize", help="optimize a local Hugging Face causal LM and print the report"
    )
    optimize.add_argument(
        "model", type=Path, help="folder of a saved model (config.json + weights) or a .gguf file"
    )
    _common_options(optimize)
    return parser


def _load_local(path: Path):
    """``(model, tokenizer or None)`` from a saved Hugging Face folder or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    except Exception as error:  # transformers raises many kinds; the user gets one line that says which
        first = str(error).splitlines()[0] if str(error) else ""
        raise UnsupportedModelError(
            f"could not load a causal LM from {path} ({type(error).__name__}: {first})"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _optimize(model, args, tokenizer=None) -> torch.nn.Module:
    start = time.perf_counter()
    calibration = None
    if args.calibration_text is not None:
        if tokenizer is None:
            raise ConfigError("--calibration-text needs the model's tokenizer next to the model")
        calibration = [args.calibration_text.read_text()]
    finetune = (
        neuronmm_fx.FinetuneConfig(steps=args.finetune_steps, progress=not args.quiet)
        if args.finetune_steps
        else None
    )
    optimized = neuronmm_fx.optimize(
        model, _config(args), calibration=calibration, tokenizer=tokenizer, finetune=finetune
    )
    report = neuronmm_fx.report_of(optimized)
    print(report)
    print(f"optimize() took {time.perf_counter() - start:.1f} s")
    if args.report_json:
        args.report_json.write_text(json.dumps(report.to_dict(), indent=2))
    if args.dump_dir:
        print(f"graph dumps written to {args.dump_dir}")
    if args.save:
        # the command line loads Hugging Face models: config and tokenizer go along, so that the
        # folder stands alone
        neuronmm_fx.save_compressed(optimized, args.save, tokenizer=tokenizer)
        print(f"compressed model saved to {args.save} (load it with neuronmm_fx.from_pretrained)")
    return optimized


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def run_demo(args) -> None:
    from neuronmm_fx.evaluate import quality
    from neuronmm_fx.models import demo_text, load_smollm2

    started = time.perf_counter()
    print("loading the bundled SmolLM2-135M-Instruct (4-bit GGUF, dequantized to float32)...", flush=True)
    model, tokenizer = load_smollm2()
    loaded = time.perf_counter() - started
    text, source = demo_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    dense = copy.deepcopy(model)  # the reference the compressed model is compared with
    before = _generate(model, tokenizer, args.prompt, args.max_new_tokens)
    optimized = _optimize(model, args, tokenizer)
    after = _generate(optimized, tokenizer, args.prompt, args.max_new_tokens)
    evaluation_started = time.perf_counter()
    dense_ppl, _ = quality(dense, dense, ids)
    ppl, fid = quality(optimized, dense, ids)
    evaluated = time.perf_counter() - evaluation_started
    report = neuronmm_fx.report_of(optimized)
    # every matched MLP counts, including those the allocation left wholly dense (reported as skipped)
    removed = report.params_removed
    total = sum(p.numel() for name, p in dense.named_parameters() if ".mlp." in name)
    print(f"\nevaluation text: {source}, {ppl.tokens} scored tokens")
    print(
        f"  perplexity: dense {dense_ppl.perplexity:.2f}, compressed {ppl.perplexity:.2f} "
        f"({ppl.perplexity / dense_ppl.perplexity:.2f}× dense)"
    )
    print(
        f"  mean KL(dense ‖ compressed) {fid.kl:.3f} nats/token, "
        f"top-1 agreement {100 * fid.top1_agreement:.1f} %"
    )
    print(f"  parameters removed: {removed:,} of the MLPs' {total:,} ({100 * removed / total:.1f} %)")
    print(
        f"  time: load {loaded:.1f} s, "
        + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in report.timings.items())
        + f", evaluation {evaluated:.1f} s"
    )
    print(f"\nprompt: {args.prompt!r}\n  dense:      {before!r}\n  compressed: {after!r}")
    if args.method == "svd":
        print("(plain truncated SVD ruins small models; the default method whitens, see the README)")


def _config(args) -> neuronmm_fx.OptimizeConfig:
    """The options as the ``OptimizeConfig`` ``optimize()`` runs with (validated: ``ConfigError``)."""
    return neuronmm_fx.OptimizeConfig(
        ratio=args.ratio,
        block=args.block,
        method=args.method,
        allocation=args.allocation,
        sequential=args.sequential,
        calibration_tokens=args.calibration_tokens,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        dump_dir=args.dump_dir,
        progress=not args.quiet,
    )


def _check_args(args) -> None:
    """Refuse bad options and unusable paths before anything is loaded (``ConfigError``)."""
    _config(args)
    if args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be 0 or more, got {args.finetune_steps}")
    if args.calibration_text is not None and not args.calibration_text.is_file():
        raise ConfigError(f"--calibration-text {args.calibration_text} is not a file")
    if args.save is not None and (
        (args.save.exists() and not args.save.is_dir()) or (args.save.is_dir() and any(args.save.iterdir()))
    ):
        raise ConfigError(f"--save {args.save} exists and is not an empty folder; choose another path")
    if args.report_json is not None and args.report_json.is_dir():
        raise ConfigError(f"--report-json {args.report_json} is a folder")
    model = getattr(args, "model", None)
    if model is not None:
        if not model.exists():
            raise ConfigError(f"no model at {model}")
        if model.is_dir() and not (model / "config.json").is_file():
            raise ConfigError(f"{model} has no config.json: not a saved Hugging Face model folder")
        if model.is_file() and model.suffix != ".gguf":
            raise ConfigError(f"{model} is a file but not a .gguf model")
        if model.is_file() and model.read_bytes()[:4] != b"GGUF":
            raise ConfigError(f"{model} is not a GGUF file (it does not start with the GGUF magic)")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the work failed (one ``neuronmm-fx: error:`` line), 2 bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)  # bad options are refused before spending time on loading
    except NeuronMMError as error:
        parser.error(str(error))
    try:
        if args.command == "demo":
            run_demo(args)
        else:
            model, tokenizer = _load_local(args.model)
            _optimize(model, args, tokenizer)
    except (NeuronMMError, OSError) as error:
        print(f"neuronmm-fx: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

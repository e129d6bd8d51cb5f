"""Command line ``neuronmm-fx``.

* ``demo``: the bundled SmolLM2-135M end to end.
* ``compress MODEL`` (alias ``optimize``): compress a model, print the report, ``--save DIR``.
* ``inspect DIR|MODEL``: the report a compressed checkpoint was saved with, or for a dense model the
  sites ``optimize`` would rewrite (:func:`neuronmm_fx.survey`); ``--json``, ``--plot``.
* ``eval MODEL --text FILE [--against DENSE] [--tasks NAMES]``: perplexity, and KL / top-1
  agreement against a dense model; lm-eval tasks through :mod:`neuronmm_fx.harness` (``--json``).
* ``bench MODEL [--against DENSE]``: prefill and decode latency, eager and compiled, medians over
  alternating rounds with their spread (``--json``; :mod:`neuronmm_fx.bench`).

``MODEL`` is a saved Hugging Face folder, a ``.gguf`` file, a compressed checkpoint folder
(``inspect``, ``eval``, ``bench``) or ``smollm2`` for the bundled model.  Exit codes: 0 success, 1 a
refused model or input (one ``neuronmm-fx: error:`` line says why), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

import neuronmm_fx
from neuronmm_fx.checkpoint import RECIPE_FILE, read_report
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

    compress = commands.add_parser(
        "compress", aliases=["optimize"], help="compress a causal LM, print the report, optionally save it"
    )
    compress.add_argument("model", help=f"{MODEL_FORMS} (no compressed checkpoint)")
    _common_options(compress)

    inspect = commands.add_parser(
        "inspect",
        help="the report of a compressed checkpoint, or the sites a dense model would have compressed",
    )
    inspect.add_argument(
        "model", help=f"a folder written by --save / save_compressed, or a dense model: {MODEL_FORMS}"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the per-site ranks")

    evaluate = commands.add_parser(
        "eval", help="perplexity on a text, and KL / top-1 agreement against a dense model"
    )
    evaluate.add_argument("model", help=f"{MODEL_FORMS}, or a compressed checkpoint folder")
    evaluate.add_argument("--text", type=Path, required=True, help="a UTF-8 text file to score")
    evaluate.add_argument("--against", help="the dense model to compare with (same forms)")
    evaluate.add_argument(
        "--tokens", type=int, default=4096, help="score at most this many tokens (default: %(default)s)"
    )
    evaluate.add_argument(
        "--seq-len", type=int, default=512, help="window length in tokens (default: %(default)s)"
    )
    evaluate.add_argument(
        "--tasks",
        metavar="NAMES",
        help="also run lm-eval tasks on the model (comma list; 'neuronmm_text' scores --text offline)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    bench = commands.add_parser(
        "bench", help="prefill and decode latency, eager and compiled, against a dense model if given"
    )
    bench.add_argument("model", help=f"{MODEL_FORMS}, or a compressed checkpoint folder")
    bench.add_argument("--against", help="the dense model to time alongside (same forms)")
    bench.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: %(default)s)")
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens decoded (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=9, help="timed rounds (default: %(default)s)")
    bench.add_argument("--no-compile", action="store_true", help="eager variants only")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the latencies")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


MODEL_FORMS = "a saved Hugging Face folder, a .gguf file, or 'smollm2' (the bundled model)"
BUNDLED = "smollm2"


def _load_model(spec: str):
    """``(model, tokenizer or None)`` for a command-line model: the bundled model, a compressed
    checkpoint (:func:`neuronmm_fx.from_pretrained`), a Hugging Face folder or a .gguf file."""
    if spec == BUNDLED:
        from neuronmm_fx.models import load_smollm2

        return load_smollm2()
    path = Path(spec)
    if (path / RECIPE_FILE).is_file():
        return neuronmm_fx.from_pretrained(path), _tokenizer_at(path)
    return _load_local(path)


def _tokenizer_at(folder: Path, **extra):
    """The tokenizer saved in ``folder`` (``extra``: ``gguf_file``), or None where there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError):
        return None


def _load_local(path: Path):
    """``(model, tokenizer or None)`` from a saved Hugging Face folder or a .gguf file."""
    from transformers import AutoModelForCausalLM

    folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    except Exception as error:  # transformers raises many kinds; the user gets one line that says which
        first = str(error).splitlines()[0] if str(error) else ""
        raise UnsupportedModelError(
            f"could not load a causal LM from {path} ({type(error).__name__}: {first})"
        ) from error
    return model, _tokenizer_at(folder, **extra)


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
    ppl, fid = quality(optimized, dense, ids)  # the dense perplexity comes with it
    evaluated = time.perf_counter() - evaluation_started
    report = neuronmm_fx.report_of(optimized)
    # every matched MLP counts, including those the allocation left wholly dense (reported as skipped)
    removed = report.params_removed
    total = sum(p.numel() for name, p in dense.named_parameters() if ".mlp." in name)
    print(f"\nevaluation text: {source}, {ppl.tokens} scored tokens")
    print(
        f"  perplexity: dense {fid.reference_perplexity:.2f}, compressed {ppl.perplexity:.2f} "
        f"({ppl.perplexity / fid.reference_perplexity:.2f}× dense)"
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


def _check_same_shape(model, dense, args) -> None:
    """``--against`` must be the same architecture as the model (same class, vocabulary, depth, width)."""
    fields = ("vocab_size", "num_hidden_layers", "hidden_size")
    mine = (type(model).__name__, *(getattr(model.config, f, None) for f in fields))
    theirs = (type(dense).__name__, *(getattr(dense.config, f, None) for f in fields))
    if mine != theirs:
        raise ConfigError(
            f"--against {args.against} is another architecture than {args.model} "
            f"(class, {', '.join(fields)}: {theirs} vs {mine})"
        )


def run_bench(args) -> None:
    from neuronmm_fx import bench

    model, _ = _load_model(args.model)
    dense = _load_model(args.against)[0] if args.against is not None else None
    if dense is not None:
        _check_same_shape(model, dense, args)
    config = model.config
    # the prompt: seeded random token ids (latency does not depend on what the tokens say)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=generator)
    variants = {}
    for label, candidate in (("dense", dense), ("model", model)):
        if candidate is None:
            continue
        variants[f"{label} eager"] = candidate
        if not args.no_compile:
            backend_name = "inductor" if label == "dense" else "neuronmm"
            variants[f"{label} compiled"] = torch.compile(candidate, backend=backend_name)
    baseline = next(
        name
        for name in ("dense compiled", "dense eager", "model compiled", "model eager")
        if name in variants
    )
    log = None if args.quiet or args.json else print
    runs, tokens = bench.timed_runs(
        variants, config, ids, args.new_tokens, args.repeats, progress=not args.quiet, log=log
    )
    summary = bench.summarize(runs, baseline)
    if args.plot is not None:
        from neuronmm_fx.plots import plot_latency

        plot_latency(summary, args.plot, title=f"{args.model} ({torch.get_num_threads()} threads)")
    ideal = bench.ideals(dense, model, config, args.prompt_tokens) if dense is not None else None
    figures = {
        "model": args.model,
        "against": args.against,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "baseline": baseline,
        "flop_ideal": ideal[0] if ideal else None,
        "weight_bytes_ideal": ideal[1] if ideal else None,
        "variants": {name: latency.to_dict() for name, latency in summary.items()},
        # greedy tokens of the compiled variant equal the eager one's, per model
        "compiled_matches_eager": {
            label: torch.equal(tokens[f"{label} eager"], tokens[f"{label} compiled"])
            for label in ("dense", "model")
            if f"{label} compiled" in tokens
        },
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(
        f"{args.model}: prompt {args.prompt_tokens} tokens, {args.new_tokens} decoded, {args.repeats} "
        f"rounds, {torch.get_num_threads()} threads; speed-ups are medians of per-round ratios "
        f"against {baseline}"
    )
    print(f"{'variant':<16} {'prefill ms':>11} {'×':>6} {'decode ms/token':>16} {'×':>6}")
    for name, latency in summary.items():
        print(
            f"{name:<16} {latency.prefill_ms:>11.1f} {latency.prefill_speedup:>6.2f} "
            f"{latency.decode_ms:>16.2f} {latency.decode_speedup:>6.2f}"
        )
    if ideal is not None:
        print(f"ideals against dense: prefill FLOPs {ideal[0]:.2f}×, decode weight bytes {ideal[1]:.2f}×")
    for label, same in figures["compiled_matches_eager"].items():
        print(f"{label}: compiled and eager greedy tokens {'equal' if same else 'DIFFER'}")


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
    plot = getattr(args, "plot", None)
    if plot is not None:
        if plot.suffix.lower() != ".png" or plot.is_dir() or not plot.parent.is_dir():
            raise ConfigError(f"--plot {plot} must be a .png file in an existing folder")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'neuronmm_fx[plots]'") from None
    if args.command == "inspect":
        _check_model(args.model, checkpoint_ok=True)
        return
    if args.command == "bench" and min(args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        raise ConfigError("--prompt-tokens, --new-tokens and --repeats must be at least 1")
    if args.command == "eval":
        if not args.text.is_file():
            raise ConfigError(f"--text {args.text} is not a file")
        if args.tokens < 2 or args.seq_len < 2:
            raise ConfigError("--tokens and --seq-len must be at least 2")
    if args.command in ("bench", "eval"):  # both read a compressed checkpoint as well as a dense model
        for spec in (args.model, args.against):
            if spec is not None:
                _check_model(spec, checkpoint_ok=True)
        return
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
    if getattr(args, "model", None) is not None:
        _check_model(args.model, checkpoint_ok=False)


def _check_model(spec: str, checkpoint_ok: bool) -> None:
    """A command-line model must be the bundled one or a path of a form the commands load."""
    if spec == BUNDLED:
        return
    model = Path(spec)
    if not model.exists():
        raise ConfigError(f"no model at {model}")
    if model.is_dir() and (model / RECIPE_FILE).is_file():
        if not checkpoint_ok:
            raise ConfigError(f"{model} is already a compressed checkpoint; compress its dense model instead")
        return
    if model.is_dir() and not (model / "config.json").is_file():
        if checkpoint_ok:
            raise ConfigError(
                f"{model} is neither a compressed checkpoint (no {RECIPE_FILE}) nor a saved Hugging Face "
                "model folder (no config.json)"
            )
        raise ConfigError(f"{model} has no config.json: not a saved Hugging Face model folder")
    if model.is_file() and model.suffix != ".gguf":
        raise ConfigError(f"{model} is a file but not a .gguf model")
    if model.is_file():
        with model.open("rb") as file:
            if file.read(4) != b"GGUF":
                raise ConfigError(f"{model} is not a GGUF file (it does not start with the GGUF magic)")


def run_inspect(args) -> None:
    if not (Path(args.model) / RECIPE_FILE).is_file():
        _inspect_dense(args)
        return
    report, saved = read_report(args.model)
    if args.plot is not None:
        from neuronmm_fx.plots import plot_ranks

        plot_ranks(report, args.plot, title=f"{saved['model_class']}: ranks per compressed site")
    if args.json:
        described = {
            "checkpoint": args.model,
            "model_class": saved["model_class"],
            "format": saved["format"],
            "library_version": saved.get("version"),
            "standalone": saved.get("standalone") is not None,
            **report.to_dict(),
        }
        print(json.dumps(described, indent=2))
        return
    print(
        f"{args.model}: {saved['model_class']}, recipe format {saved['format']}, "
        f"saved by neuronmm_fx {saved.get('version')}"
    )
    print(report)  # with the time each phase took


def _inspect_dense(args) -> None:
    """A model that is not a compressed checkpoint: the sites ``optimize`` would rewrite."""
    model, _ = _load_model(args.model)
    survey = neuronmm_fx.survey(model)
    if args.plot is not None:
        from neuronmm_fx.plots import plot_survey

        plot_survey(survey, args.plot, title=f"{survey.model_class}: sites to compress")
    if args.json:
        print(json.dumps({"model": args.model, "compressed": False, **survey.to_dict()}, indent=2))
        return
    print(survey)


def run_eval(args) -> None:
    from neuronmm_fx.evaluate import perplexity, quality

    model, tokenizer = _load_model(args.model)
    dense, dense_tokenizer = _load_model(args.against) if args.against is not None else (None, None)
    if dense is not None:
        _check_same_shape(model, dense, args)
    tokenizer = tokenizer or dense_tokenizer
    if tokenizer is None:
        raise ConfigError(f"no tokenizer next to {args.model}: save the model with its tokenizer")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"--text {args.text} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens]
    if ids.numel() < 2:
        raise ConfigError(f"{args.text} holds fewer than 2 tokens")
    progress = not args.quiet
    figures = {"text": str(args.text), "model": args.model, "against": args.against}
    if dense is None:
        ppl = perplexity(model, ids, seq_len=args.seq_len, progress=progress)
        figures.update(perplexity=ppl.perplexity, tokens=ppl.tokens)
        figures.update(dense_perplexity=None, kl=None, top1=None)
    else:
        ppl, fid = quality(model, dense, ids, seq_len=args.seq_len, progress=progress)
        figures.update(
            perplexity=ppl.perplexity, tokens=ppl.tokens, dense_perplexity=fid.reference_perplexity
        )
        figures.update(kl=fid.kl, top1=fid.top1_agreement)
    if args.tasks:
        from neuronmm_fx.harness import run_lm_eval

        tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
        figures["lm_eval"] = run_lm_eval(
            model, tokenizer, tasks, text=args.text, max_length=args.seq_len, progress=progress
        )
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for task, metrics in figures.get("lm_eval", {}).items():
        shown = ", ".join(
            f"{name.split(',')[0]} {value:.4f}" for name, value in metrics.items() if isinstance(value, float)
        )
        print(f"lm-eval {task}: {shown}")
    line = (
        f"{args.model}: perplexity {figures['perplexity']:.3f} over {figures['tokens']} tokens of {args.text}"
    )
    if dense is not None:
        ratio = figures["perplexity"] / figures["dense_perplexity"]
        line += (
            f"\n{args.against}: perplexity {figures['dense_perplexity']:.3f} ({ratio:.3f}× dense)"
            f"\nmean KL(dense ‖ model) {figures['kl']:.4f} nats/token, top-1 agreement "
            f"{100 * figures['top1']:.1f} %"
        )
    print(line)


def _run(args) -> None:
    if args.command == "demo":
        run_demo(args)
    elif args.command == "inspect":
        run_inspect(args)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "bench":
        run_bench(args)
    else:  # compress, or its alias optimize
        model, tokenizer = _load_model(args.model)
        _optimize(model, args, tokenizer)


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """Under ``--quiet``, transformers' progress bars (loading, GGUF conversion) and its log below
    errors are off for the command, and put back afterwards."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 the work failed (one ``neuronmm-fx: error:`` line), 2 bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args)  # bad options are refused before spending time on loading
    except NeuronMMError as error:
        parser.error(str(error))
    try:
        with _quiet_libraries(getattr(args, "quiet", False)):
            _run(args)
    except (NeuronMMError, OSError) as error:
        print(f"neuronmm-fx: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

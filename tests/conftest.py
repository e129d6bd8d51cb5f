"""Test-session settings: offline Hugging Face, and every pass checks its stated guarantees."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("NEURONMM_FX_CHECKS", "1")  # read when neuronmm_fx.passes is first imported

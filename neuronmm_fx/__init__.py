"""neuronmm_fx: compress LLM MLPs with block-aligned SVD and fuse them into NeuronMM kernels.

>>> model = neuronmm_fx.optimize(model, ratio=0.2)
>>> print(neuronmm_fx.report_of(model))
"""

from neuronmm_fx import ops  # noqa: F401  (registers the neuronmm custom ops)
from neuronmm_fx.api import optimize, report_of, survey
from neuronmm_fx.checkpoint import from_pretrained, load_compressed, save_compressed
from neuronmm_fx.compress.calibration import Calibration, calibrate
from neuronmm_fx.compress.finetune import FinetuneConfig, finetune
from neuronmm_fx.config import OptimizeConfig
from neuronmm_fx.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    NeuronMMError,
    NothingToCompressError,
    PassCheckError,
    UnsupportedModelError,
)
from neuronmm_fx.kernels.dispatch import use_standin_kernels
from neuronmm_fx.modules import CompressedMLP, Factors, LowRankLinear
from neuronmm_fx.neuron import NeuronSDKError
from neuronmm_fx.report import OptimizeReport, Survey

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CaptureError",
    "CheckpointError",
    "CompressedMLP",
    "ConfigError",
    "Factors",
    "FinetuneConfig",
    "LowRankLinear",
    "NeuronMMError",
    "NeuronSDKError",
    "NothingToCompressError",
    "OptimizeConfig",
    "OptimizeReport",
    "PassCheckError",
    "Survey",
    "UnsupportedModelError",
    "calibrate",
    "finetune",
    "from_pretrained",
    "load_compressed",
    "optimize",
    "report_of",
    "save_compressed",
    "survey",
    "use_standin_kernels",
]

"""Options of :func:`neuronmm_fx.optimize`, as one validated dataclass."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from neuronmm_fx.errors import ConfigError

METHODS = ("auto", "svd", "whiten")
ALLOCATIONS = ("global", "uniform")
CALIBRATION_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def is_positive_int(value) -> bool:
    """Whether ``value`` is a Python ``int`` above zero (``True`` is not a count).  The options of
    :class:`OptimizeConfig` below accept any ``numbers.Integral`` instead."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class OptimizeConfig:
    """What to compress and how.

    ratio:   fraction of the compressed MLPs' parameters removed, 0 < ratio < 1.  ``allocation``
             decides how that budget is spread over the matrices.
    block:   rank alignment; 128 matches Trainium's partitions, a CPU or GPU target may use less.
    include: ``fnmatch`` patterns on a site's module path; only matching sites are rewritten
             (empty: every site).
    exclude: ``fnmatch`` patterns on a site's module path; matching sites are left alone.
    method:  how dense matrices are factored: ``"whiten"`` (SVD-LLM: SVD of the weight whitened by its
             calibration inputs), ``"svd"`` (plain truncated SVD of the weight), or ``"auto"``: whiten
             when calibration data is given or the model can generate its own, else plain SVD.
    allocation: ``"global"`` (default: every matrix may stay dense or take any aligned rank, chosen
             by measured sensitivity so that the MLPs as a whole lose ``ratio`` of their parameters
             where it hurts least) or ``"uniform"`` (the paper's per-matrix rank rule, which can
             overshoot the ratio badly on small matrices).
    calibration_tokens: at most this many calibration tokens are used (and written, when the model
             writes its own).
    calibration_seq_len: texts are cut into sequences of this many tokens.
    sequential: compress block by block on the inputs the already-compressed blocks produce, fitting
             each down projection to the dense output (needs a stack of blocks; otherwise every Gram
             comes from the dense model in one pass, and the report says why).
    sensitivity_tokens: calibration tokens used to measure each matrix's loss curve (global allocation).
    calibration_dtype: ``"bfloat16"`` or ``"float32"``: dtype of the self-written text's sampling and
             of the block-by-block forward passes (Grams are accumulated in float64 either way; the
             model itself is not converted).
    dump_dir: where to write each site's graph before and after every pass (text and DOT).
    verify:  before installing a rewrite, check that its uncompressed form reproduces the module it
             replaces on the example inputs; a site that fails is skipped with the reason.
    progress: show progress bars on long work.
    """

    ratio: float = 0.2
    block: int = 128
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str = "auto"
    allocation: str = "global"
    calibration_tokens: int = 8192
    calibration_seq_len: int = 512
    sequential: bool = True
    sensitivity_tokens: int = 2048
    calibration_dtype: str = "bfloat16"
    dump_dir: Path | None = None
    verify: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        ratio, block = self.ratio, self.block
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise ConfigError(f"ratio must be a number between 0 and 1 (exclusive), got {ratio!r}")
        if not math.isfinite(ratio) or not 0.0 < float(ratio) < 1.0:
            raise ConfigError(
                f"ratio must satisfy 0 < ratio < 1 (the fraction of parameters removed), got {ratio!r}"
            )
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block <= 0:
            raise ConfigError(f"block must be a positive integer (rank alignment), got {block!r}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}"
            )
        if self.calibration_dtype not in CALIBRATION_DTYPES:
            raise ConfigError(
                f"unknown calibration_dtype {self.calibration_dtype!r}: choose one of "
                f"{', '.join(CALIBRATION_DTYPES)}"
            )
        for name in ("calibration_tokens", "calibration_seq_len", "sensitivity_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is None or not isinstance(patterns, (str, tuple, list)):
                raise ConfigError(f"{name} must be a module-path pattern or a list of them, got {patterns!r}")
            if isinstance(patterns, str):
                object.__setattr__(self, name, (patterns,))
            elif not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"{name} must be module-path patterns (strings), got {patterns!r}")
            else:
                object.__setattr__(self, name, tuple(patterns))
        if self.dump_dir is not None:
            if not isinstance(self.dump_dir, (str, Path)):
                raise ConfigError(f"dump_dir must be a folder path, got {self.dump_dir!r}")
            object.__setattr__(self, "dump_dir", Path(self.dump_dir))
            if self.dump_dir.exists() and not self.dump_dir.is_dir():
                raise ConfigError(f"dump_dir {str(self.dump_dir)!r} exists and is not a folder")
        for name in ("sequential", "verify", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "ratio", float(ratio))
        object.__setattr__(self, "block", int(block))

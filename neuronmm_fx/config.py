"""Options of :func:`neuronmm_fx.optimize`, as one validated dataclass."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from neuronmm_fx.errors import ConfigError

METHODS = ("svd",)


@dataclass(frozen=True)
class OptimizeConfig:
    """What to compress and how.

    ratio:   fraction of each compressed matrix's parameters removed, 0 < ratio < 1.  The rank of a
             K×N matrix is ``(1 − ratio)·K·N/(K+N)`` floored to a multiple of ``block``.
    block:   rank alignment; 128 matches Trainium's partitions, a CPU or GPU target may use less.
    include: ``fnmatch`` patterns on a site's module path; only matching sites are rewritten
             (empty: every site).
    exclude: ``fnmatch`` patterns on a site's module path; matching sites are left alone.
    method:  how dense matrices are factored (``"svd"``: truncated SVD of the weight).
    dump_dir: where to write each site's graph before and after every pass (text and DOT).
    verify:  before installing a rewrite, check that its uncompressed form reproduces the module it
             replaces on the example inputs; a site that fails is skipped with the reason.
    progress: show progress bars on long work.
    """

    ratio: float = 0.2
    block: int = 128
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str = "svd"
    dump_dir: Path | None = None
    verify: bool = True
    progress: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

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
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                object.__setattr__(self, name, (patterns,))
            elif not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"{name} must be module-path patterns (strings), got {patterns!r}")
            else:
                object.__setattr__(self, name, tuple(patterns))
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", Path(self.dump_dir))
        object.__setattr__(self, "ratio", float(ratio))
        object.__setattr__(self, "block", int(block))

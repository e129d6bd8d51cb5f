"""Running a kernel on the stand-in: ``nki.jit``, ``nki.simulate`` and :func:`run_kernel`.

A run wraps the array (or :class:`~.memory.TensorSpec`) arguments as HBM tensors, executes the
kernel function with the run in force, checks that the outputs it returns are HBM tensors whose
every element was written (numeric mode), and hands back the outputs with the run's counters.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..targets import Target, get_target
from .isa import nisa
from .language import nl
from .memory import NkiTensor, TensorSpec, wrap_input
from .rules import NkiRuleError
from .stats import RUN, KernelStats, Run
from .subset import require_subset


@dataclass
class KernelRun:
    """Result of :func:`run_kernel`: ``outputs`` (numpy arrays, or :class:`TensorSpec` in shape-only
    mode; a tuple when the kernel returns several) and the :class:`KernelStats`."""

    outputs: Any
    stats: KernelStats
    extra: dict = field(default_factory=dict)


class StandinKernel:
    """What the stand-in ``nki.jit`` returns: the kernel function plus a CPU launcher."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        """``kernel[grid](...)``: the SPMD launch grid, one program per physical core of the logical
        core.  The project's kernels are written for one core (LNC = 1)."""
        if grid not in (1, (1,)):
            raise NkiRuleError(
                "lnc", f"{self.fn.__name__} launched on grid {grid!r}; it is written for one core (grid 1)"
            )
        return self

    def __call__(self, *args, **kwargs):
        if RUN.get() is not None:  # called from inside a kernel: run it inline
            return self.fn(*args, **kwargs)
        return run_kernel(self, *args, **kwargs).outputs


def jit(fn=None, **_options):
    """``nki.jit``: on the stand-in, calling the kernel runs it numerically on the CPU."""
    if fn is None:
        return StandinKernel
    return StandinKernel(fn)


def simulate(kernel):
    """``nki.simulate(kernel)``: same as calling the stand-in kernel (numeric CPU execution)."""
    k = kernel if isinstance(kernel, StandinKernel) else StandinKernel(kernel)
    return lambda *a, **kw: run_kernel(k, *a, **kw).outputs


def _unwrap_output(t, run: Run):
    if t is None:
        return None
    if isinstance(t, (tuple, list)):
        return type(t)(_unwrap_output(x, run) for x in t)
    if not isinstance(t, NkiTensor) or t._a.kind != "hbm":
        raise NkiRuleError("dma-buffer", f"kernels return HBM tensors (nl.shared_hbm), got {t!r}")
    if run.shape_only:
        return TensorSpec(t.shape, t.dtype)
    missing = t.unwritten()
    if missing:
        raise NkiRuleError(
            "output-unwritten",
            f"the kernel returned {t.describe()} with {missing} of {t.size} elements never written",
        )
    return np.array(t._a.data[t.np_index()]).reshape(t.shape)


def run_kernel(kernel, *args, target: str | Target = "trn2", shape_only: bool = False, **kwargs) -> KernelRun:
    """Run a kernel (an ``nki.jit`` function of this package, or a plain function written against the
    stand-in's ``nki``/``nl``/``nisa``) on the CPU stand-in.

    Positional and keyword arguments that are numpy arrays or :class:`TensorSpec` become HBM
    tensors; others (ints, strings, ``None``) are passed through as compile-time constants.
    ``shape_only=True`` counts without computing (arrays are then used for their shapes only)."""
    fn = kernel.fn if isinstance(kernel, StandinKernel) else kernel
    if RUN.get() is not None:
        raise NkiRuleError("no-kernel", "run_kernel cannot be nested inside a kernel run")
    require_subset(fn)  # what the NKI 0.3 compiler would refuse to compile
    run = Run(get_target(target), shape_only)

    def wrap(name, value):
        if isinstance(value, (np.ndarray, TensorSpec)):
            return wrap_input(value, name, shape_only)
        return value

    token = RUN.set(run)
    try:
        wargs = [wrap(f"arg{i}", a) for i, a in enumerate(args)]
        wkwargs = {k: wrap(k, v) for k, v in kwargs.items()}
        outputs = _unwrap_output(fn(*wargs, **wkwargs), run)
    finally:
        RUN.reset(token)
    return KernelRun(outputs=outputs, stats=run.stats)


nki = types.SimpleNamespace(
    jit=jit,
    simulate=simulate,
    language=nl,
    isa=nisa,
    __version__="0.3-standin",
    __name__="nki (neuronmm_fx CPU stand-in)",
    IS_STANDIN=True,
)

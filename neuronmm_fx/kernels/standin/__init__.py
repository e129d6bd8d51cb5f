"""A CPU stand-in for the NKI API (the ``import nki`` dialect of NKI >= 0.3, Neuron SDK >= 2.29).

The Neuron SDK cannot be installed on machines without a Neuron device, so the project's kernels
run here on this stand-in.  It exposes the handful of ``nki`` / ``nki.language`` / ``nki.isa``
names the kernels use, with the current destination-first signatures, and it is strict: every
call is checked against what the hardware (or the real compiler) enforces, and a violation raises
:class:`NkiRuleError` whose message starts with the rule's name in brackets.

The package mirrors NKI:

==============  ================================================================================
``rules``       the rules (listed there), their checks and :class:`NkiRuleError`
``stats``       :class:`KernelStats` (the counters and the roofline time model) and the run state
``memory``      HBM/SBUF/PSUM allocations, :class:`NkiTensor` views, liveness, :class:`TensorSpec`
``isa``         ``nisa``: the instructions, checked and counted
``language``    ``nl``: ``ndarray``, memory handles, dtypes, ``tile_size``, operators
``runtime``     ``nki``: ``jit``, ``simulate``, and :func:`run_kernel`
==============  ================================================================================

Modes: *numeric* executes the instructions with numpy (bfloat16 through ``ml_dtypes``; matmuls
and element-wise arithmetic in float32); *shape-only* (``run_kernel(..., shape_only=True)`` with
:class:`TensorSpec` arguments) runs the same kernel code and checks the same shape, buffer and
capacity rules and counts the same figures, but stores and computes no values, so that prefill
shapes of real models are analysed in seconds.  Uninitialized reads are only detected in numeric
mode.

What is *not* modelled: instruction latencies and overlap between engines, DMA efficiency (queue
counts, descriptor sizes, the cost of transposing DMAs), SBUF bank conflicts, and the compiler's own
buffers.  The stand-in does not parse the kernel as the NKI compiler does; a kernel accepted here
can still be rejected by ``neuronx-cc`` for language features the stand-in does not police.
"""

from .isa import nisa
from .language import nl
from .memory import NkiTensor, TensorSpec
from .rules import NkiRuleError
from .runtime import KernelRun, StandinKernel, jit, nki, run_kernel, simulate
from .stats import KernelStats

__all__ = [
    "KernelRun",
    "KernelStats",
    "NkiRuleError",
    "NkiTensor",
    "StandinKernel",
    "TensorSpec",
    "jit",
    "nisa",
    "nki",
    "nl",
    "run_kernel",
    "simulate",
]

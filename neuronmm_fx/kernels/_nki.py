"""Choose the NKI implementation the kernels are written against.

If the real Neuron Kernel Interface (``import nki``, NKI >= 0.3 from Neuron SDK >= 2.29) imports
and looks real, the kernels use it; otherwise they use the project's CPU stand-in
(:mod:`neuronmm_fx.kernels.standin`).  The stand-in is never chosen while the real one imports.
PyPI's ``nki`` placeholder raises on import, which counts as "not importable".
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace


def _load_real() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    try:
        import nki as real_nki  # type: ignore[import-not-found]
        import nki.isa as real_isa  # type: ignore[import-not-found]
        import nki.language as real_language  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a placeholder package raising something else
        return None
    if not (
        hasattr(real_nki, "jit") and hasattr(real_isa, "nc_matmul") and hasattr(real_language, "ndarray")
    ):
        return None
    return real_nki, real_language, real_isa


_real = _load_real()

if _real is not None:  # pragma: no cover - no Neuron SDK on the CI machines
    nki, nl, nisa = _real
    USING_STANDIN = False
else:
    from .standin import nisa, nki, nl

    USING_STANDIN = True


def nki_handles() -> SimpleNamespace:
    """The ``nki``, ``nl`` (nki.language) and ``nisa`` (nki.isa) the kernels use, and whether they
    are the CPU stand-in (``using_standin``)."""
    return SimpleNamespace(nki=nki, nl=nl, nisa=nisa, using_standin=USING_STANDIN)

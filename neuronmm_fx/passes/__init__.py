"""Graph passes over the canonical IR, one per module, shared by both routes.

=====================  =====================================================================
``canonicalize``       many spellings of a linear layer / activation → ``dense`` / ``activation``
``match``              every declared pattern (:mod:`neuronmm_fx.patterns`) → sites
``fuse``               each compressed site → one ``neuronmm`` op call
``decanonicalize``     canonical nodes no site used → plain torch calls again (compile route)
=====================  =====================================================================

Each pass is a ``torch.fx`` :class:`~torch.fx.passes.infra.pass_base.PassBase` that returns a result
object and states its guarantees in its docstring.  Those guarantees also run as code: a pass's
``ensures`` checks them after every call while checks are on (:func:`checks`, on in the test suite
and with ``NEURONMM_FX_CHECKS=1``), and raises :class:`PassCheckError` naming the broken one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase

from neuronmm_fx.errors import PassCheckError

__all__ = ["CheckedPass", "PassCheckError", "checks", "checks_enabled"]

_CHECKS = {"on": os.environ.get("NEURONMM_FX_CHECKS", "") not in ("", "0")}


@contextlib.contextmanager
def checks(enabled: bool = True) -> Iterator[None]:
    """Within the block, every pass checks its guarantees after it runs (or not, ``enabled=False``)."""
    previous = _CHECKS["on"]
    _CHECKS["on"] = enabled
    try:
        yield
    finally:
        _CHECKS["on"] = previous


def checks_enabled() -> bool:
    return _CHECKS["on"]


class CheckedPass(PassBase):
    """A pass whose :meth:`check` (its stated guarantees) runs after each call while checks are on."""

    def ensures(self, graph_module: fx.GraphModule) -> None:
        if not checks_enabled():
            return
        try:
            graph_module.graph.lint()
            self.check(graph_module)
        except Exception as error:  # lint failures and broken guarantees alike name the pass
            raise PassCheckError(f"{type(self).__name__}: {error}") from error

    def check(self, graph_module: fx.GraphModule) -> None:
        """Raise if the graph after this pass breaks a guarantee; the default checks nothing more."""

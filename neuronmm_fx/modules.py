"""The modules that replace compressed sites in a user's model.

Each holds its factors as ordinary ``nn.Parameter``s (so ``state_dict``, ``to()``, fine-tuning and
saving work as for any module) and calls one ``neuronmm`` custom op in ``forward``.

Orientation: ``nn.Linear`` stores ``W`` as (out, in) and computes ``x·Wᵀ``.  Here ``u`` is (in, r)
and ``v`` is (r, out), so ``x·u·v ≈ x·Wᵀ``.  A projection left dense keeps ``u = Wᵀ`` (in, out) and
has no ``v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuronmm_fx.activations import check_activation


@dataclass
class Factors:
    """One projection ``x·u·v + bias``; ``v is None`` for a projection kept dense (``u`` is (in, out))."""

    u: torch.Tensor
    v: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.u.shape[0]

    @property
    def out_features(self) -> int:
        return (self.v if self.v is not None else self.u).shape[1]

    @property
    def rank(self) -> int | None:
        return None if self.v is None else self.u.shape[1]

    def numel(self) -> int:
        return sum(t.numel() for t in (self.u, self.v, self.bias) if t is not None)

    def describe(self) -> str:
        shape = f"{self.in_features}→{self.out_features}"
        return f"{shape} dense" if self.rank is None else f"{shape} r={self.rank}"


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    """A parameter over ``t``'s storage: a dense weight kept as the transposed view of the replaced
    layer's weight costs no copy (the layer it came from leaves the model when the rewrite commits)."""
    return None if t is None else nn.Parameter(t.detach())


class LowRankLinear(nn.Module):
    """``y = x·u·v + bias`` through ``neuronmm::xuv``; ``u`` (in, r), ``v`` (r, out)."""

    def __init__(self, factors: Factors) -> None:
        super().__init__()
        if factors.v is None:
            raise ValueError("LowRankLinear needs both factors; a dense projection stays an nn.Linear")
        # contiguous: a per-matrix replacement may receive a column block of a joint gate/up factor
        self.u = _param(factors.u.contiguous())
        self.v = _param(factors.v)
        self.bias = _param(factors.bias)

    @property
    def in_features(self) -> int:
        return self.u.shape[0]

    @property
    def out_features(self) -> int:
        return self.v.shape[1]

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.neuronmm.xuv(x, self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, rank={self.rank}, out={self.out_features}, bias={self.bias is not None}"
        )


class CompressedMLP(nn.Module):
    """A whole MLP through ``neuronmm::svd_mlp``.

    Gated (``up`` given): ``down(act(gate(x)) ⊙ up(x))`` with parameters ``gate_*``, ``up_*``, ``down_*``.
    Plain (``up`` None): ``out(act(in(x)))`` with parameters ``in_*`` and ``out_*``.

    When both gated branches are low-rank their first factors live side by side in one parameter,
    ``gate_up_u`` = ``[U_gate | U_up]`` (K, r_gate + r_up), instead of ``gate_u`` and ``up_u``:
    ``forward`` hands the op the two column blocks as views of it, and the op then reads ``x`` against
    both in one GEMM (``x·[U_gate | U_up]``, :func:`neuronmm_fx.ops.joint_columns`).
    ``share_first=False`` keeps the two apart (checkpoints written before the joint layout).
    """

    GATED_ROLES = ("gate", "up", "down")
    PLAIN_ROLES = ("in", "out")
    JOINT_FIRST = "gate_up_u"

    def __init__(
        self,
        activation: str,
        first: Factors,
        last: Factors,
        up: Factors | None = None,
        *,
        share_first: bool = True,
    ) -> None:
        super().__init__()
        self.activation = check_activation(activation)
        self.gated = up is not None
        self._roles = self.GATED_ROLES if self.gated else self.PLAIN_ROLES
        projections = dict(zip(self._roles, (first, up, last) if self.gated else (first, last), strict=True))
        # (gate rank, up rank) when the first factors share ``gate_up_u``; None otherwise
        self._joint_ranks: tuple[int, int] | None = None
        if share_first and self.gated and first.v is not None and up.v is not None:
            self._joint_ranks = (first.u.shape[1], up.u.shape[1])
            joint = torch.cat([first.u.detach(), up.u.detach()], dim=1)  # (K, r_gate + r_up)
            self.register_parameter(self.JOINT_FIRST, nn.Parameter(joint))
        for role, factors in projections.items():
            if self._joint_ranks is None or role == "down":
                self.register_parameter(f"{role}_u", _param(factors.u))
            self.register_parameter(f"{role}_v", _param(factors.v))
            self.register_parameter(f"{role}_bias", _param(factors.bias))

    @property
    def shares_first(self) -> bool:
        """Whether the gate and up first factors are the two column blocks of ``gate_up_u``."""
        return self._joint_ranks is not None

    def _all_factors(self) -> dict[str, Factors]:
        """Every projection's ``(u, v, bias)``; with the joint layout the gate's and up's ``u`` are the
        two column blocks of ``gate_up_u`` (views, split once)."""
        first_u = {role: getattr(self, f"{role}_u", None) for role in self._roles}
        if self._joint_ranks is not None:
            first_u["gate"], first_u["up"] = getattr(self, self.JOINT_FIRST).split(self._joint_ranks, dim=1)
        return {
            role: Factors(first_u[role], getattr(self, f"{role}_v"), getattr(self, f"{role}_bias"))
            for role in self._roles
        }

    def factors(self, role: str) -> Factors:
        """The ``(u, v, bias)`` of one projection: ``gate``/``up``/``down`` or ``in``/``out``."""
        if role not in self._roles:
            raise KeyError(f"{role!r} is not a projection of this MLP (has {', '.join(self._roles)})")
        return self._all_factors()[role]

    @property
    def roles(self) -> tuple[str, ...]:
        return self._roles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self._all_factors()
        first, last = factors[self._roles[0]], factors[self._roles[-1]]
        up = factors["up"] if self.gated else Factors(None)  # type: ignore[arg-type]
        return torch.ops.neuronmm.svd_mlp(
            x, first.u, first.v, first.bias, up.u, up.v, up.bias, last.u, last.v, last.bias, self.activation
        )

    def extra_repr(self) -> str:
        parts = [f"{'gated' if self.gated else 'plain'}", self.activation]
        parts += [f"{role}: {self.factors(role).describe()}" for role in self._roles]
        if self.shares_first:
            parts.append("gate/up first factors joint")
        return ", ".join(parts)

"""One rank's part of a tensor-parallel compressed MLP (the schemes of :mod:`neuronmm_fx.parallel.cost`).

:class:`ShardedMLP` is built from a :class:`~neuronmm_fx.modules.CompressedMLP` and the process
group; it keeps only this rank's shards (copies, so the full factors can be freed) and talks to the
other ranks through PyTorch's functional collectives (``torch.distributed._functional_collectives``,
the same calls DTensor issues), so it runs on any ``torch.distributed`` backend (gloo on CPU, the
Neuron backend on Trainium) and traces under ``torch.compile``.

Shapes (per rank ``p`` of ``t``; ``I_p = I/t`` intermediate columns, ``x`` (tokens, H) replicated):

``replicated``  gate/up ``U`` (H, r) whole, ``V`` (r, I_p); down ``U`` (I_p, r_d) → partial
                (tokens, r_d), all-reduced, then ``V`` (r_d, H) whole.  The local part before the
                all-reduce is one ``neuronmm::svd_mlp`` call (its down projection given as the dense
                (I_p, r_d) block), so it runs on the fused kernel.
``r_sharded``   gate/up ``U`` (H, r/t): ``x·[U_gate,p | U_up,p]`` (tokens, (r_gate + r_up)/t), all-gathered
                to (tokens, r_gate + r_up); then ``V`` (r, I_p) and down as in ``replicated``.

Collectives carry activations in the model's dtype.  The result is the same sum as the one-device
op's in a different order: equal within float32 rounding for float32 models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol

from neuronmm_fx.activations import apply_activation
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.modules import CompressedMLP, Factors
from neuronmm_fx.ops import _finish as finish_projection


def _block_of(tensor: torch.Tensor | None, dim: int, parts: int, index: int) -> torch.Tensor | None:
    """Block ``index`` of ``parts`` equal blocks of ``tensor`` along ``dim``, as its own copy."""
    if tensor is None:
        return None
    return tensor.detach().chunk(parts, dim=dim)[index].contiguous().clone()


def _param(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)


def gather_columns(local: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather ``local`` (..., w) from every rank into (..., world·w), rank ``p``'s columns at
    ``[p·w, (p+1)·w)``."""
    rows = local.reshape(-1, local.shape[-1]).unsqueeze(0)  # (1, tokens, w)
    gathered = funcol.all_gather_single(rows, 0, group)  # (world, tokens, w)
    return gathered.permute(1, 0, 2).reshape(*local.shape[:-1], world * local.shape[-1])


def _finish(first: torch.Tensor, v: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``first·v + bias`` in float32, as the ops compute it."""
    return finish_projection(first.float(), v, bias)


# --- the tensor-parallel forms of neuronmm::xuv (x·U·V + bias) ----------------------------------------


def xuv_column(x, u, v_block, bias_block=None):
    """Input replicated, output the rank's column block: ``U`` (K, r) whole, ``V`` (r, N/t).  No
    collective; the local product is one ``neuronmm::xuv`` call."""
    return torch.ops.neuronmm.xuv(x, u, v_block, bias_block)


def xuv_gathered_column(x, u_block, v_block, bias_block, group, world: int):
    """Input replicated, output the rank's column block: ``U`` (K, r/t), its product all-gathered
    over ``r`` (one collective of ``r`` per token), then ``V`` (r, N/t)."""
    first = (x.float() @ u_block.float()).type_as(x)  # (..., r/t)
    return _finish(gather_columns(first, group, world), v_block, bias_block).type_as(x)


def xuv_row(x_block, u_block, v, bias, group):
    """Input the rank's column block of ``K``, output replicated: ``U`` (K/t, r), the partial
    product all-reduced over ``r`` (one collective of ``r`` per token), then ``V`` (r, N) whole."""
    partial = (x_block.float() @ u_block.float()).type_as(x_block)  # (..., r), a partial sum
    return _finish(funcol.all_reduce(partial, "sum", group), v, bias).type_as(x_block)


class ShardedLowRankLinear(nn.Module):
    """One rank's part of a :class:`~neuronmm_fx.modules.LowRankLinear` under one of the xuv forms:
    ``"column"`` and ``"gathered_column"`` (input replicated, output this rank's block of the output
    features) or ``"row"`` (input this rank's block of the input features, output replicated).  Pair
    a column form with a row form as Megatron pairs its linear layers."""

    FORMS = ("column", "gathered_column", "row")

    def __init__(self, linear, form: str, group, rank: int, world: int) -> None:
        super().__init__()
        if form not in self.FORMS:
            raise ConfigError(f"unknown xuv form {form!r}; choose one of {', '.join(self.FORMS)}")
        splits = {  # the dimensions each form divides over the ranks
            "column": {"output features": linear.out_features},
            "gathered_column": {"rank": linear.rank, "output features": linear.out_features},
            "row": {"input features": linear.in_features},
        }[form]
        for what, size in splits.items():
            if size % world:
                raise ConfigError(
                    f"the {form} form splits the {what} ({size}) into {world} ranks: not a whole split"
                )
        self.form, self.group, self.world, self.rank = form, group, world, rank
        u, v, bias = linear.u, linear.v, linear.bias
        if form == "row":
            u = _block_of(u, 0, world, rank)
            v, bias = v.detach().clone(), None if bias is None else bias.detach().clone()
        else:
            u = _block_of(u, 1, world, rank) if form == "gathered_column" else u.detach().clone()
            v, bias = _block_of(v, 1, world, rank), _block_of(bias, 0, world, rank)
        self.u, self.v, self.bias = _param(u), _param(v), _param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "column":
            return xuv_column(x, self.u, self.v, self.bias)
        if self.form == "gathered_column":
            return xuv_gathered_column(x, self.u, self.v, self.bias, self.group, self.world)
        return xuv_row(x, self.u, self.v, self.bias, self.group)

    def extra_repr(self) -> str:
        return f"form={self.form}, rank {self.rank} of {self.world}"


class ShardedMLP(nn.Module):
    """This rank's shards of a compressed MLP, and the collectives that join them.

    ``first`` is the projection (gated: ``gate``, with ``up`` beside it; plain: ``in``) and ``last``
    the one after the activation.  Input and output are replicated on every rank of ``group``.
    """

    def __init__(self, mlp: CompressedMLP, scheme: str, group, rank: int, world: int) -> None:
        super().__init__()
        if scheme not in ("replicated", "r_sharded"):
            raise ValueError(f"ShardedMLP builds 'replicated' or 'r_sharded', not {scheme!r}")
        self.scheme, self.group, self.world, self.rank = scheme, group, world, rank
        self.activation, self.gated = mlp.activation, mlp.gated
        roles = mlp.roles
        self.first_roles, self.last_role = roles[:-1], roles[-1]
        self.gathered_widths: list[int] = []  # r/t of each low-rank first projection, r_sharded only
        for role in self.first_roles:
            factors = mlp.factors(role)
            if factors.v is None:  # dense, column-parallel: W (H, I_p)
                u, v = _block_of(factors.u, 1, world, rank), None
            elif scheme == "r_sharded":  # U (H, r/t), V (r, I_p)
                u, v = _block_of(factors.u, 1, world, rank), _block_of(factors.v, 1, world, rank)
                self.gathered_widths.append(u.shape[1])
            else:  # U (H, r) whole, V (r, I_p)
                u, v = factors.u.detach().contiguous().clone(), _block_of(factors.v, 1, world, rank)
            self.register_parameter(f"{role}_u", _param(u))
            self.register_parameter(f"{role}_v", _param(v))
            self.register_parameter(f"{role}_bias", _param(_block_of(factors.bias, 0, world, rank)))
        last = mlp.factors(self.last_role)
        # U (I_p, r_d) or dense W (I_p, H): its partial product is what the all-reduce sums
        self.register_parameter(f"{self.last_role}_u", _param(_block_of(last.u, 0, world, rank)))
        self.register_parameter(
            f"{self.last_role}_v", _param(None if last.v is None else last.v.detach().clone())
        )
        self.register_parameter(
            f"{self.last_role}_bias", _param(None if last.bias is None else last.bias.detach().clone())
        )

    def _factors(self, role: str) -> Factors:
        return Factors(getattr(self, f"{role}_u"), getattr(self, f"{role}_v"), getattr(self, f"{role}_bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._factors(self.last_role)
        if self.scheme == "replicated":
            first = self._factors(self.first_roles[0])
            up = self._factors("up") if self.gated else Factors(None)  # type: ignore[arg-type]
            partial = torch.ops.neuronmm.svd_mlp(  # (..., r_d): h_p·U_down,p, the down V left out
                x, first.u, first.v, first.bias, up.u, up.v, up.bias, last.u, None, None, self.activation
            )
        else:
            partial = self._r_sharded_partial(x)
        return _finish(funcol.all_reduce(partial, "sum", self.group), last.v, last.bias).type_as(x)

    def _r_sharded_partial(self, x: torch.Tensor) -> torch.Tensor:
        """``h_p·U_down,p`` with the low-rank first projections' ``x·U`` gathered over ``r``."""
        x32 = x.float()
        lowrank = [role for role in self.first_roles if getattr(self, f"{role}_v") is not None]
        firsts: dict[str, torch.Tensor] = {}
        if lowrank:
            # one all-gather for both branches: (..., Σ r/t) per rank → (..., t·Σ r/t), rank-major
            local = torch.cat([x32 @ getattr(self, f"{role}_u").float() for role in lowrank], dim=-1)
            gathered = gather_columns(local.type_as(x), self.group, self.world)
            per_rank = gathered.unflatten(-1, (self.world, sum(self.gathered_widths)))  # (..., t, Σ r/t)
            for role, block in zip(lowrank, per_rank.split(self.gathered_widths, dim=-1), strict=True):
                firsts[role] = block.flatten(-2).float()  # (..., r), the rank-major order of r
        branches = []
        for role in self.first_roles:
            factors = self._factors(role)
            product = firsts[role] @ factors.v.float() if role in firsts else x32 @ factors.u.float()
            branches.append(product if factors.bias is None else product + factors.bias.float())
        hidden = apply_activation(self.activation, branches[0])  # (..., I_p)
        if self.gated:
            hidden = hidden * branches[1]
        return (hidden @ getattr(self, f"{self.last_role}_u").float()).type_as(x)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, rank {self.rank} of {self.world}, {self.activation}"

"""Probe: would a gated MLP's gate and up projections do better sharing one first factor?

Gate and up read the same input, so one rank-``r`` basis of it can serve both:
``x·U·[V_gate | V_up]`` with ``U`` (576 × r) costs ``r·(576 + 2·1536)`` parameters, and ranks 256 and
384 land between the separate options (rank 384 of the pair keeps 79 % of gate + up; separately,
384 keeps 92 % and 256 only 61 %).  The probe answers whether that finer grain is worth building:

1. the default call's sensitivity pass runs on SmolLM2-135M; every matrix's whitening ``Sᵀ``, weight
   and output Fisher information are recorded as the pass computes its loss curves;
2. the estimated loss (``Σ_{i≥r} σᵢ²·Σⱼ fⱼ·pᵢⱼ²``) of every option, the shared one from the SVD of
   ``Sᵀ·[W_gate | W_up]`` with the two Fisher vectors side by side;
3. an exact allocation (dynamic programme over the MLP parameter budget) with and without the shared
   options; the library's greedy allocator is scored on the separate options for comparison;
4. both allocations applied to a copy of the model as Fisher-weighted whitened truncations of the
   dense weights (independent, without the sequential pass, the same for both), scored by KL
   against dense on the shipped text and, with ``--text``, a second one.

Run: python benchmarks/shared_basis_probe.py [--ratio 0.2] [--text ../shared/data/wikitext-2/test.txt]
(about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import neuronmm_fx  # noqa: E402
from neuronmm_fx.compress import sensitivity  # noqa: E402
from neuronmm_fx.compress.factorize import fisher_weights  # noqa: E402
from neuronmm_fx.compress.ranks import MatrixShape, aligned_ranks, allocate_global  # noqa: E402
from neuronmm_fx.evaluate import quality  # noqa: E402
from neuronmm_fx.models import demo_text, load_smollm2  # noqa: E402

BLOCK = 128
Option = tuple[int, float, object]  # (parameters, estimated loss, what to install)


def _record_sensitivity(model, ratio: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(Sᵀ, W (in, out), Fisher)`` of every matrix, in the order the sensitivity pass measures them."""
    records = []
    measure = sensitivity.loss_curve

    def recording(s_t, weight_in_out, fisher):
        records.append((s_t.clone(), weight_in_out.detach().clone(), fisher.clone()))
        return measure(s_t, weight_in_out, fisher)

    sensitivity.loss_curve = recording
    try:
        neuronmm_fx.optimize(copy.deepcopy(model), ratio=ratio, progress=False)
    finally:
        sensitivity.loss_curve = measure
    return records


def _truncation(s_t, weight_in_out, fisher):
    """``(loss(r), weight(r))``: the library's estimated loss of rank ``r`` and the Fisher-weighted
    whitened rank-``r`` weight (the factorization the default call uses, without its sequential pass)."""
    s_t, weight = s_t.double(), weight_in_out.double()
    channel = fisher_weights(fisher)
    left, singular, right_t = torch.linalg.svd(s_t @ weight * channel, full_matrices=False)

    def weight_of(rank: int) -> torch.Tensor:
        low = (left[:, :rank] * singular[:rank]) @ right_t[:rank]
        return torch.linalg.solve(s_t, low) / channel

    return sensitivity.loss_curve(s_t, weight, fisher), weight_of


def _exact(groups: list[list[Option]], budget: float) -> list[Option]:
    """The options (one per group) of least total loss within ``budget`` parameters, exactly."""
    unit = 0
    for options in groups:
        for params, _, _ in options:
            unit = math.gcd(unit, params)
    limit = int(budget // unit)
    best: dict[int, tuple[float, list[Option]]] = {0: (0.0, [])}
    for options in groups:
        reached: dict[int, tuple[float, list[Option]]] = {}
        for used, (loss, chosen) in best.items():
            for option in options:
                total = used + option[0] // unit
                if total <= limit and (total not in reached or loss + option[1] < reached[total][0]):
                    reached[total] = (loss + option[1], chosen + [option])
        best, lowest = {}, math.inf  # keep only the states no cheaper state beats
        for total in sorted(reached):
            if reached[total][0] < lowest:
                best[total], lowest = reached[total], reached[total][0]
    return min(best.values(), key=lambda state: state[0])[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--text", help="a second text to score (e.g. WikiText-2 test)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of each text scored")
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2()
    mlps = [layer.mlp for layer in model.model.layers]
    records = _record_sensitivity(model, args.ratio)
    if len(records) != 3 * len(mlps):
        raise SystemExit(f"expected gate, up and down of {len(mlps)} MLPs, recorded {len(records)} matrices")

    separate: list[list[Option]] = []
    shared: list[list[Option]] = []
    shapes: list[MatrixShape] = []
    dense_params = 0
    for index, mlp in enumerate(mlps):
        gate, up, down = records[3 * index : 3 * index + 3]
        if not torch.equal(gate[1], mlp.gate_proj.weight.t()) or not torch.equal(
            down[1], mlp.down_proj.weight.t()
        ):
            raise SystemExit(
                "the sensitivity pass measured the matrices in another order than gate, up, down"
            )
        singles = []
        for role, (s_t, weight, fisher) in zip(("gate", "up", "down"), (gate, up, down), strict=True):
            k, n = weight.shape
            loss, weight_of = _truncation(s_t, weight, fisher)
            shapes.append(MatrixShape((index, role), k, n, loss))
            dense_params += k * n
            singles.append(
                [(k * n, 0.0, {role: None})]
                + [(r * (k + n), loss(r), {role: (weight_of, r)}) for r in aligned_ranks(k, n, BLOCK)]
            )
        pairs = [(g[0] + u[0], g[1] + u[1], {**g[2], **u[2]}) for g in singles[0] for u in singles[1]]
        joint_loss, joint_weight = _truncation(
            gate[0], torch.cat([gate[1], up[1]], dim=1), torch.cat([gate[2], up[2]])
        )
        k, n = gate[1].shape
        joint = [
            (r * (k + 2 * n), joint_loss(r), {"gate+up": (joint_weight, r)})
            for r in aligned_ranks(k, 2 * n, BLOCK)
        ]
        separate += [pairs, singles[2]]
        shared += [pairs + joint, singles[2]]

    budget = (1.0 - args.ratio) * dense_params * (1.0 + 1e-9)
    greedy = allocate_global(shapes, args.ratio, BLOCK)
    greedy_loss = sum(m.loss(greedy[m.key].rank) if greedy[m.key].rank else 0.0 for m in shapes)
    print(
        f"ratio {args.ratio}: library's greedy allocation, separate options: estimated loss {greedy_loss:.4f}"
    )

    texts = {"shipped": demo_text()[0]}
    if args.text:
        with open(args.text, encoding="utf-8") as handle:
            texts[os.path.basename(args.text)] = handle.read()[: 40 * args.tokens]
    ids = {
        name: tokenizer(text, return_tensors="pt").input_ids[0][: args.tokens] for name, text in texts.items()
    }
    for name, groups in (("separate", separate), ("with shared gate/up basis", shared)):
        chosen = _exact(groups, budget)
        kept = sum(option[0] for option in chosen) / dense_params
        shared_count = sum("gate+up" in option[2] for option in chosen)
        compressed = copy.deepcopy(model)
        for index, layer in enumerate(compressed.model.layers):
            installs = {**chosen[2 * index][2], **chosen[2 * index + 1][2]}
            with torch.no_grad():
                if installs.get("gate+up") is not None:
                    weight_of, rank = installs["gate+up"]
                    both = weight_of(rank)  # (576, 2 · 1536)
                    layer.mlp.gate_proj.weight.copy_(both[:, : both.shape[1] // 2].t())
                    layer.mlp.up_proj.weight.copy_(both[:, both.shape[1] // 2 :].t())
                for role in ("gate", "up", "down"):
                    if installs.get(role) is not None:
                        weight_of, rank = installs[role]
                        getattr(layer.mlp, f"{role}_proj").weight.copy_(weight_of(rank).t())
        scores = []
        for text, tokens in ids.items():
            _, fidelity = quality(compressed, model, tokens)
            scores.append(f"{text} KL {fidelity.kl:.4f}")
        print(
            f"{name}: exact allocation, estimated loss {sum(o[1] for o in chosen):.4f}, "
            f"{kept:.1%} kept, {shared_count} MLPs sharing; " + ", ".join(scores),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

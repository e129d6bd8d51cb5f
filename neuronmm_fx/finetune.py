"""Recovery fine-tuning: train only the low-rank factors to match the dense model's outputs.

The paper follows compression with a short fine-tune.  Here the student is the compressed model,
the teacher the dense one; the loss is KL(teacher ‖ student) of next-token distributions on
calibration tokens (distillation needs no labels, and the dense model's own distribution is the
target worth recovering).  Only the parameters of :class:`CompressedMLP` and :class:`LowRankLinear`
modules train; everything else is frozen.  Deterministic for a given seed; bounded by a step count
and optionally by wall time; a progress bar shows the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx.modules import CompressedMLP, LowRankLinear


@dataclass(frozen=True)
class FinetuneConfig:
    """steps: optimizer steps; max_seconds: stop early after this much wall time (None: no limit);
    lr: AdamW learning rate; seed: fixes batch order and any randomness."""

    steps: int = 60
    max_seconds: float | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, on the training batch
    trainable_parameters: int = 0


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every fused module (the factors and their biases)."""
    params = []
    for module in model.modules():
        if isinstance(module, (CompressedMLP, LowRankLinear)):
            params.extend(module.parameters())
    return params


def distillation_loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = F.log_softmax(teacher(batch, use_cache=False).logits.float(), dim=-1)
    prediction = F.log_softmax(student(batch, use_cache=False).logits.float(), dim=-1)
    return F.kl_div(prediction, target, log_target=True, reduction="batchmean") / batch.shape[1]


def finetune(
    student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], config: FinetuneConfig | None = None
) -> FinetuneResult:
    """Train ``student``'s factors on ``batches`` (token-id tensors) to match ``teacher``."""
    config = config or FinetuneConfig()
    if not batches:
        raise ValueError("fine-tuning needs at least one calibration batch")
    trainable = factor_parameters(student)
    if not trainable:
        raise ValueError("the model has no compressed modules to fine-tune (run neuronmm_fx.optimize first)")
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    was_training = student.training
    student.eval()  # no dropout: the teacher is in eval mode too
    teacher.eval()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(config.seed)).tolist()
    result = FinetuneResult(0, 0.0, trainable_parameters=sum(p.numel() for p in trainable))
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="fine-tune", disable=not config.progress)
    try:
        for step in bar:
            batch = batches[order[step % len(order)]]
            loss = distillation_loss(student, teacher, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            result.steps = step + 1
            bar.set_postfix(kl=f"{loss.item():.4f}")
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                break
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        student.train(was_training)
        result.seconds = time.perf_counter() - start
    return result

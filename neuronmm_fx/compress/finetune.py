"""Recovery fine-tuning: train only the low-rank factors to match the dense model's outputs.

The paper follows compression with a short fine-tune.  Here the student is the compressed model,
the teacher the dense one; the loss is KL(teacher ‖ student) of next-token distributions on
calibration tokens (distillation needs no labels, and the dense model's own distribution is the
target worth recovering).  Only the parameters of :class:`CompressedMLP` and :class:`LowRankLinear`
modules train; everything else is frozen.

The learning rate warms up linearly for ``warmup`` of the steps, then follows a cosine to zero;
gradients are clipped to ``clip_norm``.  One calibration batch in ``HOLDOUT_SHARE`` is held out:
every ``eval_every`` steps the held-out KL is measured, training stops once it has not improved for
``patience`` evaluations, and the factors of the best evaluation are restored.  Deterministic for a
given seed; bounded by a step count and optionally by wall time; a progress bar shows the loss, and
the result keeps the whole curve (training loss, learning rate, held-out loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx.config import is_positive_int
from neuronmm_fx.errors import ConfigError
from neuronmm_fx.modules import CompressedMLP, LowRankLinear

HOLDOUT_SHARE = 8  # one batch in this many is held out for early stopping
BATCH_TOKENS = 512  # tokens per training step


@dataclass(frozen=True)
class FinetuneConfig:
    """steps: optimizer steps at most; lr: peak AdamW learning rate; warmup: share of the steps spent
    warming up; clip_norm: gradient-norm clip; eval_every / patience: held-out early stopping (0
    disables it); max_seconds: stop after this much wall time (None: no limit); seed: batch order."""

    steps: int = 60
    max_seconds: float | None = None
    lr: float = 1e-4
    warmup: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 10
    patience: int = 2
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not is_positive_int(self.steps):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a share of the steps, 0 <= warmup < 1, got {self.warmup}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
        if self.eval_every < 0 or self.patience < 1:
            raise ValueError(
                f"need eval_every >= 0 and patience >= 1, got {self.eval_every}, {self.patience}"
            )

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, on the training batch
    learning_rates: list[float] = field(default_factory=list)  # per step
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (steps done, held-out KL)
    best_step: int = 0  # steps done at the restored evaluation (== steps without early stopping)
    stopped_early: bool = False
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


def _split(batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Training and held-out step batches of at most ``BATCH_TOKENS`` tokens each."""
    from neuronmm_fx.compress.layerwise import micro_batches

    steps = micro_batches(batches, BATCH_TOKENS, sum(b.numel() for b in batches))
    if len(steps) < 2:
        return steps, []
    held = set(range(len(steps) - 1, -1, -HOLDOUT_SHARE))
    return [b for i, b in enumerate(steps) if i not in held], [b for i, b in enumerate(steps) if i in held]


@torch.no_grad()
def _held_out_loss(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor]) -> float:
    tokens = sum(b.numel() for b in batches)
    return sum(distillation_loss(student, teacher, b).item() * b.numel() for b in batches) / tokens


def finetune(
    student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], config: FinetuneConfig | None = None
) -> FinetuneResult:
    """Train ``student``'s factors on ``batches`` (token-id tensors) to match ``teacher``."""
    config = config or FinetuneConfig()
    if not batches:
        raise ConfigError("fine-tuning needs at least one calibration batch")
    trainable = factor_parameters(student)
    if not trainable:
        raise ConfigError("the model has no compressed modules to fine-tune (run neuronmm_fx.optimize first)")
    training, held_out = _split(batches)
    if not config.eval_every:
        training, held_out = training + held_out, []
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    was_training, teacher_was_training = student.training, teacher.training
    initial = [p.detach().clone() for p in trainable]  # put back if anything fails
    grads = [p.grad for p in trainable]
    student.eval()  # no dropout: the teacher is in eval mode too
    teacher.eval()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    order = torch.randperm(len(training), generator=torch.Generator().manual_seed(config.seed)).tolist()
    result = FinetuneResult(0, 0.0, trainable_parameters=sum(p.numel() for p in trainable))
    best_loss, best_values, stale = math.inf, None, 0
    if held_out:
        best_loss = _held_out_loss(student, teacher, held_out)
        best_values = [p.detach().clone() for p in trainable]
        result.held_out.append((0, best_loss))
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="fine-tune", disable=not config.progress)
    try:
        for step in bar:
            rate = config.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = distillation_loss(student, teacher, training[order[step % len(order)]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.clip_norm)
            optimizer.step()
            result.losses.append(loss.item())
            result.learning_rates.append(rate)
            result.steps = step + 1
            bar.set_postfix(kl=f"{loss.item():.4f}")
            if held_out and (result.steps % config.eval_every == 0 or result.steps == config.steps):
                current = _held_out_loss(student, teacher, held_out)
                result.held_out.append((result.steps, current))
                if current < best_loss:
                    best_loss, stale, result.best_step = current, 0, result.steps
                    best_values = [p.detach().clone() for p in trainable]
                else:
                    stale += 1
                    if stale >= config.patience:
                        result.stopped_early = True
                        break
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                break
        if best_values is not None:  # the factors of the best held-out evaluation
            with torch.no_grad():
                for p, value in zip(trainable, best_values, strict=True):
                    p.copy_(value)
        else:
            result.best_step = result.steps
    except BaseException:
        with torch.no_grad():
            for p, value in zip(trainable, initial, strict=True):
                p.copy_(value)
        raise
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for p, grad in zip(trainable, grads, strict=True):
            p.grad = grad
        student.train(was_training)
        teacher.train(teacher_was_training)
        result.seconds = time.perf_counter() - start
    return result

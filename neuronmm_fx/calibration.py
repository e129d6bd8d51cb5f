"""Calibration data and the input Gram matrices that whitened compression needs.

Calibration input may be given as

* a list of token tensors (each (tokens,) or (batch, tokens)),
* any iterable of batches (a ``DataLoader``) yielding token tensors or dicts with ``input_ids``,
* a list of strings together with a ``tokenizer``;

or left out: a causal language model then writes its own calibration text (seeded sampling from
its first token, the data-free recipe of LLM-QAT), and the report says so.  Anything else leaves
plain SVD in force, also said in the report.

Grams are accumulated per *input* (``G = Σ xᵀx`` over every calibration token), from float32
products added into a float64 accumulator, with one forward hook per distinct input: the gate and
up projections of a gated MLP read the same tensor and share one Gram.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_SELF_SEQUENCES = 16
DEFAULT_SELF_LENGTH = 128


@dataclass
class Calibration:
    """Token batches to calibrate on, and where they came from (for the report)."""

    batches: list[torch.Tensor]  # each (batch, tokens) of token ids
    source: str

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def _as_batch(item) -> torch.Tensor:
    if isinstance(item, dict):
        item = item["input_ids"]
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(
            f"calibration batches must be tensors (or dicts with input_ids), got {type(item).__name__}"
        )
    if item.dtype.is_floating_point:  # feature inputs of a model that does not take tokens
        return item
    return item.long().reshape(1, -1) if item.dim() == 1 else item.long()


def split_tokens(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Cut a 1-D token stream into (1, seq_len) batches, at most ``max_tokens`` tokens in all."""
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [ids[i : i + seq_len].unsqueeze(0) for i in range(0, ids.numel() - seq_len + 1, seq_len)]


def from_texts(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    return split_tokens(ids, seq_len, max_tokens)


def self_generated(model: nn.Module, sequences: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """Text the causal LM samples for itself, starting from its BOS token (or seeded random tokens)."""
    config = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < config.vocab_size:
        start = torch.full((sequences, 1), bos, dtype=torch.long)
    else:
        start = torch.randint(0, config.vocab_size, (sequences, 1), generator=generator)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        random.seed(seed)
        out = model.generate(
            start.to(device),
            attention_mask=torch.ones_like(start, device=device),
            do_sample=True,
            top_k=50,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=bos if isinstance(bos, int) else 0,
        )
    return [out.cpu()]


def can_generate(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    is_causal = hasattr(model, "generate") and getattr(config, "is_decoder", True) is not False
    return (
        is_causal
        and isinstance(getattr(config, "vocab_size", None), int)
        and hasattr(model, "get_output_embeddings")
    )


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare(
    model, calibration, tokenizer, seq_len: int, max_tokens: int | None
) -> tuple[Calibration | None, str]:
    """Normalise the user's calibration input: ``(data, "")``, or ``(None, why there is none)``."""
    if calibration is None:
        if not can_generate(model) or model.get_output_embeddings() is None:
            return None, "no calibration data was given and the model cannot generate its own"
        length = min(DEFAULT_SELF_LENGTH, max_positions(model) or DEFAULT_SELF_LENGTH)
        try:
            batches = self_generated(model, DEFAULT_SELF_SEQUENCES, length)
        except Exception as error:  # reported: the caller falls back to plain SVD and says why
            return None, f"the model could not generate calibration text ({type(error).__name__}: {error})"
        note = f"self-generated: {DEFAULT_SELF_SEQUENCES} sampled sequences of {length} tokens"
        return Calibration(batches, f"{note} (pass calibration= for better quality)"), ""
    if (
        isinstance(calibration, (list, tuple))
        and calibration
        and all(isinstance(t, str) for t in calibration)
    ):
        if tokenizer is None:
            raise ValueError(
                "calibration texts need a tokenizer: optimize(..., calibration=texts, tokenizer=tok)"
            )
        batches = from_texts(list(calibration), tokenizer, seq_len, max_tokens)
        tokens = sum(b.numel() for b in batches)
        return Calibration(batches, f"{len(calibration)} text(s), {tokens} tokens"), ""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be token tensors, a DataLoader or texts, got {type(calibration).__name__}"
        )
    batches, total = [], 0
    for item in calibration:
        batch = _as_batch(item)
        batches.append(batch)
        total += batch.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    if not batches:
        raise ValueError("calibration data is empty")
    return Calibration(batches, f"{len(batches)} user batch(es), {total} tokens"), ""


def collect_grams(
    model: nn.Module, hooks: dict[object, str], calibration: Calibration, progress: bool = False
) -> tuple[dict[object, torch.Tensor], int]:
    """Run the calibration batches; return ``{key: Σ xᵀx (float64)}`` for each hooked module's input.

    ``hooks`` maps a caller's key to the path of a module whose first positional input is the
    tensor to whiten.  Returns the Grams and the number of token rows each one saw.
    """
    grams: dict[object, torch.Tensor] = {}
    rows: dict[object, int] = {}
    handles = []
    for key, path in hooks.items():

        def hook(module, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            gram = x.t() @ x  # float32 product of one batch ...
            if key in grams:
                grams[key] += gram.double()  # ... accumulated in float64
            else:
                grams[key] = gram.double()
            rows[key] = rows.get(key, 0) + x.shape[0]

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            kwargs = (
                {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            )
            for batch in tqdm(calibration.batches, desc="calibrate", unit="batch", disable=not progress):
                model(batch.to(device), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return grams, min(rows.values(), default=0)

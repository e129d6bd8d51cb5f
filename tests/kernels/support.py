"""Helpers for the kernel tests that need a whole model (kept here so no test imports conftest)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100


def tiny_llama(seed: int = 0) -> nn.Module:
    """A randomly initialised two-layer LLaMA small enough to run on the stand-in in seconds."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Token ids in [2, VOCAB), reproducible from ``seed``."""
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits

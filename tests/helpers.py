"""Tiny random Hugging Face models, exactly-low-rank weights and model-state checks for the tests."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 128, 2, 100


def _decoder(**overrides) -> dict:
    """The tiny decoders' config fields, with ``overrides`` (e.g. ``num_hidden_layers=3``)."""
    fields = dict(
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_key_value_heads=2,
    )
    return {**fields, **overrides}


def _tiny_configs():
    import transformers as T

    common = dict(num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=VOCAB)
    decoder = _decoder()
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**decoder)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(head_dim=16, **decoder)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**decoder)),
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig(head_dim=16, **decoder)),
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(pad_token_id=0, **decoder)),
        "gpt2": (
            T.GPT2LMHeadModel,
            T.GPT2Config(
                n_embd=HIDDEN,
                n_inner=INTERMEDIATE,
                n_layer=LAYERS,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        "opt": (
            T.OPTForCausalLM,
            T.OPTConfig(
                hidden_size=HIDDEN,
                ffn_dim=INTERMEDIATE,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
                **common,
            ),
        ),
        "bert": (T.BertModel, T.BertConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, **common)),
    }


ARCHITECTURES = ("llama", "qwen3", "mistral", "gemma", "phi3", "gpt2", "opt", "bert")
EXPECTED = {  # pattern and activation each architecture's MLP must be recognised as
    "llama": ("gated_mlp", "silu"),
    "qwen3": ("gated_mlp", "silu"),
    "mistral": ("gated_mlp", "silu"),
    "gemma": ("gated_mlp", "gelu_tanh"),
    "phi3": ("gated_mlp", "silu"),
    "gpt2": ("plain_mlp", "gelu_tanh"),
    "opt": ("plain_mlp", "relu"),
    "bert": ("plain_mlp", "gelu"),
}


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """``tiny_model("llama")`` with some config fields changed (another depth, vocabulary, width)."""
    import transformers as T

    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(**_decoder(**overrides))).eval()


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    model_class, config = _tiny_configs()[name]
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_decoder(kind: str = "llama", seed: int = 0, intermediate_size: int = 160) -> nn.Module:
    """A 2-layer LLaMA or Qwen3 with intermediate size 160 (ranks of 8-blocks leave room) and 128 tokens."""
    import transformers as T

    model_class, config_class, extra = {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig, {}),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, {"head_dim": 16}),
    }[kind]
    config = config_class(
        **_decoder(vocab_size=128, intermediate_size=intermediate_size, max_position_embeddings=64), **extra
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def make_low_rank_(model: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """Give every linear weight of ``model`` exactly rank ``rank`` (so truncated SVD is exact)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            rows, cols = module.weight.shape
            left = torch.randn(rows, rank, generator=generator)
            right = torch.randn(rank, cols, generator=generator)
            module.weight.data = (left @ right / (rank * cols) ** 0.5).to(module.weight.dtype)
    return model


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def token_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor], module_types: list[type]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key
    assert [type(m) for m in model.modules()] == module_types


WORDS = [f"w{i}" for i in range(VOCAB - 2)]  # with [UNK] and </s>: exactly the tiny models' vocabulary


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"[UNK]": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>")

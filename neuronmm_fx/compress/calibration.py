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

import contextlib
import hashlib
import inspect
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from neuronmm_fx.compress.factorize import GramAccumulator
from neuronmm_fx.compress.layerwise import release_free_memory
from neuronmm_fx.config import is_positive_int
from neuronmm_fx.errors import ConfigError

DEFAULT_SELF_SEQUENCES = 128  # sampled sequences a causal LM writes for itself ...
DEFAULT_SELF_LENGTH = 64  # ... of this many tokens (8,192 in all: enough for 1536-wide Grams)
SELF_TEMPERATURE = 1.0  # the model's own distribution ...
SELF_TOP_P = 0.95  # ... without its least likely tail
GENERATION_BATCH = 128  # sequences sampled together at most (decoding is efficient only for wide batches)
GENERATION_KV_BUDGET = 192 << 20  # ... and fewer where their KV cache would pass this many bytes, so the
#   sampling's memory does not grow with depth (SmolLM2: 1.5 MiB per 64-token sequence in bf16, 128 fit)
DEDUP_PREFIX = 8  # sequences whose first generated tokens repeat an earlier one's are dropped
MIN_DISTINCT_SHARE = 0.25  # and so are degenerate ones with fewer distinct tokens than this share
PACKED_LENGTH = 512  # kept sequences are packed end to end into rows of this many tokens, so that
#                      Grams see positions as deep as in real use (measured on SmolLM2: perplexity
#                      2.46× → 2.03× dense at ratio 0.2, the same tokens unpacked and packed)


def fingerprint(model: nn.Module) -> str:
    """Identifies a model's architecture and weights (class, parameter names, shapes, checksums)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            checksum = parameter.detach().double().sum().item() if parameter.is_floating_point() else 0
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}:{checksum!r};".encode())
    return digest.hexdigest()[:16]


@dataclass
class Calibration:
    """Token batches to calibrate on, where they came from, and what was measured on them.

    Returned by :func:`neuronmm_fx.calibrate` and accepted by ``optimize(calibration=...)``: several
    ``optimize`` calls on the same dense model (other ratios, allocations) then reuse the tokens and
    the measured loss curves instead of recomputing them.  ``model_fingerprint`` ties it to the
    model it was made for; another model is refused.
    """

    batches: list[torch.Tensor]  # each (batch, tokens) of token ids
    source: str
    model_fingerprint: str | None = None
    curves: dict = field(default_factory=dict, repr=False)  # sensitivity, by settings and matrix name
    seconds: float = 0.0  # time spent making the batches

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def check_model(self, model: nn.Module) -> None:
        if self.model_fingerprint is not None and fingerprint(model) != self.model_fingerprint:
            raise ConfigError(
                "this Calibration was made for another model (or for this one before its weights changed); "
                "run neuronmm_fx.calibrate() on the model you optimize"
            )


def _as_batch(item, vocab: int | None) -> torch.Tensor:
    """One calibration batch as (batch, tokens) ids, or a model's feature tensor; ``ConfigError``
    naming the problem otherwise (``vocab``: the model's vocabulary size, when it takes tokens)."""
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise ConfigError(f"a calibration batch is a dict without 'input_ids' (keys: {sorted(item)})")
        item = item["input_ids"]
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise ConfigError(
            f"calibration batches must be tensors (or dicts with input_ids), got {type(item).__name__}"
        )
    if vocab is None and item.dtype.is_floating_point:  # feature inputs of a model without tokens
        return item
    if item.dtype.is_floating_point or item.dtype.is_complex or item.dtype == torch.bool:
        raise ConfigError(f"calibration token ids must be integers, got a {item.dtype} tensor")
    if item.dim() not in (1, 2) or item.numel() == 0:
        raise ConfigError(
            f"calibration token ids must be a non-empty (tokens,) or (batch, tokens) tensor, got shape "
            f"{tuple(item.shape)}"
        )
    if vocab is not None and (int(item.min()) < 0 or int(item.max()) >= vocab):
        raise ConfigError(
            f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary), got "
            f"{int(item.min())}..{int(item.max())}"
        )
    return item.long().reshape(1, -1) if item.dim() == 1 else item.long()


def vocabulary_size(model: nn.Module) -> int | None:
    """The vocabulary of a model that takes token ids, or None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def split_tokens(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Cut a 1-D token stream into (1, seq_len) batches, at most ``max_tokens`` tokens in all.

    A tail shorter than ``seq_len`` (but of at least two tokens) becomes one shorter batch.
    """
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    pieces = [ids[i : i + seq_len] for i in range(0, ids.numel(), seq_len)]
    return [piece.unsqueeze(0) for piece in pieces if piece.numel() >= 2]  # a shorter tail is kept


def from_texts(texts: list[str], tokenizer, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    return split_tokens(ids, seq_len, max_tokens)


SAMPLING_TOP_K = 256  # top-p is applied within the k most likely tokens (a full-vocabulary sort per step
#                       costs more than the model's forward on a CPU)


def _distinct_enough(row: torch.Tensor) -> bool:
    return row.unique().numel() >= MIN_DISTINCT_SHARE * row.numel()


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row: temperature, then nucleus (top-p) sampling within the top-k tokens."""
    top, index = torch.topk(logits.float() / SELF_TEMPERATURE, min(SAMPLING_TOP_K, logits.shape[-1]))
    probs = torch.softmax(top, dim=-1)  # (rows, k), descending
    outside = probs.cumsum(-1) - probs > SELF_TOP_P  # tokens after the nucleus is full
    probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return index.gather(1, choice)


@torch.no_grad()
def _sample_sequences(model: nn.Module, start: torch.Tensor, length: int, generator) -> torch.Tensor:
    """Extend ``start`` (rows, 1) to (rows, length) by sampling with the model's KV cache."""
    # transformers 5 names the KV cache ``cache``; earlier versions ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = [start]
    out = model(start, use_cache=True)
    for _ in range(length - 1):
        following = _sample(out.logits[:, -1], generator)
        tokens.append(following)
        if len(tokens) == length:
            break
        out = model(following, use_cache=True, **{name: getattr(out, name)})
    return torch.cat(tokens, dim=1)


def forward_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype a forward under :func:`forward_precision` computes in: ``dtype`` for a float32
    model, the model's own dtype for one already narrower."""
    parameter_dtype = next(model.parameters()).dtype
    return dtype if parameter_dtype == torch.float32 else parameter_dtype


def forward_precision(model: nn.Module, dtype: torch.dtype):
    """Autocast to ``dtype`` for a float32 model's forward passes (half the activation memory, and
    bf16 matmuls run about twice as fast on CPUs with bf16 units); a model already in a narrower dtype
    runs as it is.  Weight casts are not cached, so no second copy of the model is ever held."""
    if forward_dtype(model, dtype) == next(model.parameters()).dtype:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype, cache_enabled=False)


def kv_bytes_per_sequence(model: nn.Module, length: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one sampled sequence of ``length`` tokens holds in the KV cache (the
    decoder config's layers × key/value heads × head width; 0 where the config does not say)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, width)):
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return 2 * layers * kv_heads * head_dim * length * element


def generation_batch(model: nn.Module, length: int, dtype: torch.dtype) -> int:
    """Sequences to sample at once: ``GENERATION_BATCH``, fewer where their KV cache would pass
    ``GENERATION_KV_BUDGET`` (at least one)."""
    per_sequence = kv_bytes_per_sequence(model, length, dtype)
    if per_sequence <= 0:
        return GENERATION_BATCH
    return max(1, min(GENERATION_BATCH, GENERATION_KV_BUDGET // per_sequence))


def self_generated(
    model: nn.Module,
    sequences: int,
    length: int,
    seed: int = 0,
    progress: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[torch.Tensor], int]:
    """Text the causal LM samples for itself from its BOS token (or seeded random first tokens), packed.

    Sampling follows the model's own distribution (temperature 1) without its least likely tail
    (top-p 0.95 within the 256 likeliest tokens), as many sequences at a time as
    :func:`generation_batch` allows, deterministic for a seed, with the forward passes in ``dtype``
    (autocast; the weight casts are not cached, so no second copy of the model is held).
    Near-duplicates (same first ``DEDUP_PREFIX`` generated tokens) and degenerate repetitions are
    dropped; the rest are packed end to end (:func:`pack`) into rows of up to ``PACKED_LENGTH``
    tokens.  Returns the batches and how many sequences were dropped.
    """
    config = model.config
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    bos = getattr(config, "bos_token_id", None)
    kept: list[torch.Tensor] = []
    seen: set[tuple[int, ...]] = set()
    dropped = 0
    width = generation_batch(model, length, forward_dtype(model, dtype))  # the KV cache's dtype
    chunks = range(0, sequences, width)
    for first in tqdm(chunks, desc="write calibration text", unit="batch", disable=not progress):
        count = min(width, sequences - first)
        if isinstance(bos, int) and 0 <= bos < config.vocab_size:
            start = torch.full((count, 1), bos, dtype=torch.long, device=device)
        else:
            start = torch.randint(0, config.vocab_size, (count, 1), generator=generator, device=device)
        with forward_precision(model, dtype):
            rows = _sample_sequences(model, start, length, generator).cpu()
        for row in rows:
            prefix = tuple(row[1 : 1 + DEDUP_PREFIX].tolist())
            if prefix in seen or not _distinct_enough(row):
                dropped += 1
                continue
            seen.add(prefix)
            kept.append(row)
        release_free_memory()  # the KV cache's freed pages go back before the next batch or step
    if not kept:
        raise RuntimeError("every self-generated sequence was a duplicate or degenerate")
    return pack(torch.stack(kept), min(PACKED_LENGTH, max_positions(model) or PACKED_LENGTH)), dropped


def pack(rows: torch.Tensor, length: int) -> list[torch.Tensor]:
    """(n, L) sequences laid end to end into rows of ``length // L`` whole sequences; the sequences
    left over stay a batch of their own."""
    per_row = max(1, length // rows.shape[1])
    full = rows.shape[0] // per_row
    batches = [rows[: full * per_row].reshape(full, per_row * rows.shape[1])] if full else []
    return batches + ([rows[full * per_row :]] if rows.shape[0] > full * per_row else [])


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
    model,
    calibration,
    tokenizer,
    seq_len: int,
    max_tokens: int | None,
    progress: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Calibration | None, str]:
    """Normalise the user's calibration input: ``(data, "")``, or ``(None, why there is none)``.

    A causal LM given no data writes its own, sampling in ``dtype``."""
    if isinstance(calibration, Calibration):
        calibration.check_model(model)
        return calibration, ""
    started = time.perf_counter()
    if calibration is None:
        if not can_generate(model) or model.get_output_embeddings() is None:
            return None, "no calibration data was given and the model cannot generate its own"
        length = min(DEFAULT_SELF_LENGTH, max_positions(model) or DEFAULT_SELF_LENGTH)
        sequences = max(2, (max_tokens or DEFAULT_SELF_SEQUENCES * length) // length)
        try:
            batches, dropped = self_generated(model, sequences, length, progress=progress, dtype=dtype)
        except Exception as error:  # reported: the caller falls back to plain SVD and says why
            return None, f"the model could not generate calibration text ({type(error).__name__}: {error})"
        tokens = sum(b.numel() for b in batches)
        note = (
            f"self-generated: {tokens // length} sampled sequences of {length} tokens, packed into rows of "
            f"{batches[0].shape[1]} ({dropped} near-duplicate or degenerate dropped)"
        )
        data = Calibration(batches, note, seconds=time.perf_counter() - started)
        return data, ""
    if (
        isinstance(calibration, (list, tuple))
        and calibration
        and all(isinstance(t, str) for t in calibration)
    ):
        if tokenizer is None:
            raise ConfigError(
                "calibration texts need a tokenizer: optimize(..., calibration=texts, tokenizer=tok)"
            )
        batches = from_texts(list(calibration), tokenizer, seq_len, max_tokens)
        tokens = sum(b.numel() for b in batches)
        if not batches:
            raise ConfigError("the calibration texts gave fewer than two tokens: nothing to calibrate on")
        return Calibration(batches, f"{len(calibration)} text(s), {tokens} tokens"), ""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise ConfigError(
            f"calibration must be token tensors, a DataLoader or texts, got {type(calibration).__name__}"
        )
    if isinstance(calibration, (str, bytes)):
        raise ConfigError("calibration texts go in a list: calibration=[text, ...] with tokenizer=")
    batches, total = [], 0
    vocab = vocabulary_size(model)
    for item in calibration:
        batch = _as_batch(item, vocab)
        batches.append(batch)
        total += batch.numel()
        if max_tokens is not None and total >= max_tokens:
            break
    if not batches:
        raise ConfigError("calibration data is empty")
    return Calibration(batches, f"{len(batches)} user batch(es), {total} tokens"), ""


def collect_grams(
    model: nn.Module, hooks: dict[object, str], calibration: Calibration, progress: bool = False
) -> tuple[dict[object, torch.Tensor], int]:
    """Run the calibration batches; return ``{key: Σ xᵀx (float64)}`` for each hooked module's input.

    ``hooks`` maps a caller's key to the path of a module whose first positional input is the
    tensor to whiten.  Returns the Grams and the number of token rows each one saw.
    """
    grams = GramAccumulator()  # float32 products of one batch, accumulated in float64
    handles = []
    for key, path in hooks.items():

        def hook(module, args, key=key):
            grams.add(key, args[0].detach())  # (…, K) -> Σ xᵀx over the tokens

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
    return grams.grams, min(grams.tokens.values(), default=0)


DEFAULT_TOKENS = DEFAULT_SELF_SEQUENCES * DEFAULT_SELF_LENGTH


def calibrate(
    model: nn.Module,
    data=None,
    *,
    tokenizer=None,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = 512,
    progress: bool = False,
) -> Calibration:
    """Calibration tokens for ``model``, to pass as ``optimize(model, calibration=...)`` as often as needed.

    ``data`` takes what ``optimize(calibration=...)`` takes (token tensors, a DataLoader, texts with
    ``tokenizer``); left out, a causal LM writes its own (``tokens`` tokens in sequences of
    ``DEFAULT_SELF_LENGTH``).  The result remembers the model (a fingerprint of its weights) and
    caches what later calls measure on it, such as the loss curves of global allocation, so a sweep
    over ratios pays for generation and measurement once.
    """
    for name, value in (("tokens", tokens), ("seq_len", seq_len)):
        if not is_positive_int(value):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(data, Calibration):
        data.check_model(model)
        return data
    started = time.perf_counter()
    result, missing = prepare(model, data, tokenizer, seq_len, tokens, progress)
    if result is None:
        raise ConfigError(f"cannot calibrate: {missing}")
    result.model_fingerprint = fingerprint(model)
    result.seconds = time.perf_counter() - started
    return result

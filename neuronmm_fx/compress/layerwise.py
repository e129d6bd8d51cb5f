"""Run a model one block at a time on cached calibration inputs.

Transformers are an embedding, a stack of identical blocks (an ``nn.ModuleList``) and a head.  The
hidden states entering block 0 are captured once per calibration batch (the model runs up to block 0
and stops); then each block is run alone, on a working copy in the calibration dtype, and its outputs
become the next block's inputs.  Whatever a caller does to one block's working copy (compress a
projection, observe its inputs) is therefore seen by every block after it, and at any time only
one block's copy and the calibration hidden states are held: memory grows with one layer and the
number of calibration tokens, not with the depth of the model.

Guarantees: the user's model is never modified (blocks are copied before any change); the cached
inputs are detached, in the working dtype, and in calibration-batch order.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


@dataclass
class LayerStack:
    """The model's repeated blocks: ``model.get_submodule(path)[i]`` is block ``i``."""

    path: str
    blocks: nn.ModuleList

    def block_of(self, module_path: str) -> int | None:
        """Index of the block that holds ``module_path``, or None."""
        prefix = f"{self.path}." if self.path else ""
        if not module_path.startswith(prefix):
            return None
        head = module_path[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.blocks) else None

    def relative(self, index: int, module_path: str) -> str:
        """``module_path`` inside block ``index`` ("" for the block itself)."""
        prefix = f"{self.path}.{index}" if self.path else str(index)
        return module_path[len(prefix) + 1 :]


def find_layer_stack(model: nn.Module, module_paths: list[str]) -> tuple[LayerStack | None, str]:
    """The ``ModuleList`` of blocks holding every path in ``module_paths``, or ``(None, why not)``."""
    if not module_paths:
        return None, "nothing to compress"
    first = module_paths[0].split(".")
    stack = None
    for depth in range(len(first) - 1):
        candidate = ".".join(first[:depth])
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            break
        if isinstance(module, nn.ModuleList) and first[depth].isdigit():
            stack = LayerStack(candidate, module)
            break
    if stack is None:
        return None, "the compressed layers do not sit in a stack of blocks (an nn.ModuleList)"
    outside = [p for p in module_paths if stack.block_of(p) is None]
    if outside:
        return None, f"{outside[0]} lies outside the block stack {stack.path}"
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(set(layer_types)) > 1:
        return None, f"its blocks differ in attention type ({', '.join(sorted(set(map(str, layer_types))))})"
    return stack, ""


def _convert(value, dtype: torch.dtype):
    """Detach every tensor in ``value``; floating ones go to ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_convert(v, dtype) for v in value)
    if isinstance(value, list):
        return [_convert(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _convert(v, dtype) for k, v in value.items()}
    return value


@dataclass
class BlockInput:
    """What one block receives for one calibration batch; ``hidden`` is the running hidden state."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden})


def micro_batches(batches: list[torch.Tensor], tokens: int, max_tokens: int) -> list[torch.Tensor]:
    """Re-cut (batch, seq) token batches into batches of at most ``tokens`` tokens, ``max_tokens`` in all."""
    rows = [row for batch in batches for row in batch]
    out, used, index = [], 0, 0
    while index < len(rows) and used < max_tokens:
        length = rows[index].numel()
        length = max(length, 1)
        take = max(1, min(tokens // length, -(-(max_tokens - used) // length)))
        group = [r for r in rows[index : index + take] if r.numel() == length]
        out.append(torch.stack(group))
        used += sum(r.numel() for r in group)
        index += len(group)
    return out


def _forward_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def capture_inputs(
    model: nn.Module, stack: LayerStack, batches: list[torch.Tensor], dtype: torch.dtype
) -> list[BlockInput]:
    """Block 0's arguments for every calibration batch (the model stops there)."""
    captured: list[BlockInput] = []

    def grab(module, args, kwargs):
        captured.append(BlockInput(_convert(args, dtype), _convert(kwargs, dtype)))
        raise StopForward

    handle = stack.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    extra = _forward_kwargs(model)
    try:
        for batch in batches:
            try:
                model(batch.to(device), **extra)
            except StopForward:
                pass
            else:
                raise RuntimeError(f"{stack.path}.0 was never called by the model's forward")
    finally:
        handle.remove()
    return captured


@dataclass
class Step:
    """One block of a :func:`walk`: its working copy, its inputs, and (optionally) outputs the caller
    already computed with the final working copy, so the walk need not run the block again."""

    index: int
    work: nn.Module
    inputs: list[BlockInput]
    outputs: list[torch.Tensor] | None = None
    replay: list[dict[str, list]] | None = None  # children's outputs to reuse (see :func:`recording`)


def walk(
    model: nn.Module,
    stack: LayerStack,
    batches: list[torch.Tensor],
    dtype: torch.dtype,
    last_block: int,
    desc: str,
    progress: bool = False,
) -> Iterator[Step]:
    """Blocks ``0..last_block`` in order, each as a :class:`Step` whose working copy the caller may
    change; the next block's inputs are that copy's outputs."""
    inputs = capture_inputs(model, stack, batches, dtype)
    for index in tqdm(range(last_block + 1), desc=desc, unit="block", disable=not progress):
        step = Step(index, working_copy(stack.blocks[index], dtype), inputs)
        yield step
        if index < last_block:
            outputs = step.outputs if step.outputs is not None else run(step.work, inputs, step.replay)
            inputs = [item.with_hidden(out) for item, out in zip(inputs, outputs, strict=True)]
        del step
        release_free_memory()


def working_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A detached copy of one block, in ``dtype``, that the caller may change at will."""
    work = copy.deepcopy(block).to(dtype)
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    return work.eval()


@torch.no_grad()
def run(
    block: nn.Module, inputs: list[BlockInput], replay: list[dict[str, list]] | None = None
) -> Iterator[torch.Tensor | None]:
    """The block's output hidden state for each input, in order (None where a hook stopped it).

    With ``replay`` (from :func:`recording`, one entry per input), the recorded children return
    their recorded outputs instead of running, call for call; further calls run them."""
    with replaying(block, replay) as select:
        for index, item in enumerate(inputs):
            select(index)
            try:
                out = block(*item.args, **item.kwargs)
            except StopForward:
                yield None
                continue
            yield out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def recording(block: nn.Module, skip: str) -> Iterator[list[dict[str, list]]]:
    """Record the outputs of the block's direct children except ``skip``, per block call.

    Yields a list that gets one ``{child name: [output of each call]}`` per call of the block.  A
    child that ran before a changed submodule (``skip``: the MLP module the weights change in) saw
    the same inputs as it will next time, so a later :func:`run` may replay its outputs instead of
    computing them again: on a decoder block that is the attention and its norms.  Outputs are
    cloned, in case the block later writes into them in place.
    """
    calls: list[dict[str, list]] = []
    handles = [block.register_forward_pre_hook(lambda module, args: calls.append({}))]
    for name, child in block.named_children():
        if name == skip:
            continue

        def keep(module, args, output, name=name):
            calls[-1].setdefault(name, []).append(tree_map_only(torch.Tensor, torch.clone, output))

        handles.append(child.register_forward_hook(keep))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replaying(block: nn.Module, replay: list[dict[str, list]] | None) -> Iterator[Callable[[int], None]]:
    """Within: the recorded children of ``block`` return their recorded outputs for the selected
    call (``select(index)``), one per call, and run normally once those are used up."""
    state: dict = {"recorded": {}, "used": {}}

    def select(index: int) -> None:
        state["recorded"] = replay[index] if replay is not None else {}
        state["used"] = {}

    shadowed = []
    names = {name for call in replay or [] for name in call}
    try:
        for name in sorted(names):
            child = block.get_submodule(name)
            if "forward" in vars(child):  # shadowed by someone else: let it run
                continue
            original = child.forward

            def forward(*args, _name=name, _original=original, **kwargs):
                outputs = state["recorded"].get(_name, [])
                used = state["used"].get(_name, 0)
                state["used"][_name] = used + 1
                return outputs[used] if used < len(outputs) else _original(*args, **kwargs)

            child.forward = forward
            shadowed.append(child)
        yield select
    finally:
        for child in shadowed:
            del child.forward


def run_observed(
    block: nn.Module,
    inputs: list[BlockInput],
    observers: dict[str, Callable[[int, torch.Tensor], None]],
    stop_after: set[str] | frozenset[str] = frozenset(),
) -> list[torch.Tensor | None]:
    """:func:`run` with :func:`observe_inputs` hooks in place for the duration; the outputs."""
    handles = observe_inputs(block, observers, stop_after)
    try:
        return list(run(block, inputs))
    finally:
        for handle in handles:
            handle.remove()


def observe_inputs(
    block: nn.Module,
    paths: dict[str, Callable[[int, torch.Tensor], None]],
    stop_after: set[str] | frozenset[str] = frozenset(),
) -> list[torch.utils.hooks.RemovableHandle]:
    """Call ``paths[p](batch_index, x)`` with the input of each submodule ``p`` of ``block``.

    ``batch_index`` counts the calls of that submodule, i.e. the calibration batch when every batch
    runs the block once.  Once every path in ``stop_after`` has been seen for the current batch, the
    block's forward is cut short (:func:`run` then yields None): what comes after is not needed.
    Returns the hook handles (remove them when done).
    """
    calls = dict.fromkeys(paths, 0)
    handles = []
    for path, observer in paths.items():

        def hook(module, args, path=path, observer=observer):
            observer(calls[path], args[0].detach())
            calls[path] += 1
            if path in stop_after and all(calls[p] >= calls[path] for p in stop_after):
                raise StopForward

        handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    return handles


TRIM_EVERY_BLOCKS = 8  # under checkpointing, free heap pages go back every this many block runs: each
#   block's saved input stays live between the freed activations of the blocks around it, so glibc's
#   heap fragments in proportion to depth (on a 120-block model the Fisher pass peaked 787 MiB over its
#   start without the trim, 417 MiB with it; SmolLM2's 30 blocks 370-400 and 295 MiB)


@contextlib.contextmanager
def checkpointed(stack: LayerStack) -> Iterator[None]:
    """Within the block, every block of ``stack`` runs under activation checkpointing.

    A backward pass through the whole model then keeps each block's input and one block's
    activations at a time (recomputed during backward), instead of every block's activations: the
    working set grows with one layer, not with depth.  Each block's ``forward`` is shadowed by an
    instance attribute for the duration and the attribute removed afterwards; no parameter, buffer
    or mode of the model changes.
    """
    shadowed = []
    calls = itertools.count(1)

    def trimmed(original: Callable) -> Callable:
        def run(*args, **kwargs):  # called for the forward and again for the recomputation
            if next(calls) % TRIM_EVERY_BLOCKS == 0:
                release_free_memory()
            return original(*args, **kwargs)

        return run

    try:
        for block in stack.blocks:
            if "forward" in vars(block):  # someone else already shadows it: leave that block alone
                continue
            original = trimmed(block.forward)

            def forward(*args, _original=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            shadowed.append(block)
        yield
    finally:
        for block in shadowed:
            del block.forward


@functools.cache
def _libc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc only; elsewhere nothing).

    PyTorch's CPU tensors come from ``malloc``.  Once glibc has freed one large block, it serves
    blocks up to that size from its heap and keeps freed pages there, so a loop of short-lived
    activations ratchets the resident memory up although the live tensors stay small (on SmolLM2 the
    Fisher pass held 158 MiB of live tensors and 560 MiB of resident memory).  Called between pieces
    of work, this keeps the resident set near what is live.
    """
    trim = _libc_trim()
    if trim is not None:
        trim(0)

"""Hand-off to the AWS Neuron SDK.

Two generations of PyTorch support ship under the name ``torch-neuronx``:

* the XLA-based one (SDK up to 2.31) offers ``torch_neuronx.trace(model, example_inputs, ...)``; its
  tensors live on the ``xla`` device;
* the native TorchNeuron backend (SDK 2.33 and later, Trn2/Trn3) has no ``trace``; it adds a ``neuron``
  device and ``torch.compile(model, backend="neuron")``.  Use
  ``torch.compile(model, backend="neuronmm", options={"compiler": "neuron"})`` there.

:func:`trace` optimizes the model if asked (``ratio=``), registers the NKI kernels as the ``neuronmm``
ops' implementation for the SDK's device, and calls ``torch_neuronx.trace``.  Without the SDK it fails
at once with what to install and where.  Nothing here imports the SDK at module import time.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from neuronmm_fx.errors import NeuronMMError

log = logging.getLogger("neuronmm_fx.neuron")

NEURON_PIP_INDEX = "https://pip.repos.neuron.amazonaws.com"
NEURON_SETUP_DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/setup/index.html"
OPS = ("xuv", "svd_mlp")


class NeuronSDKError(NeuronMMError, RuntimeError):
    """The Neuron SDK needed for a hand-off is missing or too old/new for the route asked for."""


@dataclass(frozen=True)
class SDKStatus:
    """What of the Neuron SDK this Python can use."""

    torch_neuronx: bool  # ``import torch_neuronx`` works (PyPI's placeholder does not count)
    has_trace: bool  # XLA-based torch-neuronx with ``torch_neuronx.trace``
    compile_backend: bool  # ``torch.compile(backend="neuron")`` is registered (native TorchNeuron)
    version: str | None
    device_type: str | None  # device the SDK's tensors live on: "xla" or "neuron"
    detail: str = ""  # why torch_neuronx did not import


def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as error:  # ImportError, or a placeholder package raising something else
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _neuron_compile_backend() -> bool:
    try:
        from torch._dynamo import list_backends

        return "neuron" in list_backends(exclude_tags=())
    except Exception:
        return False


def sdk_status() -> SDKStatus:
    """Probe the Neuron SDK (imports ``torch_neuronx`` if it is installed; never raises)."""
    module, detail = _import("torch_neuronx")
    if module is None:
        return SDKStatus(False, False, _neuron_compile_backend(), None, None, detail)
    has_trace = callable(getattr(module, "trace", None))
    native = torch._C._get_privateuse1_backend_name() == "neuron"
    device_type = "neuron" if native else ("xla" if has_trace else None)
    version = getattr(module, "__version__", None)
    return SDKStatus(True, has_trace, _neuron_compile_backend(), version, device_type)


def missing_sdk_message(what: str, detail: str = "") -> str:
    why = f" (import torch_neuronx: {detail})" if detail else ""
    return (
        f"{what} needs the AWS Neuron SDK, and torch_neuronx is not importable here{why}. Install it on a "
        f"Trainium/Inferentia instance from AWS's Neuron pip repository, not PyPI (PyPI only has "
        f"placeholders): pip install torch-neuronx neuronx-cc --extra-index-url {NEURON_PIP_INDEX} "
        f"(or use a Neuron DLAMI / Deep Learning Container; setup: {NEURON_SETUP_DOCS}). Off Neuron, "
        "neuronmm_fx.optimize(model, ...) and torch.compile(model, backend='neuronmm') run on CPU."
    )


# --- kernels for the SDK's device -----------------------------------------------------------------------

_REGISTERED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class KernelRegistration:
    """Outcome of :func:`register_neuron_kernels`."""

    device_type: str | None
    registered: tuple[str, ...]  # ops whose device implementation is (now) registered
    reason: str = ""  # why some or all were not


def _launcher(dispatch: ModuleType, op: str):
    """The device implementation of ``op``: the launcher ``dispatch.<op>`` (the op's own signature) run
    inside ``dispatch.use_nki_kernels()``; None if the kernels lack either."""
    launcher, mode = getattr(dispatch, op, None), getattr(dispatch, "use_nki_kernels", None)
    if not (callable(launcher) and callable(mode)):
        return None

    def run(*args):
        with mode():
            return launcher(*args)

    run.__name__ = f"neuronmm_{op}_nki"
    return run


def register_neuron_kernels(device_type: str | None = None) -> KernelRegistration:
    """Register the NKI kernels as the ``neuronmm`` ops' implementation for the SDK's device.

    Only when the SDK imports; safe to call many times and when the kernels are absent (then nothing
    is registered and ``reason`` says why).  The launchers are ``neuronmm_fx.kernels.dispatch``'s
    ``xuv`` / ``svd_mlp`` run in ``use_nki_kernels()`` mode (same signatures as the ops).
    """
    status = sdk_status()
    if not status.torch_neuronx:
        why = missing_sdk_message("registering the Neuron kernels", status.detail)
        return KernelRegistration(None, (), why)
    device_type = device_type or status.device_type
    if device_type is None:
        why = "the installed torch_neuronx exposes neither an xla nor a neuron device"
        return KernelRegistration(None, (), why)
    try:
        from neuronmm_fx.kernels import dispatch
    except Exception as error:
        return KernelRegistration(device_type, (), f"neuronmm_fx.kernels did not import ({error})")
    done, missing = [], []
    for op in OPS:
        if (op, device_type) in _REGISTERED:
            done.append(op)
            continue
        launcher = _launcher(dispatch, op)
        if launcher is None:
            missing.append(f"neuronmm_fx.kernels.dispatch.{op} with use_nki_kernels")
            continue
        torch.library.register_kernel(f"neuronmm::{op}", device_type, launcher)
        _REGISTERED.add((op, device_type))
        done.append(op)
    reason = ""
    if missing:
        reason = (
            f"no launcher {', '.join(missing)}: those ops run their PyTorch reference implementation, "
            "which the SDK lowers like any other code"
        )
    if reason:
        log.warning("neuronmm: %s", reason)
    return KernelRegistration(device_type, tuple(done), reason)


# --- trace -------------------------------------------------------------------------------------------------


def trace(
    model: nn.Module,
    example_inputs,
    *,
    ratio: float | None = None,
    block: int = 128,
    optimize_options: dict | None = None,
    register_kernels: bool = True,
    **compiler_options,
):
    """Optimize ``model`` (when ``ratio`` is given) and compile it with ``torch_neuronx.trace``.

    ``example_inputs`` is a tensor or a tuple of positional tensors (what ``torch_neuronx.trace``
    takes); ``compiler_options`` go to ``torch_neuronx.trace`` unchanged (``compiler_args=``,
    ``compiler_workdir=``, ...); ``optimize_options`` go to :func:`neuronmm_fx.optimize`.  For a
    Hugging Face causal LM, trace :class:`neuronmm_fx.export.CausalLMLogits` ``(model)`` so that the
    traced function returns a tensor.  Returns what ``torch_neuronx.trace`` returns.
    """
    status = sdk_status()
    if not status.torch_neuronx:
        raise NeuronSDKError(missing_sdk_message("neuronmm_fx.neuron.trace", status.detail))
    if not status.has_trace:
        version = f" {status.version}" if status.version else ""
        raise NeuronSDKError(
            f"this torch_neuronx{version} has no torch_neuronx.trace (the native TorchNeuron backend of "
            "Neuron SDK 2.32 and later replaced it); compile with torch.compile(model, backend='neuronmm', "
            "options={'compiler': 'neuron'}) after model.to('neuron'), or install the XLA-based "
            "torch-neuronx (SDK 2.31 or earlier) for trace"
        )
    import torch_neuronx  # present: checked above

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if ratio is not None:
        from neuronmm_fx.api import optimize

        model = optimize(model, ratio, block=block, example_inputs=inputs, **(optimize_options or {}))
    if register_kernels:
        registration = register_neuron_kernels(status.device_type)
        log.info(
            "neuronmm kernels for %s: %s %s",
            registration.device_type,
            registration.registered,
            registration.reason,
        )
    return torch_neuronx.trace(model, inputs, **compiler_options)

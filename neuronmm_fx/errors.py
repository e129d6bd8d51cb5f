"""Exceptions raised by ``neuronmm_fx``; each message names the problem and what to do about it."""

from __future__ import annotations


class NeuronMMError(Exception):
    """Base class of every error ``neuronmm_fx`` raises on purpose."""


class ConfigError(NeuronMMError, ValueError):
    """An option passed to :func:`neuronmm_fx.optimize` is out of range or inconsistent."""


class UnsupportedModelError(NeuronMMError, TypeError):
    """The model cannot be compressed as it stands (no linear layers, a quantized weight, ...)."""


class NothingToCompressError(NeuronMMError):
    """Capture and matching ran, but no site could be rewritten; the message lists why."""


class CaptureError(NeuronMMError, RuntimeError):
    """``torch.export`` could not capture the model with the example inputs."""


class CheckpointError(NeuronMMError, ValueError):
    """A checkpoint does not fit the model it is loaded onto, or is not a neuronmm_fx checkpoint."""


class PassCheckError(NeuronMMError, AssertionError):
    """A graph pass broke one of the guarantees its docstring states (checked while checks are on)."""

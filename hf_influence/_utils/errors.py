"""Exceptions raised by hf_influence. Each narrows the built-in it subclasses."""

from __future__ import annotations


class ParameterSelectionError(ValueError):
    """The requested parameter selection is empty or malformed."""


class TaskInferenceError(TypeError):
    """No built-in task fits the model; the user must pass ``task=``."""


class InvalidInputError(ValueError):
    """A batch or dataset cannot be used as given (empty, missing columns, ...)."""


class IncompatibleBasisError(ValueError):
    """A saved artifact (eigenbasis, index, shard) belongs to another model or selection."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared in a loss, gradient or Hessian-vector product."""


class LissaDivergenceError(FloatingPointError):
    """The LiSSA recursion diverged; the message names the setting to change."""


class SingularHessianError(FloatingPointError):
    """``H + λI`` is (numerically) singular, so its inverse is undefined."""


class StaleIndexError(IncompatibleBasisError):
    """A saved kNN index was built on another model, embedding or training set."""

"""Exceptions raised by hf_influence. Each narrows the built-in it subclasses and shares one base,
so callers (the CLI among them) can catch every hf_influence error at once."""

from __future__ import annotations

import os


class HfInfluenceError(Exception):
    """Base of every error hf_influence raises on purpose; its message says what to do."""


class ParameterSelectionError(HfInfluenceError, ValueError):
    """The requested parameter selection is empty or malformed."""


class TaskInferenceError(HfInfluenceError, TypeError):
    """No built-in task fits the model; the user must pass ``task=``."""


class InvalidInputError(HfInfluenceError, ValueError):
    """A batch, dataset, config or path cannot be used as given (empty, missing columns, unknown keys, ...)."""


class IncompatibleBasisError(HfInfluenceError, ValueError):
    """A saved artifact (eigenbasis, index, shard, s_test) belongs to another model, selection or configuration."""


class MemoryBudgetError(HfInfluenceError, ValueError):
    """A call would hold more than ``memory_budget_gb`` at once (see ``Influence.estimate_cost``); refused before any
    work. The message names what does not fit, the figures, and the settings that make it fit.

    Attributes:
        estimate (`CostEstimate`): the estimate that was refused.
    """

    def __init__(self, message: str, estimate=None):
        super().__init__(message)
        self.estimate = estimate


class NonFiniteError(HfInfluenceError, FloatingPointError):
    """NaN or Inf appeared in a loss, gradient or Hessian-vector product."""


class LissaDivergenceError(HfInfluenceError, FloatingPointError):
    """The LiSSA recursion diverged; the message names the setting to change."""


class SingularHessianError(HfInfluenceError, FloatingPointError):
    """``H + λI`` is (numerically) singular, so its inverse is undefined."""


class StaleIndexError(IncompatibleBasisError):
    """A saved kNN index was built on another model, embedding or training set."""


class DamagedArtifactError(HfInfluenceError, ValueError):
    """A file hf_influence wrote and reads back (basis, index, shard, s_test, request or config file) is cut short,
    fails its checksum, or is not what its name says; the message names the file and the way out.

    Attributes:
        path (`Path`): the damaged file.
    """

    def __init__(self, message: str, path: os.PathLike | str | None = None):
        super().__init__(message)
        self.path = path


class CorruptShardError(DamagedArtifactError):
    """A saved score shard is unreadable, fails its checksum, or belongs to another request (it is recomputed)."""


class TrainerMixinError(HfInfluenceError, TypeError):
    """``InfluenceTrainerMixin`` was combined with a class that is not a ``transformers.Trainer``, or with arguments it cannot use."""


class RunInterrupted(HfInfluenceError):
    """SIGINT or SIGTERM stopped a sharded run after the shard in progress; a rerun continues it."""

"""The Hessian in a random subspace, ``QHQᵀ`` ``[p̄, p̄]`` for a map ``Q`` ``[p̄, P]`` (random projection's curvature), from
passes of batched Hessian-vector products sized by `hf_influence.engine.hvp_memory` within ``memory_budget_gb``:

- a dense orthonormal ``Q`` is held whole: one pass on its ``p̄`` rows, as many per batched backward as fit;
- a `hf_influence.engine.kronecker.KroneckerMap` is never held whole: its rows are materialised a block at a time, as
  many as one pass fits (:func:`subspace_rows_per_pass`), each block one pass.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers.utils import logging

from .hvp_memory import budgeted, pass_bytes
from .kronecker import KroneckerMap

logger = logging.get_logger(__name__)


def subspace_rows_per_pass(rank: int, num_params: int, itemsize: int, memory_budget_bytes: float, activation_bytes: int) -> int:
    """Rows of a Kronecker map materialised per Hessian pass of :func:`kronecker_subspace_hessian`: as many as a pass of
    batched HVPs on them (`hf_influence.engine.hvp_memory.pass_bytes`) fits in the budget, at least 1, at most ``rank``."""
    one = pass_bytes(1, num_params, itemsize, activation_bytes)
    per_row = pass_bytes(2, num_params, itemsize, activation_bytes) - one
    return int(max(1, min(rank, 1 + (memory_budget_bytes - one) // per_row)))


def kronecker_subspace_hessian(kmap: KroneckerMap, hvp: Callable[[torch.Tensor], torch.Tensor], memory_budget_bytes: float,
                               activation_bytes: int) -> torch.Tensor:
    """``ΦHΦᵀ`` ``[p̄, p̄]`` from ``hvp`` (``[P, c]`` → ``H`` times it), ``c`` rows of ``Φ`` materialised at a time, so
    the pass holds at most ``memory_budget_bytes`` (:func:`subspace_rows_per_pass`; ``activation_bytes``: what the
    largest Hessian batch's graph saves, `hf_influence.engine.hvp_memory.saved_activation_bytes`); each block of rows
    costs one pass of Hessian-vector products over the Hessian rows."""
    rank, num = kmap.shape
    step = subspace_rows_per_pass(rank, num, kmap.dtype.itemsize, memory_budget_bytes, activation_bytes)
    logger.info(f"Random projection (Kronecker map): the subspace Hessian takes {math.ceil(rank / step)} Hessian-vector pass(es) of "
                f"{step} of the {rank} map rows (vectors per batched backward, chosen from memory_budget_gb="
                f"{memory_budget_bytes / 2**30:g}): {pass_bytes(step, num, kmap.dtype.itemsize, activation_bytes) / 2**20:,.1f} "
                f"MiB per pass, counting the activations saved on the largest Hessian batch ({activation_bytes / 2**20:,.1f} MiB) "
                "once and again per row.")
    rows = [(kmap @ hvp(kmap.dense_rows(start, min(start + step, rank)).T)).T for start in range(0, rank, step)]
    return torch.cat(rows)  # rows of ΦHΦᵀ


def dense_subspace_hessian(directions: torch.Tensor, hvp: Callable[..., torch.Tensor], memory_budget_bytes: float,
                           activation_bytes: int) -> torch.Tensor:
    """``QHQᵀ`` ``[p̄, p̄]`` for orthonormal ``directions`` ``Q`` ``[p̄, P]`` from one pass of ``hvp`` (``(V, per_backward)``
    → ``H V``) on all ``p̄`` rows, as many per batched backward as fit the budget left beside ``Q``
    (`hf_influence.engine.hvp_memory.budgeted`, which logs a chunking)."""
    rank, num = directions.shape
    left = memory_budget_bytes - rank * num * directions.dtype.itemsize
    products = budgeted(hvp, num, directions.dtype.itemsize, activation_bytes, left, "Random projection (dense subspace)")
    return directions @ products(directions.T)  # [p̄, P] @ [P, p̄]

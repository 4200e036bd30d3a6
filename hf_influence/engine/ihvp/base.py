"""What the solvers share: the preconditioner contract and the damping check."""

from __future__ import annotations

from typing import Protocol

import torch

from ..._utils.errors import InvalidInputError


class Preconditioner(Protocol):
    """Applies a symmetric operator ``A`` to each row: ``[n, d] -> [n, d]``.

    Scores are ``φ(test)ᵀ A φ(train)``: with gradient features, ``A ≈ (H + λI)^-1``; with
    projected features, ``A`` is the inverse restricted to the subspace.
    """

    def __call__(self, rows: torch.Tensor) -> torch.Tensor: ...


def check_damping(damping: float) -> float:
    """Damping is additive (the solvers target ``(H + λI)^-1``) and must be >= 0."""
    if not isinstance(damping, (int, float)) or damping != damping or damping < 0:
        raise InvalidInputError(
            f"damping must be a number >= 0 (the solver targets (H + damping·I)^-1), got {damping!r}. "
            "For FastIF's (damp, scale) pair use damping = damp * scale."
        )
    return float(damping)

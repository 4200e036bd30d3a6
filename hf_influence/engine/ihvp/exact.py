"""Exact inverse through the eigendecomposition of the explicit Hessian: the test oracle."""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..._utils.errors import SingularHessianError
from ...config import check_damping

logger = logging.get_logger(__name__)


class ExactInverse:
    """``(H + λI)^-1`` from the explicit ``[P, P]`` Hessian, computed in float64.

    Args:
        hessian (`torch.Tensor` of shape `[P, P]`): symmetric Hessian of the mean training loss.
        damping (`float`): additive λ.
    """

    def __init__(self, hessian: torch.Tensor, damping: float):
        damping = check_damping(damping)
        eigenvalues, self.eigenvectors = torch.linalg.eigh(hessian.double())
        self.shifted = eigenvalues + damping
        tiny = 1e-12 * max(1.0, float(eigenvalues.abs().max()))
        if bool((self.shifted.abs() <= tiny).any()):
            raise SingularHessianError(
                f"H + λI is singular (λ={damping}, smallest |eigenvalue + λ| = {float(self.shifted.abs().min()):.3g}). "
                "Increase damping."
            )
        if float(self.shifted.min()) < 0:
            logger.warning(
                f"H + λI is indefinite: smallest eigenvalue of H is {float(eigenvalues.min()):.4g}. Scores are still "
                f"exact for (H + λI)^-1; damping > {-float(eigenvalues.min()):.4g} makes it positive definite."
            )

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        coords = rows.double() @ self.eigenvectors  # [n, P]
        return ((coords / self.shifted) @ self.eigenvectors.T).to(rows.dtype)

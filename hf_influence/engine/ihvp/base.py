"""What the solvers share: the preconditioner contract, the damping check, and Ritz pairs from a Krylov basis."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from transformers.utils import logging

from ..._utils.errors import InvalidInputError


logger = logging.get_logger(__name__)


class Preconditioner(Protocol):
    """Applies a symmetric operator ``A`` to each row: ``[n, d] -> [n, d]``.

    Scores are ``φ(test)ᵀ A φ(train)``: with gradient features, ``A ≈ (H + λI)^-1``; with
    projected features, ``A`` is the inverse restricted to the subspace.
    """

    def __call__(self, rows: torch.Tensor) -> torch.Tensor: ...


class RitzPairs(NamedTuple):
    """Approximate eigenpairs of ``H`` from a Krylov basis, ordered by decreasing |λ|."""

    eigenvalues: torch.Tensor  # [rank]
    eigenvectors: torch.Tensor  # [rank, P], orthonormal
    residuals: torch.Tensor  # [rank], ‖H u - λ u‖ from the Krylov relation, float64


def distill(basis: torch.Tensor, hessenberg: torch.Tensor, rank: int) -> RitzPairs:
    """Top-``rank`` Ritz pairs by |λ| from an orthonormal Krylov basis ``[m + b, P]`` and the (block)
    Hessenberg matrix ``[m + b, m]`` of ``H basis[:m]ᵀ = basis[:m + b]ᵀ hessenberg`` (b = 1 for Arnoldi).

    The residual of the pair ``(λ, Q y)`` is ``‖hessenberg[m:] y‖``, the part of ``H Q y`` outside the basis
    (Saad, "Numerical Methods for Large Eigenvalue Problems", Prop. 6.8 / its block analogue).
    """
    m = hessenberg.shape[1]
    if rank > m:
        raise InvalidInputError(f"rank={rank} exceeds the {m} Krylov vectors built (iterations completed); lower rank or raise iterations.")
    square = hessenberg[:m, :m].double()
    eigenvalues, eigenvectors = torch.linalg.eigh((square + square.T) / 2)
    order = eigenvalues.abs().argsort(descending=True)[:rank]
    residuals = (hessenberg[m:].double() @ eigenvectors[:, order]).norm(dim=0)  # [rank]
    vectors = eigenvectors[:, order].T.to(basis.dtype) @ basis[:m]  # [rank, P]
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return RitzPairs(eigenvalues[order].to(basis.dtype), fix_signs(vectors), residuals)


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Each row ``[k, P]`` times the sign of its largest-magnitude entry: an eigenvector's sign is arbitrary,
    this makes a basis reproducible (e.g. across process counts, where round-off may flip it)."""
    signs = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)).sign()  # [k, 1]
    return (vectors * signs).contiguous()


def log_residuals(eigenvalues: torch.Tensor, residuals: torch.Tensor, solver: str) -> None:
    """Log the largest relative Ritz residual ``‖Hu - λu‖ / |λ|`` of a fit, and the per-pair values at debug level."""
    relative = residuals / eigenvalues.double().abs().clamp_min(1e-30)
    logger.info(f"{solver}: {eigenvalues.numel()} eigenpairs, largest relative residual ‖Hu - λu‖/|λ| = {float(relative.max()):.2e} "
                f"(pair {int(relative.argmax())}, λ = {float(eigenvalues[relative.argmax()]):.4g}).")
    logger.debug(f"{solver} residuals ‖Hu - λu‖: {[round(float(r), 8) for r in residuals]}")

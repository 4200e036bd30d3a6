"""What the solvers share: the preconditioner contract, the damping check, and Ritz pairs from a Krylov basis."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from transformers.utils import logging

from ..._utils import comm
from ..._utils.errors import InvalidInputError
from ...config import Keep


logger = logging.get_logger(__name__)


class Preconditioner(Protocol):
    """Applies a symmetric operator ``A`` to each row: ``[n, d] -> [n, d]``.

    Scores are ``φ(test)ᵀ A φ(train)``: with gradient features, ``A ≈ (H + λI)^-1``; with
    projected features, ``A`` is the inverse restricted to the subspace.
    """

    def __call__(self, rows: torch.Tensor) -> torch.Tensor: ...


class RitzPairs(NamedTuple):
    """Approximate eigenpairs of ``H`` from a Krylov basis, ordered by decreasing |λ| (``keep="magnitude"``) or λ."""

    eigenvalues: torch.Tensor  # [rank]
    eigenvectors: torch.Tensor  # [rank, P], orthonormal
    residuals: torch.Tensor  # [rank], ‖H u - λ u‖ from the Krylov relation, float64


def ritz_selection(hessenberg: torch.Tensor, rank: int, keep: Keep = Keep.MAGNITUDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The ``rank`` Ritz pairs a basis keeps, in the small space: ``(θ [rank], y [m, rank], residuals [rank], max |θ|)``, float64.

    ``hessenberg`` is ``[m + b, m]`` (``H Q[:m]ᵀ = Q[:m + b]ᵀ hessenberg``); the pairs are those of largest |θ| or θ
    (``keep``), in that order, and the residual of ``(θ, Q y)`` is ``‖hessenberg[m:] y‖``, the part of ``H Q y`` outside
    the basis (Saad, "Numerical Methods for Large Eigenvalue Problems", Prop. 6.8 / its block analogue; for Arnoldi
    ``|h_{m+1,m}| |y_m|``). The largest |θ| estimates |λ_max| (the scale of the convergence test)."""
    m = hessenberg.shape[1]
    square = hessenberg[:m, :m].double()
    values, vectors = torch.linalg.eigh((square + square.T) / 2)
    key = values.abs() if Keep(keep) is Keep.MAGNITUDE else values
    order = key.argsort(descending=True)[:rank]
    residuals = (hessenberg[m:].double() @ vectors[:, order]).norm(dim=0)
    return values[order], vectors[:, order], residuals, float(values.abs().max()) if m else 0.0


def distill(basis: torch.Tensor, hessenberg: torch.Tensor, rank: int, keep: Keep = Keep.MAGNITUDE) -> RitzPairs:
    """Top-``rank`` Ritz pairs by |λ| (or λ: ``keep``) from an orthonormal Krylov basis ``[m + b, P]`` and the (block)
    Hessenberg matrix ``[m + b, m]`` of ``H basis[:m]ᵀ = basis[:m + b]ᵀ hessenberg`` (b = 1 for Arnoldi); residuals as
    :func:`ritz_selection`'s."""
    m = hessenberg.shape[1]
    if rank > m:
        raise InvalidInputError(f"rank={rank} exceeds the {m} Krylov vectors built (iterations completed); lower rank or raise iterations.")
    values, small, residuals, _ = ritz_selection(hessenberg, rank, keep)
    vectors = small.T.to(basis.dtype) @ basis[:m]  # [rank, P]
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return RitzPairs(values.to(basis.dtype), fix_signs(vectors), residuals)


class ConvergenceStop:
    """Stops a Krylov loop once the ``rank`` Ritz pairs a basis would keep have converged: every residual
    ``‖Hu - λu‖ <= tol · |λ_max|`` (Ritz estimates, from the Krylov matrix alone: no extra product).

    Called with the Krylov matrix ``[m + b, m]`` after each step; it checks once ``m >= rank`` and then whenever ``m``
    has grown by a tenth since the last check (an eigendecomposition of the ``m × m`` matrix per check, against a pass
    over the Hessian data per step), so a fit overshoots its converged length by at most ~10%. ``tol = 0`` never stops.
    With ``across_processes`` the decision is process 0's, broadcast, so every process stops at the same step.
    Afterwards ``stopped`` says whether it stopped the loop and ``relative`` holds the last checked
    ``max residual / |λ_max|``."""

    def __init__(self, rank: int, tol: float, keep: Keep = Keep.MAGNITUDE, across_processes: bool = False):
        self.rank, self.tol, self.keep, self.across_processes = rank, tol, Keep(keep), across_processes
        self.checked_at, self.relative, self.stopped = 0, float("inf"), False

    def __call__(self, hessenberg: torch.Tensor) -> bool:
        m = hessenberg.shape[1]
        if self.tol <= 0 or m < self.rank or m - self.checked_at < max(1, m // 10):
            return False
        self.checked_at = m
        _, _, residuals, scale = ritz_selection(hessenberg, self.rank, self.keep)
        self.relative = float(residuals.max()) / max(scale, 1e-300)
        stop = self.relative <= self.tol
        if self.across_processes:
            stop = bool(comm.broadcast(torch.tensor([stop], dtype=torch.uint8, device=hessenberg.device)).item())
        self.stopped = stop
        return stop


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

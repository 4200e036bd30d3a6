"""Hessian spectrum estimates from HVPs: Krylov (Lanczos) / power iteration for the extreme
eigenvalues, Hutchinson and Hutch++ (Meyer et al. 2021) for the trace, each with an error bar
and its cost in HVPs.

``hvp(V)`` maps ``[P, k] -> [P, k]``: k HVPs in one pass over the Hessian data (``hvp.batch_hvp``
shares each batch's forward and first backward among the columns; `hf_influence.engine.hvp_memory` sizes how many go in
one batched backward). The trace estimators apply
their probes as blocks (Hutchinson: one block; Hutch++: three), so they cost one or three passes;
Lanczos and power iteration need each product before the next, one vector per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .._utils.errors import InvalidInputError

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Spectrum:
    """Estimates for the Hessian ``H`` of the mean training loss.

    Attributes:
        lambda_max (`float`): largest eigenvalue; ``lambda_max_error`` bounds ``|estimate - true|``
            (Ritz residual ``‖Hu - λu‖``).
        lambda_min (`float`, *optional*): smallest eigenvalue (Lanczos only), with its residual bound;
            negative means non-convex: ``H + λI`` is positive definite only for ``damping > -lambda_min``.
        trace (`float`), trace_stderr (`float`): ``tr(H)`` and the standard error of the estimate.
        hvps (`int`): Hessian-vector products spent (each a pass over the Hessian data).
    """

    lambda_max: float
    lambda_max_error: float
    trace: float
    trace_stderr: float
    hvps: int
    lambda_min: float | None = None
    lambda_min_error: float | None = None

    @property
    def min_damping(self) -> float | None:
        """Smallest additive damping making ``H + λI`` positive definite (``None`` if unknown)."""
        return None if self.lambda_min is None else max(0.0, -self.lambda_min)

    @property
    def effective_rank(self) -> float:
        """``tr(H) / λ_max``: Klochkov & Liu's lower bound for the LiSSA Hessian batch size."""
        return self.trace / self.lambda_max if self.lambda_max > 0 else float("inf")

    def __str__(self) -> str:
        bottom = "" if self.lambda_min is None else f", λ_min={self.lambda_min:.4g}±{self.lambda_min_error:.2g}"
        return (f"Spectrum(λ_max={self.lambda_max:.4g}±{self.lambda_max_error:.2g}{bottom}, "
                f"tr(H)={self.trace:.4g}±{self.trace_stderr:.2g}, {self.hvps} HVPs)")


def check_spectrum_request(method: str, trace_estimator: str) -> None:
    """The extremes come from ``"lanczos"`` or ``"power"``, the trace from ``"hutch++"`` or ``"hutchinson"``."""
    if method not in ("lanczos", "power") or trace_estimator not in ("hutch++", "hutchinson"):
        raise InvalidInputError(f"method must be 'lanczos' or 'power' and trace_estimator 'hutch++' or 'hutchinson'; got {method!r}, {trace_estimator!r}.")


def hutchpp_blocks(matvecs: int) -> tuple[int, int, int]:
    """Vectors in Hutch++'s three passes: the sketch, its projection (a third each), and the probes (the rest, >= 1)."""
    third = max(1, matvecs // 3)
    return third, third, max(1, matvecs - 2 * third)


def trace_blocks(trace_estimator: str, matvecs: int) -> tuple[tuple[int, ...], int]:
    """The vectors in each pass of the trace estimate, and how many P-sized vectors it holds at most beside a pass (the
    sketch, probes and products): the figures its batched HVPs are sized from, at run time and in the cost estimate."""
    blocks = hutchpp_blocks(matvecs) if trace_estimator == "hutch++" else (matvecs,)
    return blocks, 2 * sum(blocks[-2:])


def krylov_iteration(hvp: HVP, start: torch.Tensor, iterations: int, progress: bool = True, desc: str = "Krylov",
                     stop: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal Krylov basis ``Q`` ``[m+1, P]`` and Hessenberg matrix ``[m+1, m]``, ``m <= iterations``.

    Arnoldi with full re-orthogonalisation (classical Gram-Schmidt, twice); for symmetric ``H``
    this is Lanczos made stable. Stops early when the Krylov space is invariant (then ``Q`` is ``[m, P]``), or when
    ``stop`` (called with the Hessenberg matrix ``[k+1, k]`` after step ``k``, e.g. a ``base.ConvergenceStop``) says so.
    The basis is one ``[iterations + 1, P]`` buffer filled row by row, so the vectors are held once (no per-step copy).
    """
    basis = torch.empty(iterations + 1, start.shape[0], dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    hessenberg = torch.zeros(iterations + 1, iterations, dtype=start.dtype, device=start.device)
    for k in tqdm(range(iterations), desc=desc, disable=not progress):
        w = hvp(basis[k][:, None])[:, 0]
        stacked = basis[: k + 1]  # [k+1, P], a view
        for _ in range(2):
            coeffs = stacked @ w
            w = w - stacked.T @ coeffs
            hessenberg[: k + 1, k] += coeffs
        residual = w.norm()
        hessenberg[k + 1, k] = residual
        if residual <= 1e-10 * hessenberg[: k + 1, k].norm().clamp_min(1e-30):
            return stacked, hessenberg[: k + 2, : k + 1]
        basis[k + 1] = w / residual
        if stop is not None and k + 1 < iterations and stop(hessenberg[: k + 2, : k + 1]):
            return basis[: k + 2], hessenberg[: k + 2, : k + 1]
    return basis, hessenberg


def ritz_extremes(hessenberg: torch.Tensor) -> tuple[float, float, float, float]:
    """``(λ_max, residual, λ_min, residual)`` from the Krylov matrix; residual = ``|β_m y_m|``."""
    m = hessenberg.shape[1]
    square = hessenberg[:m, :m].double()
    values, vectors = torch.linalg.eigh((square + square.T) / 2)
    beta = float(hessenberg[m, m - 1]) if hessenberg.shape[0] > m else 0.0
    return float(values[-1]), abs(beta * float(vectors[-1, -1])), float(values[0]), abs(beta * float(vectors[-1, 0]))


def power_iteration(hvp: HVP, start: torch.Tensor, iterations: int, tol: float = 1e-4) -> tuple[float, float, int]:
    """Dominant eigenvalue (largest |λ|) by power iteration: ``(λ, residual ‖Hu - λu‖, HVPs)``."""
    u = start / start.norm()
    value, residual = 0.0, float("inf")
    for step in range(1, iterations + 1):
        hu = hvp(u[:, None])[:, 0]
        value = float(u @ hu)
        residual = float((hu - value * u).norm())
        if residual <= tol * abs(value):
            return value, residual, step
        u = hu / hu.norm()
    return value, residual, iterations


def rademacher(num_params: int, count: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[P, count]`` of ±1, seeded."""
    signs = torch.randint(0, 2, (num_params, count), generator=generator).to(dtype) * 2 - 1
    return signs.to(device)


def hutchinson_trace(hvp: HVP, num_params: int, probes: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """``tr(H)`` as the mean of ``zᵀHz`` over Rademacher ``z``: ``(estimate, standard error)``."""
    z = rademacher(num_params, probes, generator, dtype, device)
    samples = (z * hvp(z)).sum(dim=0).double()  # [probes]
    stderr = float(samples.std() / math.sqrt(probes)) if probes > 1 else float("inf")
    return float(samples.mean()), stderr


def hutchpp_trace(hvp: HVP, num_params: int, matvecs: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    Uses ``matvecs`` HVPs (a third for the sketch, a third to project, a third for probes).
    The error bar is the standard error of the Hutchinson part.
    """
    third, _, rest = hutchpp_blocks(matvecs)
    sketch, _ = torch.linalg.qr(hvp(rademacher(num_params, third, generator, dtype, device)))  # [P, third]
    top = float((sketch * hvp(sketch)).sum())
    g = rademacher(num_params, rest, generator, dtype, device)
    g = g - sketch @ (sketch.T @ g)
    samples = (g * hvp(g)).sum(dim=0).double()
    stderr = float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else float("inf")
    return top + float(samples.mean()), stderr

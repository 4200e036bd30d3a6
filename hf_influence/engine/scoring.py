"""Scores from features and a preconditioner: ``score(x, z) = φ(x)ᵀ A φ(z)``.

Sign convention: positive means training example z helps test example x (removing z raises the
test loss, to first order); Koh & Liang's ``I_up,loss`` is the negative. Features ``φ`` are
per-example gradients (exact, LiSSA, TracIn) or their projections (Arnoldi, random projection);
``A`` approximates ``(H + λI)^-1`` on that space (the identity for TracIn).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from .._utils.memory import ResidentGuard
from ..data import Batch, to_device
from .grads import check_finite
from .ihvp.base import Preconditioner

FeatureFn = Callable[[Batch], torch.Tensor]  # batch -> [B, d]


def collect_features(
    feature_fn: FeatureFn, batches: Iterable[Batch], device: torch.device, desc: str, progress: bool = True,
    model_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Features of every example, in order: ``[N, d]``. ``model_dtype`` chooses the advice given on NaN/Inf."""
    rows, guard = [], ResidentGuard()
    for index, batch in enumerate(tqdm(batches, desc=desc, disable=not progress)):
        guard.check()
        rows.append(check_finite(feature_fn(to_device(batch, device)), "per-example gradients", f"{desc}, batch {index}", model_dtype))
    return torch.cat(rows)


def pairwise_scores(
    preconditioned_test: torch.Tensor,
    feature_fn: FeatureFn,
    train_batches: Iterable[Batch],
    device: torch.device,
    progress: bool = True,
    model_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[n_test, n_train]`` = ``(A φ_test) φ_trainᵀ``, streaming over training batches."""
    blocks, guard = [], ResidentGuard()
    for index, batch in enumerate(tqdm(train_batches, desc="scoring train", disable=not progress)):
        guard.check()
        features = check_finite(feature_fn(to_device(batch, device)), "per-example gradients", f"train batch {index}", model_dtype)
        blocks.append(preconditioned_test @ features.T.to(preconditioned_test.dtype))
    return torch.cat(blocks, dim=1)


def self_scores(
    precondition: Preconditioner,
    feature_fn: FeatureFn,
    batches: Iterable[Batch],
    device: torch.device,
    progress: bool = True,
    model_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[N]`` self-influence ``φ(z)ᵀ A φ(z)``; ranks noisy / mislabelled training pairs."""
    values, guard = [], ResidentGuard()
    for index, batch in enumerate(tqdm(batches, desc="self-influence", disable=not progress)):
        guard.check()
        features = check_finite(feature_fn(to_device(batch, device)), "per-example gradients", f"batch {index}", model_dtype)
        values.append((precondition(features) * features).sum(dim=1))
    return torch.cat(values)


def identity(rows: torch.Tensor) -> torch.Tensor:
    """TracIn / gradient dot product: ``A = I``."""
    return rows


class DiagonalInverse:
    """Arnoldi: features are eigen-coordinates, ``A = diag(1 / (λ_i + damping))``."""

    def __init__(self, inverse_eigenvalues: torch.Tensor):
        self.inverse_eigenvalues = inverse_eigenvalues

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.inverse_eigenvalues.to(rows.dtype)


class SubspaceInverse:
    """Random projection (Schioppa's baseline): ``A = (Qᵀ H Q + λI)^-1`` in the subspace of ``Q``.

    Args:
        projected_hessian (`torch.Tensor` of shape `[p̄, p̄]`): ``Qᵀ H Q``.
        damping (`float`): additive λ.
    """

    def __init__(self, projected_hessian: torch.Tensor, damping: float):
        sym = (projected_hessian.double() + projected_hessian.double().T) / 2
        self.inverse = torch.linalg.inv(sym + damping * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows.double() @ self.inverse).to(rows.dtype)


def random_subspace(num_params: int, rank: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``[rank, P]`` orthonormal rows spanning a Gaussian random subspace, seeded by ``generator``."""
    gaussian = torch.randn(num_params, rank, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q.T.to(dtype)

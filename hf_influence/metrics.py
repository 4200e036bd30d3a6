"""Metrics on scores: noise detection (how well a score ranks known noisy examples first), the rows a filter
drops, and FastIF's kNN recall (how many of the true top-m training examples the kNN candidates hold)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ._utils.errors import InvalidInputError

DIRECTIONS = ("influential", "helpful", "harmful")  # FastIF's rankings: by |score|, score, -score


def noise_detection_metrics(scores: torch.Tensor | np.ndarray, is_noisy: torch.Tensor | np.ndarray) -> dict[str, float]:
    """AUC, average precision and precision@k (k = number of noisy examples); higher score = more suspect."""
    scores = np.asarray(scores, dtype=np.float64)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    if is_noisy.all() or not is_noisy.any():
        raise ValueError("Noise detection needs both noisy and clean examples.")
    k = int(is_noisy.sum())
    top = np.argsort(-scores, kind="stable")[:k]
    return {
        "auc": float(roc_auc_score(is_noisy, scores)),
        "ap": float(average_precision_score(is_noisy, scores)),
        "precision_at_k": float(is_noisy[top].mean()),
    }


def check_filter_rule(fraction: float | None, threshold: float | None) -> None:
    """Exactly one of ``fraction`` (in ``[0, 1)``) and ``threshold``; checked before any scoring."""
    if (fraction is None) == (threshold is None):
        raise InvalidInputError(f"Pass exactly one of fraction= or threshold=; got fraction={fraction}, threshold={threshold}.")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise InvalidInputError(f"fraction must be in [0, 1) (the share of rows dropped), got {fraction}.")


def noisy_mask(scores: torch.Tensor, fraction: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """``[N]`` bool: True for the rows to drop, by exactly one rule.

    Args:
        scores (`torch.Tensor` of shape `[N]`): self-influence (higher = more suspect).
        fraction (`float`, *optional*): drop the ``round(fraction · N)`` highest scores, ties broken
            by row order; ``0 <= fraction < 1``.
        threshold (`float`, *optional*): drop every row whose score exceeds ``threshold``.
    """
    check_filter_rule(fraction, threshold)
    scores = scores.detach().cpu()
    if threshold is not None:
        return scores > threshold
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    mask[torch.argsort(-scores, stable=True)[: int(round(fraction * scores.shape[0]))]] = True
    return mask


def rank_scores(scores: torch.Tensor, m: int, direction: str = "influential") -> torch.Tensor:
    """Column indices ``[n, m]`` of the ``m`` top entries of each row of ``scores``: by ``|score|``
    (``"influential"``), by score (``"helpful"``) or by ``-score`` (``"harmful"``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= scores.shape[-1]:
        raise ValueError(f"m must be an integer in [1, {scores.shape[-1]}] (the number of scored examples), got {m!r}.")
    key = scores.abs() if direction == "influential" else scores if direction == "helpful" else -scores
    return key.topk(m, dim=-1).indices


def knn_recall(candidates: Any, full_scores: torch.Tensor, m: int, direction: str = "influential") -> torch.Tensor:
    """FastIF's recall@m: the share of the true top-``m`` training examples that the kNN candidates contain.

    ``recall@m = |kNN candidates ∩ top-m by the full scan| / m`` for each test example (Guo et al.
    2021, Sec. 4.1). With ``k`` candidates it cannot exceed ``k / m``.

    Args:
        candidates (`torch.Tensor` of shape `[n_test, k]` or `KnnScores`): candidate training rows
            (anything with an ``indices`` tensor is read through it).
        full_scores (`torch.Tensor` of shape `[n_test, N]`): ``Influence.scores`` without ``knn``.
        m (`int`): size of the true top set, ``1 <= m <= N``.
        direction (`str`, defaults to `"influential"`): ``"influential"`` (largest ``|score|``),
            ``"helpful"`` (largest score) or ``"harmful"`` (smallest score).

    Returns:
        `torch.Tensor` of shape `[n_test]`, float32, each in ``[0, 1]``.
    """
    indices = candidates if isinstance(candidates, torch.Tensor) else candidates.indices
    if indices.dim() != 2 or full_scores.dim() != 2 or indices.shape[0] != full_scores.shape[0]:
        raise ValueError(
            f"candidates [n_test, k] and full_scores [n_test, N] must have the same n_test; got shapes "
            f"{tuple(indices.shape)} and {tuple(full_scores.shape)}."
        )
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < full_scores.shape[1]:
        raise ValueError(f"candidate indices must lie in [0, {full_scores.shape[1]}), the columns of full_scores.")
    top = rank_scores(full_scores, m, direction).cpu()  # [n_test, m]
    hits = (top.unsqueeze(-1) == indices.cpu().long().unsqueeze(1)).any(dim=-1)  # [n_test, m]
    return hits.float().sum(dim=1) / m

"""Noise-detection metrics: how well a score ranks known noisy examples first."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ._utils.errors import InvalidInputError


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

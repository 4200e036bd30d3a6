"""Noise-detection metrics: how well a score ranks known noisy examples first."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score


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

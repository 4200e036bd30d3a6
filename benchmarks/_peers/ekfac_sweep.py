"""kronfluence's EK-FAC over a damping sweep, for ``benchmarks/lds.py``: one factor fit, one pairwise call per damping."""

from __future__ import annotations

import time
import warnings

import torch
from datasets import Dataset
from torch import nn

from .adapters import Kronfluence
from .common import Problem, pad_to_length

warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its deprecated torch.cuda.amp calls, on CPU


def ekfac_sweep(model: nn.Module, param_names: list[str], dampings: list[float | None], test: Dataset, train: Dataset,
                batch_size: int, seed: int, empirical_fisher: bool = False) -> tuple[dict[float | None, tuple[torch.Tensor, float]], float]:
    """EK-FAC pairwise scores of ``test`` x ``train`` at every damping, from one fit of the factors on ``train``.

    kronfluence's pairwise score is ``g_testᵀ (G + λI)^-1 g_train`` with ``G`` its EK-FAC curvature (example
    averages: the mean-loss scale) and ``g`` per-example loss gradients: our sign (positive = training on the row
    lowers the test loss) and our scale, so ``damping_factor = λ`` and the scores go to ``hfi.lds`` unchanged.
    ``None`` in ``dampings`` is kronfluence's own heuristic (0.1 x the mean corrected eigenvalue, per module). Its
    curvature is the true Fisher (labels sampled from the model's predictions, kronfluence's default, seeded here)
    or, with ``empirical_fisher``, the empirical Fisher (the true labels: what our Fisher eigenbasis decomposes).
    Every sequence is padded to the longest of both sets (kronfluence's loaders stack rows as they are).

    Args:
        model (`nn.Module`): the model every method scores; kronfluence works on a private copy.
        param_names (`list[str]`): whole ``nn.Linear`` modules' parameters (kronfluence tracks modules).
        dampings (`list[float | None]`): the sweep.
        test (`Dataset`), train (`Dataset`): encoded rows with ``labels``.
        batch_size (`int`): training rows per batch for the fit and the scores (every test row is in one query batch).
        seed (`int`): seeds the sampled labels of the Fisher.
        empirical_fisher (`bool`, defaults to `False`): fit with the true labels instead.

    Returns:
        ``({damping: (scores [n_test, N] float32, seconds of that scoring call)}, seconds of the factor fit)``.
    """
    length = max(len(ids) for ids in [*test["input_ids"], *train["input_ids"]])
    test, train = pad_to_length(test, length), pad_to_length(train, length)
    kron = Kronfluence(Problem(model, param_names, damping=0.0, batch_size=batch_size), strategy="ekfac", empirical_fisher=empirical_fisher)
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        kron.fit(train)
        fit_seconds = time.perf_counter() - start
        sweep = {}
        for damping in dampings:
            kron.set_damping(damping)
            start = time.perf_counter()
            scores = kron.scores(test, train, query_batch_size=len(test)).float()  # one pass over train for all test rows
            sweep[damping] = (scores, time.perf_counter() - start)
    finally:
        kron.close()
    return sweep, fit_seconds

"""The linear datamodeling score (LDS; Park et al. 2023, "TRAK", Eq. 5): how well attribution scores predict
what retraining on a random subset of the training set does to each test example's loss.

Sign convention, stated once for the whole library: our scores are positive when a training row *helps* a
test row (training on it lowers that test row's loss). The predicted effect of training on subset ``S`` on
test row ``t``'s loss is therefore ``-Σ_{i∈S} scores[t, i]``. LDS is the Spearman rank correlation, over the
``M`` subsets, between that prediction and the loss measured after retraining on each subset, averaged over
test rows. 1 means the scores order the subsets exactly as retraining does; 0 means no better than chance.

The workflow: :func:`lds_subsets` draws the ``M`` subsets, the user retrains one model per subset and
measures its per-example test loss (:func:`run_subset_models` keeps one checksummed file per model, so the
trainings resume after an interruption and can be spread over processes), then :func:`lds` scores.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.stats import rankdata
from transformers.utils import logging

from ._utils.errors import DamagedArtifactError, InvalidInputError
from ._utils.io import read_tensors_artifact, save_tensors

logger = logging.get_logger(__name__)

SUBSET_MODEL_FILE = "subset_model_{index:05d}.safetensors"  # one per subset model, under run_subset_models' out_dir


@dataclasses.dataclass(frozen=True)
class LdsResult:
    """What :func:`lds` returns.

    Attributes:
        mean (`float`): the LDS, the mean of ``per_test`` over the test rows whose correlation is defined.
        per_test (`torch.Tensor` of shape `[n_test]`, float64): Spearman correlation over the ``M`` subsets for each
            test row; NaN where the measured (or predicted) losses are the same for every subset.
        ci (`tuple[float, float]`): the percentile bootstrap interval of ``mean`` over test rows (resampled with
            replacement), at level ``confidence``.
    """

    mean: float
    per_test: torch.Tensor
    ci: tuple[float, float]


def lds_subsets(num_train: int, num_models: int = 100, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """The ``num_models`` random training subsets LDS retrains on, each exactly ``round(fraction * num_train)`` rows.

    Args:
        num_train (`int`): number of training rows ``N``.
        num_models (`int`, defaults to `100`): number of subsets ``M`` (one retrained model each); at least 3.
        fraction (`float`, defaults to `0.5`): share of the training rows in each subset, in ``(0, 1)``.
        seed (`int`, defaults to `0`): the same seed gives the same subsets on every machine.

    Returns:
        `torch.Tensor` of shape `[M, N]`, bool: ``subsets[m, i]`` is True when training row ``i`` is in subset ``m``.
    """
    if not isinstance(num_train, int) or num_train < 2:
        raise InvalidInputError(f"num_train must be an integer >= 2 (the number of training rows), got {num_train!r}.")
    if not isinstance(num_models, int) or num_models < 3:
        raise InvalidInputError(f"num_models must be an integer >= 3 (a rank correlation over fewer subsets is meaningless), got {num_models!r}.")
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"fraction must lie strictly between 0 and 1 (the share of training rows per subset), got {fraction!r}.")
    size = round(fraction * num_train)
    if not 1 <= size < num_train:
        raise InvalidInputError(f"fraction={fraction} of num_train={num_train} keeps {size} rows: each subset needs at least 1 row and "
                                "must leave at least 1 out; raise num_train or move fraction away from 0 and 1.")
    generator = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(num_models, num_train, dtype=torch.bool)
    for row in subsets:
        row[torch.randperm(num_train, generator=generator)[:size]] = True
    return subsets


def lds(scores: torch.Tensor, subsets: torch.Tensor, outputs: torch.Tensor, confidence: float = 0.95,
        num_bootstrap: int = 1000, seed: int = 0) -> LdsResult:
    """The linear datamodeling score of ``scores`` against retrained models' measured losses.

    The prediction for subset ``m`` and test row ``t`` is ``-Σ_{i∈S_m} scores[t, i]`` (scores positive = the training
    row lowers the test loss); the result is the Spearman correlation over subsets (average ranks for ties) between
    prediction and ``outputs[:, t]``, per test row, then its mean and a seeded bootstrap interval over test rows.

    Args:
        scores (`torch.Tensor` of shape `[n_test, N]`, floating): attribution scores, our sign (positive = helps).
        subsets (`torch.Tensor` of shape `[M, N]`, bool): the training subsets, as from :func:`lds_subsets`.
        outputs (`torch.Tensor` of shape `[M, n_test]`, floating): the loss of test row ``t`` under the model
            retrained on subset ``m`` (any measurement where lower is better).
        confidence (`float`, defaults to `0.95`): level of the bootstrap interval.
        num_bootstrap (`int`, defaults to `1000`): bootstrap resamples of the test rows.
        seed (`int`, defaults to `0`): seeds the bootstrap.

    Returns:
        `LdsResult` with ``mean``, ``per_test`` and ``ci``.
    """
    _check_lds_inputs(scores, subsets, outputs)
    if not 0.0 < confidence < 1.0 or num_bootstrap < 1:
        raise InvalidInputError(f"Need 0 < confidence < 1 and num_bootstrap >= 1, got confidence={confidence}, num_bootstrap={num_bootstrap}.")
    predicted = -(subsets.double() @ scores.double().T)  # [M, n_test]
    per_test = _spearman_columns(predicted.numpy(), outputs.double().numpy())  # [n_test]
    defined = per_test[~np.isnan(per_test)]
    if defined.size == 0:
        raise InvalidInputError("Every test row's measured or predicted loss is the same on all subsets, so no rank correlation "
                                "is defined: check that the retrained models differ and that the scores are not all zero.")
    rng = np.random.default_rng(seed)
    means = defined[rng.integers(0, defined.size, size=(num_bootstrap, defined.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return LdsResult(float(defined.mean()), torch.from_numpy(per_test), (float(low), float(high)))


def _check_lds_inputs(scores: torch.Tensor, subsets: torch.Tensor, outputs: torch.Tensor) -> None:
    """Types, dtypes, shapes and finiteness of lds' three tensors, each named in the message."""
    for name, value in (("scores", scores), ("subsets", subsets), ("outputs", outputs)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            got = f"a {value.dim()}-D tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidInputError(f"{name} must be a 2-D torch.Tensor, got {got}.")
    if subsets.dtype != torch.bool:
        raise InvalidInputError(f"subsets must be a bool tensor [M, N] (True = row in the subset, as lds_subsets returns), got {subsets.dtype}.")
    for name, value in (("scores", scores), ("outputs", outputs)):
        if not value.is_floating_point():
            raise InvalidInputError(f"{name} must be a floating-point tensor, got {value.dtype}.")
        if not torch.isfinite(value).all():
            raise InvalidInputError(f"{name} holds NaN or Inf values: LDS needs finite {name}.")
    (n_test, num_train), (num_models, subset_rows), (output_models, output_tests) = scores.shape, subsets.shape, outputs.shape
    if subset_rows != num_train:
        raise InvalidInputError(f"scores are [n_test, N] = {list(scores.shape)} but subsets are [M, N] = {list(subsets.shape)}: "
                                "both must cover the same N training rows, in the same order.")
    if (output_models, output_tests) != (num_models, n_test):
        raise InvalidInputError(f"outputs must be [M, n_test] = [{num_models}, {n_test}] (one row per subset model, one column per "
                                f"test row of scores), got {list(outputs.shape)}.")
    if num_models < 3:
        raise InvalidInputError(f"LDS needs at least 3 subset models for a rank correlation, got M={num_models}.")


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of ``a`` and ``b`` [M, T]: NaN where a column is constant."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    norm = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(axis=0) / norm, np.nan)


def run_subset_models(train_fn: Callable[[int, torch.Tensor], torch.Tensor], subsets: torch.Tensor, out_dir: str | os.PathLike,
                      rank: int = 0, world_size: int = 1) -> list[int]:
    """Retrain one model per subset and keep its measured test losses, one checksummed file per model.

    Resumable: a subset model whose file exists, verifies, and was trained on the same subset is skipped; a damaged
    file is logged and trained again. Spread over processes by index: rank ``r`` of ``world_size`` takes subsets
    ``r, r + world_size, ...``; run every rank, then :func:`load_subset_outputs` gathers the results.

    Args:
        train_fn (`Callable[[int, torch.Tensor], torch.Tensor]`): ``train_fn(index, subset)`` trains on the rows where
            the bool ``subset`` [N] is True (seed it from ``index`` for repeatable runs) and returns the per-example
            test losses, a float tensor [n_test].
        subsets (`torch.Tensor` of shape `[M, N]`, bool): from :func:`lds_subsets`.
        out_dir (`str` or `os.PathLike`): where the per-model files go.
        rank (`int`, defaults to `0`), world_size (`int`, defaults to `1`): this process's share.

    Returns:
        `list[int]`: the subset indices trained by this call (the skipped ones are not listed).

    Raises:
        `InvalidInputError`: a file in ``out_dir`` was trained on another subset (other seed, N or fraction).
    """
    if subsets.dim() != 2 or subsets.dtype != torch.bool:
        raise InvalidInputError(f"subsets must be a bool tensor [M, N] as lds_subsets returns, got {subsets.dtype} {list(subsets.shape)}.")
    if not 0 <= rank < world_size:
        raise InvalidInputError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    trained = []
    for index in range(rank, subsets.shape[0], world_size):
        if _read_subset_model(Path(out_dir), index, subsets[index], missing_ok=True) is not None:
            continue
        losses = train_fn(index, subsets[index].clone())
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            raise InvalidInputError(f"train_fn({index}, subset) must return a 1-D float tensor of test losses, got "
                                    f"{type(losses).__name__ if not isinstance(losses, torch.Tensor) else f'{losses.dtype} {list(losses.shape)}'}.")
        save_tensors(_subset_model_path(out_dir, index), {"subset": subsets[index], "losses": losses.detach().double()}, {"index": index})
        trained.append(index)
    return trained


def load_subset_outputs(subsets: torch.Tensor, out_dir: str | os.PathLike) -> torch.Tensor:
    """The measured losses of every subset model :func:`run_subset_models` wrote: ``outputs`` [M, n_test], float64.

    Raises:
        `InvalidInputError`: a subset model is missing (its index is named; run the ranks that own it), was trained on
        another subset, or its losses differ in length from the others'. `DamagedArtifactError`: a file is damaged.
    """
    missing = [index for index in range(subsets.shape[0]) if not _subset_model_path(out_dir, index).is_file()]
    if missing:
        raise InvalidInputError(f"{len(missing)} of {subsets.shape[0]} subset models have no result in {out_dir} (first: "
                                f"{missing[:10]}): run run_subset_models for them (every rank) first.")
    losses = [_read_subset_model(Path(out_dir), index, subsets[index], missing_ok=False) for index in range(subsets.shape[0])]
    lengths = sorted({len(row) for row in losses})
    if len(lengths) != 1:
        raise InvalidInputError(f"The subset models in {out_dir} measured different numbers of test rows ({lengths}): delete them and rerun.")
    return torch.stack(losses)


def _subset_model_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / SUBSET_MODEL_FILE.format(index=index)


def _read_subset_model(out_dir: Path, index: int, subset: torch.Tensor, missing_ok: bool) -> torch.Tensor | None:
    """Subset model ``index``'s losses, or None when it must be (re)trained: absent, or damaged when ``missing_ok``."""
    path = _subset_model_path(out_dir, index)
    if missing_ok and not path.is_file():
        return None
    try:
        tensors, _ = read_tensors_artifact(path, f"subset model {index}'s losses", "run_subset_models trains it again; delete the file.")
    except DamagedArtifactError as err:
        if not missing_ok:
            raise
        logger.warning(f"{err} Training subset model {index} again.")
        return None
    if "subset" not in tensors or "losses" not in tensors or not torch.equal(tensors["subset"], subset):
        raise InvalidInputError(f"{path} was trained on another subset than subsets[{index}] (another seed, num_train or fraction): "
                                "use a fresh out_dir for these subsets, or delete the old files.")
    return tensors["losses"]

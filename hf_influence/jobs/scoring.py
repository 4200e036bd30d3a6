"""Sharded, resumable scoring jobs: self-influence and test-vs-train scores (optionally kNN-restricted)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Method, ScoringConfig, sharded_method
from .._utils.errors import InvalidInputError
from ..data import dataset_fingerprint, dataset_of, select_rows
from ..engine.ihvp.arnoldi import ArnoldiBasis
from ..influence import Influence
from ..knn import KnnScores, build_index, check_num_neighbors
from .._utils.io import tensors_checksum
from .shards import ShardPlan, ShardReport, compute_shards, merge_shards


@dataclass
class ShardedScores:
    """A sharded scoring run: its ``report`` and, when every shard is saved, the merged ``scores``.

    ``scores`` is a ``[N]`` tensor (self-influence), a ``[n_test, n_train]`` tensor (pairwise) or a
    `KnnScores` (``knn=k``); ``None`` while shards are missing (``max_shards`` stopped the run).
    """

    report: ShardReport
    scores: torch.Tensor | KnnScores | None


def check_sharded_method(method: str | Method, basis: ArnoldiBasis | None) -> Method:
    """:func:`sharded_method`, and Arnoldi only with a fitted basis."""
    method = sharded_method(method)
    if method is Method.ARNOLDI and basis is None:
        raise InvalidInputError("method='arnoldi' needs a fitted basis: fit one first (`hf-influence fit`, or trainer.fit_influence()).")
    return method


def scoring_request(inf: Influence, method: Method, basis: ArnoldiBasis | None, **data: Any) -> dict:
    """Everything sharded scores depend on: model weights, selection, method, basis, damping and data contents.

    The basis is checked against the model once here (`Influence.check_basis`), and the verdict is kept by
    ``inf`` for every shard. Damping is the scorer's setting, so it is part of the request for every method
    that inverts a curvature.
    """
    if basis is not None:
        inf.check_basis(basis)
    return {
        "method": method.value, "model_class": type(inf.model).__name__, "model_fingerprint": inf.selection.fingerprint(inf.model),
        "param_names": list(inf.selection.names), "basis": None if basis is None else basis_fingerprint(basis),
        "damping": None if method is Method.TRACIN else inf.damping,
        **{f"{name}_data": None if value is None else dataset_fingerprint(value) for name, value in data.items()},
    }


def basis_fingerprint(basis: ArnoldiBasis) -> str:
    """SHA-256 over the eigenpairs of ``basis``."""
    return tensors_checksum({"eigenvalues": basis.eigenvalues, "eigenvectors": basis.eigenvectors})


def sharded_self_influence(
    inf: Influence,
    train_data: Any,
    root: str | os.PathLike,
    method: str | Method = Method.ARNOLDI,
    basis: ArnoldiBasis | None = None,
    shard_size: int = ScoringConfig.shard_size,
    accelerator: Any = None,
    max_shards: int | None = None,
    merge: bool = True,
    progress: bool = True,
) -> ShardedScores:
    """``inf.self_influence`` of ``train_data`` partition by partition, saved under ``root``, resumable.

    Args:
        inf (`Influence`): the facade; its own ``progress`` flag governs the per-batch bars inside a shard.
        train_data (`datasets.Dataset` or `DataLoader`): scored in row order.
        root (`str` or `os.PathLike`): folder that holds one sub-folder per request.
        method (`str`, defaults to `"arnoldi"`): ``"arnoldi"`` (needs ``basis``) or ``"tracin"``.
        shard_size (`int`, defaults to `ScoringConfig.shard_size`): rows per partition.
        accelerator (`accelerate.Accelerator`, *optional*): spreads partitions over processes.
        max_shards (`int`, *optional*): stop after this many new partitions (all ranks together).
        merge (`bool`, defaults to `True`): merge the shards on this rank once all are saved.
        progress (`bool`, defaults to `True`): a bar over the shards, with ETA, on the main process.

    Returns:
        `ShardedScores` whose ``scores`` is ``[N]`` (fp32, fp64 for fp64 models; high = likely noisy).
    """
    method = check_sharded_method(method, basis)
    inf.check_data(**{"training data": train_data})
    plan = ShardPlan.create(root, "self_influence", scoring_request(inf, method, basis, train=train_data),
                            len(dataset_of(train_data)), shard_size, "training data")

    def compute(rows: range) -> dict[str, torch.Tensor]:
        return {"self_influence": inf.self_influence(select_rows(train_data, list(rows)), method=method, basis=basis)}

    report = compute_shards(plan, compute, accelerator, max_shards, progress)
    scores = merge_shards(plan)["self_influence"] if merge and report.complete else None
    return ShardedScores(report, scores)


def sharded_scores(
    inf: Influence,
    test_data: Any,
    train_data: Any,
    root: str | os.PathLike,
    method: str | Method = Method.ARNOLDI,
    basis: ArnoldiBasis | None = None,
    knn: int | None = None,
    shard_size: int = ScoringConfig.shard_size,
    accelerator: Any = None,
    max_shards: int | None = None,
    merge: bool = True,
    progress: bool = True,
    knn_embedding: str | None = None,
    knn_metric: str | None = None,
) -> ShardedScores:
    """``inf.scores(test_data, train_data, knn=knn)`` in partitions saved under ``root``, resumable.

    Without ``knn`` the training rows are partitioned and each shard holds ``[rows, n_test]``
    scores (the test features are recomputed for every shard: keep shards large next to the test
    set); with ``knn=k`` the test rows are partitioned (each shard holds the ``[rows, k]`` scores
    and candidate indices), and every rank builds the same exact kNN index once, over
    ``knn_embedding`` with ``knn_metric`` (see `hf_influence.knn.build_index`; defaults: the
    model class's embedding, the head gradient for classifiers). Other arguments as in :func:`sharded_self_influence`.

    Returns:
        `ShardedScores` whose ``scores`` is ``[n_test, n_train]`` (``g_testᵀ (H + λI)^-1 g_train``,
        positive = the training example helps) or a `KnnScores` with ``knn=k``.
    """
    method = check_sharded_method(method, basis)
    inf.check_data(**{"training data": train_data, "test data": test_data})
    if knn is not None:
        check_num_neighbors(knn, len(dataset_of(train_data)))
    request = {**scoring_request(inf, method, basis, train=train_data, test=test_data), "knn": knn}
    if knn is None:
        plan = ShardPlan.create(root, "scores", request, len(dataset_of(train_data)), shard_size, "training data")

        def compute(rows: range) -> dict[str, torch.Tensor]:
            return {"scores": inf.scores(test_data, select_rows(train_data, list(rows)), method=method, basis=basis).T}
    else:
        request.update(knn_embedding=knn_embedding, knn_metric=knn_metric)
        plan = ShardPlan.create(root, "knn_scores", request, len(dataset_of(test_data)), shard_size, "test data")

        @functools.cache
        def knn_index() -> Any:  # built on the first shard this rank computes, then reused
            return build_index(inf.model, train_data, knn_embedding, knn_metric, batch_size=inf.batch_size, progress=False)

        def compute(rows: range) -> dict[str, torch.Tensor]:
            found = inf.scores(select_rows(test_data, list(rows)), train_data, method=method, basis=basis, knn=knn, index=knn_index())
            return {"scores": found.scores, "indices": found.indices}

    report = compute_shards(plan, compute, accelerator, max_shards, progress)
    if not (merge and report.complete):
        return ShardedScores(report, None)
    merged = merge_shards(plan)
    return ShardedScores(report, merged["scores"].T if knn is None else KnnScores(merged["scores"], merged["indices"]))

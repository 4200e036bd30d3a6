"""Building an `InfluenceIndex`: every training row's features, in memory or in resumable shards.

With ``output_dir`` the rows are cut into the fixed partitions of `hf_influence.jobs.shards` under the
index folder: any number of processes share them, each shard is written atomically (a SIGKILL loses
at most the shards in progress), and a rerun computes only what is missing. The main process then
adds the query side (random projection: ``QᵀHQ`` from ``p̄`` Hessian-vector products over the Hessian
rows) and the manifest, which marks the index complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .._utils.errors import DamagedArtifactError, InvalidInputError, NonFiniteError
from .._utils.io import read_json_artifact
from ..config import BasisConfig, Method, ScoringConfig, as_choice
from ..data import dataset_fingerprint, dataset_of, select_rows
from ..engine.grads import eval_mode
from ..engine.ihvp.arnoldi import ArnoldiBasis
from ..engine.kronecker import KroneckerMap
from ..engine.scoring import collect_features
from ..jobs.processes import is_main_process, wait_for_everyone
from ..jobs.scoring import basis_fingerprint
from ..jobs.shards import ShardReport, compute_shards
from .store import INDEX_FILE, INDEX_METHODS, InfluenceIndex, features_plan, load_index, save_manifest, storage_dtype

logger = logging.get_logger(__name__)


@dataclass
class IndexBuild:
    """A build: its shard ``report`` (``None`` for an in-memory build) and the ``index`` (``None`` while shards are missing)."""

    report: ShardReport | None
    index: InfluenceIndex | None


def index_method(method: str | Method, basis: ArnoldiBasis | None) -> Method:
    """``method`` if the index supports it: ``"arnoldi"`` (with a fitted basis), ``"randproj"`` or ``"tracin"``."""
    method = as_choice(Method, method, "method")
    if method not in INDEX_METHODS:
        raise InvalidInputError(
            f"An influence index stores p̄-dimensional features: method must be one of {[m.value for m in INDEX_METHODS]}, "
            f"got {method.value!r} (exact and LiSSA need the full gradient of every training row: use Influence.scores)."
        )
    if method is Method.ARNOLDI and basis is None:
        raise InvalidInputError("method='arnoldi' needs a fitted basis: basis=inf.fit_basis(...) (Hessian or Fisher), or `hf-influence fit`.")
    if method is not Method.ARNOLDI and basis is not None:
        raise InvalidInputError(f"basis= is only used by method='arnoldi'; {method.value} draws its own seeded random subspace: drop basis.")
    return method


def build_index(
    inf: Any,
    train_data: Any,
    method: str | Method = Method.ARNOLDI,
    basis: ArnoldiBasis | None = None,
    hessian_data: Any = None,
    rank: int = BasisConfig.rank,
    dtype: str = "float32",
    output_dir: str | os.PathLike | None = None,
    shard_size: int = ScoringConfig.shard_size,
    accelerator: Any = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> IndexBuild:
    """Features of every row of ``train_data`` for ``method`` (see `InfluenceIndex`), with the query side.

    Args:
        inf (`Influence`): model, selection, batches and projection mode (its damping is not used: queries apply theirs).
        train_data (`datasets.Dataset` or `DataLoader`): rows stored in order (the indices queries return).
        method (`str`, defaults to `"arnoldi"`): ``"arnoldi"`` (needs ``basis``, Hessian or Fisher), ``"randproj"``, or
            ``"tracin"`` (TracIn on a seeded ``rank``-dimensional random projection of the gradient: an approximation of
            the gradient dot product, exact when ``rank`` equals the number of selected parameters).
        hessian_data: rows whose Hessian gives random projection's ``QᵀHQ`` (default ``train_data``; its
            ``hessian_examples`` subset, as in `Influence.scores`).
        rank (`int`, defaults to `20`): subspace dimension of ``"randproj"`` and ``"tracin"`` (Arnoldi: the basis rank).
        dtype (`str`, defaults to `"float32"`): storage of the features, ``"float32"`` or ``"float16"`` (half the memory;
            top-k agreement with float32 is measured in ``benchmarks/index.py``).
        output_dir (`str`, *optional*): build in shards in this folder, resumable; ``None`` builds in memory.
        shard_size, accelerator, max_shards, progress: as in `hf_influence.jobs.sharded_self_influence`.

    Returns:
        `IndexBuild`; its ``index`` is ``None`` when ``max_shards`` stopped the build (rerun to continue).
    """
    method, dtype_ = index_method(method, basis), storage_dtype(dtype)
    inf.check_data(**{"training data": train_data, "Hessian data": hessian_data})
    directions = _directions(inf, method, basis, rank)
    request = index_request(inf, method, basis, directions, dtype, train_data, hessian_data)

    def compute(rows: range) -> dict[str, torch.Tensor]:
        data = train_data if len(rows) == len(dataset_of(train_data)) else select_rows(train_data, list(rows))
        return {"features": _features(inf, inf.train_loss, directions, data, dtype_)}

    if output_dir is None:
        features = compute(range(len(dataset_of(train_data))))["features"]
        return IndexBuild(None, InfluenceIndex(features, _stored(directions), _curvature(inf, method, basis, directions, train_data, hessian_data), request))
    plan = features_plan(output_dir, request, len(dataset_of(train_data)), shard_size)
    report = compute_shards(plan, compute, accelerator, max_shards, progress)
    if not report.complete:
        return IndexBuild(report, None)
    if is_main_process(accelerator) and _manifest_hash(Path(output_dir)) != plan.request_hash:
        save_manifest(output_dir, plan, _stored(directions), _curvature(inf, method, basis, directions, train_data, hessian_data))
    wait_for_everyone(accelerator)
    return IndexBuild(report, load_index(output_dir))


def index_request(inf: Any, method: Method, basis: ArnoldiBasis | None, directions: torch.Tensor, dtype: str,
                  train_data: Any, hessian_data: Any) -> dict:
    """Everything stored features depend on (damping is not among them: queries apply it)."""
    seeded = method is not Method.ARNOLDI
    hessian = inf.hessian_rows(train_data if hessian_data is None else hessian_data) if method is Method.RANDPROJ else None
    return {
        "method": method.value, "model_class": type(inf.model).__name__, "model_fingerprint": inf.selection.fingerprint(inf.model),
        "param_names": list(inf.selection.names), "basis": None if basis is None else basis_fingerprint(basis),
        "rank": int(directions.shape[0]), "seed": inf.seed if seeded else None, "dtype": dtype,
        "train_data": dataset_fingerprint(train_data), "hessian_data": None if hessian is None else dataset_fingerprint(hessian),
        **({"random_projection": "kronecker"} if isinstance(directions, KroneckerMap) else {}),  # dense requests hash as before
    }


def _directions(inf: Any, method: Method, basis: ArnoldiBasis | None, rank: int) -> torch.Tensor | KroneckerMap:
    """``Q`` ``[p̄, P]`` on the model's device: the basis's eigenvectors, or the seeded random map of `Influence.scores`
    (dense, or a `KroneckerMap` under ``random_projection="kronecker"``)."""
    if method is Method.ARNOLDI:
        inf.check_basis(basis)
        return basis.eigenvectors.to(inf._device())
    return inf._random_directions(rank)


def _features(inf: Any, loss_fn: Any, directions: torch.Tensor, data: Any, dtype: torch.dtype) -> torch.Tensor:
    """``Q g`` of every row of ``data`` ``[n, p̄]`` in ``dtype`` (on the CPU); refuses values ``dtype`` cannot hold."""
    with eval_mode(inf.model):
        features = collect_features(inf._projection_fn(loss_fn, directions), inf._loader(data), inf._device(), "index features", inf.progress)
    stored = features.to(dtype).cpu()
    if not torch.isfinite(stored).all():
        raise NonFiniteError(f"Projected gradients exceed the range of {dtype} (largest |value| {features.abs().max():.3g}): "
                             "store them as float32 (dtype='float32').")
    return stored


def _curvature(inf: Any, method: Method, basis: ArnoldiBasis | None, directions: torch.Tensor, train_data: Any, hessian_data: Any) -> torch.Tensor:
    """The damping-free part of the preconditioner (see `InfluenceIndex.curvature`)."""
    if method is Method.ARNOLDI:
        return basis.eigenvalues.clone()
    if method is Method.TRACIN:  # a Kronecker map's per-feature weights (E[Qᵀ diag(w) Q] = I); dense: none, the scale is P / p̄
        return directions.weights.to(directions.dtype) if isinstance(directions, KroneckerMap) else torch.zeros(0)
    return inf._subspace_hessian(train_data if hessian_data is None else hessian_data, directions).cpu()  # QᵀHQ [p̄, p̄]


def _stored(directions: torch.Tensor | KroneckerMap) -> torch.Tensor:
    """What the index keeps of ``Q``: the dense ``[p̄, P]`` matrix, or a Kronecker map's factors flattened (``[F]``)."""
    return directions.factors().cpu() if isinstance(directions, KroneckerMap) else directions.cpu()


def _manifest_hash(folder: Path) -> str | None:
    """The request hash of the index completed in ``folder`` (``None``: none, or a damaged manifest, which is replaced)."""
    try:
        return read_json_artifact(folder / INDEX_FILE, "an influence index manifest", "", keys=("request_hash",))["request_hash"]
    except (FileNotFoundError, DamagedArtifactError):
        return None


"""`InfluenceIndex`: every training row's features stored once, with what turns a test gradient into a query.

Arnoldi, random projection and projected TracIn all score ``score(x, z) = (A φ(x)) · φ(z)`` with
``p̄``-dimensional features ``φ(z) = Q g_z`` (Schioppa et al. 2022, Sec. 3). The index stores
``φ(z)`` of every training row (``N × p̄`` values, float32 or float16) and the directions ``Q``
with the damping-free part of ``A`` (Arnoldi's eigenvalues, random projection's ``QᵀHQ``). The
preconditioner is applied on the query side, with the querying `Influence`'s damping, so one index
serves any damping and ``query · row`` equals the method's score.

On disk (a folder): ``influence_index.json`` (the manifest, written last: its presence means the
index is complete), ``query_side.safetensors`` (``Q`` and the curvature) and
``index_features-<hash>/shard_*.safetensors`` (fixed partitions of rows, each checksummed, written
by `hf_influence.jobs.compute_shards`, so a half-built index resumes with any process count).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .._utils.errors import CorruptShardError, DamagedArtifactError, InvalidInputError, StaleIndexError
from .._utils.io import damaged_artifact, read_json_artifact, read_tensors_artifact, save_tensors, write_json_artifact
from ..config import Method, ScoringConfig
from ..data import dataset_fingerprint
from ..engine.scoring import DiagonalInverse, SubspaceInverse
from ..jobs.shards import ShardPlan, compute_shards, merge_shards

logger = logging.get_logger(__name__)

INDEX_FILE = "influence_index.json"
QUERY_FILE = "query_side.safetensors"
FEATURES_KIND = "index_features"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INDEX_METHODS = (Method.ARNOLDI, Method.RANDPROJ, Method.TRACIN)
_REMEDY = "Build it again: Influence.build_index(train_data, ..., output_dir=path) (the valid shards are kept)."


@dataclass
class InfluenceIndex:
    """Stored training features of one estimator, for exact top-k influence queries (`Influence.query`).

    Attributes:
        features (`torch.Tensor` of shape `[N, p̄]`, float32 or float16): ``φ(z) = Q g_z`` of every training row, in row order.
        directions (`torch.Tensor` of shape `[p̄, P]`): ``Q`` (Arnoldi: the eigenvectors; random projection and
            TracIn: a seeded orthonormal random subspace), ``named_parameters()`` order of the selection. Under
            ``random_projection="kronecker"`` (``request["random_projection"]``): the map's factors flattened, ``[F]``
            (`hf_influence.engine.kronecker.KroneckerMap.factors`).
        curvature (`torch.Tensor`): the damping-free part of the preconditioner: Arnoldi ``[p̄]`` eigenvalues,
            random projection ``[p̄, p̄]`` ``QᵀHQ``, TracIn ``[0]`` (none; a Kronecker map: its ``[p̄]`` feature weights).
        request (`dict`): what the features depend on: method, model class and weight fingerprint, parameter
            names, basis fingerprint, rank, seed, training (and Hessian) data fingerprints, storage dtype.
    """

    features: torch.Tensor
    directions: torch.Tensor
    curvature: torch.Tensor
    request: dict
    _searchers: dict = field(default_factory=dict, repr=False, compare=False)  # FAISS indexes built on first use
    _verified: list = field(default_factory=list, repr=False, compare=False)  # (model, weights version) that passed the check

    @property
    def method(self) -> Method:
        return Method(self.request["method"])

    @property
    def size(self) -> int:
        """Training rows stored (``N``)."""
        return int(self.features.shape[0])

    @property
    def rank(self) -> int:
        """Features per row (``p̄``)."""
        return int(self.features.shape[1])

    @property
    def memory_bytes(self) -> int:
        """``N × p̄ × bytes per value`` of the stored features (FAISS holds one more copy of that size while searching)."""
        return self.features.numel() * self.features.element_size()

    def query_vectors(self, test_features: torch.Tensor, damping: float) -> torch.Tensor:
        """``A φ(test)`` ``[n_test, p̄]`` such that ``query · φ(z)`` is the method's score at this ``damping``.

        Arnoldi: ``(u_i·g) / (λ_i + damping)``; random projection: ``(QᵀHQ + damping·I)^-1 Q g``; TracIn on projected
        gradients: ``(P / p̄) Q g`` (``E[QᵀQ] = (p̄ / P) I`` for a uniformly random subspace, so the score is an unbiased
        estimate of ``g_testᵀ g_train``, and exactly it when ``p̄ = P``; a Kronecker map: ``diag(w) Q g`` with its weights
        ``w``, unbiased too).
        """
        if self.method is Method.ARNOLDI:
            return DiagonalInverse(1.0 / (self.curvature.to(test_features) + damping))(test_features)
        if self.method is Method.RANDPROJ:
            return SubspaceInverse(self.curvature.to(test_features), damping)(test_features)
        if self.curvature.numel():  # a Kronecker map's per-feature weights
            return test_features * self.curvature.to(test_features)
        return test_features * (self.directions.shape[1] / self.rank)

    def mismatches(self, model_class: str | None = None, param_names: list[str] | None = None, model_fingerprint: str | None = None,
                   train_data: Any = None, basis_fingerprint: str | None = None) -> list[str]:
        """Why this index cannot answer for the given model class, selection and weights, training data or basis (each
        compared when given); empty when it can."""
        saved, problems = self.request, []
        if model_class is not None and saved["model_class"] != model_class:
            problems.append(f"model class: built on {saved['model_class']}, given {model_class}")
        if param_names is not None and saved["param_names"] != list(param_names):
            problems.append(f"parameter selection: built on {len(saved['param_names'])} tensors, given {len(param_names)}")
        elif model_fingerprint is not None and saved["model_fingerprint"] != model_fingerprint:
            problems.append(f"model weights: built on {saved['model_fingerprint'][:12]}…, given {model_fingerprint[:12]}… "
                            "(the model changed since the index was built)")
        if basis_fingerprint is not None and saved.get("basis") != basis_fingerprint:
            problems.append(f"basis: built with {str(saved.get('basis'))[:12]}…, given {basis_fingerprint[:12]}…")
        if train_data is not None and (given := dataset_fingerprint(train_data)) != saved["train_data"]:
            problems.append(f"training data: built on {self.size} rows ({saved['train_data'][:12]}…), given {given[:12]}…")
        return problems

    def check_compatible(self, model_class: str | None = None, param_names: list[str] | None = None, model_fingerprint: str | None = None,
                         train_data: Any = None, basis_fingerprint: str | None = None) -> None:
        """Raise `StaleIndexError` listing :meth:`mismatches`, with the way out."""
        problems = self.mismatches(model_class, param_names, model_fingerprint, train_data, basis_fingerprint)
        if problems:
            raise StaleIndexError(
                "This influence index was built for another model, selection, basis or training set: " + "; ".join(problems)
                + ". Rebuild it with Influence.build_index(train_data, method=..., basis=...) on this model, or load the "
                "model (and data) it was built on."
            )

    def save(self, path: str | os.PathLike, shard_size: int = ScoringConfig.shard_size) -> Path:
        """Write to the folder ``path`` (features in checksummed shards of ``shard_size`` rows, then the manifest)."""
        plan = features_plan(path, self.request, self.size, shard_size)
        compute_shards(plan, lambda rows: {"features": self.features[rows.start:rows.stop]}, progress=False)
        return save_manifest(path, plan, self.directions, self.curvature)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InfluenceIndex":
        """Read an index written by :meth:`save` or by a sharded build; every file's checksum is verified."""
        return load_index(path)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a complete index (its manifest is written last)."""
        return (Path(path) / INDEX_FILE).is_file()


def features_plan(path: str | os.PathLike, request: dict, num_rows: int, shard_size: int) -> ShardPlan:
    """The fixed partitions of the feature rows under the index folder ``path``."""
    return ShardPlan.create(path, FEATURES_KIND, request, num_rows, shard_size, "training data")


def save_manifest(path: str | os.PathLike, plan: ShardPlan, directions: torch.Tensor, curvature: torch.Tensor) -> Path:
    """Write the query side, then the manifest that marks the index complete (every shard must be saved); the
    features of an earlier index in ``path`` are removed."""
    folder = Path(path)
    save_tensors(folder / QUERY_FILE, {"directions": directions, "curvature": curvature},
                 {"kind": "influence_index_query", "request_hash": plan.request_hash})
    write_json_artifact(folder / INDEX_FILE, {"kind": "influence_index", "request": plan.request, "request_hash": plan.request_hash,
                                              "features_folder": plan.folder.name})
    for other in folder.glob(f"{FEATURES_KIND}-*"):  # the features of an index this one replaced
        if other != plan.folder and other.is_dir():
            logger.warning(f"Removing {other}: the features of the influence index this one replaced.")
            shutil.rmtree(other)
    return folder


def load_index(path: str | os.PathLike) -> InfluenceIndex:
    """:meth:`InfluenceIndex.load`: manifest, query side and every feature shard, verified."""
    folder = Path(path)
    if not (folder / INDEX_FILE).is_file():
        started = any(folder.glob(f"{FEATURES_KIND}-*/shard_*.safetensors"))
        raise FileNotFoundError(
            f"No complete influence index at {folder}" + (" (feature shards are there: the build was stopped). Rerun the "
            "same build_index(..., output_dir=path) / `hf-influence index` command to finish it." if started else
            ". Build one with Influence.build_index(train_data, ...).save(path) or `hf-influence index`.")
        )
    manifest = read_json_artifact(folder / INDEX_FILE, "an influence index manifest", _REMEDY, keys=("request", "request_hash", "features_folder"))
    saved = manifest["request"]
    request = {k: v for k, v in saved.items() if k not in ("kind", "num_rows", "shard_size")}
    plan = features_plan(folder, request, saved["num_rows"], saved["shard_size"])
    if plan.request_hash != manifest["request_hash"] or plan.folder.name != manifest["features_folder"]:
        raise damaged_artifact(folder / INDEX_FILE, "an influence index manifest", "its request does not match the hash it records", _REMEDY)
    tensors, meta = read_tensors_artifact(folder / QUERY_FILE, "the query side of an influence index", _REMEDY)
    if meta.get("request_hash") != plan.request_hash or {"directions", "curvature"} - set(tensors):
        raise damaged_artifact(folder / QUERY_FILE, "the query side of an influence index", "it belongs to another build", _REMEDY)
    try:
        features = merge_shards(plan)["features"]
    except CorruptShardError as err:
        raise DamagedArtifactError(f"{err} {_REMEDY}", path=err.path) from None
    return InfluenceIndex(features, tensors["directions"], tensors["curvature"], request)


def storage_dtype(dtype: str) -> torch.dtype:
    """``"float32"`` or ``"float16"`` as a torch dtype."""
    if dtype not in STORAGE_DTYPES:
        raise InvalidInputError(f"dtype must be one of {sorted(STORAGE_DTYPES)} (the stored features' precision), got {dtype!r}.")
    return STORAGE_DTYPES[dtype]

"""Top-k influence queries: maximum inner-product search over the stored features (FAISS).

Exact by default: ``IndexFlatIP`` over float32 features, ``IndexScalarQuantizer`` (fp16 codes, inner product)
over float16 ones; both compare the query with every stored row, so the answer is the full scan's
top-k (to float32 rounding). ``approximate=True`` switches to an HNSW graph (``IndexHNSWFlat``, inner
product) from ``APPROXIMATE_THRESHOLD`` rows on; its recall against exact is measured in
``benchmarks/index.py``. Directions: ``"helpful"`` (largest scores) searches ``+q``; ``"harmful"``
(smallest) searches ``-q``; ``"abs"`` (largest ``|score|``) searches both and merges, since the top-k by
``|score|`` lies in the union of the k largest and the k smallest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from .._utils.errors import InvalidInputError
from .._utils.imports import require_faiss
from ..engine.grads import eval_mode
from ..engine.kronecker import KroneckerMap
from ..engine.scoring import collect_features
from ..params import weights_version
from .store import InfluenceIndex

logger = logging.get_logger(__name__)

DIRECTIONS = ("helpful", "harmful", "abs")
APPROXIMATE_THRESHOLD = 100_000  # below this many rows, approximate=True still searches exactly
HNSW_NEIGHBORS = 32  # graph degree M
HNSW_EF_SEARCH = 128  # candidates kept while searching (at least 2k)


@dataclass
class TopInfluences:
    """The ``k`` most influential training rows of each test row, best first.

    Attributes:
        scores (`torch.Tensor` of shape `[n_test, k]`, float32): the method's scores ``g_testᵀ A g_train``
            (positive: the training row helps the test row).
        indices (`torch.Tensor` of shape `[n_test, k]`, int64): their rows in the training set the index was built on.
        direction (`str`): ``"helpful"`` (descending scores), ``"harmful"`` (ascending) or ``"abs"`` (descending ``|score|``).
    """

    scores: torch.Tensor
    indices: torch.Tensor
    direction: str


def check_query(index: InfluenceIndex, k: Any, direction: str) -> None:
    """``1 <= k <= N`` and a known direction, before any gradient is computed."""
    if direction not in DIRECTIONS:
        raise InvalidInputError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= index.size:
        raise InvalidInputError(f"k must be an integer in [1, {index.size}] (the rows in the index), got {k!r}.")


def searcher(index: InfluenceIndex, approximate: bool = False, threshold: int = APPROXIMATE_THRESHOLD) -> Any:
    """The FAISS index over ``index.features`` (built on first use and kept on ``index``)."""
    kind = "hnsw" if approximate and index.size >= threshold else "exact"
    if kind not in index._searchers:
        faiss = require_faiss()
        vectors = index.features.float().contiguous().numpy()
        if kind == "hnsw":
            found = faiss.IndexHNSWFlat(index.rank, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        elif index.features.dtype == torch.float16:
            found = faiss.IndexScalarQuantizer(index.rank, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            found = faiss.IndexFlatIP(index.rank)
        found.add(vectors)
        logger.info(f"Influence index: {type(found).__name__} over {index.size} rows × {index.rank} features "
                    f"({index.memory_bytes / 2**20:.1f} MiB stored).")
        index._searchers[kind] = found
    return index._searchers[kind]


def search(index: InfluenceIndex, queries: torch.Tensor, k: int, direction: str = "helpful", approximate: bool = False,
           threshold: int = APPROXIMATE_THRESHOLD) -> TopInfluences:
    """Top ``k`` rows of ``queries @ index.features.T`` per query row in ``direction``, without forming that matrix.

    Args:
        queries (`torch.Tensor` of shape `[n, p̄]`): preconditioned test features (`InfluenceIndex.query_vectors`).
        approximate (`bool`, defaults to `False`): HNSW instead of exact search from ``threshold`` rows on.
    """
    check_query(index, k, direction)
    if queries.dim() != 2 or queries.shape[1] != index.rank:
        raise InvalidInputError(f"queries must be [n, {index.rank}] (the index's feature size), got shape {tuple(queries.shape)}.")
    found = searcher(index, approximate, threshold)
    if hasattr(found, "hnsw"):
        found.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
    vectors = queries.detach().float().cpu().contiguous()
    if direction == "helpful":
        scores, indices = _search(found, vectors, k)
    elif direction == "harmful":
        scores, indices = _search(found, -vectors, k)
        scores = -scores
    else:
        scores, indices = _largest_magnitude(*_search(found, vectors, k), *_search(found, -vectors, k), k)
    return TopInfluences(scores, indices, direction)


def _search(found: Any, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, indices = found.search(vectors.numpy(), k)
    if (indices < 0).any():
        raise InvalidInputError(f"The approximate index returned fewer than k={k} rows for a query: lower k or search exactly.")
    return torch.from_numpy(scores), torch.from_numpy(indices).long()


def _largest_magnitude(top_scores: torch.Tensor, top_indices: torch.Tensor, bottom_negated: torch.Tensor, bottom_indices: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the k largest and (negated) k smallest scores into the k largest ``|score|``, each row once."""
    scores = torch.cat([top_scores, -bottom_negated], dim=1)  # [n, 2k]
    indices = torch.cat([top_indices, bottom_indices], dim=1)
    order = scores.abs().argsort(dim=1, descending=True, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    earlier = torch.ones(2 * k, 2 * k, dtype=torch.bool).tril(-1)  # [j, i]: i comes before j
    repeated = ((indices.unsqueeze(2) == indices.unsqueeze(1)) & earlier).any(dim=2)  # a row already listed
    keep = torch.where(repeated, -1.0, scores.abs()).topk(k, dim=1, sorted=True).indices.sort(dim=1).values
    return scores.gather(1, keep), indices.gather(1, keep)


def query_features(inf: Any, index: InfluenceIndex, test_data: Any) -> torch.Tensor:
    """``Q g_test`` ``[n_test, p̄]`` of the task's test-side measurement (fp32 accumulation or wider)."""
    directions = index.directions.to(inf._device())
    if index.request.get("random_projection") == "kronecker":  # the stored factors, laid out on this (checked) selection
        directions = KroneckerMap.from_factors(inf.selection.names, inf.selection.shapes, index.rank, directions)
    with eval_mode(inf.model):
        return collect_features(inf._projection_fn(inf.test_loss, directions), inf._loader(test_data), inf._device(), "test features", inf.progress)


def _check_model(inf: Any, index: InfluenceIndex) -> None:
    """`InfluenceIndex.check_compatible` against ``inf``'s model and selection; hashing the weights costs a pass over them,
    so a model is checked again only when a selected tensor is replaced or changed in place (its version counter)."""
    version = weights_version(inf._params().items())
    if any(model is inf.model and seen == version for model, seen in index._verified):
        return
    index.check_compatible(type(inf.model).__name__, list(inf.selection.names), inf.selection.fingerprint(inf.model))
    index._verified[:] = [(model, seen) for model, seen in index._verified if model is not inf.model] + [(inf.model, version)]


def query_index(inf: Any, index: InfluenceIndex, test_data: Any, k: int = 10, direction: str = "helpful", approximate: bool = False,
                train_data: Any = None) -> TopInfluences:
    """`Influence.query`: checks, test features, the query-side preconditioner at ``inf.damping``, search."""
    check_query(index, k, direction)
    _check_model(inf, index)
    index.check_compatible(train_data=train_data)
    inf.check_data(**{"test data": test_data})
    queries = index.query_vectors(query_features(inf, index, test_data), inf.damping)
    return search(index, queries, k, direction, approximate)

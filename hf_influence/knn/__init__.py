"""kNN restriction (FastIF, Guo et al. 2021, Sec. 3.2): score only the nearest training examples.

``embeddings`` (how examples are embedded: pluggable `Embedding` strategies, the head gradient by
default for classifiers), ``index`` (the FAISS index and its persistence) and ``search`` (candidate
search and restricted scoring). FastIF's recall metric is `hf_influence.metrics.knn_recall`.
"""

from ..metrics import DIRECTIONS, rank_scores
from .embeddings import EMBEDDINGS, Embedding, FunctionEmbedding, HeadGradientEmbedding, compute_embeddings, infer_embedding
from .index import (
    IVF_THRESHOLD,
    METRICS,
    IndexChecks,
    KnnIndex,
    build_index,
    index_embeddings,
    index_exists,
    index_save_path,
    load_index,
    save_index,
)
from .search import KnnScores, check_num_neighbors, find_candidates, score_candidates

__all__ = [
    "DIRECTIONS",
    "EMBEDDINGS",
    "IVF_THRESHOLD",
    "METRICS",
    "Embedding",
    "FunctionEmbedding",
    "HeadGradientEmbedding",
    "IndexChecks",
    "KnnIndex",
    "KnnScores",
    "build_index",
    "check_num_neighbors",
    "compute_embeddings",
    "find_candidates",
    "index_embeddings",
    "index_exists",
    "index_save_path",
    "infer_embedding",
    "load_index",
    "rank_scores",
    "save_index",
    "score_candidates",
]

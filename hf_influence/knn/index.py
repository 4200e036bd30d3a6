"""The FAISS index over training-set embeddings, and its persistence.

A `KnnIndex` returns the ``k`` nearest training examples of a query (FastIF, Guo et al. 2021,
Sec. 3.2). It is saved with the fingerprints of the model and the training set it was built from,
and refuses to serve another model or dataset; `IndexChecks` remembers which index passed that
check, so a run verifies it once and not once per shard.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .._utils.errors import InvalidInputError, StaleIndexError
from .._utils.imports import require_faiss
from .._utils.io import damaged_artifact, read_tensors_artifact, save_tensors
from ..data import check_in_order, dataset_fingerprint, dataset_of
from ..params import select_parameters, weights_version
from .embeddings import EMBEDDINGS, Embedding, EmbedFn, compute_embeddings, resolve_embedding
from .search import check_num_neighbors

logger = logging.get_logger(__name__)

INDEX_FILE = "knn_index.safetensors"
IVF_THRESHOLD = 100_000  # from this many training examples on, an IVF index replaces exact search
METRICS = ("l2", "ip", "cosine", "abs_ip")
_SAVED_FIELDS = ("metric", "index_type", "embedding", "model_fingerprint", "model_class", "dataset_fingerprint", "nprobe")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over all trainable parameters of ``model`` (names, shapes, dtypes, values) and its class."""
    return select_parameters(model).fingerprint(model)


@dataclass
class KnnIndex:
    """A FAISS index over training-set embeddings, tied to one model, embedding and training set.

    Attributes:
        index (`faiss.Index`): ``IndexFlatL2`` / ``IndexFlatIP`` (exact) or ``IndexIVFFlat``.
        metric (`str`): ``"l2"`` (squared Euclidean), ``"ip"`` (inner product), ``"cosine"`` or
            ``"abs_ip"`` (largest |inner product|: each row is stored as ``+x`` and ``-x``).
        index_type (`str`): ``"flat"`` (exact) or ``"ivf"`` (inverted lists, approximate).
        embedding (`str`): the embedding's name (``"head_gradient"``, ..., or ``"custom:<qualname>"``).
        model_fingerprint (`str`), model_class (`str`): the model the embeddings came from.
        dataset_fingerprint (`str`): the training set (see :func:`dataset_fingerprint`).
        nprobe (`int`): IVF lists visited per query (widened automatically if fewer than ``k`` hits).
        embed_fn (`Embedding`, *optional*): the embedding strategy (a built-in is restored by name on load; a
            custom one is given again to :func:`load_index`).
    """

    index: Any
    metric: str
    index_type: str
    embedding: str
    model_fingerprint: str
    model_class: str
    dataset_fingerprint: str
    nprobe: int = 1
    embed_fn: Embedding | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        """Training examples indexed (``"abs_ip"`` stores each one twice, as ``+x`` and ``-x``)."""
        return int(self.index.ntotal) // (2 if self.metric == "abs_ip" else 1)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest training examples of each query, nearest first.

        Args:
            queries (`torch.Tensor` of shape `[n, d]`): embeddings (any float dtype).
            k (`int`): neighbours per query, ``1 <= k <= size``.

        Returns:
            distances (`torch.Tensor` of shape `[n, k]`, float32: squared L2, or similarity for ``"ip"``,
            ``"cosine"`` and ``"abs_ip"`` (|inner product|)) and indices (`torch.Tensor` of shape `[n, k]`, int64, rows of the training set).
        """
        check_num_neighbors(k, self.size)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"queries must be [n, {self.dim}] embeddings, got shape {tuple(queries.shape)}.")
        vectors = _prepare(queries, self.metric)
        nprobe = self.nprobe
        while True:
            if self.index_type == "ivf":
                self.index.nprobe = nprobe
            distances, indices = self.index.search(vectors, k)
            if (indices >= 0).all() or self.index_type != "ivf" or nprobe >= self.index.nlist:
                indices = torch.from_numpy(indices).long()
                if self.metric == "abs_ip":  # row i is stored at i (+x) and size + i (-x)
                    indices = torch.where(indices >= 0, indices % self.size, indices)
                return torch.from_numpy(distances), indices
            nprobe = min(2 * nprobe, self.index.nlist)  # too few vectors in the visited lists

    def neighbors(self, model: nn.Module, data: Any, k: int, batch_size: int = 32, pad_token_id: int = 0, progress: bool = True) -> torch.Tensor:
        """Indices ``[n, k]`` (int64) of the ``k`` nearest training examples of each example of ``data``."""
        if self.embed_fn is None:
            raise InvalidInputError(
                f"This index was built with the embedding {self.embedding!r}, which is not saved with it: pass the "
                "same function again, load_index(path, embed_fn=...)."
            )
        queries = compute_embeddings(model, data, self.embed_fn, batch_size, pad_token_id, progress)
        return self.search(queries, k)[1]

    def check_compatible(self, model: nn.Module, train_data: Any) -> None:
        """Refuse a model or training set other than the ones the index was built on, naming what differs."""
        problems = []
        if (fingerprint := model_fingerprint(model)) != self.model_fingerprint or type(model).__name__ != self.model_class:
            problems.append(
                f"model: built on {self.model_class} weights {self.model_fingerprint[:12]}…, given "
                f"{type(model).__name__} weights {fingerprint[:12]}…"
            )
        if (fingerprint := dataset_fingerprint(train_data)) != self.dataset_fingerprint:
            problems.append(
                f"training data: built on {self.size} examples ({self.dataset_fingerprint[:20]}…), given "
                f"{len(dataset_of(train_data))} examples ({fingerprint[:20]}…)"
            )
        if problems:
            raise StaleIndexError(
                "This kNN index is stale: " + "; ".join(problems) + ". Rebuild it on this model and training set, "
                "hf_influence.knn.build_index(model, train_data).save(path), or pass the model and training data "
                "it was built on."
            )

    def metadata(self) -> dict:
        return {"kind": "knn_index", "size": self.size, "dim": self.dim, **{k: getattr(self, k) for k in _SAVED_FIELDS}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a folder: ``path/knn_index.safetensors``; or a ``.safetensors`` file), atomically."""
        return save_index(self, path)


def _prepare(vectors: torch.Tensor, metric: str):
    """Contiguous float32 numpy rows for FAISS; unit rows for the cosine metric."""
    vectors = vectors.detach().float().cpu()
    if metric == "cosine":
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    return vectors.contiguous().numpy()


def index_embeddings(
    embeddings: torch.Tensor,
    metric: str = "l2",
    ivf_threshold: int = IVF_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> tuple[Any, str, int]:
    """A FAISS index over ``embeddings`` (``[N, d]``): exact below ``ivf_threshold`` rows, IVF from it on.

    IVF uses ``nlist = 4·√N`` lists by default (FAISS's guideline is 4·√N to 16·√N) and visits
    ``nprobe = max(8, nlist / 16)`` of them per query. Returns ``(index, index_type, nprobe)``.
    """
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}.")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise InvalidInputError(f"embeddings must be a non-empty [N, d] tensor, got shape {tuple(embeddings.shape)}.")
    faiss = require_faiss()
    count, dim = embeddings.shape
    vectors = _prepare(torch.cat([embeddings, -embeddings]) if metric == "abs_ip" else embeddings, metric)
    flat = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
    if count < ivf_threshold:  # count: training examples, whatever the metric stores per example
        flat.add(vectors)
        logger.info(f"kNN index: exact {type(flat).__name__} over {count} examples (IVF from {ivf_threshold} on).")
        return flat, "flat", 1
    nlist = nlist or max(1, int(4 * math.sqrt(len(vectors))))
    if not 1 <= nlist <= count:
        raise InvalidInputError(f"nlist must be in [1, {count}] (the number of embeddings), got {nlist}.")
    index = faiss.IndexIVFFlat(flat, dim, nlist, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    nprobe = nprobe or min(nlist, max(8, nlist // 16))
    logger.info(f"kNN index: IVF over {count} examples (>= {ivf_threshold}), nlist={nlist}, nprobe={nprobe}.")
    return index, "ivf", nprobe


def build_index(
    model: nn.Module,
    train_data: Any,
    embed_fn: Embedding | EmbedFn | str | None = None,
    metric: str | None = None,
    batch_size: int = 32,
    pad_token_id: int | None = None,
    ivf_threshold: int = IVF_THRESHOLD,
    nlist: int | None = None,
    nprobe: int | None = None,
    progress: bool = True,
) -> KnnIndex:
    """Embed ``train_data`` with ``model`` and index it (see :func:`compute_embeddings`, :func:`index_embeddings`).

    Args:
        model (`nn.Module`): the model whose features define neighbourhoods.
        train_data (`datasets.Dataset` or `DataLoader`): the training set; rows are indexed in order
            (a ``DataLoader`` must not shuffle).
        embed_fn (`Embedding`, `Callable` or `str`, *optional*): see
            `hf_influence.knn.compute_embeddings`; defaults to ``"head_gradient"`` for sequence classifiers
            (FastIF's features stay available as ``"classifier_input"``).
        metric (`str`, *optional*): ``"l2"``, ``"ip"`` (inner product), ``"cosine"``, or ``"abs_ip"``
            (largest |inner product|); defaults to the embedding's (``"abs_ip"`` for ``"head_gradient"``, else ``"l2"``).
        batch_size (`int`, defaults to `32`): embedding batch size for a ``Dataset``.
        pad_token_id (`int`, *optional*): defaults to ``model.config.pad_token_id`` (else 0).
        ivf_threshold (`int`, defaults to `100_000`): exact search below this many examples, IVF from it on.
        nlist (`int`, *optional*), nprobe (`int`, *optional*): IVF lists and lists visited per query.
        progress (`bool`, defaults to `True`): show a tqdm bar.
    """
    strategy = resolve_embedding(model, embed_fn)
    metric = metric or strategy.metric
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}.")
    require_faiss()
    check_in_order(train_data)
    pad = pad_token_id if pad_token_id is not None else getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    embeddings = compute_embeddings(model, train_data, strategy, batch_size, pad, progress)
    index, index_type, probes = index_embeddings(embeddings, metric, ivf_threshold, nlist, nprobe)
    return KnnIndex(
        index, metric, index_type, strategy.name, model_fingerprint(model), type(model).__name__, dataset_fingerprint(train_data),
        probes, strategy,
    )


def index_save_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a ``.safetensors`` file, else ``path/knn_index.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / INDEX_FILE


def index_exists(path: str | os.PathLike) -> bool:
    return index_save_path(path).is_file()


def save_index(index: KnnIndex, path: str | os.PathLike) -> Path:
    """The serialized FAISS index as a uint8 tensor, with the metadata, in one safetensors file (tmp + rename)."""
    faiss = require_faiss()
    target = index_save_path(path)
    save_tensors(target, {"faiss_index": torch.from_numpy(faiss.serialize_index(index.index))}, index.metadata())
    return target


def load_index(path: str | os.PathLike, embed_fn: Embedding | EmbedFn | None = None) -> KnnIndex:
    """Read an index written by :func:`save_index`.

    Args:
        path (`str` or `os.PathLike`): the folder (or file) it was saved to.
        embed_fn (`Embedding` or `Callable`, *optional*): the strategy or function a custom-embedding index
            was built with (built-in embeddings are restored by name).
    """
    faiss = require_faiss()
    target = index_save_path(path)
    if not target.is_file():
        raise FileNotFoundError(f"No kNN index at {target}. Build one with hf_influence.knn.build_index(model, train_data).save(path).")
    remedy = "Build it again, which overwrites it: hf_influence.knn.build_index(model, train_data).save(path)."
    tensors, meta = read_tensors_artifact(target, "a kNN index", remedy)
    if meta.get("kind") != "knn_index":
        raise StaleIndexError(f"{target} holds a {meta.get('kind')!r}, not a kNN index.")
    missing = [k for k in _SAVED_FIELDS if k not in meta] + [k for k in ("faiss_index",) if k not in tensors]
    if missing:
        raise damaged_artifact(target, "a kNN index", f"it lacks {', '.join(missing)}", remedy)
    name = meta["embedding"]
    strategy = None if embed_fn is None else resolve_embedding(None, embed_fn)
    if strategy is not None and strategy.name != name:
        raise StaleIndexError(
            f"The index at {target} was built with the embedding {name!r}, not {strategy.name!r}: "
            "pass the function it was built with, or rebuild the index."
        )
    fields = {k: meta[k] for k in _SAVED_FIELDS}
    try:
        index = faiss.deserialize_index(tensors["faiss_index"].numpy())
    except RuntimeError as err:  # an index saved before files carried a checksum, damaged since
        raise damaged_artifact(target, "a kNN index", f"FAISS cannot read it ({str(err).splitlines()[0]})", remedy) from None
    return KnnIndex(index, embed_fn=strategy or EMBEDDINGS.get(name), **fields)


class IndexChecks:
    """Indexes that passed :meth:`KnnIndex.check_compatible` (which hashes every weight and the training set), with
    what they passed on: checked again only when the weights change (a parameter replaced or changed in place)
    or the ``datasets.Dataset``'s fingerprint does. Other data is checked every time."""

    def __init__(self):
        self._passed: list[tuple[KnnIndex, tuple]] = []

    def verify(self, index: KnnIndex, model: nn.Module, train_data: Any) -> None:
        """``index.check_compatible(model, train_data)`` unless this index passed it on the same weights and data."""
        data = getattr(dataset_of(train_data), "_fingerprint", None)  # a datasets.Dataset's, else None
        key = (weights_version((n, p) for n, p in model.named_parameters() if p.requires_grad), data)
        if data is not None and any(seen is index and passed == key for seen, passed in self._passed):
            return
        index.check_compatible(model, train_data)
        if data is not None:
            self._passed = [(seen, passed) for seen, passed in self._passed if seen is not index] + [(index, key)]


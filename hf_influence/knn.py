"""kNN restriction (FastIF, Guo et al. 2021, Sec. 3.2): score only the nearest training examples.

Each example is embedded by the model's own features (the classifier input for sequence
classification, mean-pooled encoder states for seq2seq, the mean-pooled last hidden state for causal
LMs, or a user function); a FAISS index over the training embeddings returns the ``k`` nearest
training examples of a test example, and influence is computed for those candidates only.
The index is saved with the fingerprints of the model and the training set it was built from, and
refuses to serve another model or dataset.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, Subset
from tqdm.auto import tqdm
from transformers.utils import logging

from ._utils.errors import InvalidInputError, StaleIndexError
from ._utils.imports import require_faiss
from ._utils.io import load_tensors, save_tensors
from .data import Batch, dataset_fingerprint, make_loader, to_device
from .engine.grads import eval_mode
from .engine.scoring import FeatureFn, pairwise_scores
from .head_gradient import classifier_output_layer, embed_head_gradient
from .params import select_parameters

logger = logging.get_logger(__name__)

EmbedFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> [B, d]
INDEX_FILE = "knn_index.safetensors"
IVF_THRESHOLD = 100_000  # from this many training examples on, an IVF index replaces exact search
METRICS = ("l2", "ip", "cosine", "abs_ip")
DIRECTIONS = ("influential", "helpful", "harmful")
_SAVED_FIELDS = ("metric", "index_type", "embedding", "model_fingerprint", "model_class", "dataset_fingerprint", "nprobe")


# ----------------------------------------------------------------------------- embeddings
def _real_token_mask(batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]`` float: 1 at real tokens (all tokens when the batch has no attention mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.new_ones(hidden.shape[:2]).unsqueeze(-1)
    return mask.to(hidden.dtype).unsqueeze(-1)


def _masked_mean(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of ``[B, T, d]`` states over real tokens only: ``[B, d]``."""
    mask = _real_token_mask(batch, hidden)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _last_real_token(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """State at each sequence's rightmost real token (where GPT-style classifiers read): ``[B, d]``."""
    mask = _real_token_mask(batch, hidden).squeeze(-1)  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * (mask > 0)).amax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _text_inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def embed_classifier_input(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The vector the classification head's output layer reads: BERT's pooler output, RoBERTa's
    dense+tanh first-token state; for heads applied at every position (GPT-2), the last real token's."""
    captured: list[torch.Tensor] = []
    handle = classifier_output_layer(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    features = captured[-1]
    return _last_real_token(features, batch) if features.dim() == 3 else features


def embed_encoder_mean(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Encoder states of a seq2seq model (Marian, T5, BART), averaged over real tokens."""
    hidden = model.get_encoder()(**_text_inputs(batch)).last_hidden_state  # [B, T, d]
    return _masked_mean(hidden, batch)


def embed_last_hidden_mean(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states of a causal LM's base model (after its final norm), averaged over real tokens."""
    hidden = model.base_model(**_text_inputs(batch)).last_hidden_state  # [B, T, d]
    return _masked_mean(hidden, batch)


EMBEDDINGS: dict[str, EmbedFn] = {
    "classifier_input": embed_classifier_input,
    "encoder_mean": embed_encoder_mean,
    "last_hidden_mean": embed_last_hidden_mean,
    "head_gradient": embed_head_gradient,
}


def infer_embedding(model: nn.Module) -> str:
    """Name of the built-in embedding for ``model``'s class (a key of ``EMBEDDINGS``)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classifier_input"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return "encoder_mean"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "last_hidden_mean"
    raise InvalidInputError(
        f"No built-in embedding for model class {name!r} (built-ins: *ForSequenceClassification, encoder-decoder "
        "models, *ForCausalLM / *LMHeadModel). Pass embed_fn=<(model, batch) -> Tensor[B, d]>."
    )


def default_metric(embedding: str) -> str:
    """``"abs_ip"`` for gradient embeddings (|g_test · g_train| is what ranks influence), ``"l2"`` otherwise (FastIF)."""
    return "abs_ip" if embedding == "head_gradient" else "l2"


def custom_embedding_name(embed_fn: EmbedFn) -> str:
    """The name saved for a user-supplied embedding function."""
    return f"custom:{getattr(embed_fn, '__qualname__', type(embed_fn).__name__)}"


def resolve_embedding(model: nn.Module, embed_fn: EmbedFn | str | None) -> tuple[str, EmbedFn]:
    """``(name, function)`` for ``embed_fn``: a callable, a key of ``EMBEDDINGS``, or ``None`` (inferred)."""
    if callable(embed_fn):
        return custom_embedding_name(embed_fn), embed_fn
    name = infer_embedding(model) if embed_fn is None else embed_fn
    if name not in EMBEDDINGS:
        raise InvalidInputError(f"embed_fn must be a callable, None or one of {sorted(EMBEDDINGS)}; got {embed_fn!r}.")
    return name, EMBEDDINGS[name]


def compute_embeddings(
    model: nn.Module,
    data: Any,
    embed_fn: EmbedFn | str | None = None,
    batch_size: int = 32,
    pad_token_id: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Embed every example of ``data`` with the model's own features, in order.

    Args:
        model (`nn.Module`): a HF model, run in eval mode without gradients.
        data (`datasets.Dataset` or `DataLoader`): tokenized examples (a ``DataLoader`` is used as is).
        embed_fn (`Callable` or `str`, *optional*): ``(model, batch) -> Tensor[B, d]``, or the name of a
            built-in (``"classifier_input"``, ``"encoder_mean"``, ``"last_hidden_mean"``, ``"head_gradient"``); inferred
            from the model class when ``None``. Padding never enters a mean.
        batch_size (`int`, defaults to `32`): batch size when ``data`` is a ``Dataset``.
        pad_token_id (`int`, defaults to `0`): id used to pad ``input_ids``.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `torch.Tensor` of shape `[N, d]`, float32, on the CPU.
    """
    _, function = resolve_embedding(model, embed_fn)
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model):
        for batch in tqdm(make_loader(data, batch_size, pad_token_id), desc="embeddings", disable=not progress):
            rows.append(function(model, to_device(batch, device)).float().cpu())
    return torch.cat(rows)


# ----------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over all trainable parameters of ``model`` (names, shapes, dtypes, values) and its class."""
    return select_parameters(model).fingerprint(model)


def dataset_of(data: Any) -> Any:
    """The dataset behind ``data`` (a ``DataLoader``'s ``dataset``, else ``data`` itself)."""
    return data.dataset if isinstance(data, DataLoader) else data


# ----------------------------------------------------------------------------- the index
@dataclass
class KnnIndex:
    """A FAISS index over training-set embeddings, tied to one model, embedding and training set.

    Attributes:
        index (`faiss.Index`): ``IndexFlatL2`` / ``IndexFlatIP`` (exact) or ``IndexIVFFlat``.
        metric (`str`): ``"l2"`` (squared Euclidean), ``"ip"`` (inner product), ``"cosine"`` or
            ``"abs_ip"`` (largest |inner product|: each row is stored as ``+x`` and ``-x``).
        index_type (`str`): ``"flat"`` (exact) or ``"ivf"`` (inverted lists, approximate).
        embedding (`str`): the embedding's name (``"classifier_input"``, ..., or ``"custom:<qualname>"``).
        model_fingerprint (`str`), model_class (`str`): the model the embeddings came from.
        dataset_fingerprint (`str`): the training set (see :func:`dataset_fingerprint`).
        nprobe (`int`): IVF lists visited per query (widened automatically if fewer than ``k`` hits).
        embed_fn (`Callable`, *optional*): the embedding function (not saved; given again to :func:`load_index`).
    """

    index: Any
    metric: str
    index_type: str
    embedding: str
    model_fingerprint: str
    model_class: str
    dataset_fingerprint: str
    nprobe: int = 1
    embed_fn: EmbedFn | None = field(default=None, repr=False, compare=False)

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
    embed_fn: EmbedFn | str | None = None,
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
        embed_fn (`Callable` or `str`, *optional*): see :func:`compute_embeddings`.
        metric (`str`, *optional*): ``"l2"``, ``"ip"`` (inner product), ``"cosine"``, or ``"abs_ip"``
            (largest |inner product|); defaults to ``"abs_ip"`` for ``embed_fn="head_gradient"``, else ``"l2"``.
        batch_size (`int`, defaults to `32`): embedding batch size for a ``Dataset``.
        pad_token_id (`int`, *optional*): defaults to ``model.config.pad_token_id`` (else 0).
        ivf_threshold (`int`, defaults to `100_000`): exact search below this many examples, IVF from it on.
        nlist (`int`, *optional*), nprobe (`int`, *optional*): IVF lists and lists visited per query.
        progress (`bool`, defaults to `True`): show a tqdm bar.
    """
    name, function = resolve_embedding(model, embed_fn)
    metric = metric or default_metric(name)
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}.")
    require_faiss()
    check_in_order(train_data)
    pad = pad_token_id if pad_token_id is not None else getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    embeddings = compute_embeddings(model, train_data, function, batch_size, pad, progress)
    index, index_type, probes = index_embeddings(embeddings, metric, ivf_threshold, nlist, nprobe)
    return KnnIndex(
        index, metric, index_type, name, model_fingerprint(model), type(model).__name__, dataset_fingerprint(train_data), probes, function
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


def load_index(path: str | os.PathLike, embed_fn: EmbedFn | None = None) -> KnnIndex:
    """Read an index written by :func:`save_index`.

    Args:
        path (`str` or `os.PathLike`): the folder (or file) it was saved to.
        embed_fn (`Callable`, *optional*): the function a custom-embedding index was built with
            (built-in embeddings are restored by name).
    """
    faiss = require_faiss()
    target = index_save_path(path)
    if not target.is_file():
        raise FileNotFoundError(f"No kNN index at {target}. Build one with hf_influence.knn.build_index(model, train_data).save(path).")
    tensors, meta = load_tensors(target)
    if meta.get("kind") != "knn_index":
        raise StaleIndexError(f"{target} holds a {meta.get('kind')!r}, not a kNN index.")
    name = meta["embedding"]
    if embed_fn is not None and custom_embedding_name(embed_fn) != name:
        raise StaleIndexError(
            f"The index at {target} was built with the embedding {name!r}, not {custom_embedding_name(embed_fn)!r}: "
            "pass the function it was built with, or rebuild the index."
        )
    fields = {k: meta[k] for k in _SAVED_FIELDS}
    return KnnIndex(faiss.deserialize_index(tensors["faiss_index"].numpy()), embed_fn=embed_fn or EMBEDDINGS.get(name), **fields)


# ----------------------------------------------------------------------------- restricted scores
def check_num_neighbors(k: Any, num_train: int) -> int:
    """``k`` must be an integer with ``1 <= k <= num_train``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_train:
        raise InvalidInputError(
            f"knn must be an integer in [1, {num_train}] (the number of training examples), got {k!r}. "
            "FastIF uses about 1-10% of the training set; knn=None scores every training example."
        )
    return k


def check_in_order(train_data: Any) -> None:
    """Candidate indices are dataset rows, so a training ``DataLoader`` must iterate in dataset order."""
    if isinstance(train_data, DataLoader) and not isinstance(train_data.sampler, SequentialSampler):
        raise InvalidInputError(
            "With knn=, the training DataLoader must iterate in dataset order (shuffle=False, no custom sampler): "
            f"its sampler is a {type(train_data.sampler).__name__}. Pass the Dataset, or a DataLoader with shuffle=False."
        )


def select_rows(data: Any, rows: list[int]) -> Any:
    """The given rows of ``data``, in that order; a ``DataLoader`` keeps its batch size and collator."""
    dataset = dataset_of(data)
    subset = dataset.select(rows) if hasattr(dataset, "select") else Subset(dataset, rows)
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size, collate_fn=data.collate_fn)
    return subset


@dataclass
class KnnScores:
    """Influence of each test example's ``k`` candidate training examples.

    Attributes:
        scores (`torch.Tensor` of shape `[n_test, k]`): ``g_testᵀ (H + λI)^-1 g_train`` of each candidate
            (positive: the training example helps the test example), fp32 (fp64 model: fp64).
        indices (`torch.Tensor` of shape `[n_test, k]`, int64): the candidates' rows in the training
            set, nearest first (or in the order :meth:`topk` sorted them).
    """

    scores: torch.Tensor
    indices: torch.Tensor

    def topk(self, m: int, direction: str = "influential") -> "KnnScores":
        """The ``m`` top candidates of each test example, best first.

        Args:
            m (`int`): how many to keep, ``1 <= m <= k``.
            direction (`str`, defaults to `"influential"`): ``"influential"`` ranks by ``|score|``,
                ``"helpful"`` by score, ``"harmful"`` by ``-score`` (FastIF's three rankings).
        """
        order = rank_scores(self.scores, m, direction)  # [n_test, m]
        return KnnScores(self.scores.gather(1, order), self.indices.gather(1, order.to(self.indices.device)))


def rank_scores(scores: torch.Tensor, m: int, direction: str = "influential") -> torch.Tensor:
    """Column indices ``[n, m]`` of the ``m`` top entries of each row of ``scores`` (see :meth:`KnnScores.topk`)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= scores.shape[-1]:
        raise ValueError(f"m must be an integer in [1, {scores.shape[-1]}] (the number of scored examples), got {m!r}.")
    key = scores.abs() if direction == "influential" else scores if direction == "helpful" else -scores
    return key.topk(m, dim=-1).indices


def score_candidates(
    preconditioned_test: torch.Tensor,
    train_fn: FeatureFn,
    train_data: Any,
    candidates: torch.Tensor,
    loader: Callable[[Any], DataLoader],
    device: torch.device,
    progress: bool = True,
) -> KnnScores:
    """Scores of each test example against its own candidates, computing each candidate's features once.

    Args:
        preconditioned_test (`torch.Tensor` of shape `[n_test, d]`): ``A φ(test)`` (see ``engine.scoring``).
        train_fn (`FeatureFn`): training-side features ``φ``.
        train_data: the training set the candidate indices refer to.
        candidates (`torch.Tensor` of shape `[n_test, k]`, int64): training rows per test example.
        loader (`Callable`): turns a (sub)set of ``train_data`` into batches.
    """
    rows, positions = torch.unique(candidates, return_inverse=True)  # sorted rows [U], positions [n_test, k]
    block = pairwise_scores(preconditioned_test, train_fn, loader(select_rows(train_data, rows.tolist())), device, progress)
    return KnnScores(block.gather(1, positions.to(block.device)), candidates)


def knn_recall(
    candidates: torch.Tensor | KnnScores, full_scores: torch.Tensor, m: int, direction: str = "influential"
) -> torch.Tensor:
    """FastIF's recall@m: the share of the true top-``m`` training examples that the kNN candidates contain.

    ``recall@m = |kNN candidates ∩ top-m by the full scan| / m`` for each test example (Guo et al.
    2021, Sec. 4.1). With ``k`` candidates it cannot exceed ``k / m``.

    Args:
        candidates (`torch.Tensor` of shape `[n_test, k]` or `KnnScores`): candidate training rows.
        full_scores (`torch.Tensor` of shape `[n_test, N]`): ``Influence.scores`` without ``knn``.
        m (`int`): size of the true top set, ``1 <= m <= N``.
        direction (`str`, defaults to `"influential"`): ``"influential"`` (largest ``|score|``),
            ``"helpful"`` (largest score) or ``"harmful"`` (smallest score).

    Returns:
        `torch.Tensor` of shape `[n_test]`, float32, each in ``[0, 1]``.
    """
    indices = candidates.indices if isinstance(candidates, KnnScores) else candidates
    if indices.dim() != 2 or full_scores.dim() != 2 or indices.shape[0] != full_scores.shape[0]:
        raise ValueError(
            f"candidates [n_test, k] and full_scores [n_test, N] must have the same n_test; got shapes "
            f"{tuple(indices.shape)} and {tuple(full_scores.shape)}."
        )
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < full_scores.shape[1]:
        raise ValueError(f"candidate indices must lie in [0, {full_scores.shape[1]}), the columns of full_scores.")
    top = rank_scores(full_scores, m, direction).cpu()  # [n_test, m]
    hits = (top.unsqueeze(-1) == indices.cpu().long().unsqueeze(1)).any(dim=-1)  # [n_test, m]
    return hits.float().sum(dim=1) / m

"""Candidate search and restricted scoring (FastIF, Guo et al. 2021, Sec. 3.2): each test example is
scored against its ``k`` candidate training examples only, each candidate's features computed once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from .._utils.errors import InvalidInputError
from ..data import select_rows
from ..engine.scoring import FeatureFn, pairwise_scores
from ..metrics import rank_scores
from ..params import ParamSelection

if TYPE_CHECKING:
    from .index import KnnIndex

def check_num_neighbors(k: Any, num_train: int) -> int:
    """``k`` must be an integer with ``1 <= k <= num_train``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_train:
        raise InvalidInputError(
            f"knn must be an integer in [1, {num_train}] (the number of training examples), got {k!r}. "
            "FastIF uses about 1-10% of the training set; knn=None scores every training example."
        )
    return k


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


def find_candidates(
    index: KnnIndex,
    model: nn.Module,
    selection: ParamSelection,
    test_data: Any,
    k: int,
    preconditioned: torch.Tensor,
    directions: torch.Tensor | None,
    batch_size: int = 32,
    pad_token_id: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Each test example's ``k`` candidate training rows, ``[n_test, k]`` int64, nearest first.

    The index's embedding strategy turns the preconditioned test features into queries when it can
    (`Embedding.queries`, e.g. the head gradient's); otherwise the test rows are embedded like the
    training rows were (``batch_size``, ``pad_token_id`` and ``progress`` serve that pass).

    Args:
        preconditioned (`torch.Tensor` of shape `[n_test, r]`): ``A φ(test)``, the preconditioned test features.
        directions (`torch.Tensor` of shape `[r, P]`, *optional*): the subspace of ``φ`` (``None``: gradients).
    """
    strategy = index.embed_fn
    queries = None if strategy is None else strategy.queries(model, selection, preconditioned, directions)
    if queries is not None:
        return index.search(queries, k)[1]
    return index.neighbors(model, test_data, k, batch_size, pad_token_id, progress)


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

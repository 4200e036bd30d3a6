"""The ``Influence`` facade: picks parameters and task, wires data to the engine. Holds no math."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
from torch import nn
from transformers.utils import logging

from .config import BasisConfig, InfluenceConfig, Method, as_choice
from ._utils.errors import InvalidInputError
from .cost_estimate import costed
from .curvature import CurvatureMethods
from .data import check_in_order, dataset_of, make_loader
from .engine.grads import eval_mode
from .engine.ihvp.arnoldi import ArnoldiBasis
from .engine.ihvp.base import Preconditioner
from .engine.ihvp.exact import ExactInverse
from .engine.ihvp.lissa import LissaConfig
from .engine.scoring import DiagonalInverse, FeatureFn, collect_features, identity, pairwise_scores, self_scores
from .knn import KnnIndex, KnnScores, build_index, check_num_neighbors, find_candidates, score_candidates
from .tasks import Task
from .wiring import refuses_autocast

if TYPE_CHECKING:
    from .index import InfluenceIndex, TopInfluences

logger = logging.get_logger(__name__)


class _MethodParts(NamedTuple):
    """What one estimator needs: ``score = precondition(test_fn(test)) · train_fn(train)``, where the
    features are ``directions @ g`` (Arnoldi, random projection) or the gradients themselves (``directions=None``)."""

    precondition: Preconditioner
    train_fn: FeatureFn
    test_fn: FeatureFn
    directions: torch.Tensor | None


class Influence(CurvatureMethods):
    """Influence functions over a selection of a model's parameters.

    Scores are ``g_testᵀ (H + λI)^-1 g_train`` where ``H`` is the Hessian of the mean training
    loss and ``g`` are per-example loss gradients (losses summed over a sequence's target tokens).
    Positive means the training example helps the test example; Koh & Liang's ``I_up,loss`` is
    the negative.

    Args:
        model (`nn.Module`): a HF model (or any module the ``task`` understands). Scored in eval mode.
        task (`Task`, *optional*): ``per_example_loss(model, batch) -> Tensor[B]``; inferred from the
            model class when ``None``.
        params, last_n_layers, damping, batch_size, seed, projection, random_projection, memory_budget_gb, hessian_examples,
        hessian_batch_size:
            the settings of `hf_influence.config.InfluenceConfig`, where each one's default, meaning and check
            live (``Influence.from_config(model, config)`` takes them as one object).
        progress (`bool`, defaults to `True`): show tqdm bars.

    Every public method first checks its data against the model and task (``self.limits``: columns,
    sequence lengths, token ids, labels; see `hf_influence.inputs`) and refuses to run under
    ``torch.autocast``, raising an `HfInfluenceError` that says what to change. Every Hessian pass
    (basis fits, spectrum, exact Hessian, random projection's subspace, LiSSA minibatches) runs over
    the same seeded subset of ``hessian_examples`` rows of its Hessian data.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        params: Sequence[str] | str | None = InfluenceConfig.params,
        last_n_layers: int | None = InfluenceConfig.last_n_layers,
        damping: float = InfluenceConfig.damping,
        batch_size: int = InfluenceConfig.batch_size,
        seed: int = InfluenceConfig.seed,
        projection: str = InfluenceConfig.projection,
        random_projection: str = InfluenceConfig.random_projection,
        memory_budget_gb: float = InfluenceConfig.memory_budget_gb,
        hessian_examples: int | None = InfluenceConfig.hessian_examples,
        hessian_batch_size: int | None = InfluenceConfig.hessian_batch_size,
        progress: bool = True,
    ):
        config = InfluenceConfig(params=params, last_n_layers=last_n_layers, damping=damping, batch_size=batch_size, seed=seed,
                                 projection=projection, random_projection=random_projection, memory_budget_gb=memory_budget_gb,
                                 hessian_examples=hessian_examples, hessian_batch_size=hessian_batch_size)
        super().__init__(model, task, config, progress)

    @classmethod
    def from_config(cls, model: nn.Module, config: InfluenceConfig, task: Task | None = None, progress: bool = True) -> "Influence":
        """An `Influence` with the settings of ``config`` (the Trainer, the CLI and recipes build theirs this way)."""
        return cls(model, task, progress=progress, **dataclasses.asdict(config))

    # ----------------------------------------------------------------- public surface

    @refuses_autocast
    @costed("scores")
    def scores(
        self,
        test_data: Any,
        train_data: Any,
        method: str | Method = Method.ARNOLDI,
        basis: ArnoldiBasis | None = None,
        hessian_data: Any = None,
        lissa: str | LissaConfig = "auto",
        rank: int = BasisConfig.rank,
        knn: int | None = None,
        index: KnnIndex | None = None,
    ) -> torch.Tensor | KnnScores:
        """Influence of each training example on each test example: ``[n_test, n_train]``, fp32 (fp64 model: fp64).

        ``hessian_data`` defaults to ``train_data``. ``basis`` is used by ``"arnoldi"`` (fitted on
        ``hessian_data`` when not given); ``lissa`` configures ``"lissa"``; ``rank`` sizes ``"randproj"``.

        With ``knn=k`` (FastIF), only the ``k`` training examples nearest to each test example in
        the model's embedding space are scored: the result is a `KnnScores` with ``scores`` and
        ``indices`` of shape ``[n_test, k]`` (``.topk(m)`` ranks them). ``index`` is a prebuilt
        `hf_influence.knn.KnnIndex` over ``train_data`` (built on the fly when ``None``; refused if it
        was built on another model or training set).
        """
        method = as_choice(Method, method, "method")
        self.check_data(**{"test data": test_data, "training data": train_data, "Hessian data": hessian_data})
        if knn is not None:
            return self._knn_scores(test_data, train_data, knn, index, method, basis, hessian_data, lissa, rank)
        if index is not None:
            raise InvalidInputError("index= is only used with knn=k: pass knn (the number of candidates per test example), or drop index.")
        precondition, train_fn, test_fn, _ = self._method_parts(method, train_data, hessian_data, basis, lissa, rank)
        with eval_mode(self.model):
            test_features = collect_features(test_fn, make_loader(test_data, self.batch_size, self._pad_id()), self._device(), "test features", self.progress,
                                            self._dtype())
            return pairwise_scores(precondition(test_features), train_fn, self._loader(train_data), self._device(), self.progress, self._dtype())

    def _knn_scores(self, test_data, train_data, knn, index, method, basis, hessian_data, lissa, rank) -> KnnScores:
        """``scores(knn=k)``: checks first, then the test side, candidates from the index, scores for those only."""
        check_num_neighbors(knn, len(dataset_of(train_data)))
        check_in_order(train_data)
        index = self._knn_index(train_data, index)
        parts = self._method_parts(method, train_data, hessian_data, basis, lissa, rank)
        with eval_mode(self.model):
            test = parts.precondition(collect_features(parts.test_fn, self._loader(test_data), self._device(), "test features", self.progress,
                                                       self._dtype()))
        candidates = find_candidates(index, self.model, self.selection, test_data, knn, test, parts.directions,
                                     self.batch_size, self._pad_id(), self.progress)  # [n_test, k]
        with eval_mode(self.model):
            return score_candidates(test, parts.train_fn, train_data, candidates, self._loader, self._device(), self.progress)

    def _knn_index(self, train_data: Any, index: KnnIndex | None) -> KnnIndex:
        """The given index, verified against this model and ``train_data`` once per run (see `IndexChecks`), else a new exact one."""
        if index is None:
            return build_index(self.model, train_data, batch_size=self.batch_size, pad_token_id=self._pad_id(), progress=self.progress)
        self._index_checks.verify(index, self.model, train_data)
        return index

    @refuses_autocast
    def build_index(self, train_data: Any, method: str | Method = Method.ARNOLDI, basis: ArnoldiBasis | None = None,
                    **options: Any) -> "InfluenceIndex | None":
        """Every training row's features for ``method`` (``"arnoldi"``, ``"randproj"``, or ``"tracin"`` on a projected
        gradient), stored once for exact top-k :meth:`query` calls; ``options`` (``hessian_data``, ``rank``, ``dtype``,
        ``output_dir``: resumable shards, ``shard_size``, ``accelerator``, ``max_shards``) as in
        `hf_influence.index.build_index`. ``None`` when ``max_shards`` stopped a sharded build (rerun to finish)."""
        from .index import build_index  # the index layer sits above the facade (it uses the sharded jobs)

        return build_index(self, train_data, method, basis, progress=self.progress, **options).index

    @refuses_autocast
    def query(self, index: "InfluenceIndex", test_data: Any, k: int = 10, direction: str = "helpful", approximate: bool = False,
              train_data: Any = None) -> "TopInfluences":
        """The ``k`` top training rows of each test row from ``index``: ``.scores``, ``.indices`` ``[n_test, k]``, exactly the
        top-k of :meth:`scores` for the index's method at this ``damping`` (``direction``: ``"helpful"``, ``"harmful"``
        or ``"abs"``). Refused for another model or selection (and another ``train_data``, when given); see
        `hf_influence.index.query_index` (``approximate=True``: HNSW on large indexes)."""
        from .index import query_index

        return query_index(self, index, test_data, k, direction, approximate, train_data)

    @refuses_autocast
    @costed("self_influence")
    def self_influence(
        self,
        train_data: Any,
        method: str | Method = Method.ARNOLDI,
        basis: ArnoldiBasis | None = None,
        hessian_data: Any = None,
        lissa: str | LissaConfig = "auto",
        rank: int = BasisConfig.rank,
    ) -> torch.Tensor:
        """Self-influence ``g_zᵀ (H + λI)^-1 g_z`` of each training example: ``[N]``. High = likely noisy."""
        method = as_choice(Method, method, "method")
        self.check_data(**{"training data": train_data, "Hessian data": hessian_data})
        precondition, train_fn, _, _ = self._method_parts(method, train_data, hessian_data, basis, lissa, rank)
        if method is Method.TRACIN:  # φ·φ = ‖g‖²: gradient norms, without holding [B, P] where hooks allow
            train_fn = self._norm_fn(self.train_loss)
        with eval_mode(self.model):
            return self_scores(precondition, train_fn, self._loader(train_data), self._device(), self.progress, self._dtype())

    @refuses_autocast
    @costed("gradients")
    def gradients(self, data: Any, test_side: bool = False) -> torch.Tensor:
        """Per-example loss gradients over the selection: ``[N, P]`` (``named_parameters()`` order), fp32 or wider.

        ``test_side=True`` differentiates the task's test-side measurement (the loss unless the task defines one).
        """
        self.check_data(data=data)
        loss_fn = self.test_loss if test_side else self.train_loss
        with eval_mode(self.model):
            return collect_features(self._grad_fn(loss_fn), self._loader(data), self._device(), "gradients", self.progress, self._dtype())


    def _method_parts(self, method, train_data, hessian_data, basis, lissa, rank) -> _MethodParts:
        hessian_data = train_data if hessian_data is None else hessian_data
        if method is Method.TRACIN:
            return _MethodParts(identity, self._grad_fn(self.train_loss), self._grad_fn(self.test_loss), None)
        if method is Method.EXACT:
            inverse = ExactInverse(self.exact_hessian(hessian_data), self.damping)
            return _MethodParts(inverse, self._grad_fn(self.train_loss), self._grad_fn(self.test_loss), None)
        if method is Method.LISSA:
            return _MethodParts(self._lissa(hessian_data, lissa), self._grad_fn(self.train_loss), self._grad_fn(self.test_loss), None)
        if method is Method.ARNOLDI:
            basis = basis if basis is not None else self._fit_default_basis(hessian_data, rank)
            self.check_basis(basis)
            directions = basis.eigenvectors.to(self._device())
            inverse = DiagonalInverse(basis.inverse_eigenvalues(self.damping).to(self._device()))
        else:
            directions = self._random_directions(rank)
            inverse = self._subspace_inverse(hessian_data, directions)
        return _MethodParts(inverse, self._projection_fn(self.train_loss, directions), self._projection_fn(self.test_loss, directions), directions)

















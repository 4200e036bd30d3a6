"""The ``Influence`` facade: picks parameters and task, wires data to the engine. Holds no math."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.utils import logging

from ._utils.errors import IncompatibleBasisError, InvalidInputError, TaskInferenceError
from .config import BasisConfig, Curvature, InfluenceConfig, Method, as_choice
from .data import RandomBatches, batch_size_of, check_in_order, dataset_of, make_loader, select_rows, to_device
from .engine.grads import LossFunction, accumulation_dtype, eval_mode, per_example_grads
from .engine.hvp import batch_hvp, dataset_hvp, explicit_hessian
from .engine.prefix import PrefixReplay
from .engine.ihvp.arnoldi import ArnoldiBasis
from .engine.ihvp.block import as_algorithm, fit_eigenpairs
from .engine.ihvp.fisher import fisher_eigenpairs, fisher_product
from .engine.spectrum import Spectrum, hutchinson_trace, hutchpp_trace, krylov_iteration, power_iteration, ritz_extremes
from .engine.ihvp.base import Preconditioner
from .engine.ihvp.exact import ExactInverse
from .engine.ihvp.lissa import LissaConfig, LissaInverse, LissaResult, choose_lissa_config
from .engine.projection import choose_projection, grads_chunk_size, project_by_grads, project_by_jvp
from .engine.scoring import (
    DiagonalInverse,
    FeatureFn,
    SubspaceInverse,
    collect_features,
    identity,
    pairwise_scores,
    random_subspace,
    self_scores,
)
from .inputs import check_examples, input_limits
from .knn import IndexChecks, KnnIndex, KnnScores, build_index, check_num_neighbors, find_candidates, score_candidates
from .params import select_parameters
from .tasks import Task, infer_task

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


def _refuses_autocast(method):
    """Run a public entry point only outside ``torch.autocast`` (see ``Influence._check_precision``)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self._check_precision()
        return method(self, *args, **kwargs)

    return checked


class ResolvedLissa(NamedTuple):
    """The `LissaConfig` a ``lissa=`` request stands for, and the `Spectrum` it was chosen from (``"auto"`` only)."""

    config: LissaConfig
    spectrum: Spectrum | None


class Influence:
    """Influence functions over a selection of a model's parameters.

    Scores are ``g_testᵀ (H + λI)^-1 g_train`` where ``H`` is the Hessian of the mean training
    loss and ``g`` are per-example loss gradients (losses summed over a sequence's target tokens).
    Positive means the training example helps the test example; Koh & Liang's ``I_up,loss`` is
    the negative.

    Args:
        model (`nn.Module`): a HF model (or any module the ``task`` understands). Scored in eval mode.
        task (`Task`, *optional*): ``per_example_loss(model, batch) -> Tensor[B]``; inferred from the
            model class when ``None``.
        params, last_n_layers, damping, batch_size, seed, projection, memory_budget_gb, hessian_examples:
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
        memory_budget_gb: float = InfluenceConfig.memory_budget_gb,
        hessian_examples: int | None = InfluenceConfig.hessian_examples,
        progress: bool = True,
    ):
        self.config = InfluenceConfig(None if params is None else list([params] if isinstance(params, str) else params),
                                      last_n_layers, damping, batch_size, seed, projection, memory_budget_gb, hessian_examples)
        self.model = model
        self.task = task if task is not None else infer_task(model)
        if not callable(getattr(self.task, "per_example_loss", None)):
            raise TaskInferenceError(f"task must have a per_example_loss(model, batch) method; got {type(self.task).__name__}.")
        self.selection = select_parameters(model, self.config.params, self.config.last_n_layers)
        self.limits = input_limits(model, self.task)
        self.damping, self.batch_size, self.seed = self.config.damping, self.config.batch_size, self.config.seed
        self.projection, self.progress = self.config.projection, progress
        self.memory_budget = self.config.memory_budget_gb * 2**30
        self.train_loss = LossFunction(model, self.task, self.selection)
        self.test_loss = LossFunction(model, self.task, self.selection, measurement=True)
        self._verified_bases: dict[int, ArnoldiBasis] = {}  # bases that passed the model/selection check (weights hashed once)
        self._checked: set[str] = set()  # fingerprints of the Datasets that passed check_data
        self._index_checks = IndexChecks()  # kNN indexes verified against this model and training set

    @classmethod
    def from_config(cls, model: nn.Module, config: InfluenceConfig, task: Task | None = None, progress: bool = True) -> "Influence":
        """An `Influence` with the settings of ``config`` (the Trainer, the CLI and recipes build theirs this way)."""
        return cls(model, task, progress=progress, **dataclasses.asdict(config))

    # ----------------------------------------------------------------- public surface
    @_refuses_autocast
    def fit_arnoldi(self, hessian_data: Any, rank: int = BasisConfig.rank, iterations: int = BasisConfig.iterations, seed: int | None = None,
                    algorithm: str = "arnoldi", data_parallel: bool = False) -> ArnoldiBasis:
        """Fit the top-``rank`` eigenpairs (largest |λ|) of the Hessian of the mean loss over ``hessian_data`` from
        about ``iterations`` Hessian-vector products (Schioppa et al. 2022); the Ritz residuals ``‖Hu - λu‖`` are logged.

        Args:
            algorithm (`str`, defaults to `"arnoldi"`): ``"arnoldi"`` (one HVP per pass over the Hessian data:
                ``iterations`` passes in sequence) or ``"block"`` (block Krylov: ``b`` HVPs per pass, ``iterations / b``
                passes; ``b`` is chosen from ``memory_budget_gb`` and logged).
            data_parallel (`bool`, defaults to `False`): every process calls this with the same ``hessian_data``
                (torch.distributed initialised); each takes every ``world_size``-th Hessian batch, the products are
                summed over processes, and all return the same basis. With one process it is the plain fit.
        """
        algorithm = as_algorithm(algorithm)
        if not 1 <= rank <= iterations:
            raise InvalidInputError(f"Need 1 <= rank <= iterations, got rank={rank}, iterations={iterations}: raise iterations.")
        if rank > self.selection.num_params:
            raise InvalidInputError(f"rank={rank} exceeds the {self.selection.num_params} selected parameters: lower rank.")
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        params = self._params()
        like = torch.empty((), dtype=accumulation_dtype(params), device=self._device())
        with eval_mode(self.model):
            hvp = PrefixReplay(self.train_loss, params, batches, self.memory_budget, across_processes=data_parallel).hvp
            pairs, products = fit_eigenpairs(hvp, self.selection.num_params, rank, iterations, algorithm, generator, like,
                                             self.memory_budget, across_processes=data_parallel, progress=self.progress)
        return self._basis(pairs.eigenvalues, pairs.eigenvectors, products, "hessian")

    def fit_basis(self, hessian_data: Any, rank: int = BasisConfig.rank, iterations: int = BasisConfig.iterations,
                  curvature: str = BasisConfig.curvature, algorithm: str = "arnoldi", data_parallel: bool = False) -> ArnoldiBasis:
        """:meth:`fit_arnoldi` (``curvature="hessian"``, with ``algorithm``) or :meth:`fit_fisher` (``"fisher"``;
        ``iterations`` and ``algorithm`` unused); the settings of `hf_influence.config.BasisConfig`, checked there.
        ``data_parallel=True``: every process calls this with the same data and gets the same basis."""
        config = BasisConfig(rank, iterations, curvature)
        algorithm = as_algorithm(algorithm)
        if config.curvature == Curvature.FISHER:
            return self.fit_fisher(hessian_data, rank=config.rank, data_parallel=data_parallel)
        return self.fit_arnoldi(hessian_data, rank=config.rank, iterations=config.iterations, algorithm=algorithm, data_parallel=data_parallel)

    @_refuses_autocast
    def fit_fisher(self, hessian_data: Any, rank: int = BasisConfig.rank, data_parallel: bool = False) -> ArnoldiBasis:
        """Fit the top-``rank`` eigenpairs of the empirical Fisher ``F = mean_z g_z g_zᵀ`` over ``hessian_data``.

        ``F`` is the Gauss-Newton-type curvature that K-FAC / EK-FAC approximate: positive
        semi-definite, of rank at most the number of examples. Its eigenpairs are exact, from one pass
        of per-example gradients and an SVD, with no HVP passes, so the fit costs about as much as
        scoring the Hessian data once. The basis is used like :meth:`fit_arnoldi`'s (``method="arnoldi"``).
        The per-example gradients are held at once when ``examples × P`` floats fit ``memory_budget_gb``; otherwise the
        eigenpairs come from block Krylov on Fisher products ``F V``, one gradient pass per block, nothing held
        (Krylov accuracy, residuals logged; ``iterations`` on the basis counts the products).
        ``data_parallel=True``: every process calls this with the same data, computes the gradients of its share of
        the batches, and gets the same basis as one process would.
        """
        if rank < 1 or rank > self.selection.num_params:
            raise InvalidInputError(f"rank must be in [1, {self.selection.num_params}] (number of parameters), got {rank}.")
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data)
        count, num = sum(batch_size_of(b) for b in batches), self.selection.num_params
        if rank > count:
            raise InvalidInputError(f"rank={rank} exceeds the {count} Hessian examples, the largest rank the empirical Fisher "
                                    "can have: lower rank or pass more Hessian data.")
        dtype = accumulation_dtype(self._params())
        size = count * num * torch.finfo(dtype).bits // 8
        grad_fn = self._grad_fn(self.train_loss)
        with eval_mode(self.model):
            if size <= self.memory_budget:
                eigenvalues, eigenvectors = fisher_eigenpairs(grad_fn, batches, rank, data_parallel, self.progress)
                return self._basis(eigenvalues, eigenvectors, 0, "fisher")
            iterations = max(2 * rank, rank + 20)
            logger.info(f"fit_fisher: {count} × {num:,} per-example gradients ({size / 2**30:.2f} GiB) exceed memory_budget_gb="
                        f"{self.memory_budget / 2**30:g}; fitting by block Krylov on Fisher products instead ({iterations} products, "
                        "each block one gradient pass, no gradients held).")
            operator = functools.partial(fisher_product, grad_fn, batches, across_processes=data_parallel)
            pairs, products = fit_eigenpairs(operator, num, rank, iterations, as_algorithm("block"), torch.Generator().manual_seed(self.seed),
                                             torch.empty((), dtype=dtype, device=self._device()), self.memory_budget, data_parallel, self.progress)
        return self._basis(pairs.eigenvalues, pairs.eigenvectors, products, "fisher")

    @_refuses_autocast
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
            test_features = collect_features(test_fn, make_loader(test_data, self.batch_size, self._pad_id()), self._device(), "test features", self.progress)
            return pairwise_scores(precondition(test_features), train_fn, self._loader(train_data), self._device(), self.progress)

    def _knn_scores(self, test_data, train_data, knn, index, method, basis, hessian_data, lissa, rank) -> KnnScores:
        """``scores(knn=k)``: checks first, then the test side, candidates from the index, scores for those only."""
        check_num_neighbors(knn, len(dataset_of(train_data)))
        check_in_order(train_data)
        index = self._knn_index(train_data, index)
        parts = self._method_parts(method, train_data, hessian_data, basis, lissa, rank)
        with eval_mode(self.model):
            test = parts.precondition(collect_features(parts.test_fn, self._loader(test_data), self._device(), "test features", self.progress))
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

    @_refuses_autocast
    def build_index(self, train_data: Any, method: str | Method = Method.ARNOLDI, basis: ArnoldiBasis | None = None,
                    **options: Any) -> "InfluenceIndex | None":
        """Every training row's features for ``method`` (``"arnoldi"``, ``"randproj"``, or ``"tracin"`` on a projected
        gradient), stored once for exact top-k :meth:`query` calls; ``options`` (``hessian_data``, ``rank``, ``dtype``,
        ``output_dir``: resumable shards, ``shard_size``, ``accelerator``, ``max_shards``) as in
        `hf_influence.index.build_index`. ``None`` when ``max_shards`` stopped a sharded build (rerun to finish)."""
        from .index import build_index  # the index layer sits above the facade (it uses the sharded jobs)

        return build_index(self, train_data, method, basis, progress=self.progress, **options).index

    @_refuses_autocast
    def query(self, index: "InfluenceIndex", test_data: Any, k: int = 10, direction: str = "helpful", approximate: bool = False,
              train_data: Any = None) -> "TopInfluences":
        """The ``k`` top training rows of each test row from ``index``: ``.scores``, ``.indices`` ``[n_test, k]``, exactly the
        top-k of :meth:`scores` for the index's method at this ``damping`` (``direction``: ``"helpful"``, ``"harmful"``
        or ``"abs"``). Refused for another model or selection (and another ``train_data``, when given); see
        `hf_influence.index.query_index` (``approximate=True``: HNSW on large indexes)."""
        from .index import query_index

        return query_index(self, index, test_data, k, direction, approximate, train_data)

    @_refuses_autocast
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
        with eval_mode(self.model):
            return self_scores(precondition, train_fn, self._loader(train_data), self._device(), self.progress)

    @_refuses_autocast
    def s_test(self, test_data: Any, hessian_data: Any, lissa: str | LissaConfig = "auto") -> torch.Tensor:
        """``(H + λI)^-1 ∇L(z_test)`` by LiSSA for each test example: ``[n_test, P]`` (``named_parameters()`` order).

        ``lissa`` is a `LissaConfig`, ``"auto"`` (settings from :meth:`spectrum`, see
        ``choose_lissa_config``), ``"fastif"`` or ``"koh_liang"`` (the papers' settings at this
        ``Influence``'s damping). :meth:`solve_s_test` also returns the solver's record.
        """
        return self.solve_s_test(test_data, hessian_data, lissa).solution.T

    @_refuses_autocast
    def solve_s_test(self, test_data: Any, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa = "auto") -> LissaResult:
        """:meth:`s_test` with the solver's record: ``solution`` ``[P, n_test]``, ``hvps`` (minibatch HVPs, all
        processes), the `LissaConfig` it ended with (a divergence restart raises ``scale``) and the norms."""
        self.check_data(**{"test data": test_data, "Hessian data": hessian_data})
        precondition = self._lissa(hessian_data, lissa)
        test_grads = self.gradients(test_data, test_side=True)
        with eval_mode(self.model):
            precondition(test_grads)
        return precondition.last_result

    @_refuses_autocast
    def gradients(self, data: Any, test_side: bool = False) -> torch.Tensor:
        """Per-example loss gradients over the selection: ``[N, P]`` (``named_parameters()`` order), fp32 or wider.

        ``test_side=True`` differentiates the task's test-side measurement (the loss unless the task defines one).
        """
        self.check_data(data=data)
        loss_fn = self.test_loss if test_side else self.train_loss
        with eval_mode(self.model):
            return collect_features(self._grad_fn(loss_fn), self._loader(data), self._device(), "gradients", self.progress)

    @_refuses_autocast
    def spectrum(
        self,
        hessian_data: Any,
        method: str = "lanczos",
        iterations: int = 30,
        trace_estimator: str = "hutch++",
        trace_matvecs: int = 30,
        data_parallel: bool = False,
    ) -> Spectrum:
        """Estimate ``λ_max`` (and with Lanczos ``λ_min``) and ``tr(H)`` from HVPs, with error bars.

        Args:
            method (`str`, defaults to `"lanczos"`): ``"lanczos"`` (also gives the bottom of the
                spectrum, i.e. the damping that makes ``H + λI`` positive definite) or ``"power"``.
            iterations (`int`, defaults to `30`): Lanczos steps / maximum power iterations.
            trace_estimator (`str`, defaults to `"hutch++"`): ``"hutch++"`` or ``"hutchinson"``.
            trace_matvecs (`int`, defaults to `30`): HVPs spent on the trace, in blocks (Hutch++: three blocks of a
                third; Hutchinson: one block), each block one pass over the Hessian data.
            data_parallel (`bool`, defaults to `False`): every process calls this with the same data; each takes its
                share of the Hessian batches and the products are summed, so all get the same estimate.
            The estimate runs over the ``hessian_examples`` rows every Hessian pass uses.
        """
        if method not in ("lanczos", "power") or trace_estimator not in ("hutch++", "hutchinson"):
            raise InvalidInputError(f"method must be 'lanczos' or 'power' and trace_estimator 'hutch++' or 'hutchinson'; got {method!r}, {trace_estimator!r}.")
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data)
        params = self._params()
        dtype, device, num = accumulation_dtype(params), self._device(), self.selection.num_params
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(num, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        with eval_mode(self.model):
            hvp = PrefixReplay(self.train_loss, params, batches, self.memory_budget, across_processes=data_parallel).hvp
            if method == "lanczos":
                _, hessenberg = krylov_iteration(hvp, start, iterations, self.progress, desc="Lanczos")
                top, top_err, bottom, bottom_err = ritz_extremes(hessenberg)
                extremes, hvps = {"lambda_min": bottom, "lambda_min_error": bottom_err}, hessenberg.shape[1]
            else:
                top, top_err, hvps = power_iteration(hvp, start, iterations)
                extremes = {}
            estimator = hutchpp_trace if trace_estimator == "hutch++" else hutchinson_trace
            trace, stderr = estimator(hvp, num, trace_matvecs, generator, dtype, device)
        return Spectrum(top, top_err, trace, stderr, hvps + trace_matvecs, **extremes)

    @_refuses_autocast
    def exact_hessian(self, hessian_data: Any) -> torch.Tensor:
        """The explicit ``[P, P]`` Hessian of the mean loss (small parameter sets only)."""
        self.check_data(**{"Hessian data": hessian_data})
        with eval_mode(self.model):
            return explicit_hessian(self.train_loss, self._params(), self._materialize(hessian_data), progress=self.progress)

    # ----------------------------------------------------------------- checks
    def check_data(self, **data_by_role: Any) -> None:
        """Refuse data the model cannot use (missing columns, too long, foreign token ids, no targets),
        naming each by its keyword (``check_data(**{"training data": ds})``). A ``Dataset`` that passed
        is remembered by its fingerprint, so sharded runs and nested calls scan it once."""
        for role, data in data_by_role.items():
            fingerprint = getattr(data, "_fingerprint", None)  # a datasets.Dataset's; a DataLoader has none
            if data is None or fingerprint in self._checked:
                continue
            check_examples(data, self.limits, role)
            if fingerprint is not None:
                self._checked.add(fingerprint)

    def _check_precision(self) -> None:
        """Refuse mixed precision: under ``torch.autocast`` the gradients and HVPs would run in half precision."""
        device = self._device().type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            raise InvalidInputError(
                f"Mixed precision is on (torch.autocast on {device}, {dtype}): gradients and Hessian-vector products "
                f"would run in {dtype}, and inverting the Hessian magnifies that error by its condition number. Call "
                "hf_influence outside the autocast block (e.g. outside accelerator.autocast()); it accumulates in "
                "float32 on its own."
            )

    # ----------------------------------------------------------------- wiring
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

    def _fit_default_basis(self, hessian_data: Any, rank: int) -> ArnoldiBasis:
        iterations = max(2 * rank, rank + 20)
        logger.info(f"No basis given: fitting Arnoldi (rank={rank}, iterations={iterations}) on the Hessian data.")
        return self.fit_arnoldi(hessian_data, rank=rank, iterations=iterations)

    def _basis(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, iterations: int, curvature: str) -> ArnoldiBasis:
        description = self.selection.describe()
        return ArnoldiBasis(
            eigenvalues.cpu(), eigenvectors.cpu(), description["names"], description["shapes"], iterations,
            self.selection.fingerprint(self.model), type(self.model).__name__, curvature,
        )

    def basis_mismatches(self, basis: ArnoldiBasis, rank: int | None = None, curvature: str | None = None) -> list[str]:
        """Why ``basis`` cannot serve this model and selection (and the requested ``rank`` / ``curvature``, when
        given); empty when it can. The one reuse rule (`ArnoldiBasis.mismatches`), verified once per basis object."""
        if id(basis) not in self._verified_bases:
            described = self.selection.describe()
            problems = basis.mismatches(described["names"], described["shapes"], self.selection.fingerprint(self.model), type(self.model).__name__)
            if problems:
                return problems + basis.mismatches(basis.param_names, basis.param_shapes, basis.fingerprint, basis.model_class, rank, curvature)
            self._verified_bases[id(basis)] = basis  # kept alive, so the id is not reused
        return basis.mismatches(basis.param_names, basis.param_shapes, basis.fingerprint, basis.model_class, rank, curvature)

    def check_basis(self, basis: ArnoldiBasis, rank: int | None = None, curvature: str | None = None) -> None:
        """Raise `IncompatibleBasisError` unless ``basis`` can serve this model (see :meth:`basis_mismatches`)."""
        problems = self.basis_mismatches(basis, rank, curvature)
        if problems:
            raise IncompatibleBasisError(
                "This eigenbasis was fitted for a different model or request: " + "; ".join(problems) + ". Fit a new basis "
                "with Influence.fit_basis(...) on this model, or load the model the basis was fitted on."
            )

    def _random_directions(self, rank: int) -> torch.Tensor:
        if not 1 <= rank <= self.selection.num_params:
            raise InvalidInputError(f"rank must be in [1, {self.selection.num_params}] (number of parameters), got {rank}.")
        generator = torch.Generator().manual_seed(self.seed)
        return random_subspace(self.selection.num_params, rank, generator, accumulation_dtype(self._params())).to(self._device())

    def _subspace_inverse(self, hessian_data: Any, directions: torch.Tensor) -> SubspaceInverse:
        params = self._params()
        with eval_mode(self.model):
            h_q = dataset_hvp(self.train_loss, params, self._materialize(hessian_data), directions.T)  # [P, p̄]
        return SubspaceInverse(directions @ h_q, self.damping)

    def _lissa(self, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa) -> LissaInverse:
        config = self.resolve_lissa(hessian_data, lissa).config
        stream = RandomBatches(self.hessian_rows(hessian_data), config.batch_size, self._pad_id())
        damping = self.damping if config.damping is None else config.damping
        params, device = self._params(), self._device()

        def sample_hvp(vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            with eval_mode(self.model):
                return batch_hvp(self.train_loss, params, to_device(stream.sample(generator), device), vectors, where="a LiSSA minibatch")

        return LissaInverse(sample_hvp, config, damping, self.progress)

    def resolve_lissa(self, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa = "auto") -> ResolvedLissa:
        """The `LissaConfig` that ``lissa`` stands for (itself, or the papers' presets at this damping, or
        ``"auto"``: chosen from :meth:`spectrum` of the Hessian rows), with that spectrum.

        Resolve once and pass the result to several :meth:`s_test` calls to pay for the spectrum once.
        """
        if isinstance(lissa, ResolvedLissa):
            return lissa
        if isinstance(lissa, LissaConfig):
            return ResolvedLissa(lissa, None)
        if lissa == "auto":
            spectrum = self.spectrum(hessian_data)
            num_examples = len(dataset_of(self.hessian_rows(hessian_data)))
            return ResolvedLissa(choose_lissa_config(spectrum, self.damping, num_examples, seed=self.seed), spectrum)
        if lissa in ("fastif", "koh_liang"):
            return ResolvedLissa(getattr(LissaConfig, lissa)(damping=self.damping, seed=self.seed), None)
        raise InvalidInputError(f"lissa must be a LissaConfig, 'auto', 'fastif' or 'koh_liang'; got {lissa!r}.")

    def hessian_rows(self, data: Any) -> Any:
        """The seeded random subset of at most ``hessian_examples`` rows that every Hessian pass uses (in row order)."""
        dataset, limit = dataset_of(data), self.config.hessian_examples
        if limit is None or len(dataset) <= limit:
            return data
        keep = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:limit].tolist())
        return select_rows(data, keep)

    def _grad_fn(self, loss_fn: LossFunction) -> FeatureFn:
        params = self._params()
        chunk = grads_chunk_size(self.selection.num_params, self.batch_size, self.memory_budget)
        return lambda batch: per_example_grads(loss_fn, params, batch, chunk_size=chunk)

    def _projection_fn(self, loss_fn: LossFunction, directions: torch.Tensor) -> FeatureFn:
        params, num, rank = self._params(), self.selection.num_params, directions.shape[0]
        mode = self.projection if self.projection != "auto" else choose_projection(num, rank, self.batch_size, self.memory_budget)
        if mode == "jvp":
            return lambda batch: project_by_jvp(loss_fn, params, batch, directions)
        chunk = grads_chunk_size(num, self.batch_size, self.memory_budget)
        return lambda batch: project_by_grads(loss_fn, params, batch, directions, chunk_size=chunk)

    def _params(self) -> dict[str, torch.Tensor]:
        return self.selection.tensors(self.model)

    def _device(self) -> torch.device:
        return next(iter(self._params().values())).device

    def _pad_id(self) -> int:
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def _loader(self, data: Any) -> DataLoader:
        return make_loader(data, self.batch_size, self._pad_id())

    def _materialize(self, data: Any) -> list:
        """All batches of the Hessian rows of ``data`` (see :meth:`_hessian_rows`) on the model's device (reused many times)."""
        batches = [to_device(b, self._device()) for b in self._loader(self.hessian_rows(data))]
        if not batches:
            raise InvalidInputError("The Hessian data is empty: pass at least one training example.")
        return batches

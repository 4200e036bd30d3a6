"""What every `Influence` method is wired from: the model, task, parameter selection and settings, the data
checks, batches, Hessian rows, and the feature functions (gradients, projections) handed to the engine."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._utils.errors import InvalidInputError, TaskInferenceError
from .config import InfluenceConfig
from .cost import estimate
from .cost_estimate import CostEstimate
from .data import dataset_of, length_sorted_batches, make_loader, select_rows, to_device
from .engine.grads import LossFunction, accumulation_dtype, decide_hooks, eval_mode, per_example_grads
from .engine.hooks import hook_plan
from .engine.hvp import dataset_hvp
from .engine.hvp_memory import largest_batch, saved_activation_bytes
from .engine.ihvp.arnoldi import ArnoldiBasis
from .engine.kronecker import KroneckerMap, project_kronecker
from .engine.norms import hook_squared_norms
from .engine.projection import choose_projection, grads_chunk_size, project_by_grads, project_by_jvp
from .engine.scoring import FeatureFn, SubspaceInverse, random_subspace
from .engine.subspace_hessian import dense_subspace_hessian, kronecker_subspace_hessian
from .inputs import check_examples, input_limits
from .knn import IndexChecks
from .params import select_parameters
from .tasks import Task, infer_task


def refuses_autocast(method):
    """Run a public entry point only outside ``torch.autocast`` (see ``ModelWiring._check_precision``)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self._check_precision()
        return method(self, *args, **kwargs)

    return checked


class ModelWiring:
    """The state every `Influence` method shares and the helpers that feed the engine (no public scoring here)."""

    def __init__(self, model: nn.Module, task: Task | None, config: InfluenceConfig, progress: bool):
        self.config = config
        self.model = model
        self.task = task if task is not None else infer_task(model)
        if not callable(getattr(self.task, "per_example_loss", None)):
            raise TaskInferenceError(f"task must have a per_example_loss(model, batch) method; got {type(self.task).__name__}.")
        self.selection = select_parameters(model, config.params, config.last_n_layers)
        self.limits = input_limits(model, self.task)
        self.damping, self.batch_size, self.seed = config.damping, config.batch_size, config.seed
        self.projection, self.progress = config.projection, progress
        self.memory_budget = config.memory_budget_gb * 2**30
        self.train_loss = LossFunction(model, self.task, self.selection)
        self.test_loss = LossFunction(model, self.task, self.selection, measurement=True)
        self._verified_bases: dict[int, tuple[ArnoldiBasis, tuple]] = {}  # bases that passed the model check, on which weights
        self._checked: set[str] = set()  # fingerprints of the Datasets that passed check_data
        self._index_checks = IndexChecks()  # kNN indexes verified against this model and training set

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

    def estimate_cost(self, action: str, *args: Any, **kwargs: Any) -> CostEstimate:
        """What ``self.<action>(*args, **kwargs)`` would cost, without running it: parameters selected, memory held at
        once (basis, Krylov vectors, per-example gradients, explicit Hessian), passes and HVPs over the Hessian rows.

        ``action`` is one of ``fit_arnoldi``, ``fit_basis``, ``fit_fisher``, ``spectrum``, ``exact_hessian``, ``s_test``,
        ``solve_s_test``, ``gradients``, ``scores``, ``self_influence``; the arguments are that method's. Each of those
        methods logs this estimate at INFO and raises `MemoryBudgetError` (with the ways out) before any work when it
        cannot fit ``memory_budget_gb``. See `hf_influence.cost`.
        """
        return estimate(self, action, *args, **kwargs)

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
        if "_original_forward" in vars(self.model):  # Accelerate's mixed precision wraps forward in autocast
            raise InvalidInputError(
                "The model's forward is wrapped in torch.autocast by Accelerate's mixed precision (prepared with "
                "mixed_precision='bf16' or 'fp16'): gradients and Hessian-vector products would run in half precision. "
                "Unwrap it first: model = accelerator.unwrap_model(model, keep_fp32_wrapper=False) "
                "(InfluenceTrainer does this itself)."
            )

    def hessian_rows(self, data: Any) -> Any:
        """The seeded random subset of at most ``hessian_examples`` rows that every Hessian pass uses (in row order)."""
        dataset, limit = dataset_of(data), self.config.hessian_examples
        if limit is None or len(dataset) <= limit:
            return data
        keep = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:limit].tolist())
        return select_rows(data, keep)

    def _params(self) -> dict[str, torch.Tensor]:
        return self.selection.tensors(self.model)

    def _device(self) -> torch.device:
        return next(iter(self._params().values())).device

    def _dtype(self) -> torch.dtype:
        """The model's dtype (of its selected parameters), which chooses the advice given on NaN/Inf."""
        return next(iter(self._params().values())).dtype

    def _pad_id(self) -> int:
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def _loader(self, data: Any) -> DataLoader:
        return make_loader(data, self.batch_size, self._pad_id())

    def _hessian_batches(self, data: Any, batch_size: int | None = None) -> list:
        """All batches of the Hessian rows of ``data`` (see :meth:`hessian_rows`), collated on the CPU, grouped by length
        and cut to each batch's longest row: ``batch_size`` rows each when given (else ``hessian_batch_size``); with
        neither, as many rows as hold ``batch_size × the longest row`` tokens, the most a batch of ``batch_size`` rows can
        hold, so memory stays within what ``batch_size`` allows and short rows share calls."""
        rows, size = self.hessian_rows(data), batch_size or self.config.hessian_batch_size
        batches = length_sorted_batches(rows, size or len(dataset_of(rows)), self._pad_id(), None if size else self.batch_size)
        if not batches:
            raise InvalidInputError("The Hessian data is empty: pass at least one training example.")
        return batches

    def _materialize(self, data: Any, batch_size: int | None = None) -> list:
        """:meth:`_hessian_batches` on the model's device (reused by every pass)."""
        return [to_device(b, self._device()) for b in self._hessian_batches(data, batch_size)]

    def _grad_fn(self, loss_fn: LossFunction) -> FeatureFn:
        params = self._params()
        chunk = grads_chunk_size(self.selection.num_params, self.batch_size, self.memory_budget)
        return lambda batch: per_example_grads(loss_fn, params, batch, chunk_size=chunk)

    def _norm_fn(self, loss_fn: LossFunction) -> FeatureFn:
        """TracIn self-influence features: each example's gradient norm as a ``[B, 1]`` column (its square is the score).
        Once module hooks passed their first-use check (``engine.grads.decide_hooks``, on a few rows of the first batch, so
        no ``[B, P]`` is formed), the squared norms come from one hooked pass; the checking batch takes that path too, so no
        row depends on batch order."""
        params, grad_fn = self._params(), self._grad_fn(loss_fn)

        def norms(batch: Any) -> torch.Tensor:
            decide_hooks(loss_fn, params, batch)  # on this model's first batch
            plan = hook_plan(loss_fn, params) if loss_fn.hooks_ok else None
            if plan is None:
                return grad_fn(batch).norm(dim=1, keepdim=True)
            return hook_squared_norms(loss_fn, batch, plan).clamp(min=0).sqrt().unsqueeze(1)

        return norms

    def _projection_fn(self, loss_fn: LossFunction, directions: torch.Tensor | KroneckerMap) -> FeatureFn:
        params, num, rank = self._params(), self.selection.num_params, directions.shape[0]
        if isinstance(directions, KroneckerMap):  # always from (hooked) gradient pieces: no dense rows for JVPs
            chunk = grads_chunk_size(num, self.batch_size, self.memory_budget)
            return lambda batch: project_kronecker(loss_fn, params, batch, directions, chunk_size=chunk)
        mode = self.projection if self.projection != "auto" else choose_projection(num, rank, self.batch_size, self.memory_budget)
        if mode == "jvp":
            return lambda batch: project_by_jvp(loss_fn, params, batch, directions)
        chunk = grads_chunk_size(num, self.batch_size, self.memory_budget)
        return lambda batch: project_by_grads(loss_fn, params, batch, directions, chunk_size=chunk, memory_budget_bytes=self.memory_budget)

    def _random_directions(self, rank: int) -> torch.Tensor | KroneckerMap:
        """The seeded random map of ``rank`` rows of random projection and projected TracIn (``random_projection``):
        a dense orthonormal ``[rank, P]`` subspace, or a `KroneckerMap` of the same shape."""
        if not 1 <= rank <= self.selection.num_params:
            raise InvalidInputError(f"rank must be in [1, {self.selection.num_params}] (number of parameters), got {rank}.")
        generator, dtype = torch.Generator().manual_seed(self.seed), accumulation_dtype(self._params())
        if self.config.random_projection == "kronecker":
            if rank < len(self.selection.names):
                raise InvalidInputError(
                    f"random_projection='kronecker' gives each of the {len(self.selection.names)} selected tensors at least one "
                    f"feature, so rank must be >= {len(self.selection.names)}, got {rank}: raise rank, narrow the selection "
                    "(params= / last_n_layers=), or use random_projection='dense'.")
            return KroneckerMap.draw(self.selection.names, self.selection.shapes, rank, generator, dtype).to(self._device())
        return random_subspace(self.selection.num_params, rank, generator, dtype).to(self._device())

    def _hvp_activation_bytes(self, batches: list) -> int:
        """What the graph of a batched HVP saves on the largest of ``batches`` (one forward and backward of it, in eval mode;
        `hf_influence.engine.hvp_memory`): the figure that sizes passes of batched HVPs and their estimate. Measured once
        per batch shape, so a call and its cost estimate share one measurement."""
        return self._activation_bytes(largest_batch(batches), create_graph=True)

    def _grad_activation_bytes(self, batch: dict) -> int:
        """What the forward of a first-order backward (per-example gradients, a hooked projection) saves on ``batch``:
        ``A₁`` of `hf_influence.engine.hvp_memory` (one forward, in eval mode), measured once per batch shape."""
        return self._activation_bytes(batch, create_graph=False)

    def _activation_bytes(self, batch: dict, create_graph: bool) -> int:
        """`hvp_memory.saved_activation_bytes` on ``batch``, cached by batch shape and ``create_graph``."""
        shape = tuple((key, tuple(value.shape)) for key, value in batch.items() if isinstance(value, torch.Tensor))
        measured = self.__dict__.setdefault("_activation_bytes_by_shape", {})
        if (shape, create_graph) not in measured:
            with eval_mode(self.model):
                measured[shape, create_graph] = saved_activation_bytes(self.train_loss, self._params(), to_device(batch, self._device()),
                                                                       create_graph)
        return measured[shape, create_graph]

    def _subspace_hessian(self, hessian_data: Any, directions: torch.Tensor | KroneckerMap) -> torch.Tensor:
        """``QᵀHQ`` ``[p̄, p̄]`` over the Hessian rows, in passes of batched HVPs within the budget
        (`hf_influence.engine.subspace_hessian`)."""
        params, batches = self._params(), self._materialize(hessian_data)
        hvp = lambda v, per_backward=None: dataset_hvp(self.train_loss, params, batches, v, per_backward=per_backward)  # noqa: E731
        activations = self._hvp_activation_bytes(batches)
        subspace_hessian = kronecker_subspace_hessian if isinstance(directions, KroneckerMap) else dense_subspace_hessian
        with eval_mode(self.model):
            return subspace_hessian(directions, hvp, self.memory_budget, activations)

    def _subspace_inverse(self, hessian_data: Any, directions: torch.Tensor | KroneckerMap) -> SubspaceInverse:
        return SubspaceInverse(self._subspace_hessian(hessian_data, directions), self.damping)

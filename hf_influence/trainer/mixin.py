"""``InfluenceTrainerMixin``: influence methods for a ``transformers.Trainer``; the training loop is untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from .._utils.errors import TrainerMixinError
from ..distributed import (
    broadcast_from_main,
    is_main_process,
    sharded_method,
    sharded_scores,
    sharded_self_influence,
    wait_for_everyone,
)
from ..engine.ihvp.arnoldi import ArnoldiBasis, basis_exists, basis_save_path
from ..influence import Influence, Method
from ..knn import KnnScores, select_rows
from ..metrics import check_filter_rule, noisy_mask
from .arguments import InfluenceArgumentsMixin

logger = logging.get_logger(__name__)


class TensorBatches:
    """The trainer's data collator, keeping only the tensor entries of its batch (what the engine takes)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        if not hasattr(batch, "items"):
            raise TrainerMixinError(
                f"The trainer's data collator returned a {type(batch).__name__}; influence needs a mapping of tensors "
                "(model keyword arguments). Pass a collator that returns a dict, e.g. DataCollatorWithPadding."
            )
        return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


class InfluenceTrainerMixin:
    """Adds influence functions to a `transformers.Trainer`: put it first in the bases.

    ``class MyTrainer(InfluenceTrainerMixin, Trainer)`` gains :meth:`fit_influence`,
    :meth:`self_influence`, :meth:`influence` and :meth:`filter_noisy` (and, for the methods it does
    not wrap, :meth:`get_influence`, :meth:`get_influence_dataloader` and
    :meth:`get_hessian_dataset`); nothing of ``Trainer`` is overridden, so training, evaluation and saving are inherited unchanged. The methods reuse
    the trainer's model (scored in eval mode), data collator, ``Accelerator`` and ``output_dir``,
    and read their settings from the ``influence_*`` fields of `InfluenceTrainingArguments`. They
    work after ``train()`` or on a loaded model. Scores are computed in fixed shards saved under
    ``output_dir/<influence_dir>/shards`` (see `hf_influence.distributed`): under ``accelerate
    launch`` or ``torchrun`` the processes share the shards, and a rerun resumes. Summaries go
    through ``self.log``. Score sign: ``g_testᵀ (H + λI)^-1 g_train``, positive = the training
    example helps (Koh & Liang's ``I_up,loss`` is the negative).
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, Trainer):
            raise TrainerMixinError(
                f"{cls.__name__} mixes InfluenceTrainerMixin into {', '.join(b.__name__ for b in cls.__bases__)}, which is not "
                "a transformers.Trainer. Use `class MyTrainer(InfluenceTrainerMixin, Trainer)` (or Seq2SeqTrainer), "
                "or hf_influence.Influence(model) outside a trainer."
            )

    # ----------------------------------------------------------------- public methods
    def fit_influence(self, dataset: Any = None) -> ArnoldiBasis:
        """Fit and save the Arnoldi eigenbasis of the Hessian (or, with ``influence_curvature="fisher"``,
        the exact eigenbasis of the empirical Fisher) for the model's current weights.

        The Hessian is that of the mean training loss over a seeded random subset of
        ``influence_hessian_examples`` rows of ``dataset``. The main process fits and saves it to
        ``output_dir/<influence_dir>/arnoldi_basis.safetensors``; the others load it, so every
        process scores with the same basis.

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``.

        Returns:
            `ArnoldiBasis`: top ``influence_rank`` eigenpairs by |λ| (Schioppa et al. 2022).
        """
        settings = self._influence_settings()
        dataset = self._dataset_or_train(dataset, "fit_influence")
        path = basis_save_path(self._influence_root())
        if is_main_process(self.accelerator):
            inf = self.get_influence(progress=not self.args.disable_tqdm)
            hessian = self.get_influence_dataloader(self.get_hessian_dataset(dataset))
            inf.fit_basis(hessian, settings.influence_rank, settings.influence_iterations, settings.influence_curvature).save(path)
        wait_for_everyone(self.accelerator)
        basis = ArnoldiBasis.load(path)
        self.log({"influence/basis_rank": float(basis.rank), "influence/lambda_max": float(basis.eigenvalues[0]),
                  "influence/lambda_smallest_kept": float(basis.eigenvalues[-1])})
        return basis

    def self_influence(self, dataset: Any = None, method: str | None = None) -> torch.Tensor:
        """Self-influence ``g_zᵀ (H + λI)^-1 g_z`` of every row of ``dataset``: ``[N]``, high = likely noisy.

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``; scored in row order.
            method (`str`, *optional*): ``"arnoldi"`` or ``"tracin"``; defaults to ``influence_method``.
                Arnoldi reuses the saved basis if it was fitted on the current weights with the same
                parameters, damping, rank and curvature; otherwise it calls :meth:`fit_influence` first.
        """
        settings = self._influence_settings()
        dataset = self._dataset_or_train(dataset, "self_influence")
        method = sharded_method(method or settings.influence_method)
        result = sharded_self_influence(
            self.get_influence(), self.get_influence_dataloader(dataset), self._influence_root() / "shards", method,
            self._influence_basis(method), settings.influence_shard_size, self.accelerator, progress=not self.args.disable_tqdm,
        )
        self._log_shards(result.report)
        self.log({"influence/self_influence_mean": float(result.scores.mean()), "influence/self_influence_max": float(result.scores.max())})
        return result.scores

    def influence(self, test_dataset: Any, train_dataset: Any = None, knn: int | None = None, method: str | None = None) -> torch.Tensor | KnnScores:
        """Influence of each training row on each test row, ``g_testᵀ (H + λI)^-1 g_train``.

        Args:
            test_dataset (`datasets.Dataset`): the examples to explain.
            train_dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``.
            knn (`int`, *optional*): score only each test row's ``knn`` nearest training rows (FastIF).
            method (`str`, *optional*): ``"arnoldi"`` or ``"tracin"``; defaults to ``influence_method``.

        Returns:
            `torch.Tensor` of shape `[n_test, n_train]` (positive = the training row helps the test
            row), or with ``knn`` a `KnnScores` with ``scores`` and ``indices`` of shape ``[n_test, knn]``.
        """
        settings = self._influence_settings()
        train_dataset = self._dataset_or_train(train_dataset, "influence")
        method = sharded_method(method or settings.influence_method)
        result = sharded_scores(
            self.get_influence(), self.get_influence_dataloader(test_dataset), self.get_influence_dataloader(train_dataset),
            self._influence_root() / "shards", method, self._influence_basis(method), knn, settings.influence_shard_size,
            self.accelerator, progress=not self.args.disable_tqdm,
        )
        self._log_shards(result.report)
        return result.scores

    def filter_noisy(self, dataset: Any = None, fraction: float | None = None, threshold: float | None = None, method: str | None = None) -> Any:
        """``dataset`` without its most self-influential rows (likely mislabelled), in row order.

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``.
            fraction (`float`, *optional*): drop the ``round(fraction · N)`` highest self-influences.
            threshold (`float`, *optional*): drop every row whose self-influence exceeds it.
                Pass exactly one of ``fraction`` and ``threshold``.
            method (`str`, *optional*): as in :meth:`self_influence`.

        Returns:
            The kept rows (``dataset.select``), ready for another ``train()``.
        """
        check_filter_rule(fraction, threshold)
        dataset = self._dataset_or_train(dataset, "filter_noisy")
        drop = noisy_mask(self.self_influence(dataset, method), fraction, threshold)
        self.log({"influence/removed": float(drop.sum()), "influence/kept": float((~drop).sum())})
        return select_rows(dataset, torch.nonzero(~drop).flatten().tolist())

    def get_influence(self, progress: bool = False) -> Influence:
        """An `Influence` over the trainer's model with the ``influence_*`` settings (parameters, damping,
        batch size, seed, projection, memory budget), for methods the trainer does not wrap (LiSSA,
        random projection, spectra)."""
        settings = self._influence_settings()
        return Influence(
            self.model, params=settings.influence_params, last_n_layers=settings.influence_last_n_layers,
            damping=settings.influence_damping, batch_size=settings.influence_batch_size, seed=settings.influence_seed,
            projection=settings.influence_projection, memory_budget_gb=settings.influence_memory_budget_gb, progress=progress,
        )

    def get_influence_dataloader(self, dataset: Any) -> DataLoader:
        """``dataset`` as the influence methods read it: rows in order, columns the model does not take
        removed, ``influence_batch_size`` rows per batch, collated by the trainer's collator."""
        if hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="influence")
        return DataLoader(dataset, batch_size=self.args.influence_batch_size, shuffle=False, collate_fn=TensorBatches(self.data_collator))

    def get_hessian_dataset(self, dataset: Any = None) -> Any:
        """The rows whose mean loss defines the Hessian of :meth:`fit_influence`: a seeded random subset
        of ``influence_hessian_examples`` rows of ``dataset`` (default ``self.train_dataset``), in row order."""
        settings = self._influence_settings()
        dataset = self._dataset_or_train(dataset, "get_hessian_dataset")
        count = min(settings.influence_hessian_examples, len(dataset))
        rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(settings.influence_seed))[:count]
        return select_rows(dataset, sorted(rows.tolist()))

    # ----------------------------------------------------------------- wiring
    def _influence_settings(self) -> InfluenceArgumentsMixin:
        if not isinstance(self.args, InfluenceArgumentsMixin):
            raise TrainerMixinError(
                f"{type(self).__name__} needs InfluenceTrainingArguments (or InfluenceSeq2SeqTrainingArguments) for its "
                f"influence settings, got {type(self.args).__name__}. Build args with "
                "hf_influence.InfluenceTrainingArguments(output_dir=..., influence_method=...)."
            )
        if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            raise TrainerMixinError(
                "Influence needs every selected parameter whole in each process, and this Trainer shards them "
                f"({'FSDP' if getattr(self, 'is_fsdp_enabled', False) else 'DeepSpeed ZeRO-3'}). Train under sharding, "
                "save_model(), then score the saved model in one process or under DDP (recipes/accelerate_configs/multi_gpu.yaml)."
            )
        return self.args

    def _influence_root(self) -> Path:
        return Path(self.args.output_dir) / self.args.influence_dir

    def _dataset_or_train(self, dataset: Any, caller: str) -> Any:
        if dataset is None and self.train_dataset is None:
            raise TrainerMixinError(f"{caller}() needs a dataset: pass one, or build the trainer with train_dataset=.")
        return self.train_dataset if dataset is None else dataset

    def _influence_basis(self, method: Method) -> ArnoldiBasis | None:
        """The saved basis if it was fitted on the current weights with the same parameters, damping, rank and curvature
        (the main process decides, so every rank agrees), else a new :meth:`fit_influence`."""
        if method is not Method.ARNOLDI:
            return None
        root = self._influence_root()
        reusable = broadcast_from_main(is_main_process(self.accelerator) and self._saved_basis_matches(root), self.accelerator)
        if reusable:
            return ArnoldiBasis.load(root)
        logger.info("No saved Arnoldi basis for the current weights and influence settings: fitting one (fit_influence).")
        return self.fit_influence()

    def _saved_basis_matches(self, root: Path) -> bool:
        if not basis_exists(root):
            return False
        basis, settings, inf = ArnoldiBasis.load(root), self.args, self.get_influence()
        return (basis.param_names == list(inf.selection.names) and basis.fingerprint == inf.selection.fingerprint(self.model)
                and basis.damping == settings.influence_damping and basis.rank == settings.influence_rank
                and basis.curvature == settings.influence_curvature)

    def _log_shards(self, report: Any) -> None:
        self.log({"influence/shards_computed": float(len(report.computed)), "influence/shards_skipped": float(report.skipped)})


class InfluenceTrainer(InfluenceTrainerMixin, Trainer):
    """`transformers.Trainer` with the influence methods of `InfluenceTrainerMixin`; use `InfluenceTrainingArguments`."""


class InfluenceSeq2SeqTrainer(InfluenceTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with the methods of `InfluenceTrainerMixin`; use `InfluenceSeq2SeqTrainingArguments`."""

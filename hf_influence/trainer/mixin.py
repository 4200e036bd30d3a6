"""``InfluenceTrainerMixin``: influence methods for a ``transformers.Trainer``; the training loop is untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import logging

from .._utils.errors import DamagedArtifactError, TrainerMixinError
from ..config import BasisConfig, InfluenceConfig, Method, ScoringConfig, as_choice, sharded_method
from ..data import select_rows
from ..engine.ihvp.arnoldi import ArnoldiBasis, basis_exists, basis_save_path
from ..engine.ihvp.lissa import LissaConfig
from ..index import InfluenceIndex, TopInfluences, build_index
from ..influence import Influence
from ..jobs import StestRun, broadcast_from_main, is_main_process, sharded_s_test, sharded_scores, sharded_self_influence, wait_for_everyone
from ..knn import KnnScores
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
    :meth:`self_influence`, :meth:`influence`, :meth:`build_influence_index` and :meth:`filter_noisy` (and, for the methods it does
    not wrap, :meth:`get_influence`, :meth:`get_influence_dataloader` and
    :meth:`get_hessian_dataset`); nothing of ``Trainer`` is overridden, so training, evaluation and saving are inherited unchanged. The methods reuse
    the trainer's model (scored in eval mode), data collator, ``Accelerator`` and ``output_dir``,
    and read their settings from the ``influence_*`` fields of `InfluenceTrainingArguments`. They
    work after ``train()`` or on a loaded model. Scores are computed in fixed shards saved under
    ``output_dir/<influence_dir>/shards`` (see `hf_influence.jobs`): under ``accelerate
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
        ``influence_hessian_examples`` rows of ``dataset``. Every process runs the fit on its share of
        the Hessian batches (products summed across processes, so all end with the same basis); the main
        process saves it to ``output_dir/<influence_dir>/arnoldi_basis.safetensors``.

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``.

        Returns:
            `ArnoldiBasis`: top ``influence_rank`` eigenpairs by |λ| (Schioppa et al. 2022).
        """
        settings = self._influence_settings().influence_config(BasisConfig)
        dataset = self._dataset_or_train(dataset, "fit_influence")
        inf = self.get_influence(progress=not self.args.disable_tqdm and is_main_process(self.accelerator))
        basis = inf.fit_basis(self.get_influence_dataloader(self.get_hessian_dataset(dataset)), settings.rank, settings.iterations,
                              settings.curvature, settings.algorithm, settings.tol, settings.keep,
                              data_parallel=self.accelerator.num_processes > 1, block_size=settings.block_size)
        if is_main_process(self.accelerator):
            basis.save(basis_save_path(self._influence_root()))
        wait_for_everyone(self.accelerator)
        self.log({"influence/basis_rank": float(basis.rank), "influence/lambda_max": float(basis.eigenvalues[0]),
                  "influence/lambda_smallest_kept": float(basis.eigenvalues[-1])})
        return basis

    def self_influence(self, dataset: Any = None, method: str | None = None) -> torch.Tensor:
        """Self-influence ``g_zᵀ (H + λI)^-1 g_z`` of every row of ``dataset``: ``[N]``, high = likely noisy.

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``; scored in row order.
            method (`str`, *optional*): ``"arnoldi"`` or ``"tracin"``; defaults to ``influence_method``.
                Arnoldi reuses the saved basis if it was fitted on the current weights with the same
                parameters, rank, curvature and keep (damping is a scoring setting); otherwise it calls :meth:`fit_influence` first.
        """
        settings = self._influence_settings().influence_config(ScoringConfig)
        dataset = self._dataset_or_train(dataset, "self_influence")
        method = sharded_method(method or settings.method)
        result = sharded_self_influence(
            self.get_influence(), self.get_influence_dataloader(dataset), self._influence_root() / "shards", method,
            self._influence_basis(method), settings.shard_size, self.accelerator, progress=not self.args.disable_tqdm,
        )
        self._log_shards(result.report)
        self.log({"influence/self_influence_mean": float(result.scores.mean()), "influence/self_influence_max": float(result.scores.max())})
        return result.scores

    def influence(self, test_dataset: Any, train_dataset: Any = None, knn: int | None = None, method: str | None = None,
                  index: InfluenceIndex | None = None, k: int = 10, direction: str = "helpful") -> torch.Tensor | KnnScores | TopInfluences:
        """Influence of each training row on each test row, ``g_testᵀ (H + λI)^-1 g_train``.

        Args:
            test_dataset (`datasets.Dataset`): the examples to explain.
            train_dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``.
            knn (`int`, *optional*): score only each test row's ``knn`` nearest training rows (FastIF).
            method (`str`, *optional*): ``"arnoldi"`` or ``"tracin"``; defaults to ``influence_method``.
            index (`InfluenceIndex`, *optional*): answer from a stored index (:meth:`build_influence_index`) instead:
                the exact top ``k`` training rows per test row in ``direction`` (``"helpful"``, ``"harmful"``, ``"abs"``).

        Returns:
            `torch.Tensor` of shape `[n_test, n_train]` (positive = the training row helps the test
            row), with ``knn`` a `KnnScores` with ``scores`` and ``indices`` of shape ``[n_test, knn]``, with ``index`` a
            `TopInfluences` with ``scores`` and ``indices`` of shape ``[n_test, k]``.
        """
        if index is not None:
            if knn is not None or method is not None:
                raise TrainerMixinError("index= answers from the stored features of the index's method: drop knn= and method=.")
            return self.get_influence().query(index, self.get_influence_dataloader(test_dataset), k, direction)
        settings = self._influence_settings().influence_config(ScoringConfig)
        train_dataset = self._dataset_or_train(train_dataset, "influence")
        method = sharded_method(method or settings.method)
        result = sharded_scores(
            self.get_influence(), self.get_influence_dataloader(test_dataset), self.get_influence_dataloader(train_dataset),
            self._influence_root() / "shards", method, self._influence_basis(method), knn, settings.shard_size,
            self.accelerator, progress=not self.args.disable_tqdm,
        )
        self._log_shards(result.report)
        return result.scores

    def build_influence_index(self, dataset: Any = None, method: str | None = None, dtype: str = "float32") -> InfluenceIndex | None:
        """Store every row's features once (see `hf_influence.index`) for exact top-k :meth:`influence` queries (``index=``).

        Shards under ``output_dir/<influence_dir>/index`` (shared by the processes; a rerun resumes).

        Args:
            dataset (`datasets.Dataset`, *optional*): defaults to ``self.train_dataset``; rows stored in order.
            method (`str`, *optional*): ``"arnoldi"`` (the saved basis, or :meth:`fit_influence`), ``"randproj"`` or
                ``"tracin"`` (on an ``influence_rank``-dimensional random projection of the gradient); defaults to ``influence_method``.
            dtype (`str`, defaults to `"float32"`): ``"float32"`` or ``"float16"`` storage.
        """
        settings = self._influence_settings()
        scoring = settings.influence_config(ScoringConfig)
        dataset = self._dataset_or_train(dataset, "build_influence_index")
        method = as_choice(Method, method or scoring.method, "method")
        build = build_index(
            self.get_influence(), self.get_influence_dataloader(dataset), method, self._influence_basis(method),
            rank=settings.influence_config(BasisConfig).rank, dtype=dtype, output_dir=self._influence_root() / "index",
            shard_size=scoring.shard_size, accelerator=self.accelerator, progress=not self.args.disable_tqdm,
        )
        self._log_shards(build.report)
        return build.index

    def s_test(self, test_dataset: Any, hessian_dataset: Any = None, lissa: str | LissaConfig = "auto",
               points_per_solve: int = 8) -> torch.Tensor:
        """``(H + λI)^-1 ∇L(z_test)`` by LiSSA for every row of ``test_dataset``: ``[n_test, P]``, resumable.

        One file per test point under ``output_dir/<influence_dir>/s_test`` (see `hf_influence.jobs.stest`): a rerun
        reads finished points back; under several processes the LiSSA repeats are spread over them.

        Args:
            test_dataset (`datasets.Dataset`): the test points, in row order.
            hessian_dataset (`datasets.Dataset`, *optional*): rows defining the Hessian; defaults to ``self.train_dataset``
                (its seeded random subset of ``influence_hessian_examples`` rows).
            lissa (`str` or `LissaConfig`, defaults to `"auto"`): ``"auto"``, ``"fastif"``, ``"koh_liang"`` or settings.
            points_per_solve (`int`, defaults to `8`): test points solved together (fixed groups: keep it when resuming).
        """
        hessian_dataset = self._dataset_or_train(hessian_dataset, "s_test")
        run: StestRun = sharded_s_test(
            self.get_influence(), self._model_rows(test_dataset), self._model_rows(hessian_dataset), self._influence_root(), lissa,
            points_per_solve, self.accelerator, load=True, progress=not self.args.disable_tqdm,
        )
        self.log({"influence/s_test_computed": float(run.computed), "influence/s_test_skipped": float(run.skipped)})
        return run.vectors

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
        random projection, spectra).

        Mixed-precision training (``bf16=True`` / ``fp16=True``) leaves Accelerate's autocast wrapper on the model's
        forward; it is removed here so influence runs in the model's own dtype (a later ``train()`` wraps it again)."""
        self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        return Influence.from_config(self.model, self._influence_settings().influence_config(InfluenceConfig), progress=progress)

    def get_influence_dataloader(self, dataset: Any) -> DataLoader:
        """``dataset`` as the influence methods read it: rows in order, columns the model does not take
        removed, ``influence_batch_size`` rows per batch, collated by the trainer's collator."""
        return DataLoader(self._model_rows(dataset), batch_size=self.args.influence_batch_size, shuffle=False,
                          collate_fn=TensorBatches(self.data_collator))

    def get_hessian_dataset(self, dataset: Any = None) -> Any:
        """The rows whose mean loss defines the Hessian of :meth:`fit_influence`: a seeded random subset
        of ``influence_hessian_examples`` rows of ``dataset`` (default ``self.train_dataset``), in row order."""
        return self.get_influence().hessian_rows(self._dataset_or_train(dataset, "get_hessian_dataset"))

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

    def _model_rows(self, dataset: Any) -> Any:
        """``dataset`` without the columns the model does not take (as the Trainer's own loaders drop them)."""
        return self._remove_unused_columns(dataset, description="influence") if hasattr(dataset, "column_names") else dataset

    def _influence_root(self) -> Path:
        return Path(self.args.output_dir) / self.args.influence_dir

    def _dataset_or_train(self, dataset: Any, caller: str) -> Any:
        if dataset is None and self.train_dataset is None:
            raise TrainerMixinError(f"{caller}() needs a dataset: pass one, or build the trainer with train_dataset=.")
        return self.train_dataset if dataset is None else dataset

    def _influence_basis(self, method: Method) -> ArnoldiBasis | None:
        """The saved basis if it was fitted on the current weights with the same parameters, rank, curvature and keep
        (the main process decides, so every rank agrees), else a new :meth:`fit_influence`."""
        if method is not Method.ARNOLDI:
            return None
        root = self._influence_root()
        saved = self._reusable_basis(root) if is_main_process(self.accelerator) else None
        if broadcast_from_main(saved is not None, self.accelerator):
            return saved if saved is not None else ArnoldiBasis.load(root)
        logger.info("No saved Arnoldi basis for the current weights and influence settings: fitting one (fit_influence).")
        return self.fit_influence()

    def _reusable_basis(self, root: Path) -> ArnoldiBasis | None:
        """The saved basis if the one reuse rule (`Influence.basis_mismatches`) accepts it with this trainer's rank,
        curvature and keep, else ``None`` (a damaged basis is reported and fitted again, like a damaged shard)."""
        if not basis_exists(root):
            return None
        try:
            saved = ArnoldiBasis.load(root)
        except DamagedArtifactError as err:
            logger.warning(f"{err} The trainer fits it again now.")
            return None
        requested = self.args.influence_config(BasisConfig)
        return None if self.get_influence().basis_mismatches(saved, requested.rank, requested.curvature, requested.keep) else saved

    def _log_shards(self, report: Any) -> None:
        self.log({"influence/shards_computed": float(len(report.computed)), "influence/shards_skipped": float(report.skipped)})


class InfluenceTrainer(InfluenceTrainerMixin, Trainer):
    """`transformers.Trainer` with the influence methods of `InfluenceTrainerMixin`; use `InfluenceTrainingArguments`."""


class InfluenceSeq2SeqTrainer(InfluenceTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with the methods of `InfluenceTrainerMixin`; use `InfluenceSeq2SeqTrainingArguments`."""

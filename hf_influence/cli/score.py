"""``hf-influence score``: self-influence of every training row, or test-vs-train scores; sharded, resumable.

Rows are scored in fixed shards of ``--shard_size`` rows under ``output_dir/shards/<kind>-<hash>/``
(see ``hf_influence.jobs``): under ``torchrun`` / ``accelerate launch`` the processes share
them out, a rerun skips every shard already saved (checksums verified, corrupt ones recomputed),
and any process count can finish a run. ``--max_shards n`` stops after n new shards. Once all are
saved, the main process merges them and writes:

- ``--kind self``: ``self_influence.parquet`` (``row_index``, ``self_influence``), ``scored_dataset/``
  (the training data as read, plus ``row_index`` and ``self_influence``; ``load_from_disk``),
  ``self_influence_histogram.png`` and, when the training data has the ``--noise_column``,
  ``precision_recall.png`` and AUC / AP in the summary.
- ``--kind pairwise``: ``scores.parquet`` (``test_index``, ``train_index``, ``score``; with ``--knn k``
  also ``neighbor_rank``, 0 = nearest) and ``scores_histogram.png``.

Scores are ``g_testᵀ (H + λI)^-1 g_train`` (self-influence: ``g_zᵀ (H + λI)^-1 g_z``); positive
means the training row helps. Arnoldi needs ``hf-influence fit`` first (same config).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._utils.errors import InvalidInputError
from ..config import ScoringConfig, settings_named
from ..engine.ihvp.arnoldi import ArnoldiBasis, basis_exists, basis_save_path
from ..influence import Influence
from ..jobs import ShardedScores, sharded_scores, sharded_self_influence
from ..knn import EMBEDDINGS, METRICS, KnnScores
from ..metrics import noise_detection_metrics
from ..outputs import ROW_INDEX, save_dataset, write_parquet
from ..plots import plot_histogram, plot_precision_recall
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_split, prepare_split, read_split
from .outputs import listing, noise_labels, print_table
from .session import Session

SHARDS_DIR = "shards"
KINDS = ("self", "pairwise")


@dataclass
class ScoringArguments(ScoringConfig):
    """How rows are scored and saved (`hf_influence.config.ScoringConfig`, plus the CLI's own; shared by ``score`` and ``filter``)."""

    basis_path: str | None = field(default=None, metadata={"help": "Arnoldi basis file or folder (default: --output_dir)."})
    max_shards: int | None = field(default=None, metadata={"help": "Compute at most this many new shards, then stop "
                                                                   "(time-limited jobs); rerun the same command to continue."})
    noise_column: str = field(default="is_noisy", metadata={"help": "Training-data column marking known noisy rows (bool); "
                                                                   "when present: precision-recall plot, AUC and AP."})
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (needs matplotlib)."})

    def __post_init__(self):
        with settings_named("--"):
            super().__post_init__()
        if self.max_shards is not None and self.max_shards < 1:
            raise InvalidInputError(f"--max_shards must be >= 1, got {self.max_shards}.")


@dataclass
class ScoreArguments:
    """What ``hf-influence score`` computes."""

    kind: str = field(default="self", metadata={"help": "self: self-influence of every training row (ranks noisy rows); "
                                                        "pairwise: every test row against every training row (needs --test_data)."})
    knn: int | None = field(default=None, metadata={"help": "pairwise only: score each test row against its k nearest "
                                                            "training rows in the model's embedding space (FastIF)."})
    knn_embedding: str | None = field(default=None, metadata={
        "help": "kNN features: head_gradient (the default for classifiers: the head's loss gradient, searched with the "
                "preconditioned test gradient, far higher recall of the true top influences; needs test labels), "
                "classifier_input (FastIF's features), encoder_mean (seq2seq default) or last_hidden_mean (causal LM default)."})
    knn_metric: str | None = field(default=None, metadata={
        "help": "kNN index metric: l2, ip, cosine or abs_ip (default: abs_ip for head_gradient, else l2)."})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidInputError(f"--kind must be one of {KINDS}, got {self.kind!r}.")
        if self.knn is not None and self.kind != "pairwise":
            raise InvalidInputError("--knn restricts test-vs-train scores: use it with --kind pairwise.")
        if (self.knn_embedding or self.knn_metric) and self.knn is None:
            raise InvalidInputError("--knn_embedding / --knn_metric shape the kNN index: use them with --knn k.")
        if self.knn_embedding is not None and self.knn_embedding not in EMBEDDINGS:
            raise InvalidInputError(f"--knn_embedding must be one of {sorted(EMBEDDINGS)}, got {self.knn_embedding!r}.")
        if self.knn_metric is not None and self.knn_metric not in METRICS:
            raise InvalidInputError(f"--knn_metric must be one of {list(METRICS)}, got {self.knn_metric!r}.")


@dataclass
class ScoringJob:
    """Everything a scoring run needs, loaded and checked once."""

    run: Session
    raw_train: Any  # the training data as read, for the scored dataset
    train: Any  # its model inputs
    test: Any
    basis: ArnoldiBasis | None
    args: ScoringArguments

    @property
    def inf(self) -> Influence:
        return self.run.inf

    @property
    def is_main(self) -> bool:
        return self.run.is_main

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir


def load_job(run: Session, data_args: DataArguments, args: ScoringArguments, needs_test: bool = False) -> ScoringJob:
    """Load data and basis for ``run``; the basis is checked against the model once, here."""
    raw_train = read_split(data_args.train_data, data_args.train_split, data_args, data_args.max_train_examples)
    train = prepare_split(raw_train, data_args, run.tokenizer, data_args.train_data)
    test = load_split(data_args.test_data, data_args.test_split, data_args, run.tokenizer, data_args.max_test_examples) if needs_test else None
    basis = None
    if args.method == "arnoldi":
        basis = ArnoldiBasis.load(basis_save_path(args.basis_path or run.output_dir))
        run.inf.check_basis(basis)
    return ScoringJob(run, raw_train, train, test, basis, args)


def check_request(data_args: DataArguments, inf_args: InfluenceArguments, args: ScoringArguments, needs_test: bool = False) -> None:
    """Refuse an impossible request before anything is loaded."""
    if needs_test and data_args.test_data is None:
        raise InvalidInputError("--kind pairwise needs --test_data (the rows whose influences are scored).")
    basis_path = basis_save_path(args.basis_path or inf_args.output_dir)
    if args.method == "arnoldi" and not basis_exists(basis_path):
        raise InvalidInputError(f"No Arnoldi basis at {basis_path}. Run `hf-influence fit` with the same --config first, "
                                "pass --basis_path, or use --method tracin.")


def score_self_influence(job: ScoringJob) -> ShardedScores:
    """Self-influence of every training row, sharded; merged on the main process once complete."""
    return sharded_self_influence(job.inf, job.train, job.output_dir / SHARDS_DIR, job.args.method, job.basis, job.args.shard_size,
                                  job.run.accelerator, job.args.max_shards, merge=job.is_main, progress=job.is_main)


def run_score(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments,
              scoring: ScoringArguments, args: ScoreArguments) -> dict:
    """Score, merge and write the outputs (main process); print a summary table and return it."""
    check_request(data_args, inf_args, scoring, needs_test=args.kind == "pairwise")
    with Session(model_args, inf_args, progress=False) as run:
        job = load_job(run, data_args, scoring, needs_test=args.kind == "pairwise")
        run.wait()  # scoring time starts when every rank has loaded
        scoring_start = time.perf_counter()
        if args.kind == "self":
            result = score_self_influence(job)
        else:
            result = sharded_scores(job.inf, job.test, job.train, job.output_dir / SHARDS_DIR, scoring.method, job.basis, args.knn,
                                    scoring.shard_size, run.accelerator, scoring.max_shards, merge=job.is_main, progress=job.is_main,
                                    knn_embedding=args.knn_embedding, knn_metric=args.knn_metric)
        summary = shard_summary(result, time.perf_counter() - scoring_start)
        if job.is_main and result.scores is not None:
            summary |= write_self_influence(job, result.scores) if args.kind == "self" else _write_pairwise(job, result.scores)
        run.finish("score", (model_args, data_args, inf_args, scoring, args), summary)
        if job.is_main:
            print_table(f"hf-influence score --kind {args.kind} --method {scoring.method}", summary_rows(summary, inf_args.output_dir))
    return summary


def shard_summary(result: ShardedScores, seconds: float) -> dict:
    """Figures of a sharded run (``seconds``: planning, scoring and merging) for the config file and summary table."""
    report = result.report
    rows = sum(len(report.plan.rows(shard)) for shard in report.computed)
    return {"rows": report.plan.num_rows, "shards": report.plan.num_shards, "shards_computed": len(report.computed),
            "shards_skipped": report.skipped, "shards_remaining": report.remaining, "processes": report.processes,
            "shard_folder": str(report.plan.folder), "scoring_seconds": round(seconds, 3),
            "rows_scored_per_second": round(rows / seconds, 2)}


def summary_rows(summary: dict, output_dir: str) -> list[tuple[str, Any]]:
    """The summary table: shard bookkeeping, then figures, then what to do next."""
    rows = [(key.replace("_", " "), value) for key, value in summary.items()]
    if summary["shards_remaining"]:
        rows.append(("next", f"{summary['shards_remaining']} shard(s) left: rerun the same command to continue"))
    return rows + [("output_dir", listing(output_dir))]


def scored_dataset(raw_train: Any, scores: torch.Tensor) -> Any:
    """The training data as read, plus its ``row_index`` and ``self_influence`` columns."""
    return raw_train.add_column(ROW_INDEX, list(range(len(scores)))).add_column("self_influence", scores.double().tolist())


def write_self_influence(job: ScoringJob, scores: torch.Tensor) -> dict:
    """Parquet, scored dataset and plots of the merged self-influence; the figures for the summary."""
    rows = torch.arange(len(scores))
    write_parquet(job.output_dir / "self_influence.parquet", {ROW_INDEX: rows, "self_influence": scores.double()})
    save_dataset(scored_dataset(job.raw_train, scores), job.output_dir / "scored_dataset")
    is_noisy = noise_labels(job.raw_train, job.args.noise_column)
    figures = {"self_influence_median": float(scores.median()), "self_influence_max": float(scores.max()),
               "most_self_influential_rows": scores.argsort(descending=True)[:5].tolist()}
    if is_noisy is not None and 0 < is_noisy.sum() < len(is_noisy):
        figures |= {f"noise_{k}": round(v, 4) for k, v in noise_detection_metrics(scores, is_noisy).items()}
    if job.args.plots:
        plot_histogram(scores, job.output_dir / "self_influence_histogram.png", f"self-influence ({job.args.method})", is_noisy)
        if is_noisy is not None and 0 < is_noisy.sum() < len(is_noisy):
            plot_precision_recall(scores, is_noisy, job.output_dir / "precision_recall.png", f"finding {job.args.noise_column} rows")
    return figures


def _write_pairwise(job: ScoringJob, scores: torch.Tensor | KnnScores) -> dict:
    """``scores.parquet`` in long form (one row per test/train pair) and a histogram."""
    if isinstance(scores, KnnScores):
        values, train_index = scores.scores, scores.indices  # [n_test, k] each
        extra = {"neighbor_rank": torch.arange(values.shape[1]).repeat(values.shape[0])}
    else:
        values, train_index = scores, torch.arange(scores.shape[1]).expand_as(scores)  # [n_test, n_train]
        extra = {}
    test_index = torch.arange(values.shape[0]).repeat_interleave(values.shape[1])
    write_parquet(job.output_dir / "scores.parquet", {"test_index": test_index, "train_index": train_index.flatten(),
                                                       "score": values.double().flatten(), **extra})
    if job.args.plots:
        plot_histogram(values.flatten(), job.output_dir / "scores_histogram.png", f"test-vs-train scores ({job.args.method})")
    best = values.argmax(dim=1)
    return {"test_rows": values.shape[0], "most_helpful_train_row_of_test_0": int(train_index[0, best[0]]),
            "score_median": float(values.median()), "score_max": float(values.max()), "score_min": float(values.min())}

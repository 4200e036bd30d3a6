"""``hf-influence filter``: drop the most self-influential training rows (likely mislabelled) and save the rest.

Runs the sharded, resumable self-influence scoring of ``hf-influence score --kind self`` (shards an
earlier score run saved are reused, not recomputed), then drops the top ``--fraction`` of rows
(0.05 unless ``--threshold`` is given) or every row whose self-influence exceeds ``--threshold``.
Writes ``filtered_dataset/`` (the training data as read, kept rows in their order, with
``row_index`` and ``self_influence``; ``datasets.load_from_disk``) with a dataset card
(``README.md``), and the ``filter`` section of ``influence_config.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from huggingface_hub import DatasetCard, DatasetCardData

from ..metrics import check_filter_rule, noisy_mask
from ..outputs import save_dataset
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .outputs import noise_labels, print_table
from .score import ScoringArguments, ScoringJob, check_request, load_job, score_self_influence, scored_dataset, shard_summary, summary_rows
from .session import Session

FILTERED_DIR = "filtered_dataset"


@dataclass
class FilterArguments:
    """Which rows ``hf-influence filter`` drops (one rule)."""

    fraction: float | None = field(default=None, metadata={"help": "Drop this share of rows, highest self-influence first "
                                                                    "(default 0.05 when --threshold is not given)."})
    threshold: float | None = field(default=None, metadata={"help": "Drop every row whose self-influence exceeds this value."})

    def __post_init__(self):
        if self.fraction is None and self.threshold is None:
            self.fraction = 0.05
        check_filter_rule(self.fraction, self.threshold)


def run_filter(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments,
               scoring: ScoringArguments, args: FilterArguments) -> dict:
    """Score self-influence (resuming), write the filtered dataset and its card, print a summary; return it."""
    check_request(data_args, inf_args, scoring)
    with Session(model_args, inf_args, progress=False) as run:
        job = load_job(run, data_args, scoring)
        run.wait()  # scoring time starts when every rank has loaded
        scoring_start = time.perf_counter()
        result = score_self_influence(job)
        summary = shard_summary(result, time.perf_counter() - scoring_start)
        if job.is_main and result.scores is not None:
            summary |= _write_filtered(job, result.scores, args)
        run.finish("filter", (model_args, data_args, inf_args, scoring, args), summary)
        if job.is_main:
            print_table(f"hf-influence filter ({_rule(args)})", summary_rows(summary, inf_args.output_dir))
    return summary


def _write_filtered(job: ScoringJob, scores: torch.Tensor, args: FilterArguments) -> dict:
    drop = noisy_mask(scores, args.fraction, args.threshold)  # [N] bool
    kept = scored_dataset(job.raw_train, scores).select(torch.nonzero(~drop).flatten().tolist())
    figures = {"kept": int((~drop).sum()), "removed": int(drop.sum()),
               "lowest_removed_score": float(scores[drop].min()) if drop.any() else None}
    is_noisy = noise_labels(job.raw_train, job.args.noise_column)
    if is_noisy is not None:
        figures |= {"removed_noisy": int(is_noisy[drop.numpy()].sum()), "noisy_total": int(is_noisy.sum())}
    save_dataset(kept, job.output_dir / FILTERED_DIR, _card(job, args, figures))
    return figures


def _rule(args: FilterArguments) -> str:
    return f"fraction {args.fraction}" if args.threshold is None else f"threshold {args.threshold}"


def _card(job: ScoringJob, args: FilterArguments, figures: dict) -> DatasetCard:
    """A dataset card saying what was removed, how, and with which model."""
    data = DatasetCardData(tags=["hf-influence", "influence-functions", "data-filtering"])
    model = job.run.model_info
    return DatasetCard(
        f"---\n{data.to_yaml()}\n---\n\n# Training data filtered by self-influence\n\n"
        f"{figures['removed']} of {figures['removed'] + figures['kept']} rows were removed ({_rule(args)}): the rows "
        f"with the highest self-influence `g_zᵀ (H + λI)^-1 g_z` ({job.args.method}, damping {job.inf.damping}), which "
        "are the likeliest to be mislabelled or atypical. Kept rows keep their order; `row_index` is their row in the "
        "original training data and `self_influence` their score.\n\n"
        f"- model: `{model['name_or_path']}` ({model['class']}, weights fingerprint `{model['fingerprint'][:16]}`)\n"
        f"- parameters: {model['num_params']:,} in {len(model['param_names'])} tensors\n"
        f"- settings and library versions: `influence_config.json` in the run's output folder\n"
    )

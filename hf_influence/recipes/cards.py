"""Model and dataset cards of a recipe run, rendered from the package's templates with huggingface_hub.

The model card's metadata carries the quality before and after filtering and the noise-detection
figures as ``model-index`` results (``EvalResult``), so the Hub shows them and
``ModelCard.load(path).data.eval_results`` reads them back.
"""

from __future__ import annotations

from pathlib import Path
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).parent / "templates"
TAGS = ["hf-influence", "influence-functions", "data-filtering"]
_TASK_TYPES = {"nli": ("text-classification", "Natural Language Inference"), "translation": ("translation", "Translation")}


def _results(run: dict) -> list[EvalResult]:
    """Quality of each training set on the test set, and each ranking's detection AUC / AP on the noisy training set."""
    task_type, task_name = _TASK_TYPES[run["task"]]
    results = []
    for training, runs in run["quality"].items():
        results.append(EvalResult(
            task_type=task_type, task_name=task_name, dataset_type=run["dataset_id"], dataset_config=run.get("dataset_config"), dataset_name=run["test_name"],
            dataset_split="test", metric_type=run["quality_name"], metric_value=round(sum(runs) / len(runs), 4),
            metric_name=f"{run['quality_name']} after training on the {training} data (mean of {len(runs)} runs)"))
    for ranking, row in run["detection"].items():
        for metric in ("auc", "ap"):
            results.append(EvalResult(
                task_type="noise-detection", task_name="Noisy training pair detection", dataset_type=run["dataset_id"], dataset_config=run.get("dataset_config"),
                dataset_name=f"{run['dataset_name']} with synthetic noise", dataset_split="train", metric_type=f"noise_detection_{metric}",
                metric_value=round(row[metric], 4), metric_name=f"{ranking} {metric.upper()}"))
    return results


def model_card(run: dict) -> ModelCard:
    """The card of the model retrained on the filtered data (``run``: the recipe's results, see ``run_recipe``)."""
    data = ModelCardData(
        model_name=run["model_name"], library_name="transformers", tags=TAGS + [run["task"]], datasets=[run["dataset_id"]],
        metrics=[run["quality_name"], "noise_detection_auc", "noise_detection_ap"], eval_results=_results(run),
        language=run.get("languages"), license="apache-2.0",
    )
    return ModelCard.from_template(data, template_path=str(TEMPLATES / "model_card.md"), **run)


def dataset_card(run: dict) -> DatasetCard:
    """The card of the filtered training set."""
    data = DatasetCardData(pretty_name=f"{run['dataset_name']} filtered by {run['filter_method']}", tags=TAGS,
                           language=run.get("languages"), size_categories=[_size_category(run["kept"])])
    return DatasetCard.from_template(data, template_path=str(TEMPLATES / "dataset_card.md"), pretty_name=data.pretty_name, **run)


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "n>1M"

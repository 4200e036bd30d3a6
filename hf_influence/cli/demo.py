"""``hf-influence demo``: the embedded default. No network, no files needed, minutes on a CPU.

Generates a small NLI-style task, trains a word-level tokenizer (both from `hf_influence.recipes.presets`),
flips 10% of the training labels, and trains a tiny BERT with `InfluenceTrainer`. Through the trainer it then fits an Arnoldi basis
(``fit_influence``), ranks training pairs by self-influence (``self_influence``), reports how well
each ranking finds the flipped pairs (AUC, AP), removes the top-ranked fraction
(``filter_noisy``) and retrains to compare test accuracy before and after. Everything lands in
``--output_dir``: the basis and score shards under ``noisy/influence/``, plots and a summary.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, PrinterCallback

from .._utils.errors import InvalidInputError
from .._utils.io import atomic_path
from ..metrics import noise_detection_metrics
from ..outputs import ROW_INDEX
from ..plots import plot_histogram, plot_precision_recall
from ..recipes.noise import NOISY_COLUMN, flip_labels
from ..recipes.presets import LABELS, build_tokenizer, fast_tokenizer, make_dataset, make_pair, tiny_bert_classifier
from ..trainer import InfluenceTrainer, InfluenceTrainingArguments


@dataclass
class DemoArguments:
    """Settings of the embedded demo (all defaulted)."""

    output_dir: str = field(default="hf_influence_demo", metadata={"help": "Where the trainers' outputs, plots and summary are written."})
    num_train: int = field(default=1200, metadata={"help": "Training pairs generated."})
    num_test: int = field(default=300, metadata={"help": "Held-out pairs for accuracy."})
    noise_fraction: float = field(default=0.1, metadata={"help": "Fraction of training labels flipped."})
    filter_fraction: float = field(default=0.1, metadata={"help": "Fraction removed by self-influence before retraining."})
    epochs: int = field(default=30, metadata={"help": "Training epochs (each run)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate (warm-up over the first tenth of the steps, then linear decay)."})
    retrain_seeds: int = field(default=3, metadata={
        "help": "Training runs (seeds seed, seed+1, ...) averaged for each accuracy: one tiny-BERT run swings by several points."})
    rank: int = field(default=20, metadata={"help": "Arnoldi rank p̄."})
    iterations: int = field(default=40, metadata={"help": "Arnoldi iterations n."})
    hessian_examples: int = field(default=256, metadata={"help": "Training pairs whose mean loss defines the Hessian."})
    seed: int = field(default=0, metadata={"help": "Seed for data, noise, model and basis."})

    def __post_init__(self):
        for name in ("noise_fraction", "filter_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidInputError(f"--{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.num_train < 20 or self.num_test < 1:
            raise InvalidInputError("--num_train must be >= 20 and --num_test >= 1.")
        if self.retrain_seeds < 1 or self.epochs < 1:
            raise InvalidInputError(f"--retrain_seeds and --epochs must be >= 1, got {self.retrain_seeds} and {self.epochs}.")
        if not 1 <= self.rank <= self.iterations:
            raise InvalidInputError(f"Need 1 <= --rank <= --iterations, got {self.rank} and {self.iterations}.")


def build_trainer(dataset: Dataset, tokenizer: PreTrainedTokenizerFast, output_dir: Path, args: DemoArguments, seed: int) -> InfluenceTrainer:
    """A fresh tiny BERT initialised from ``seed`` in an `InfluenceTrainer`, which trains it and scores its data."""
    torch.manual_seed(seed)
    training = InfluenceTrainingArguments(
        output_dir=str(output_dir), num_train_epochs=args.epochs, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=args.learning_rate, warmup_steps=0.1, lr_scheduler_type="linear", weight_decay=0.01, seed=seed, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        influence_rank=args.rank, influence_iterations=args.iterations, influence_hessian_examples=args.hessian_examples,
        influence_batch_size=32, influence_shard_size=256, influence_seed=args.seed,
    )
    model = tiny_bert_classifier(len(tokenizer), tokenizer.pad_token_id, hidden_size=64, num_layers=2, max_length=32, num_labels=len(LABELS))
    trainer = InfluenceTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # the demo prints its own stage lines
    return trainer


def train_runs(dataset: Dataset, tokenizer: PreTrainedTokenizerFast, test: Dataset, output_dir: Path, args: DemoArguments) -> tuple[InfluenceTrainer, list[float]]:
    """Train ``retrain_seeds`` models on ``dataset``; the first run's trainer and every run's test accuracy."""
    first, accuracies = None, []
    for seed in range(args.seed, args.seed + args.retrain_seeds):
        trainer = build_trainer(dataset, tokenizer, output_dir, args, seed)
        trainer.train()
        accuracies.append(accuracy(trainer, test))
        first = trainer if first is None else first
    return first, accuracies


def predictions(trainer: InfluenceTrainer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, 3]`` and labels ``[N]`` of ``dataset`` under the trainer's model."""
    output = trainer.predict(dataset)
    return torch.as_tensor(output.predictions), torch.as_tensor(output.label_ids)


def accuracy(trainer: InfluenceTrainer, dataset: Dataset) -> float:
    logits, labels = predictions(trainer, dataset)
    return float((logits.argmax(-1) == labels).double().mean())


def per_example_loss(trainer: InfluenceTrainer, dataset: Dataset) -> torch.Tensor:
    logits, labels = predictions(trainer, dataset)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def run_demo(args: DemoArguments) -> dict:
    """Run the whole demo; print a report and return the figures."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    rng = random.Random(args.seed)
    pairs = [make_pair(rng) for _ in range(args.num_train + args.num_test)]
    tokenizer = fast_tokenizer(build_tokenizer([t for p, h, _ in pairs for t in (p, h)]))
    clean_train, test = make_dataset(pairs[: args.num_train], tokenizer), make_dataset(pairs[args.num_train :], tokenizer)
    train, _ = flip_labels(clean_train, args.noise_fraction, seed=args.seed, column="labels", num_labels=len(LABELS))
    is_noisy, train = list(train[NOISY_COLUMN]), train.remove_columns(NOISY_COLUMN)
    print(f"[1/5] data: {len(train)} training pairs ({sum(is_noisy)} labels flipped), {len(test)} test pairs")

    trainer, noisy_runs = train_runs(train, tokenizer, test, output_dir / "noisy", args)
    noisy_accuracy = statistics.fmean(noisy_runs)
    print(f"[2/5] InfluenceTrainer trained a tiny BERT on the noisy data: test accuracy {_runs(noisy_runs)}")

    trainer.fit_influence()
    rankings = {
        "arnoldi self-influence": trainer.self_influence(),
        "tracin self-influence": trainer.self_influence(method="tracin"),
        "loss": per_example_loss(trainer, train),
        "random": torch.rand(len(train), generator=torch.Generator().manual_seed(args.seed)),
    }
    detection = {name: noise_detection_metrics(scores, is_noisy) for name, scores in rankings.items()}
    _print_detection(detection, sum(is_noisy), len(train))
    _plot(rankings["arnoldi self-influence"], is_noisy, output_dir)

    filtered = trainer.filter_noisy(fraction=args.filter_fraction)
    removed_noisy = sum(is_noisy) - sum(is_noisy[i] for i in filtered[ROW_INDEX])
    filtered_runs = train_runs(filtered, tokenizer, test, output_dir / "filtered", args)[1]
    filtered_accuracy = statistics.fmean(filtered_runs)
    print(f"[4/5] filter_noisy removed {len(train) - len(filtered)} top self-influence pairs ({removed_noisy} of them flipped); "
          f"retrained: test accuracy {_runs(filtered_runs)} (noisy data: {noisy_accuracy:.3f})")

    summary = {"detection": detection, "accuracy_noisy": noisy_accuracy, "accuracy_filtered": filtered_accuracy,
               "accuracy_runs": {"noisy": noisy_runs, "filtered": filtered_runs},
               "removed": len(train) - len(filtered), "removed_noisy": int(removed_noisy), "seconds": time.perf_counter() - start,
               "arguments": vars(args)}
    with atomic_path(output_dir / "demo_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"[5/5] done in {summary['seconds']:.0f}s; {output_dir}/ holds:")
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        print(f"      {path.relative_to(output_dir)}")
    return summary


def _runs(accuracies: list[float]) -> str:
    """Mean accuracy, and the runs behind it when there are several."""
    if len(accuracies) == 1:
        return f"{accuracies[0]:.3f}"
    return f"{statistics.fmean(accuracies):.3f} (mean of {len(accuracies)} runs: {', '.join(f'{a:.3f}' for a in accuracies)})"


def _print_detection(detection: dict, num_noisy: int, num_train: int) -> None:
    print(f"[3/5] noise detection ({num_noisy} flipped of {num_train}):")
    print(f"      {'ranking':26s}{'AUC':>8s}{'AP':>8s}{'P@k':>8s}")
    for name, m in detection.items():
        print(f"      {name:26s}{m['auc']:8.3f}{m['ap']:8.3f}{m['precision_at_k']:8.3f}")


def _plot(scores: torch.Tensor, is_noisy: list[bool], output_dir: Path) -> None:
    plot_histogram(scores, output_dir / "self_influence_histogram.png", "Arnoldi self-influence", np.asarray(is_noisy))
    plot_precision_recall(scores, np.asarray(is_noisy), output_dir / "precision_recall.png", "finding the flipped labels")

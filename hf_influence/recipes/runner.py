"""``hf-influence recipe``: corrupt a training set, find the corruption by self-influence, filter, retrain, compare.

The shape of Schioppa et al. (2023): synthetic noise with known rows (flipped NLI labels, permuted
translation references), noise-detection AUC / AP of every ranking side by side (random, loss or
perplexity, TracIn, random projection, the empirical Fisher's eigenbasis, Arnoldi at several p̄, LiSSA on a subset), then the test
quality of models trained on the clean, the noisy and the filtered data. Writes under ``output_dir``:
``noise.json``, ``results.json``, ``results.md``, the model card (``README.md``) and the filtered
training set with its card (``filtered_dataset/``); ``card_dir`` gets copies of both cards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from .._utils.errors import InvalidInputError
from .._utils.io import atomic_path
from ..config import BasisConfig, InfluenceConfig, ScoringConfig
from ..engine.ihvp.lissa import choose_lissa_config
from ..metrics import noisy_mask
from ..outputs import ROW_INDEX, library_versions, save_dataset
from .cards import dataset_card, model_card
from .data import hub_id, load_nli, load_translation
from .noise import NOISY_COLUMN, NoiseRecord
from .tasks import RECIPE_TASKS, influence_settings, load_metric

BASELINES = ("random", "loss", "tracin", "randproj", "fisher", "lissa")
LISSA_MAX_REPEATS = 2


@dataclass
class RecipeArguments:
    """Settings of a recipe run (YAML configs in ``recipes/nli`` and ``recipes/translation``)."""

    task: str = field(default="nli", metadata={"help": "'nli' (label flips, accuracy) or 'translation' (permuted references, BLEU)."})
    dataset: str = field(default="sick", metadata={"help": "sick, snli, multi30k (local, with data_dir) or glue/mnli, hub/snli, wmt16 (Hub)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the local corpus (../shared/data/<name> here)."})
    test_dir: str | None = field(default=None, metadata={"help": "Translation: a WMT21 newstest folder to test on instead."})
    source_lang: str = field(default="en", metadata={"help": "Translation source language."})
    target_lang: str = field(default="de", metadata={"help": "Translation target language."})
    max_train: int | None = field(default=None, metadata={"help": "Seeded random subset of the training set (reduced runs)."})
    max_test: int | None = field(default=None, metadata={"help": "Seeded random subset of the test set."})
    noise_fraction: float = field(default=0.1, metadata={"help": "Share of training rows corrupted (NLI 0.1, translation 0.06)."})
    filter_fraction: float | None = field(default=None, metadata={"help": "Share removed before retraining (default: noise_fraction)."})
    filter_method: str = field(default="arnoldi", metadata={"help": "Ranking that filters: arnoldi (largest p̄) or tracin."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from this checkpoint; default: a small model from config."})
    hidden_size: int = field(default=64, metadata={"help": "From-config model width."})
    num_layers: int = field(default=2, metadata={"help": "From-config model depth (encoder and decoder each)."})
    overlap_hint: bool = field(default=False, metadata={"help": "NLI: append the words the hypothesis adds to and drops from the premise "
                                                                  "(exact-match features) for small models trained from scratch."})
    max_length: int = field(default=64, metadata={"help": "Tokens per side (truncation), and generation limit."})
    min_word_frequency: int = field(default=2, metadata={"help": "Translation word-level vocabulary: minimum count."})
    num_beams: int = field(default=1, metadata={"help": "Translation: beams when generating the test set."})
    epochs: int = field(default=8, metadata={"help": "Training epochs of every run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (warm-up over the first tenth of the steps, then linear decay)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    retrain_seeds: int = field(default=1, metadata={"help": "Runs averaged for each quality figure (clean, noisy, filtered)."})
    last_n_layers: int | None = field(default=None, metadata={"help": "Influence over the last k layers + head, no embeddings."})
    params: list[str] | None = field(default=None, metadata={"help": "Influence over the parameters matching these regexes instead "
                                                                     "(e.g. classifier pooler: the head alone)."})
    damping: float = field(default=InfluenceConfig.damping, metadata={"help": "Additive damping λ."})
    ranks: list[int] = field(default_factory=lambda: [10, 20, 50], metadata={"help": "Arnoldi p̄ values compared (one basis, truncated)."})
    iterations: int = field(default=BasisConfig.iterations, metadata={"help": "Arnoldi iterations (>= the largest p̄)."})
    hessian_examples: int | None = field(default=InfluenceConfig.hessian_examples, metadata={
        "help": "The Hessian is that of the mean loss over a seeded random subset of this many training rows."})
    influence_batch_size: int = field(default=InfluenceConfig.batch_size, metadata={"help": "Examples per batch when scoring."})
    shard_size: int = field(default=ScoringConfig.shard_size, metadata={"help": "Rows per saved score shard (resumable)."})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata={"help": f"Rankings beside Arnoldi: {', '.join(BASELINES)}."})
    lissa_subset: int = field(default=256, metadata={"help": "LiSSA self-influence costs one solve per row: scored on this many rows."})
    output_dir: str = field(default="recipe_output", metadata={"help": "Where results, cards and the filtered set go."})
    card_dir: str | None = field(default=None, metadata={"help": "Also copy the cards here, as <name>.md and <name>.dataset.md."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run's cards (default: <task>-<dataset>)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    seed: int = field(default=0, metadata={"help": "Seed of subsets, noise, models and bases."})

    def __post_init__(self):
        if self.task not in RECIPE_TASKS:
            raise InvalidInputError(f"task must be one of {sorted(RECIPE_TASKS)}, got {self.task!r}.")
        self.filter_fraction = self.noise_fraction if self.filter_fraction is None else self.filter_fraction
        for name in ("noise_fraction", "filter_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidInputError(f"{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.filter_method not in ("arnoldi", "tracin"):
            raise InvalidInputError(f"filter_method must be 'arnoldi' or 'tracin', got {self.filter_method!r}.")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise InvalidInputError(f"Unknown baselines {sorted(unknown)}; choose from {BASELINES}.")
        if not self.ranks or min(self.ranks) < 1 or max(self.ranks) > self.iterations:
            raise InvalidInputError(f"ranks must be >= 1 and <= iterations ({self.iterations}), got {self.ranks}.")
        if self.overlap_hint and self.task != "nli":
            raise InvalidInputError("overlap_hint is an NLI setting (premise / hypothesis words); drop it for translation.")
        influence_settings(self)  # every influence rule, checked once, in hf_influence.config
        if self.retrain_seeds < 1 or self.epochs < 1:
            raise InvalidInputError("retrain_seeds and epochs must be >= 1.")


def _subset(data: Dataset, size: int | None, seed: int) -> Dataset:
    return data if size is None or size >= len(data) else data.shuffle(seed=seed).select(range(size))


def _load(args: RecipeArguments) -> tuple[Dataset, Dataset]:
    if args.task == "nli":
        return load_nli(args.dataset, args.data_dir)
    return load_translation(args.dataset, args.data_dir, args.source_lang, args.target_lang, args.test_dir)


def _say(message: str) -> None:
    """Progress lines from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function, *arguments):
        start = time.perf_counter()
        result = function(*arguments)
        self.seconds[name] = time.perf_counter() - start
        return result


def _train(recipe, data: Dataset, test: Dataset, output_dir: Path, args: RecipeArguments, label: str) -> tuple[Any, list[float]]:
    """``retrain_seeds`` runs on ``data``: the first run's trainer and every run's test quality."""
    first, runs = None, []
    for seed in range(args.seed, args.seed + args.retrain_seeds):
        trainer = recipe.trainer(data, output_dir / label, seed)
        trainer.train()
        runs.append(float(recipe.quality(trainer, test)))
        first = first or trainer
        _say(f"      {label} data, seed {seed}: {recipe.quality_name} {runs[-1]:.3f}")
    return first, runs


def _rankings(trainer, recipe, noisy: Dataset, args: RecipeArguments, timer: _Timer) -> tuple[dict[str, torch.Tensor], dict]:
    """Every ranking's score per training row (higher = more suspect); LiSSA's on its subset only."""
    scores: dict[str, torch.Tensor] = {}
    basis = timer.run("arnoldi fit", trainer.fit_influence)  # its time is added to every Arnoldi row below
    inf, loader = trainer.get_influence(), trainer.get_influence_dataloader(noisy)
    hessian_loader = trainer.get_influence_dataloader(trainer.get_hessian_dataset(noisy))  # the rows Arnoldi's Hessian averages
    for rank in sorted(args.ranks):
        truncated = dataclasses.replace(basis, eigenvalues=basis.eigenvalues[:rank], eigenvectors=basis.eigenvectors[:rank])
        name = f"arnoldi p̄={rank}"
        scores[name] = timer.run(name, trainer.self_influence) if rank == max(args.ranks) else \
            timer.run(name, lambda: inf.self_influence(loader, method="arnoldi", basis=truncated))
        timer.seconds[name] += timer.seconds["arnoldi fit"]
    if "tracin" in args.baselines:
        scores["tracin"] = timer.run("tracin", trainer.self_influence, None, "tracin")
    if "randproj" in args.baselines:
        scores[f"randproj p̄={max(args.ranks)}"] = timer.run(f"randproj p̄={max(args.ranks)}", lambda: inf.self_influence(loader, method="randproj", rank=max(args.ranks), hessian_data=hessian_loader))
    if "fisher" in args.baselines:
        name = f"fisher eigenbasis p̄={max(args.ranks)}"
        scores[name] = timer.run(name, lambda: inf.self_influence(loader, method="arnoldi", basis=inf.fit_fisher(hessian_loader, rank=max(args.ranks))))
    if "loss" in args.baselines:
        scores[recipe.loss_name] = timer.run(recipe.loss_name, recipe.loss, trainer, noisy)
    if "random" in args.baselines:
        scores["random"] = torch.rand(len(noisy), generator=torch.Generator().manual_seed(args.seed))
        timer.seconds["random"] = 0.0
    subset = {}
    if "lissa" in args.baselines:
        rows = sorted(random.Random(f"lissa subset {args.seed}").sample(range(len(noisy)), min(args.lissa_subset, len(noisy))))
        subset_loader = trainer.get_influence_dataloader(noisy.select(rows))

        def solve():
            config = _lissa_config(inf, hessian_loader, args)
            return config, inf.self_influence(subset_loader, method="lissa", hessian_data=hessian_loader, lissa=config)

        config, lissa = timer.run("lissa", solve)
        subset = {"rows": rows, "lissa": lissa, "damping": config.damping, "beside": f"arnoldi p̄={max(args.ranks)}"}
    return scores, subset


def _lissa_config(inf, hessian_loader, args: RecipeArguments):
    """Auto LiSSA settings, with at most ``LISSA_MAX_REPEATS`` repeats (one solve per row is the cost
    of this baseline); the damping is raised to twice ``|λ_min|`` where the Hessian is indefinite (the
    recursion diverges otherwise), as Koh & Liang raised it for non-convex models."""
    spectrum = inf.spectrum(hessian_loader)
    damping = args.damping
    if spectrum.lambda_min is not None and spectrum.lambda_min + damping <= 0:
        damping = 2 * -spectrum.lambda_min
    config = choose_lissa_config(spectrum, damping, len(hessian_loader.dataset), seed=args.seed)
    return dataclasses.replace(config, max_repeats=min(config.max_repeats or config.repeats, LISSA_MAX_REPEATS))


def _detection(scores: dict[str, torch.Tensor], subset: dict, is_noisy: list[bool], timer: _Timer) -> dict[str, dict]:
    metric = load_metric("noise_detection")
    table = {name: {**metric.compute(predictions=s.tolist(), references=[int(n) for n in is_noisy]), "seconds": timer.seconds[name]}
             for name, s in scores.items()}
    if subset:
        noisy_rows = [int(is_noisy[r]) for r in subset["rows"]]
        if 0 < sum(noisy_rows) < len(noisy_rows):
            best = subset["beside"]
            table[f"lissa, λ={subset['damping']:.3g} ({len(noisy_rows)}-row subset)"] = {**metric.compute(predictions=subset["lissa"].tolist(), references=noisy_rows),
                                                                 "seconds": timer.seconds["lissa"]}
            table[f"{best} (same subset)"] = {**metric.compute(predictions=scores[best][subset["rows"]].tolist(), references=noisy_rows),
                                              "seconds": timer.seconds[best] * len(noisy_rows) / len(is_noisy)}
    return table


def _command() -> str:
    argv = sys.argv[sys.argv.index("recipe"):] if "recipe" in sys.argv else sys.argv[1:]
    return shlex.join(["hf-influence", *argv])


def _markdown(run: dict) -> str:
    lines = [f"# {run['model_name']}", "", f"`{run['command']}`", "", "| ranking | AUC | AP | precision@k | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['auc']:.3f} | {r['ap']:.3f} | {r['precision_at_k']:.3f} | {r['seconds']:.1f} |" for n, r in run["detection"].items()]
    lines += ["", f"| training data | {run['quality_name']} (mean) | runs |", "|---|---:|---|"]
    lines += [f"| {n} | {sum(r) / len(r):.3f} | {', '.join(f'{x:.3f}' for x in r)} |" for n, r in run["quality"].items()]
    return "\n".join(lines) + "\n"


def run_recipe(args: RecipeArguments) -> dict:
    """Run the whole recipe; print progress and return the results (also written to ``output_dir``)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise InvalidInputError("The recipe scores its training rows in the processes that train, and influence needs whole "
                                "parameters: launch it with multi_gpu.yaml (DDP) or one process, not under FSDP.")
    start, timer = time.perf_counter(), _Timer()
    output_dir = Path(args.output_dir)
    train, test = _load(args)
    train, test = _subset(train, args.max_train, args.seed), _subset(test, args.max_test, args.seed + 1)
    train = train.add_column(ROW_INDEX, list(range(len(train))))
    task = RECIPE_TASKS[args.task]
    noisy_raw, record = task.noise(train, args.noise_fraction, args.seed)
    is_noisy = list(noisy_raw[NOISY_COLUMN])
    recipe = task(args, noisy_raw)
    clean, noisy, test_set = (recipe.encode(d) for d in (train, noisy_raw.remove_columns(NOISY_COLUMN), test))
    _say(f"[1/5] {args.dataset}: {len(train)} training rows ({sum(is_noisy)} corrupted: {record.kind}), {len(test)} test rows")

    _say("[2/5] training on the clean and the noisy data")
    quality = {"clean": _train(recipe, clean, test_set, output_dir, args, "clean")[1]}
    trainer, quality["noisy"] = _train(recipe, noisy, test_set, output_dir, args, "noisy")

    _say("[3/5] ranking the training rows")
    scores, subset = _rankings(trainer, recipe, noisy, args, timer)
    detection = _detection(scores, subset, is_noisy, timer)
    for name, row in detection.items():
        _say(f"      {name:34s} AUC {row['auc']:.3f}  AP {row['ap']:.3f}  P@k {row['precision_at_k']:.3f}  {row['seconds']:.1f}s")

    filter_scores = scores[f"arnoldi p̄={max(args.ranks)}"] if args.filter_method == "arnoldi" else scores["tracin"]
    drop = noisy_mask(filter_scores, fraction=args.filter_fraction)
    kept_rows = torch.nonzero(~drop).flatten().tolist()
    filtered = noisy.select(kept_rows)
    removed_noisy = sum(is_noisy[i] for i in torch.nonzero(drop).flatten().tolist())
    _say(f"[4/5] removed {int(drop.sum())} rows by {args.filter_method} self-influence ({removed_noisy} of them corrupted); retraining")
    quality["filtered"] = _train(recipe, filtered, test_set, output_dir, args, "filtered")[1]

    name = args.run_name or f"{args.task}-{args.dataset.replace('/', '-')}"
    dataset_id, dataset_config = hub_id(args.dataset)
    run = {
        "model_name": name, "task": args.task, "command": _command(), "processes": int(os.environ.get("WORLD_SIZE", "1")), "dataset_name": args.dataset,
        "dataset_id": dataset_id, "dataset_config": dataset_config,
        "data_dir": args.data_dir, "test_name": f"{args.dataset} test" if not args.test_dir else "WMT21 newstest", "num_train": len(train),
        "num_test": len(test), "noise": dataclasses.asdict(record), "filter_method": args.filter_method,
        "filter_fraction": args.filter_fraction, "removed": int(drop.sum()), "removed_noisy": int(removed_noisy), "kept": len(kept_rows),
        "detection": detection, "quality": quality, "quality_name": recipe.quality_name, "versions": library_versions(),
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "card_dir", "run_name")},
        "languages": [args.source_lang, args.target_lang] if args.task == "translation" else ["en"],
        "summary": f"{'An NLI' if args.task == 'nli' else 'A translation'} model retrained on {args.dataset} after removing the {args.filter_fraction:.0%} most self-influential "
                   f"training rows, from a run that corrupted {args.noise_fraction:.0%} of them on purpose to measure detection.",
    }
    if trainer.is_world_process_zero():
        _write(run, filtered, output_dir, args, name)
    run["seconds"] = time.perf_counter() - start
    _say(f"[5/5] {recipe.quality_name}: clean {_mean(quality['clean']):.3f}, noisy {_mean(quality['noisy']):.3f}, filtered "
         f"{_mean(quality['filtered']):.3f}; done in {run['seconds']:.0f}s; results in {output_dir}/")
    return run


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _write(run: dict, filtered: Dataset, output_dir: Path, args: RecipeArguments, name: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    NoiseRecord(**run["noise"]).save(output_dir / "noise.json")
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(run, indent=1, default=str))
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(_markdown(run))
    save_dataset(filtered, output_dir / "filtered_dataset", dataset_card(run))
    model_card(run).save(str(output_dir / "README.md"))
    if args.card_dir:
        card_dir = Path(args.card_dir)
        card_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output_dir / "README.md", card_dir / f"{name}.md")
        shutil.copyfile(output_dir / "filtered_dataset" / "README.md", card_dir / f"{name}.dataset.md")

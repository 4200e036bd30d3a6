"""``hf-influence recipe``: corrupt a training set, find the corruption by every ranking, filter by each, retrain, compare.

The shape of Schioppa et al. (2023): synthetic noise with known rows (flipped NLI labels, permuted
translation references), noise-detection AUC / AP / precision@k of every ranking side by side (random,
loss or perplexity, TracIn, random projection, the empirical Fisher's eigenbasis, Arnoldi at several p̄,
LiSSA on a subset, validation influence), then the test quality of models trained on the clean, the
noisy and each filtered training set (``filter_methods``) and, with ``ceiling_arm``, the training set without exactly the
corrupted rows (the perfect filter), ``retrain_seeds`` runs each on the same seeds, with paired tests against
the noisy arm and the loss-filtered arm. Writes under ``output_dir``:
``noise.json``, ``rankings.safetensors`` and ``runs/`` (what a rerun resumes from), ``results.json``,
``results.md``, the model card (``README.md``) and the first filter's training set with its card
(``filtered_dataset/``); ``card_dir`` gets copies of both cards.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from datasets import Dataset

from .._utils.errors import InvalidInputError
from ..metrics import noisy_mask
from ..outputs import ROW_INDEX, library_versions
from .arguments import RecipeArguments
from .data import hub_id, load_nli, load_translation, load_validation
from .noise import NOISY_COLUMN
from .rankings import (Timer, compute_rankings, detection_table, load_rankings, ranking_name, rankings_exist, rankings_request,
                       save_rankings)
from .report import command_line, write_outputs
from .retraining import say, train_once
from .statistics import CEILING_ARM, ceiling_summary, filtering_summary
from .tasks import RECIPE_TASKS

__all__ = ["RecipeArguments", "run_recipe"]


def _subset(data: Dataset, size: int | None, seed: int) -> Dataset:
    return data if size is None or size >= len(data) else data.shuffle(seed=seed).select(range(size))


def _load(args: RecipeArguments) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(train, validation, test)``; the validation split only where validation influence needs it."""
    if args.task == "nli":
        train, test = load_nli(args.dataset, args.data_dir)
    else:
        train, test = load_translation(args.dataset, args.data_dir, args.source_lang, args.target_lang, args.test_dir)
    return train, load_validation(args.dataset, args.data_dir) if "val_influence" in args.baselines else None, test


def _rankings(recipe, noisy: Dataset, validation: Dataset | None, test: Dataset, args: RecipeArguments) -> tuple[dict, dict, dict]:
    """The saved rankings when they match these settings, else the model trained on the noisy data (first seed) ranks the rows."""
    request = rankings_request(args)
    saved = load_rankings(args.output_dir, request) if rankings_exist(args.output_dir) else None
    if saved is not None:
        say("      read back the saved rankings (rankings.safetensors)")
        return saved
    timer = Timer()
    _, trainer = train_once(recipe, noisy, test, args, "noisy", args.seed, keep_trainer=True)
    scores, subset = compute_rankings(trainer, recipe, noisy, validation, args, timer)
    scores = {name: s.float().cpu() for name, s in scores.items()}
    if trainer.is_world_process_zero():
        save_rankings(args.output_dir, scores, subset, timer.seconds, request)
    return scores, subset, timer.seconds


def _filtered_sets(noisy: Dataset, scores: dict, is_noisy: list[bool], args: RecipeArguments, loss_name: str) -> dict[str, dict]:
    """Per filter method: its arm name, the ranking's name, the kept rows and what was removed."""
    sets = {}
    for method in args.filter_methods:
        ranking = ranking_name(method, args, loss_name)
        drop = noisy_mask(scores[ranking], fraction=args.filter_fraction)
        removed = torch.nonzero(drop).flatten().tolist()
        sets[f"filtered by {ranking}"] = {"method": method, "ranking": ranking, "data": noisy.select(torch.nonzero(~drop).flatten().tolist()),
                                          "removed": len(removed), "removed_noisy": sum(is_noisy[i] for i in removed)}
    return sets


def _train_arms(recipe, arms: dict[str, Dataset], test: Dataset, args: RecipeArguments) -> dict[str, list[float]]:
    """Every arm at every seed, seed by seed (so a stopped run leaves whole seeds), each read back when saved."""
    quality: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in range(args.seed, args.seed + args.retrain_seeds):
        for arm, data in arms.items():
            quality[arm].append(train_once(recipe, data, test, args, arm, seed)[0])
    return quality


def run_recipe(args: RecipeArguments) -> dict:
    """Run the whole recipe; print progress and return the results (also written to ``output_dir``)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise InvalidInputError("The recipe scores its training rows in the processes that train, and influence needs whole "
                                "parameters: launch it with multi_gpu.yaml (DDP) or one process, not under FSDP.")
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    train, validation, test = _load(args)
    train, test = _subset(train, args.max_train, args.seed), _subset(test, args.max_test, args.seed + 1)
    train = train.add_column(ROW_INDEX, list(range(len(train))))
    task = RECIPE_TASKS[args.task]
    noisy_raw, record = task.noise(train, args.noise_fraction, args.seed)
    is_noisy = list(noisy_raw[NOISY_COLUMN])
    recipe = task(args, noisy_raw)
    clean, noisy, test_set = (recipe.encode(d) for d in (train, noisy_raw.remove_columns(NOISY_COLUMN), test))
    validation_set = recipe.encode(validation) if validation is not None else None
    say(f"[1/4] {args.dataset}: {len(train)} training rows ({sum(is_noisy)} corrupted: {record.kind}), {len(test)} test rows"
        + (f", {len(validation)} validation rows" if validation is not None else ""))

    say("[2/4] ranking the training rows with the model trained on the noisy data")
    scores, subset, seconds = _rankings(recipe, noisy, validation_set, test_set, args)
    detection = detection_table(scores, subset, is_noisy, seconds)
    for name, row in detection.items():
        say(f"      {name:34s} AUC {row['auc']:.3f}  AP {row['ap']:.3f}  P@k {row['precision_at_k']:.3f}  {row['seconds']:.1f}s")

    filtered = _filtered_sets(noisy, scores, is_noisy, args, recipe.loss_name)
    say(f"[3/4] training clean, noisy, {'the corruption removed, ' if args.ceiling_arm else ''}and {len(filtered)} filtered arm(s), "
        f"{args.retrain_seeds} seed(s) each: "
        + "; ".join(f"{arm}: {f['removed']} removed, {f['removed_noisy']} corrupted" for arm, f in filtered.items()))
    ceiling = {CEILING_ARM: noisy.select([i for i, corrupted in enumerate(is_noisy) if not corrupted])} if args.ceiling_arm else {}
    quality = _train_arms(recipe, {"clean": clean, "noisy": noisy, **ceiling, **{arm: f["data"] for arm, f in filtered.items()}}, test_set, args)
    loss_arm = next((arm for arm, f in filtered.items() if f["method"] == "loss"), None)
    filtering = filtering_summary(quality, {arm: f["ranking"] for arm, f in filtered.items()}, detection, loss_arm)
    for arm, f in filtered.items():
        filtering[arm].update(removed=f["removed"], removed_noisy=f["removed_noisy"])

    run = _results(args, recipe, record, train, test, detection, quality, filtering, filtered)
    if int(os.environ.get("RANK", "0")) == 0:
        write_outputs(run, next(iter(filtered.values()))["data"], output_dir, args.card_dir, run["model_name"])
    run["seconds"] = time.perf_counter() - start
    say(f"[4/4] {recipe.quality_name}: " + ", ".join(f"{arm} {sum(q) / len(q):.4f}" for arm, q in quality.items())
        + f"; done in {run['seconds']:.0f}s; results in {output_dir}/")
    return run


def _results(args, recipe, record, train, test, detection, quality, filtering, filtered) -> dict:
    """The run's results: what ``results.json`` and the cards hold."""
    name = args.run_name or f"{args.task}-{args.dataset.replace('/', '-')}"
    dataset_id, dataset_config = hub_id(args.dataset)
    first = next(iter(filtered.values()))
    return {
        "model_name": name, "task": args.task, "command": command_line(), "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "dataset_name": args.dataset, "dataset_id": dataset_id, "dataset_config": dataset_config, "data_dir": args.data_dir,
        "test_name": f"{args.dataset} test" if not args.test_dir else "WMT21 newstest", "num_train": len(train), "num_test": len(test),
        "noise": dataclasses.asdict(record), "filter_method": first["ranking"], "filter_fraction": args.filter_fraction,
        "removed": first["removed"], "removed_noisy": int(first["removed_noisy"]), "kept": len(first["data"]),
        "detection": detection, "quality": quality, "filtering": filtering, "ceiling": ceiling_summary(quality),
        "quality_name": recipe.quality_name,
        "versions": library_versions(), "seeds": list(range(args.seed, args.seed + args.retrain_seeds)),
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("output_dir", "card_dir", "run_name")},
        "languages": [args.source_lang, args.target_lang] if args.task == "translation" else ["en"],
        "summary": f"{'An NLI' if args.task == 'nli' else 'A translation'} model retrained on {args.dataset} after removing the "
                   f"{args.filter_fraction:.0%} most suspect training rows by {first['ranking']}, from a run that corrupted "
                   f"{args.noise_fraction:.0%} of them on purpose to measure detection; every filter compared below.",
    }

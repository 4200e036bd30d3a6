"""Training runs of the recipe's arms (clean, noisy, one filtered set per ranking), one per seed, resumable.

Every finished run's test quality is saved (checksummed, ``runs/<arm>/seed-<s>.json``) with a digest of
what it depends on: the training settings, the seed, and the training rows themselves. A rerun into the
same ``output_dir`` reads each matching result back instead of training again, so a killed run
continues where it stopped; a result made from other settings or other rows is trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from datasets import Dataset

from .._utils.io import read_json_artifact, write_json_artifact
from ..outputs import ROW_INDEX

# settings that change no training run: influence settings, and what happens after training
_NOT_TRAINING = ("filter_fraction", "filter_methods", "ceiling_arm", "retrain_seeds", "last_n_layers", "params", "damping", "ranks", "iterations",
                 "hessian_examples", "influence_batch_size", "memory_budget_gb", "shard_size", "baselines", "lissa_subset", "output_dir",
                 "card_dir", "run_name")


def say(message: str) -> None:
    """Progress lines from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def training_request(args: Any, data: Dataset, seed: int) -> str:
    """Digest of one run: every training setting, the seed, and the training rows (their original indices and labels)."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _NOT_TRAINING}
    label = "labels" if "labels" in data.column_names else "target"
    rows = {"index": list(data[ROW_INDEX]), "label": list(data[label])}
    return hashlib.sha256(json.dumps([settings, seed, rows], sort_keys=True, default=str).encode()).hexdigest()


def run_save_path(output_dir: str | Path, arm: str, seed: int) -> Path:
    return Path(output_dir) / "runs" / re.sub(r"[^A-Za-z0-9._-]+", "_", arm) / f"seed-{seed}.json"


def run_exists(output_dir: str | Path, arm: str, seed: int) -> bool:
    return run_save_path(output_dir, arm, seed).is_file()


def save_run(output_dir: str | Path, arm: str, seed: int, quality: float, request: str) -> None:
    path = run_save_path(output_dir, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_artifact(path, {"arm": arm, "seed": seed, "quality": quality, "request": request})


def load_run(output_dir: str | Path, arm: str, seed: int, request: str) -> float | None:
    """The saved quality of ``arm`` at ``seed``, or ``None`` when absent or made from other settings or rows."""
    if not run_exists(output_dir, arm, seed):
        return None
    saved = read_json_artifact(run_save_path(output_dir, arm, seed), "a recipe training result", "Delete it and rerun: that run "
                               "is trained again.", keys=("quality", "request"))
    return float(saved["quality"]) if saved["request"] == request else None


def train_once(recipe: Any, data: Dataset, test: Dataset, args: Any, arm: str, seed: int, keep_trainer: bool = False) -> tuple[float, Any]:
    """Test quality of ``arm`` trained with ``seed``: read back when saved, else trained (and saved by the main process).
    ``keep_trainer=True`` always trains and returns the trainer too (the rankings need the model)."""
    request = training_request(args, data, seed)
    saved = None if keep_trainer else load_run(args.output_dir, arm, seed, request)
    if saved is not None:
        say(f"      {arm}, seed {seed}: {recipe.quality_name} {saved:.4f} (saved)")
        return saved, None
    trainer = recipe.trainer(data, Path(args.output_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", arm), seed)
    trainer.train()
    quality = float(recipe.quality(trainer, test))
    if trainer.is_world_process_zero():
        save_run(args.output_dir, arm, seed, quality, request)
    say(f"      {arm}, seed {seed}: {recipe.quality_name} {quality:.4f}")
    return quality, trainer if keep_trainer else None

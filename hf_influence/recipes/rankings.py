"""Every ranking of the recipe's training rows (higher score = more suspect), its detection figures, and its file.

Self-influence by Arnoldi at several p̄, TracIn, random projection, the Fisher eigenbasis and LiSSA (on a
subset); the loss; a seeded random floor; and **validation influence**: each row's total influence on the
loss of a clean validation split, ``Σ_v g_vᵀ (H + λI)^-1 g_i`` (positive = the row helps the validation
set, so the rows that hurt it most, the most negative, rank first). All are computed on the model trained
on the noisy data with the first seed, and saved (checksummed) so a rerun into the same ``output_dir``
reads them back instead of retraining that model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from .._utils.io import read_tensors_artifact, save_tensors
from ..engine.ihvp.lissa import choose_lissa_config
from .tasks import load_metric

LISSA_MAX_REPEATS = 2
VALIDATION_INFLUENCE = "validation influence"
# settings that change no ranking (they act after it): a rerun that changes only these reuses the saved rankings
_AFTER_RANKING = ("filter_fraction", "filter_methods", "ceiling_arm", "retrain_seeds", "output_dir", "card_dir", "run_name")


class Timer:
    """Seconds taken by each named step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function, *arguments):
        start = time.perf_counter()
        result = function(*arguments)
        self.seconds[name] = time.perf_counter() - start
        return result


def ranking_name(method: str, args: Any, loss_name: str) -> str:
    """The detection-table row of a ``filter_methods`` entry (``"arnoldi"`` → ``"arnoldi p̄=50"``)."""
    top = max(args.ranks)
    names = {"arnoldi": f"arnoldi p̄={top}", "randproj": f"randproj p̄={top}", "fisher": f"fisher eigenbasis p̄={top}",
             "loss": loss_name, "val_influence": VALIDATION_INFLUENCE}
    return names.get(method, method)


def validation_influence(inf: Any, validation_data: Any, train_data: Any, method: str = "arnoldi", **options: Any) -> torch.Tensor:
    """Each training row's total influence on the validation loss: ``Σ_v scores[v, i]``, ``[N]``.

    ``inf.scores(validation_data, train_data, method, **options)`` summed over the validation rows (the
    validation side is projected once, then every training batch once). Positive = the row helps the
    validation set (removing it raises the validation loss, to first order); rank by its negative for noise.
    """
    return inf.scores(validation_data, train_data, method=method, **options).sum(0)  # [n_val, N] -> [N]


def compute_rankings(trainer: Any, recipe: Any, noisy: Any, validation: Any, args: Any, timer: Timer) -> tuple[dict[str, torch.Tensor], dict]:
    """Every ranking's score per training row (higher = more suspect); LiSSA's on its subset only."""
    scores: dict[str, torch.Tensor] = {}
    basis = timer.run("arnoldi fit", trainer.fit_influence)  # its time is added to every Arnoldi row below
    inf, loader = trainer.get_influence(), trainer.get_influence_dataloader(noisy)
    hessian_loader = trainer.get_influence_dataloader(trainer.get_hessian_dataset(noisy))  # the rows Arnoldi's Hessian averages
    for rank in sorted(args.ranks):
        truncated = dataclasses.replace(basis, eigenvalues=basis.eigenvalues[:rank], eigenvectors=basis.eigenvectors[:rank])
        name = f"arnoldi p̄={rank}"
        scores[name] = timer.run(name, trainer.self_influence, None, "arnoldi") if rank == max(args.ranks) else \
            timer.run(name, lambda: inf.self_influence(loader, method="arnoldi", basis=truncated))
        timer.seconds[name] += timer.seconds["arnoldi fit"]
    if "val_influence" in args.baselines:  # basis fit included, like the Arnoldi rows
        scores[VALIDATION_INFLUENCE] = -timer.run(VALIDATION_INFLUENCE, lambda: validation_influence(
            inf, trainer.get_influence_dataloader(validation), loader, basis=basis))
        timer.seconds[VALIDATION_INFLUENCE] += timer.seconds["arnoldi fit"]
    if "tracin" in args.baselines:
        scores["tracin"] = timer.run("tracin", trainer.self_influence, None, "tracin")
    top = max(args.ranks)
    if "randproj" in args.baselines:
        scores[f"randproj p̄={top}"] = timer.run(f"randproj p̄={top}", lambda: inf.self_influence(loader, method="randproj", rank=top, hessian_data=hessian_loader))
    if "fisher" in args.baselines:
        name = f"fisher eigenbasis p̄={top}"
        scores[name] = timer.run(name, lambda: inf.self_influence(loader, method="arnoldi", basis=inf.fit_fisher(hessian_loader, rank=top)))
    if "loss" in args.baselines:
        scores[recipe.loss_name] = timer.run(recipe.loss_name, recipe.loss, trainer, noisy)
    if "random" in args.baselines:
        scores["random"] = torch.rand(len(noisy), generator=torch.Generator().manual_seed(args.seed))
        timer.seconds["random"] = 0.0
    subset = _lissa_subset(trainer, inf, noisy, hessian_loader, args, timer) if "lissa" in args.baselines else {}
    return scores, subset


def _lissa_subset(trainer: Any, inf: Any, noisy: Any, hessian_loader: Any, args: Any, timer: Timer) -> dict:
    rows = sorted(random.Random(f"lissa subset {args.seed}").sample(range(len(noisy)), min(args.lissa_subset, len(noisy))))
    subset_loader = trainer.get_influence_dataloader(noisy.select(rows))

    def solve():
        config = _lissa_config(inf, hessian_loader, args)
        return config, inf.self_influence(subset_loader, method="lissa", hessian_data=hessian_loader, lissa=config)

    config, lissa = timer.run("lissa", solve)
    return {"rows": rows, "lissa": lissa, "damping": config.damping, "beside": f"arnoldi p̄={max(args.ranks)}"}


def _lissa_config(inf, hessian_loader, args):
    """Auto LiSSA settings, with at most ``LISSA_MAX_REPEATS`` repeats (one solve per row is the cost
    of this baseline); the damping is raised to twice ``|λ_min|`` where the Hessian is indefinite (the
    recursion diverges otherwise), as Koh & Liang raised it for non-convex models."""
    spectrum = inf.spectrum(hessian_loader)
    damping = args.damping
    if spectrum.lambda_min is not None and spectrum.lambda_min + damping <= 0:
        damping = 2 * -spectrum.lambda_min
    config = choose_lissa_config(spectrum, damping, len(hessian_loader.dataset), seed=args.seed)
    return dataclasses.replace(config, max_repeats=min(config.max_repeats or config.repeats, LISSA_MAX_REPEATS))


def detection_table(scores: dict[str, torch.Tensor], subset: dict, is_noisy: list[bool], seconds: dict[str, float]) -> dict[str, dict]:
    """AUC, AP and precision@k (k = the corrupted rows) of every ranking, with its seconds; LiSSA and Arnoldi on its subset."""
    metric = load_metric("noise_detection")
    table = {name: {**metric.compute(predictions=s.tolist(), references=[int(n) for n in is_noisy]), "seconds": seconds[name]}
             for name, s in scores.items()}
    if subset:
        noisy_rows = [int(is_noisy[r]) for r in subset["rows"]]
        if 0 < sum(noisy_rows) < len(noisy_rows):
            best = subset["beside"]
            table[f"lissa, λ={subset['damping']:.3g} ({len(noisy_rows)}-row subset)"] = {**metric.compute(predictions=subset["lissa"].tolist(), references=noisy_rows),
                                                                 "seconds": seconds["lissa"]}
            table[f"{best} (same subset)"] = {**metric.compute(predictions=scores[best][subset["rows"]].tolist(), references=noisy_rows),
                                              "seconds": seconds[best] * len(noisy_rows) / len(is_noisy)}
    return table


# ----------------------------------------------------------------- the saved rankings (resume)
def rankings_request(args: Any) -> str:
    """Digest of every setting a ranking depends on; saved rankings with another digest are computed again."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _AFTER_RANKING}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def rankings_save_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "rankings.safetensors"


def rankings_exist(output_dir: str | Path) -> bool:
    return rankings_save_path(output_dir).is_file()


def save_rankings(output_dir: str | Path, scores: dict[str, torch.Tensor], subset: dict, seconds: dict[str, float], request: str) -> None:
    """Scores (one tensor per ranking, in order), LiSSA's subset and the seconds, checksummed, with the request digest."""
    tensors = {f"ranking_{i}": s.float() for i, s in enumerate(scores.values())}
    if subset:
        tensors["lissa"] = subset["lissa"].float()
    meta = {"names": list(scores), "seconds": seconds, "request": request,
            "subset": {k: v for k, v in subset.items() if k != "lissa"}}
    save_tensors(rankings_save_path(output_dir), tensors, meta)


def load_rankings(output_dir: str | Path, request: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]] | None:
    """What :func:`save_rankings` wrote, or ``None`` when it was made with other settings (then they are computed again)."""
    tensors, meta = read_tensors_artifact(rankings_save_path(output_dir), "the recipe's saved rankings",
                                          "Delete it and rerun: the rankings are computed again.")
    if meta.get("request") != request:
        return None
    scores = {name: tensors[f"ranking_{i}"] for i, name in enumerate(meta["names"])}
    subset = {**meta["subset"], "lissa": tensors["lissa"]} if "lissa" in tensors else {}
    return scores, subset, meta["seconds"]

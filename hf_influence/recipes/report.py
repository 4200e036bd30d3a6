"""What a recipe run writes under ``output_dir``: ``noise.json``, ``results.json``, ``results.md``, the model card
(``README.md``) and the filtered training set with its dataset card; ``card_dir`` gets copies of both cards."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from datasets import Dataset

from .._utils.io import atomic_path
from ..outputs import save_dataset
from .cards import dataset_card, model_card
from .noise import NoiseRecord


def command_line() -> str:
    """The ``hf-influence recipe ...`` command that made this run."""
    argv = sys.argv[sys.argv.index("recipe"):] if "recipe" in sys.argv else sys.argv[1:]
    return shlex.join(["hf-influence", *argv])


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def filtering_rows(run: dict) -> list[str]:
    """The filtering table of ``results.md`` (the model card renders the same figures from its template)."""
    name = run["quality_name"]
    lines = [f"| filtered by | AUC | AP | precision@k | {name} mean ± sd | runs | vs noisy: Δ, p | vs loss filter: Δ, p | recovered | of ceiling |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for arm, row in run["filtering"].items():
        tests = [_test(row[k]) for k in ("vs_noisy", "vs_loss")]
        lines.append(f"| {row['ranking']} | {row['auc']:.3f} | {row['ap']:.3f} | {row['precision_at_k']:.3f} | {row['mean']:.4f} ± "
                     f"{_number(row['sd'], 4)} | {row['runs']} | {tests[0]} | {tests[1]} | {_share(row['recovered'])} | "
                     f"{_share(row['of_ceiling'])} |")
    ceiling = run["ceiling"]
    if ceiling:
        lines.append(f"| (ceiling: exactly the corrupted rows removed) | 1 | 1 | 1 | {ceiling['mean']:.4f} ± {_number(ceiling['sd'], 4)} | "
                     f"{ceiling['runs']} | {_test(ceiling['vs_noisy'])} | - | {_share(ceiling['recovered'])} | 100% |")
    return lines


def _test(test: dict | None) -> str:
    return f"{test['mean_difference']:+.4f}, p={_number(test['p'], 3)}" if test else "-"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def markdown(run: dict) -> str:
    """``results.md``: the detection table, the quality of every arm, and what filtering by each ranking did."""
    lines = [f"# {run['model_name']}", "", f"`{run['command']}`", "", "| ranking | AUC | AP | precision@k | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['auc']:.3f} | {r['ap']:.3f} | {r['precision_at_k']:.3f} | {r['seconds']:.1f} |" for n, r in run["detection"].items()]
    lines += ["", f"| training data | {run['quality_name']} (mean) | runs |", "|---|---:|---|"]
    lines += [f"| {n} | {sum(r) / len(r):.4f} | {', '.join(f'{x:.4f}' for x in r)} |" for n, r in run["quality"].items()]
    return "\n".join(lines + [""] + filtering_rows(run)) + "\n"


def write_outputs(run: dict, filtered: Dataset, output_dir: Path, card_dir: str | None, name: str) -> None:
    """Every file of the run (main process only)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    NoiseRecord(**run["noise"]).save(output_dir / "noise.json")
    with atomic_path(output_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(run, indent=1, default=str))
    with atomic_path(output_dir / "results.md") as tmp:
        tmp.write_text(markdown(run))
    save_dataset(filtered, output_dir / "filtered_dataset", dataset_card(run))
    model_card(run).save(str(output_dir / "README.md"))
    if card_dir:
        Path(card_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output_dir / "README.md", Path(card_dir) / f"{name}.md")
        shutil.copyfile(output_dir / "filtered_dataset" / "README.md", Path(card_dir) / f"{name}.dataset.md")

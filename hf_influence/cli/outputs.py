"""The run record the ``fit`` / ``score`` / ``filter`` subcommands keep under ``output_dir`` (written atomically),
and their console summaries. Writers shared with the recipes live in `hf_influence.outputs`.

``influence_config.json`` holds the library versions, the model, and one section per subcommand
with its settings and results; each subcommand replaces only its own section.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import Influence
from .._utils.io import read_json_artifact, write_json_artifact
from ..outputs import library_versions

RUN_CONFIG = "influence_config.json"


def model_description(inf: Influence, name_or_path: str) -> dict:
    """The model and parameter selection results refer to, with the weights' fingerprint."""
    return {"name_or_path": name_or_path, "class": type(inf.model).__name__, "fingerprint": inf.selection.fingerprint(inf.model),
            "num_params": inf.selection.num_params, "param_names": list(inf.selection.names)}


def update_run_config(output_dir: str | os.PathLike, section: str, model: dict, settings: Sequence[Any], result: dict) -> Path:
    """Replace ``section`` of ``influence_config.json`` (settings = the command's argument dataclasses)."""
    path = Path(output_dir) / RUN_CONFIG
    config = read_run_config(output_dir)
    config.update({"versions": library_versions(), "model": model})
    config[section] = {"settings": {k: v for args in settings for k, v in dataclasses.asdict(args).items()},
                       "model_fingerprint": model["fingerprint"], "result": result}
    return write_json_artifact(path, config)


def read_run_config(output_dir: str | os.PathLike) -> dict:
    """``output_dir/influence_config.json`` (``{}`` if absent). A damaged one is refused, never overwritten: the
    `DamagedArtifactError` says to delete it (it only records earlier commands; the files beside it are kept).
    The run wrapper calls this before any model is loaded."""
    path = Path(output_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    remedy = (f"Delete it (or move it aside) and rerun the command: it only records the settings and results of earlier "
              f"commands in {path.parent}, and the basis, scores and shards beside it are kept.")
    return read_json_artifact(path, "the run record of hf-influence", remedy)


def noise_labels(raw: Any, column: str) -> np.ndarray | None:
    """``[N]`` bool from ``raw[column]`` when the training data has that column, else ``None``."""
    return np.asarray(raw[column], dtype=bool) if column in raw.column_names else None


def print_table(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    """A two-column summary table on stdout (floats to 4 significant digits)."""
    width = max(len(name) for name, _ in rows)
    cells = [(name, f"{value:.4g}" if isinstance(value, float) else str(value)) for name, value in rows]
    rule = "-" * min(100, width + 2 + max(len(cell) for _, cell in cells))
    print(f"\n{title}\n{rule}")
    for name, cell in cells:
        print(f"{name:<{width}}  {cell}")
    print(rule)


def listing(output_dir: str | os.PathLike) -> str:
    """The visible entries of ``output_dir``, folders marked with a slash."""
    entries = sorted(p for p in Path(output_dir).iterdir() if not p.name.startswith("."))
    return ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries)

"""Files the ``fit`` / ``score`` / ``filter`` subcommands write under ``output_dir``, all atomically.

``influence_config.json`` holds the library versions, the model, and one section per subcommand
with its settings and results; each subcommand replaces only its own section.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import Influence
from .._utils.io import atomic_dir, atomic_path

RUN_CONFIG = "influence_config.json"
ROW_INDEX = "row_index"
_LIBRARIES = ("hf_influence", "torch", "transformers", "accelerate", "datasets", "safetensors", "faiss-cpu")


def library_versions() -> dict[str, str | None]:
    """Python and the installed versions of the libraries results depend on (``None``: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_description(inf: Influence, name_or_path: str) -> dict:
    """The model and parameter selection results refer to, with the weights' fingerprint."""
    return {"name_or_path": name_or_path, "class": type(inf.model).__name__, "fingerprint": inf.selection.fingerprint(inf.model),
            "num_params": inf.selection.num_params, "param_names": list(inf.selection.names)}


def update_run_config(output_dir: str | os.PathLike, section: str, model: dict, settings: Sequence[Any], result: dict) -> Path:
    """Replace ``section`` of ``influence_config.json`` (settings = the command's argument dataclasses)."""
    path = Path(output_dir) / RUN_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update({"versions": library_versions(), "model": model})
    config[section] = {"settings": {k: v for args in settings for k, v in dataclasses.asdict(args).items()},
                       "model_fingerprint": model["fingerprint"], "result": result}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2, default=str))
    return path


def write_parquet(path: str | os.PathLike, columns: dict[str, Any]) -> Path:
    """One parquet table from equal-length columns (tensors, arrays or lists)."""
    table = pa.table({name: np.asarray(values) for name, values in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def save_dataset(dataset: Any, path: str | os.PathLike, card: Any = None) -> Path:
    """``dataset.save_to_disk`` into a fresh folder that replaces ``path``; ``card`` is saved as its README.md."""
    with atomic_dir(path) as tmp:
        dataset.save_to_disk(str(tmp))
        if card is not None:
            card.save(str(tmp / "README.md"))
    return Path(path)


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

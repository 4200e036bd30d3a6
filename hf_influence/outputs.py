"""Output helpers every run writer shares (the CLI, the recipes, the demo): the row-index column, library
versions, and atomic parquet / dataset writes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._utils.io import atomic_dir, atomic_path

ROW_INDEX = "row_index"  # column holding each row's position in the original training set
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

"""Seeded, recorded synthetic noise, so that noise detection can be scored (Schioppa et al. 2023 setups).

Every function returns the corrupted dataset with an ``is_noisy`` column and a `NoiseRecord` that
says exactly what was done (kind, fraction, seed, rows); the same call with the same seed gives
the same corruption on any machine.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset

from .._utils.errors import InvalidInputError
from .._utils.io import damaged_artifact, read_json_artifact, write_json_artifact

NOISY_COLUMN = "is_noisy"


@dataclass(frozen=True)
class NoiseRecord:
    """What a noise injection did.

    Attributes:
        kind (`str`): ``"label_flip"`` or ``"permuted_references"``.
        column (`str`): the column corrupted.
        fraction (`float`): share of rows asked for; ``rows`` holds the ``round(fraction · N)`` chosen.
        seed (`int`): the seed of the choice and of the new values.
        num_rows (`int`): size of the dataset.
        rows (`list[int]`): the corrupted rows, ascending.
    """

    kind: str
    column: str
    fraction: float
    seed: int
    num_rows: int
    rows: list[int]

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON (atomically, with a checksum)."""
        return write_json_artifact(path, asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NoiseRecord":
        """Read a record written by :meth:`save`; a damaged file raises `DamagedArtifactError`."""
        remedy = "Rerun the recipe, which writes it again (the same seed gives the same noise)."
        saved = read_json_artifact(path, "a noise record", remedy, keys=tuple(cls.__dataclass_fields__))
        unknown = sorted(set(saved) - set(cls.__dataclass_fields__))
        if unknown:
            raise damaged_artifact(path, "a noise record", f"it has unknown keys {unknown}", remedy)
        return cls(**saved)


def _choose_rows(dataset: Dataset, column: str, fraction: float, rng: random.Random, minimum: int = 1) -> list[int]:
    if column not in dataset.column_names:
        raise InvalidInputError(f"Cannot corrupt column {column!r}: the dataset has {dataset.column_names}.")
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"noise fraction must be in (0, 1), got {fraction}.")
    count = int(round(fraction * len(dataset)))
    if count < minimum:
        raise InvalidInputError(f"noise fraction {fraction} of {len(dataset)} rows corrupts {count} rows; at least {minimum} are needed.")
    return sorted(rng.sample(range(len(dataset)), count))


def _replace_column(dataset: Dataset, column: str, values: list, rows: list[int]) -> Dataset:
    noisy = set(rows)
    features = dataset.features[column]
    dataset = dataset.remove_columns(column).add_column(column, values, feature=features)
    if NOISY_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(NOISY_COLUMN)
    return dataset.add_column(NOISY_COLUMN, [i in noisy for i in range(len(dataset))])


def flip_labels(dataset: Dataset, fraction: float, seed: int, column: str = "label", num_labels: int | None = None) -> tuple[Dataset, NoiseRecord]:
    """Give a seeded ``fraction`` of rows a different class, uniformly among the others.

    Args:
        dataset (`datasets.Dataset`): with an integer class column.
        fraction (`float`): share of rows flipped, in ``(0, 1)``.
        seed (`int`): seeds the rows and the new classes.
        column (`str`, defaults to `"label"`): the class column.
        num_labels (`int`, *optional*): number of classes; defaults to the column's ``ClassLabel`` size.
    """
    num_labels = num_labels or getattr(dataset.features.get(column), "num_classes", None)
    if not num_labels or num_labels < 2:
        raise InvalidInputError(f"flip_labels needs num_labels >= 2 (column {column!r} is not a ClassLabel: pass num_labels=).")
    rng = random.Random(seed)
    rows = _choose_rows(dataset, column, fraction, rng)
    labels = list(dataset[column])
    for row in rows:
        labels[row] = (labels[row] + rng.randrange(1, num_labels)) % num_labels
    return _replace_column(dataset, column, labels, rows), NoiseRecord("label_flip", column, fraction, seed, len(dataset), rows)


def permute_references(dataset: Dataset, fraction: float, seed: int, column: str = "target") -> tuple[Dataset, NoiseRecord]:
    """Shuffle the references of a seeded ``fraction`` of rows among themselves, no row keeping its own.

    Schioppa et al. permute 6% of the target sides of a translation corpus: each chosen source is
    then paired with another chosen row's reference (a cyclic shift of a random order, so none stays).
    """
    rng = random.Random(seed)
    rows = _choose_rows(dataset, column, fraction, rng, minimum=2)
    order = rows[:]
    rng.shuffle(order)
    original = list(dataset[column])
    targets = original[:]
    for here, there in zip(order, order[1:] + order[:1]):
        targets[here] = original[there]
    return _replace_column(dataset, column, targets, rows), NoiseRecord("permuted_references", column, fraction, seed, len(dataset), rows)

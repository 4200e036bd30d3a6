"""Checks on the examples a run is given, made before any work: columns, lengths, token ids, labels.

A ``datasets.Dataset`` is checked column by column through Arrow: the cost is a scan of its token
and label columns, not a forward pass. So is a ``DataLoader`` over one that batches with
``PaddingCollator``. Other data is not scanned: a ``DataLoader`` with its own collator (the
Trainer's, say) may rename, add or truncate columns on the way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from ._utils.errors import InvalidInputError
from .data import PaddingCollator
from .tasks import SequenceClassificationTask

TOKEN_COLUMNS = ("input_ids", "decoder_input_ids")
SEQUENCE_COLUMNS = ("input_ids", "decoder_input_ids", "labels")
IGNORE_INDEX = -100
_SHOWN_ROWS = 5


@dataclass(frozen=True)
class InputLimits:
    """What a model and task accept.

    Attributes:
        required (`tuple[str, ...]`): columns the task reads.
        max_positions (`int`, *optional*): longest sequence the position embeddings cover (``None``: no limit).
        vocab_size (`int`, *optional*): token ids must lie in ``[0, vocab_size)``.
        num_classes (`int`, *optional*): single-label classification: labels must lie in ``[0, num_classes)``.
    """

    required: tuple[str, ...]
    max_positions: int | None
    vocab_size: int | None
    num_classes: int | None


def input_limits(model: nn.Module, task: Any) -> InputLimits:
    """The limits of ``model`` (from its config) and ``task`` (its ``required_columns``, if it declares them)."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    num_labels, problem = getattr(config, "num_labels", None), getattr(config, "problem_type", None)
    single_label = isinstance(task, SequenceClassificationTask) and problem in (None, "single_label_classification")
    return InputLimits(
        tuple(getattr(task, "required_columns", ())), positions, getattr(config, "vocab_size", None),
        num_labels if single_label and num_labels is not None and num_labels > 1 else None,
    )


def check_examples(data: Any, limits: InputLimits, role: str) -> None:
    """Raise `InvalidInputError` naming the rows of ``data`` the model cannot use, and how to fix them."""
    if isinstance(data, DataLoader) and not isinstance(data.collate_fn, PaddingCollator):
        return
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not (hasattr(dataset, "column_names") and hasattr(dataset, "with_format")) or len(dataset) == 0:
        return
    missing = [c for c in limits.required if c not in dataset.column_names]
    if missing:
        raise InvalidInputError(
            f"The {role} has no column(s) {missing} (it has {dataset.column_names}); the task reads {list(limits.required)}. "
            "Rename its columns (dataset.rename_column), or on the command line set --label_column / --text_column."
        )
    table = dataset.select_columns([c for c in SEQUENCE_COLUMNS if c in dataset.column_names]).with_format("arrow")[:]
    for column in table.column_names:
        _check_column(table.column(column).combine_chunks(), column, limits, role)


def _check_column(values: Any, column: str, limits: InputLimits, role: str) -> None:
    """One column's lengths, token ids or labels (a list column holds one sequence per row)."""
    import pyarrow as pa

    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        lengths = values.value_lengths().to_numpy(zero_copy_only=False)
        flat = values.flatten().to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(len(lengths)), lengths)
    else:
        lengths, flat, rows = None, values.to_numpy(zero_copy_only=False), np.arange(len(values))
    integer = np.issubdtype(flat.dtype, np.integer)
    if lengths is not None and integer and limits.max_positions is not None and (too_long := lengths > limits.max_positions).any():
        raise InvalidInputError(
            f"The {role} has sequences longer than the model allows: {column} of {_rows(too_long)} has up to "
            f"{int(lengths.max())} tokens, the model's position embeddings cover {limits.max_positions}. Truncate when "
            f"tokenizing (truncation=True, max_length={limits.max_positions}; on the command line --max_length)."
        )
    if lengths is not None and column in TOKEN_COLUMNS and (empty := lengths == 0).any():
        raise InvalidInputError(
            f"The {role} has empty sequences: {column} of {_rows(empty)} holds no token. Drop those rows (dataset.filter)."
        )
    if column in TOKEN_COLUMNS and limits.vocab_size is not None:
        _check_token_ids(flat, rows, len(values), column, limits.vocab_size, role)
    if column == "labels" and integer:
        _check_labels(flat, rows, len(values), limits.num_classes if lengths is None else None, role)


def _check_token_ids(flat: np.ndarray, rows: np.ndarray, num_rows: int, column: str, vocab_size: int, role: str) -> None:
    outside = (flat < 0) | (flat >= vocab_size)
    if outside.any():
        raise InvalidInputError(
            f"The {role} has token ids outside the model's vocabulary [0, {vocab_size}): {column} of "
            f"{_rows(_row_mask(rows[outside], num_rows))} (e.g. id {int(flat[outside][0])}). It was tokenized with "
            "another tokenizer: tokenize with the model's own (--tokenizer_name_or_path on the command line)."
        )


def _check_labels(flat: np.ndarray, rows: np.ndarray, num_rows: int, num_classes: int | None, role: str) -> None:
    targets = np.bincount(rows[flat != IGNORE_INDEX], minlength=num_rows)  # [N] labels that count, per row
    if (no_target := targets == 0).any():
        raise InvalidInputError(
            f"The {role} has examples whose labels are all {IGNORE_INDEX} (or empty): {_rows(no_target)}. Their loss, "
            "gradient and influence would be 0. Drop them (dataset.filter), or tokenize with a larger max_length so "
            "the target survives truncation."
        )
    if num_classes is not None and (outside := (flat < 0) | (flat >= num_classes)).any():
        raise InvalidInputError(
            f"The {role} has class labels outside [0, {num_classes}) (the model's num_labels): {_rows(_row_mask(rows[outside], num_rows))} "
            f"(e.g. {flat[outside][0].item()!r}). Map the labels to 0..{num_classes - 1}, or use a model with as many labels as classes."
        )


def _row_mask(rows: np.ndarray, num_rows: int) -> np.ndarray:
    mask = np.zeros(num_rows, dtype=bool)
    mask[rows] = True
    return mask


def _rows(mask: np.ndarray) -> str:
    """``rows [3, 17] (2 of 100)`` for a ``[N]`` bool mask."""
    found = np.flatnonzero(mask)
    shown = ", ".join(str(int(i)) for i in found[:_SHOWN_ROWS]) + (", ..." if len(found) > _SHOWN_ROWS else "")
    return f"rows [{shown}] ({len(found)} of {len(mask)})"

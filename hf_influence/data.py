"""Batches from a tokenized ``datasets.Dataset`` or a ``DataLoader``, row selection, and per-example mask helpers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch.utils.data import DataLoader, SequentialSampler, Subset

from ._utils.errors import InvalidInputError

Batch = dict[str, torch.Tensor]
_PAD_WITH_ZERO = ("attention_mask", "decoder_attention_mask", "token_type_ids", "special_tokens_mask")


class PaddingCollator:
    """Pad the numeric columns of dataset rows into a batch; string columns are dropped.

    ``input_ids``/``decoder_input_ids`` pad with ``pad_token_id``, masks and token types with 0,
    sequence ``labels`` with -100 (ignored by the loss). Padding is on the right, and columns that are padding in
    every row (rows that came padded to a fixed length) are cut (:func:`trim_padding`).
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> Batch:
        columns = [k for k, v in rows[0].items() if _is_numeric(v)]
        return trim_padding({key: self._stack(key, [row[key] for row in rows]) for key in columns})

    def _stack(self, key: str, values: list[Any]) -> torch.Tensor:
        tensors = [torch.as_tensor(v) for v in values]
        if tensors[0].dim() == 0:
            return torch.stack(tensors)
        fill = -100 if key == "labels" else 0 if key in _PAD_WITH_ZERO else self.pad_token_id
        return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=fill)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return len(value) == 0 or isinstance(value[0], (int, float, bool))
    return isinstance(value, (int, float, bool))


def make_loader(data: Any, batch_size: int, pad_token_id: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``data`` in its original order (a ``DataLoader`` is returned as is)."""
    if isinstance(data, DataLoader):
        return data
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise InvalidInputError(
            f"Expected a tokenized datasets.Dataset or a torch DataLoader, got {type(data).__name__}."
        )
    if len(data) == 0:
        raise InvalidInputError("The dataset is empty: influence needs at least one example.")
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=PaddingCollator(pad_token_id))


def length_sorted_batches(data: Any, batch_size: int, pad_token_id: int = 0, rows_of_longest: int | None = None) -> list[Batch]:
    """Batches of at most ``batch_size`` rows of ``data`` in order of length (stable), each cut to its longest row
    (``PaddingCollator``); with ``rows_of_longest``, a batch of several rows also holds at most as many padded tokens as
    that many of the longest rows of ``data``. For passes whose result is a sum over rows (the Hessian of the mean loss,
    the Fisher), where the order of rows is free and padding is wasted work. A ``DataLoader`` keeps its own batches, trimmed."""
    if isinstance(data, DataLoader):
        return [trim_padding(batch) for batch in data]
    lengths = [max(n, 1) for n in row_lengths(data)]
    max_tokens = None if rows_of_longest is None else rows_of_longest * max(lengths, default=1)
    groups: list[list[int]] = [[]]
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):  # lengths only grow: a batch's longest row is its last
        group = groups[-1]
        if group and (len(group) == batch_size or (max_tokens is not None and (len(group) + 1) * lengths[index] > max_tokens)):
            groups.append(group := [])
        group.append(index)
    return list(DataLoader(data, batch_sampler=[g for g in groups if g], collate_fn=PaddingCollator(pad_token_id)))


def longest_rows(data: Any, count: int, pad_token_id: int = 0) -> Batch:
    """The ``count`` longest rows of ``data`` as one batch (``PaddingCollator``, or a ``DataLoader``'s own ``collate_fn``):
    the largest a batch of ``count`` rows of ``data`` can be, whatever rows it draws. Reads every row's length."""
    dataset = dataset_of(data)
    lengths = row_lengths(dataset)
    rows = sorted(range(len(lengths)), key=lengths.__getitem__)[-count:]
    collate = data.collate_fn if isinstance(data, DataLoader) else PaddingCollator(pad_token_id)
    return trim_padding(collate([dataset[i] for i in rows]))


def row_lengths(data: Any) -> list[int]:
    """Tokens per row: ones in ``attention_mask`` when the rows have one, else the length of ``input_ids`` (0 without)."""
    columns = getattr(data, "column_names", None)
    if columns is not None and "attention_mask" in columns:  # a datasets.Dataset: read the column at once
        return [int(torch.as_tensor(mask).ne(0).sum()) for mask in data["attention_mask"]]
    return [_row_length(data[i]) for i in range(len(data))]


def _row_length(row: dict[str, Any]) -> int:
    if "attention_mask" in row:
        return int(torch.as_tensor(row["attention_mask"]).ne(0).sum())
    return int(torch.as_tensor(row.get("input_ids", ())).numel())


_TRIMMED = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "position_ids", "labels")


def trim_padding(batch: Batch) -> Batch:
    """``batch`` without its trailing columns that are padding in every row: ``attention_mask`` 0 and, for ``labels``
    of the same length ``T``, -100 (columns of length ``T``, e.g. ``[1, T]`` position ids, are cut alike). With right padding the model's outputs at the kept tokens and every loss term are
    unchanged (the dropped keys were masked, the dropped targets ignored, and a causal decoder never reads later
    positions). The batch is returned as is when a 2-D mask is missing or another column of length ``T`` has unknown meaning."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return batch
    same_shape = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == mask.shape[1]]
    if any(k not in _TRIMMED or batch[k].shape[0] not in (1, mask.shape[0]) for k in same_shape):
        return batch
    used = mask.ne(0).any(dim=0)  # [T]
    if "labels" in same_shape:
        targets = batch["labels"].reshape(batch["labels"].shape[0], mask.shape[1], -1)  # [B, T, ...]
        used |= targets.ne(-100).any(dim=2).any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    if length == mask.shape[1]:
        return batch
    return {k: v[:, :length] if k in same_shape else v for k, v in batch.items()}


def dataset_of(data: Any) -> Any:
    """The dataset behind ``data`` (a ``DataLoader``'s ``dataset``, else ``data`` itself)."""
    return data.dataset if isinstance(data, DataLoader) else data


def select_rows(data: Any, rows: list[int]) -> Any:
    """The given rows of ``data``, in that order; a ``DataLoader`` keeps its batch size and collator."""
    dataset = dataset_of(data)
    subset = dataset.select(rows) if hasattr(dataset, "select") else Subset(dataset, rows)
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size, collate_fn=data.collate_fn)
    return subset


def check_in_order(train_data: Any) -> None:
    """Candidate indices are dataset rows, so a training ``DataLoader`` must iterate in dataset order."""
    if isinstance(train_data, DataLoader) and not isinstance(train_data.sampler, SequentialSampler):
        raise InvalidInputError(
            "With knn=, the training DataLoader must iterate in dataset order (shuffle=False, no custom sampler): "
            f"its sampler is a {type(train_data.sampler).__name__}. Pass the Dataset, or a DataLoader with shuffle=False."
        )


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_size_of(batch: Batch) -> int:
    return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]


def batch_tokens(batch: Batch) -> int:
    """Rows × columns of the batch's widest tensor: what its activations grow with."""
    widths = [value.shape[1] for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() >= 2]
    return batch_size_of(batch) * max(widths, default=1)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}


def additive_mask(attention_mask: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Turn a ``[B, T]`` 0/1 padding mask into a 4-D additive float mask.

    ``kind="bidirectional"`` gives ``[B, 1, 1, T]``; ``"causal"`` gives ``[B, 1, T, T]`` that also
    hides future tokens. HF models accept 4-D masks as they are, which lets ``vmap`` run (the 2-D
    path inspects mask values in Python, which ``vmap`` cannot trace).
    """
    allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if kind == "causal":
        length = attention_mask.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = allowed & causal[None, None]  # [B, 1, T, T]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class RandomBatches:
    """Random minibatches for stochastic Hessians, drawn with the caller's generator.

    From a ``Dataset``: ``batch_size`` distinct indices per draw, padded by ``PaddingCollator``.
    From a ``DataLoader``: indices into its ``dataset``, collated by its own ``collate_fn``.
    """

    def __init__(self, data: Any, batch_size: int, pad_token_id: int):
        if isinstance(data, DataLoader):
            self.dataset, self.collate = data.dataset, data.collate_fn
        else:
            self.dataset, self.collate = data, PaddingCollator(pad_token_id)
        if len(self.dataset) == 0:
            raise InvalidInputError("The Hessian data is empty: pass at least one training example.")
        self.batch_size = min(batch_size, len(self.dataset))

    def sample(self, generator: torch.Generator) -> Batch:
        idx = torch.randperm(len(self.dataset), generator=generator)[: self.batch_size].tolist()
        return self.collate([self.dataset[i] for i in idx])


def dataset_fingerprint(data: Any) -> str:
    """SHA-256 of the numeric columns' contents in row order: the same rows give the same hash in any
    process, however the dataset was built (``datasets``' own ``_fingerprint`` tracks the operations
    instead, and can differ for equal contents). A ``datasets.Dataset`` is hashed through Arrow."""
    dataset = dataset_of(data)
    digest = hashlib.sha256(f"rows:{len(dataset)}".encode())
    if len(dataset) == 0:
        return digest.hexdigest()
    columns = sorted(k for k, v in dataset[0].items() if _is_numeric(v))
    if hasattr(dataset, "select_columns") and hasattr(dataset, "with_format"):
        digest.update(_arrow_bytes(dataset.select_columns(columns)))
        return digest.hexdigest()
    for index in range(len(dataset)):
        row = dataset[index]
        digest.update(json.dumps([torch.as_tensor(row[k]).tolist() for k in columns]).encode())
    return digest.hexdigest()


def _arrow_bytes(dataset: Any) -> bytes:
    """The rows of a ``datasets.Dataset`` (row selections applied) as one Arrow IPC stream."""
    import pyarrow as pa

    table = dataset.with_format("arrow")[:].combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()

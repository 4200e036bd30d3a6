"""Rank, world size and collectives; identity when torch.distributed is not initialised."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import InvalidInputError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """``tensor`` as process ``source`` holds it, on every process (in place); returned."""
    if is_distributed():
        dist.broadcast(tensor, src=source)
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` (``[n_r, d]``, ``n_r`` may differ) stacked in rank order: ``[Σ n_r, d]``."""
    if not is_distributed():
        return rows
    counts = [int(n) for n in all_gather_objects(rows.shape[0])]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:n] for part, n in zip(gathered, counts)])


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` on one process."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def local_share(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every ``world_size()``-th one from index ``rank()``."""
    return list(items[rank() :: world_size()])


def check_same_everywhere(value: Any, what: str) -> None:
    """Refuse to go on unless every process holds the same ``value``, listing each process's view."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        views = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise InvalidInputError(f"Every process must pass the same {what} to a data-parallel fit, got {views}. "
                                "Give each process the same data (same rows, order and batch size).")
